"""Load generator: popproxy in front of a real Dovecot, against Dovecot direct
and against trio's floor (a minimal trio relay), with issue 16's bars.

Run from the repository root::

    python -m benchmarks.run            # the full run (about 90 s on 2 cores)
    python -m benchmarks.run --quick    # a smoke run: fewer rounds, smaller sizes
    python -m benchmarks.run --repeat 2 # twice, with each figure's spread
    python -m benchmarks.run --bare     # popproxy without audit, metrics, info logs
    python -m benchmarks.run --no-floor # without the trio-sockio relay
    python -m benchmarks.run --json results.json
    python -m benchmarks.run --only noop,pipeline --profile /tmp/prof   # py-spy
    python -m benchmarks.run --baseline main --only noop,sessions,concurrent,pipeline
    python -m benchmarks.run --baseline HEAD~3 --repeat 2 --quick

It starts one private Dovecot (``tests/dovecot.py``) on a free loopback
port, delivers the test messages, and starts in front of it, each as a
separate process on its own free port:

- the proxy, ``python -m popproxy run -c FILE``;
- the floor, ``python -m benchmarks.floor --relay-config trio-sockio FILE``:
  the least a trio relay can do per forwarded chunk (two pumps on
  ``popproxy.sockio``, no POP3 logic, no observers).  Issue 16 measures the
  proxy against it: what the proxy spends above it is its own Python.
  ``--no-floor`` leaves it out.

Every scenario then measures the targets DIRECT (client -> Dovecot), the
PROXY and the FLOOR in turn, in rounds (direct first; the proxy and the
relay swap places every other round), so that machine noise hits all alike:

1. RETR throughput of a 20 MiB and a 100 MiB message, and the proxy's RSS
   while it streams the 100 MiB one (sampled every 2 ms, and the kernel's
   peak-RSS mark reset before the transfer).
2. NOOP round trip p50/p99 on one logged-in session per target, in blocks
   of 1,000.
3. One client doing full sessions back to back (greeting, USER, PASS, STAT,
   UIDL, RETR 1, QUIT): latency per session and per step, the session rate,
   and the steps slower than 35 ms (the Nagle / delayed-ACK trap costs 40 ms).
4. Full sessions per second with 50 concurrent clients (one user each).
5. 1,000 pipelined LIST n / UIDL n commands in one write.
6. Proxy RSS per idle logged-in session at 1,000 open sessions (on a fresh
   proxy process, so that memory freed by earlier scenarios is not reused;
   the relay is not measured here).

The CPU figures are each process's CPU time (user + system, all threads,
read from its POSIX CPU-time clock) while it was being measured, divided by
what it did in that time: per NOOP round trip (scenario 2), per full
session (scenario 3, one client, and scenario 4, 50 clients), per
pipelined command and per MB streamed.  The proxy's and the relay's are
measured the same way, so their difference is the proxy's own work.

The proxy runs as in production unless ``--bare``: the configuration of
``docs/audit.md``'s example and the deployment example, that is

- ``[audit] sink = "file"`` with ``path`` in the run's temporary directory,
  ``hash_chain = true`` (the default), ``fsync = "session"`` (the default,
  and what both examples use: ``fdatasync`` in the audit's own thread once
  a session's last record is written, group-committed at most every 50 ms),
  ``rotate_size = "100MiB"`` (the example's; a run writes far less),
  ``commands = "all"`` (the default: a record per command);
- ``[metrics] address = "127.0.0.1:0"``: the HTTP endpoint up (scraped once
  after each run, to prove it), metrics counted for every event;
- ``[log] level = "info"`` (the default): three lines per session, to the
  proxy's standard output (a file here, as under journald).

``--bare`` is the configuration earlier runs used: no audit, no metrics
endpoint, log level ``warning``.  Running both shows what the observers
cost.  The relay never has any of these.

Issue 16's bars are rows of the table, each with its verdict (met or
MISSED): proxy CPU per NOOP round trip ≤ 90 µs; proxy CPU per full session
≤ 1.0 ms (judged on both the one-client and the 50-client figure); NOOP p50
≤ the relay's p50 in the same run + 25 µs; 1,000 pipelined commands ≤ 3x
direct; full sessions per second with 50 clients ≥ 0.6x direct; and the
bars it keeps: RETR ≥ 0.9x direct, RSS growth while streaming ≤ 10 MiB,
zero steps slower than 35 ms, ≤ 32 KiB per idle session
(``benchmarks/_bars.py``).  The relay's own figures (CPU per NOOP and per
session, p50s, rates) are in its column, so the gap to the floor shows.
A second table gives every figure per target with the proxy / direct and
proxy / relay ratios, both of medians and "paired" (the median of the
rounds' own ratios, which a drift of the machine between rounds moves
less); then the per-step latencies of scenario 3 and each process's CPU
while measured.

``--repeat N`` runs the chosen scenarios N times, each run with freshly
started proxy and relay processes (Dovecot stays), and ends with each
figure's spread (min-max) with every run's ratios, and each bar's verdict
in every run ("met in k of N"): this 2-core VM drifts by up to 1.5x
within minutes, and a process can keep a bias of its own for its lifetime,
so one run's ratio is not the noise.  ``--only`` also takes ``sessions``
(= sequential), ``retr`` (= throughput) and ``rss`` (= idle).

A/B mode: ``--baseline REV`` (any git revision of this repository) exports
``popproxy/`` as of REV (``git archive``, into the run's temporary
directory) and starts a second proxy from it beside the current tree's,
with the same interpreter, virtualenv and configuration, in front of the
same Dovecot.  Both proxies are started the same way (``runpy``, with the
editable install's import finder dropped: see ``_ab.TREE_LAUNCHER``), so
that they differ in their code only, and a child run the same way first
proves where each one's ``popproxy`` comes from.  Every scenario then
measures four targets interleaved, direct, baseline, current and the relay
(three without it; the order of the last three reverses every other round,
so the two proxies stay adjacent and swap places), and the figures table
gives each figure for all of them with the current / baseline ratio, both
of medians and paired, and each proxy's CPU per NOOP, session, pipelined
command and MB.  Scenario 4 runs twice as many rounds, half as long, in
this mode.

Dovecot runs in its documented high-performance mode (login processes
serve many connections, mail processes are reused); with
``--dovecot-default-processes`` it forks a login and a mail process per
connection as it does out of the box, which on a small machine makes
Dovecot's process churn, not the proxy, the limit of the session rate.

Every loop is bounded in count and in time; everything is on 127.0.0.1 with
ports picked by binding port 0; Dovecot, the proxies and the relay are
stopped on exit, Ctrl-C, SIGTERM and errors.  MB/s means 10^6 octets per
second of the raw reply.  ``python -m benchmarks.floor`` compares the NOOP
round trips of all of its relays; ``--relay MODE`` puts one of them in the
proxy's place here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import trio

from benchmarks import _bars
from benchmarks._ab import (
    TREE_LAUNCHER,
    Figure,
    Revision,
    check_source,
    describe_worktree,
    export_package,
    render_figures,
    render_spread,
    resolve_revision,
)
from benchmarks._bars import Row, render_bars_over_runs, render_table
from benchmarks._client import (
    AsyncConn,
    ClientErrors,
    Conn,
    ProtocolFailure,
    full_session,
    session_round,
)
from benchmarks._procs import (
    CLI_LAUNCHER,
    REPO_ROOT,
    CpuMeter,
    ProxyProcess,
    RssSampler,
    dovecot_extra_config,
    proc_status_kib,
    raise_fd_limit,
    reset_peak_rss,
)
from benchmarks._profile import record, summarize
from benchmarks.floor import RELAYS
from tests.dovecot import SAMPLE_MESSAGES, Dovecot, dovecot_binary, ensure_dovecot

MIB = 1 << 20
SLOW_STEP = 0.035  # seconds; a 40 ms delayed-ACK stall is above it
SESSION_STEPS = ("greeting", "USER", "PASS", "STAT", "UIDL", "RETR 1", "QUIT")
#: The relay measured beside the proxy as trio's floor (issue 16).
FLOOR_RELAY = "trio-sockio"
FLOOR_LAUNCHER: tuple[str, ...] = ("-m", "benchmarks.floor", "--relay-config", FLOOR_RELAY)


# --------------------------------------------------------------------------
# Settings, targets, results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    sizes_mib: tuple[int, ...] = (20, 100)
    retr_rounds: int = 5
    noop_total: int = 20_000
    noop_block: int = 1_000
    seq_sessions: int = 300
    seq_block: int = 25
    seq_seconds: float = 60.0  # per target
    conc_clients: int = 50
    conc_seconds: float = 5.0
    conc_rounds: int = 3
    pipeline_cmds: int = 1_000
    pipeline_rounds: int = 7
    pipeline_messages: int = 20
    idle_sessions: int = 1_000
    idle_concurrency: int = 25

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            sizes_mib=(2, 10), retr_rounds=2, noop_total=2_000, noop_block=500,
            seq_sessions=30, seq_block=10, seq_seconds=15.0, conc_clients=50,
            conc_seconds=1.5, conc_rounds=1, pipeline_cmds=1_000, pipeline_rounds=2,
            idle_sessions=100,
        )

    def for_ab(self) -> Settings:
        """The same time in twice as many, half as long, concurrent rounds.

        With three targets a 5 s round puts 10 s between the two proxies'
        turns, and the session rate of this machine drifts by 1.5x within a
        minute: shorter rounds pair the two proxies' turns more closely.
        """
        return dataclasses.replace(self, conc_rounds=self.conc_rounds * 2,
                                   conc_seconds=self.conc_seconds / 2)


@dataclass(frozen=True)
class Target:
    name: str  # "direct" | "baseline" | "proxy" (the current tree's) | "floor"
    host: str
    port: int
    pid: int | None = None  # a proxy's or the relay's process, whose CPU is metered


#: Column titles of the targets; "proxy" is "Current" in an A/B run.
LABELS = {"direct": "Direct", "baseline": "Baseline", "proxy": "Proxy",
          "floor": f"{FLOOR_RELAY} relay"}
AB_LABELS = LABELS | {"proxy": "Current"}


@dataclass
class Env:
    """The processes under test and one run's findings.

    ``baseline``: the proxy started from an earlier revision's tree, in an
    A/B run; it is measured as a target named "baseline", between direct
    and the current tree's "proxy".  ``floor``: the trio-sockio relay,
    measured last, as "floor" (None with ``--no-floor``).  ``proxy_config``:
    the TOML every popproxy process of the run gets beyond the generated
    sections, given its working directory (audit file, metrics), and
    ``log_level`` its log level.
    """

    settings: Settings
    dovecot: Dovecot
    proxy: ProxyProcess
    workdir: Path
    users: dict[str, str]
    conc_users: list[str]
    baseline: ProxyProcess | None = None
    floor: ProxyProcess | None = None
    proxy_config: Callable[[Path], str] = lambda _: ""
    log_level: str = "warning"
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    # target name -> scenario -> CPU facts
    cpu: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)

    @property
    def direct(self) -> Target:
        return Target("direct", self.dovecot.host, self.dovecot.port)

    @property
    def popproxies(self) -> dict[str, ProxyProcess]:
        """The popproxy processes by target name: "baseline" (A/B runs) and "proxy"."""
        out = {} if self.baseline is None else {"baseline": self.baseline}
        return out | {"proxy": self.proxy}

    @property
    def proxies(self) -> dict[str, ProxyProcess]:
        """Every process between the client and Dovecot, by target name, in
        the order of ``order(0)``: the popproxies, then the relay ("floor")."""
        out = self.popproxies
        return out if self.floor is None else out | {"floor": self.floor}

    @property
    def targets(self) -> tuple[Target, ...]:
        return self.order(0)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.targets)

    def order(self, round_: int) -> tuple[Target, ...]:
        """The targets in the order round ``round_`` measures them (see ``turns``)."""
        proxies = {name: Target(name, p.host, p.port, p.pid)
                   for name, p in self.proxies.items()}
        return (self.direct, *(proxies[name] for name in turns(list(proxies), round_)))

    def cpu_meters(self) -> Meters:
        return Meters({name: CpuMeter(p.pid) for name, p in self.proxies.items()})

    def check_alive(self) -> None:
        for p in self.proxies.values():
            p.check_alive()

    def figure(self, key: str, label: str, values: dict[str, float], digits: int = 1,
               rounds: dict[str, list[float]] | None = None) -> None:
        self.figures.append(Figure(key, label, values, digits, rounds or {}))

    def record_cpu(self, scenario: str, meters: Meters, units: Mapping[str, Sequence[float]],
                   unit: str, scale: float, per: str, key: str, label: str,
                   ) -> dict[str, float]:
        """Each proxy's (and the relay's) CPU while it was measured: busy
        share and CPU per unit; returns the CPU per unit by target name.

        ``units``: per proxy, the units (NOOPs, sessions, MB...) of each
        block it measured, in order.  Also a figure ``key`` (``label``):
        the CPU per unit of each proxy, and per block.
        """
        values: dict[str, float] = {}
        rounds: dict[str, list[float]] = {}
        for name, meter in meters.meters.items():
            n = sum(units.get(name, ()))
            per_unit = meter.cpu / n * scale if n else math.nan
            self.cpu.setdefault(name, {})[scenario] = {
                "wall_s": meter.wall, "cpu_s": meter.cpu, "user_s": meter.user,
                "system_s": meter.system,
                "busy": meter.cpu / meter.wall if meter.wall else math.nan,
                "units": n, "unit": unit, "per_unit": per_unit, "per": per,
            }
            values[name] = per_unit
            rounds[name] = [c / u * scale if u else math.nan
                            for c, u in zip(meters.blocks[name], units.get(name, ()),
                                            strict=False)]
        self.figure(key, label, values, 1 if scale >= 1e6 else 3, rounds)
        return values

    def cpu_row(self, figure: str, values: Mapping[str, float], unit: str, digits: int,
                bar: _bars.Bar | None, key: str) -> None:
        """A row of the proxy's CPU per unit beside the relay's, with ``bar``
        (a limit in ``unit``) judged on the proxy's."""
        p, f = values.get("proxy", math.nan), values.get("floor", math.nan)
        self.rows.append(Row(
            figure, "—", fmt(p, digits), "—", "—" if bar is None else bar.text,
            None if bar is None else bar.judge(p), floor=_cell(values, "floor", digits),
            vs_floor=_plus(p, f, unit, digits), key=key, judged=f"{fmt(p, digits)} {unit}",
        ))


def turns(names: Sequence[str], round_: int) -> list[str]:
    """The order in which round ``round_`` measures the targets after direct.

    Direct always comes first; the others, given in the order ("baseline",
    "proxy", "floor"), reverse every other round, so that a drift within a
    round does not favour the one measured first: the proxy and the relay
    swap places, and in an A/B run the two proxies stay adjacent and swap
    places too.
    """
    return list(reversed(names)) if round_ % 2 else list(names)


class Meters:
    """A CpuMeter per proxy target, and the CPU of each block it measured."""

    def __init__(self, meters: dict[str, CpuMeter]) -> None:
        self.meters = meters
        self.blocks: dict[str, list[float]] = {name: [] for name in meters}

    @contextlib.contextmanager
    def measure(self, t: Target) -> Iterator[None]:
        meter = self.meters.get(t.name)
        if meter is None:  # direct: nothing of ours to meter
            yield
            return
        before = meter.cpu
        with meter.measure():
            yield
        self.blocks[t.name].append(meter.cpu - before)


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _block_p50(values: Sequence[float], block: int) -> list[float]:
    """The p50 of each interleaved block of ``block`` values, in order."""
    return [percentile(values[i : i + block], 50) for i in range(0, len(values), block)]


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _cell(values: Mapping[str, float], name: str, digits: int = 1) -> str:
    """``values[name]`` as the table prints it; "—" for a target not measured."""
    return fmt(values[name], digits) if name in values else "—"


def _times(value: float, base: float) -> str:
    """``value`` as a multiple of ``base`` ("1.23x"); "—" when there is none."""
    r = _bars.ratio(value, base)
    return "—" if math.isnan(r) else f"{r:.2f}x"


def _plus(value: float, base: float, unit: str, digits: int = 1) -> str:
    """``value`` over ``base`` ("+12.3 µs"); "—" when either is missing."""
    d = value - base
    return "—" if math.isnan(d) else f"{d:+,.{digits}f} {unit}"


def _medians(med: Mapping[str, float]) -> dict[str, float]:
    """Each target's median, keyed as the JSON results name them: ``median_<target>``."""
    return {f"median_{name}": v for name, v in med.items()}


# --------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------


def make_message(size: int, tag: str) -> bytes:
    """A text message of about ``size`` octets (LF form), lines of ~80 octets.

    Every 64th line starts with a dot, so the byte-stuffing paths run too.
    """
    header = (
        "From: Bench <bench@example.org>\n"
        "To: Alice <alice@example.org>\n"
        f"Subject: benchmark message {tag}\n"
        "Date: Mon, 04 Nov 2024 09:15:00 +0000\n"
        f"Message-ID: <{tag}@bench.example.org>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
    ).encode()
    lines = [
        (b"." if i % 64 == 0 else b"")
        + b"%06d lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do %03d\n"
        % (i, (i * 7919) % 1000)
        for i in range(4096)
    ]
    block = b"".join(lines)
    want = max(0, size - len(header))
    body = (block * (want // len(block) + 1))[:want]
    body = body[: body.rfind(b"\n") + 1]
    return header + body


# --------------------------------------------------------------------------
# Scenario 1: RETR throughput and RSS while streaming
# --------------------------------------------------------------------------


def _retr_session(
    env: Env, t: Target, number: int, scratch: bytearray, sample_rss: bool
) -> tuple[float, int, dict[str, int]]:
    """One session that RETRs ``number``: (MB/s, octets, rss facts of ``t``'s proxy)."""
    conn = Conn(t.host, t.port, timeout=60.0)
    rss: dict[str, int] = {}
    try:
        conn.login("big", env.users["big"])
        if sample_rss and t.pid is not None:
            pid = t.pid
            rss["before_kib"] = proc_status_kib(pid)
            hwm_reset = reset_peak_rss(pid)
            with RssSampler(pid) as sampler:
                octets, seconds = conn.retr_raw(number, scratch)
            rss["sampled_peak_kib"] = sampler.peak_kib
            rss["samples"] = sampler.samples
            peak = sampler.peak_kib
            if hwm_reset:
                rss["hwm_kib"] = proc_status_kib(pid, "VmHWM")
                peak = max(peak, rss["hwm_kib"])
            rss["peak_kib"] = peak
            rss["growth_kib"] = peak - rss["before_kib"]
        else:
            octets, seconds = conn.retr_raw(number, scratch)
        conn.cmd("QUIT")
    finally:
        conn.close()
    return octets / seconds / 1e6, octets, rss


def bench_throughput(env: Env) -> None:
    s = env.settings
    scratch = bytearray(1 << 20)
    for number, size_mib in enumerate(s.sizes_mib, start=1):
        largest = size_mib == max(s.sizes_mib)
        for t in env.targets:  # warm-up: Dovecot's size scan, page cache
            _retr_session(env, t, number, scratch, False)
        speeds: dict[str, list[float]] = {name: [] for name in env.names}
        rss_rounds: dict[str, list[dict[str, int]]] = {name: [] for name in env.proxies}
        octets = 0
        meters = env.cpu_meters()
        for r in range(s.retr_rounds):
            for t in env.order(r):
                with meters.measure(t):
                    mbps, octets, rss = _retr_session(env, t, number, scratch, True)
                if octets < size_mib * MIB:
                    raise ProtocolFailure(f"RETR {number} gave only {octets} octets")
                speeds[t.name].append(mbps)
                if rss:
                    rss_rounds[t.name].append(rss)
                log(f"RETR {size_mib} MiB round {r + 1}/{s.retr_rounds} {t.name}: "
                    f"{mbps:,.0f} MB/s" + (f", RSS +{rss['growth_kib']} KiB" if rss else ""))
        scenario = f"RETR {size_mib} MiB"
        env.record_cpu(scenario, meters,
                       {name: [octets / 1e6] * s.retr_rounds for name in env.proxies}, "MB",
                       1000.0, "ms per MB", f"cpu_retr_{size_mib}mib",
                       f"Proxy CPU per MB, RETR {size_mib} MiB (ms)")
        med = {name: median(v) for name, v in speeds.items()}
        d, p = med["direct"], med["proxy"]
        env.results[f"retr_{size_mib}mib"] = {
            "octets": octets, "mbps": speeds, **_medians(med), "ratio": _bars.ratio(p, d),
        } | {f"{name}_rss": v for name, v in rss_rounds.items()}
        env.figure(f"retr_{size_mib}mib_mbps", f"RETR {size_mib} MiB throughput (MB/s)", med, 0,
                   speeds)
        ratio = _bars.ratio(p, d)
        env.rows.append(Row(
            f"RETR {size_mib} MiB throughput (MB/s)", fmt(d, 0), fmt(p, 0),
            _times(p, d), _bars.RETR.text, _bars.RETR.judge(ratio),
            floor=_cell(med, "floor", 0), vs_floor=_times(p, med.get("floor", math.nan)),
            key=f"retr_{size_mib}mib", judged=_times(p, d),
        ))
        if largest:
            # ms per MB is s per GB: issue 16 counts the CPU per GB streamed.
            per_gb = {name: c[scenario]["per_unit"] for name, c in env.cpu.items()
                      if scenario in c}
            env.rows.append(Row(
                f"CPU per GB streamed, RETR {size_mib} MiB (s)", "—",
                _cell(per_gb, "proxy", 2), "—", "—", None,
                floor=_cell(per_gb, "floor", 2),
                vs_floor=_times(per_gb.get("proxy", math.nan),
                                per_gb.get("floor", math.nan)),
            ))
        if largest and rss_rounds["proxy"]:
            worst = {name: max(v, key=lambda x: x["growth_kib"])
                     for name, v in rss_rounds.items() if v}
            env.figure(f"retr_{size_mib}mib_rss_growth",
                       f"Proxy RSS growth streaming {size_mib} MiB (MiB, worst)",
                       {name: w["growth_kib"] / 1024 for name, w in worst.items()})
            w = worst["proxy"]
            growth_mib = w["growth_kib"] / 1024
            fw = worst.get("floor")
            env.rows.append(Row(
                f"Proxy RSS streaming {size_mib} MiB (MiB, worst of {len(rss_rounds['proxy'])})",
                "—",
                f"{w['before_kib'] / 1024:.1f} → peak {w['peak_kib'] / 1024:.1f}",
                f"+{growth_mib:.1f} MiB", _bars.RSS_STREAMING.text,
                _bars.RSS_STREAMING.judge(growth_mib),
                floor="—" if fw is None else f"+{fw['growth_kib'] / 1024:.1f} MiB",
                key=f"retr_{size_mib}mib_rss", judged=f"+{growth_mib:.1f} MiB",
            ))


# --------------------------------------------------------------------------
# Scenario 2: NOOP round trips
# --------------------------------------------------------------------------


def bench_noop(env: Env) -> None:
    s = env.settings
    conns = {
        t.name: Conn(t.host, t.port, timeout=30.0) for t in env.targets
    }
    lat: dict[str, list[float]] = {name: [] for name in conns}
    try:
        for i, conn in enumerate(conns.values()):
            user = env.conc_users[i]
            conn.login(user, env.users[user])
            for _ in range(200):  # warm-up
                conn.cmd("NOOP")
        deadline = time.monotonic() + 120.0 * len(env.proxies)
        blocks = max(1, s.noop_total // s.noop_block)
        meters = env.cpu_meters()
        for b in range(blocks):
            for t in env.order(b):
                conn = conns[t.name]
                out = lat[t.name]
                sock = conn.sock
                clock = time.perf_counter_ns
                with meters.measure(t):
                    for _ in range(s.noop_block):
                        t0 = clock()
                        sock.sendall(b"NOOP\r\n")
                        conn.ok_line()
                        out.append((clock() - t0) / 1000.0)
            if time.monotonic() > deadline:
                env.notes.append("NOOP: stopped early at the time bound")
                break
        for conn in conns.values():
            conn.cmd("QUIT")
    finally:
        for conn in conns.values():
            conn.close()
    cpu = env.record_cpu(
        "NOOP", meters, {k: [s.noop_block] * (len(v) // s.noop_block) for k, v in lat.items()},
        "NOOP", 1e6, "µs per NOOP", "cpu_noop", "Proxy CPU per NOOP round trip (µs)")
    env.cpu_row("Proxy CPU per NOOP round trip (µs)", cpu, "µs", 1, _bars.NOOP_CPU, "cpu_noop")
    summary: dict[str, Any] = {"count": {k: len(v) for k, v in lat.items()}}
    for name, values in lat.items():
        summary[name] = {
            "p50_us": percentile(values, 50), "p99_us": percentile(values, 99),
            "mean_us": statistics.fmean(values), "max_us": max(values),
        }
    env.results["noop"] = summary
    env.figure("noop_p50", "NOOP round trip p50 (µs)",
               {name: summary[name]["p50_us"] for name in lat}, 1,
               {name: _block_p50(v, s.noop_block) for name, v in lat.items()})
    env.figure("noop_p99", "NOOP round trip p99 (µs)",
               {name: summary[name]["p99_us"] for name in lat})
    p50s = {name: summary[name]["p50_us"] for name in lat}
    p99s = {name: summary[name]["p99_us"] for name in lat}
    d50, p50, f50 = p50s["direct"], p50s["proxy"], p50s.get("floor", math.nan)
    log("NOOP p50 / p99: " + ", ".join(
        f"{name} {p50s[name]:.1f} / {p99s[name]:.1f} µs" for name in lat))
    n = summary["count"]["proxy"]
    # Issue 16's bar is against the relay in the same run; without one
    # (--no-floor) there is nothing to judge it on.
    env.rows.append(Row(
        f"NOOP round trip p50 (µs, {n:,} each)", fmt(d50), fmt(p50),
        _plus(p50, d50, "µs"),
        _bars.NOOP_P50.text + ("" if "floor" in p50s else " (no relay in this run)"),
        _bars.NOOP_P50.judge(p50 - f50),
        floor=_cell(p50s, "floor"), vs_floor=_plus(p50, f50, "µs"), key="noop_p50",
        judged=_plus(p50, f50, "µs"),
    ))
    env.rows.append(Row(
        "NOOP round trip p99 (µs)", fmt(p99s["direct"]), fmt(p99s["proxy"]),
        _plus(p99s["proxy"], p99s["direct"], "µs"), "—", None,
        floor=_cell(p99s, "floor"), vs_floor=_plus(p99s["proxy"], p99s.get("floor", math.nan),
                                                   "µs"),
    ))


# --------------------------------------------------------------------------
# Scenario 3: one client, full sessions back to back
# --------------------------------------------------------------------------


def _full_session(t: Target, user: str, password: str) -> list[float]:
    """Durations (s) of SESSION_STEPS; the greeting includes the TCP connect."""
    clock = time.perf_counter
    steps: list[float] = []
    t0 = clock()
    conn = Conn(t.host, t.port, timeout=30.0)
    try:
        conn.ok_line()
        t1 = clock()
        steps.append(t1 - t0)
        for text, multi in (
            (f"USER {user}", False), (f"PASS {password}", False), ("STAT", False),
            ("UIDL", True), ("RETR 1", True), ("QUIT", False),
        ):
            if multi:
                conn.cmd_multi(text)
            else:
                conn.cmd(text)
            t2 = clock()
            steps.append(t2 - t1)
            t1 = t2
    finally:
        conn.close()
    return steps


def bench_sequential(env: Env) -> None:
    s = env.settings
    user = "seq"
    per: dict[str, list[list[float]]] = {name: [] for name in env.names}
    spent = dict.fromkeys(env.names, 0.0)
    sizes: dict[str, list[float]] = {name: [] for name in env.names}
    walls: dict[str, list[float]] = {name: [] for name in env.names}  # per block (s)
    for t in env.targets:  # warm-up
        _full_session(t, user, env.users[user])
    meters = env.cpu_meters()
    for r in range(s.seq_sessions):  # a block a round: ends far earlier
        if all(len(v) >= s.seq_sessions for v in per.values()):
            break
        progressed = False
        for t in env.order(r):
            if len(per[t.name]) >= s.seq_sessions or spent[t.name] > s.seq_seconds:
                continue
            t0 = time.monotonic()
            size = min(s.seq_block, s.seq_sessions - len(per[t.name]))
            sizes[t.name].append(size)
            w0 = time.perf_counter()
            with meters.measure(t):
                for _ in range(size):
                    per[t.name].append(_full_session(t, user, env.users[user]))
            walls[t.name].append(time.perf_counter() - w0)
            spent[t.name] += time.monotonic() - t0
            progressed = True
        if not progressed:
            env.notes.append("sequential sessions: stopped early at the time bound")
            break
    cpu = env.record_cpu("sequential sessions", meters, sizes,
                         "session", 1000.0, "ms per session", "cpu_sequential",
                         "Proxy CPU per full session, one client (ms)")
    env.cpu_row("Proxy CPU per full session, one client (ms)", cpu, "ms", 3,
                _bars.SESSION_CPU, "cpu_sequential")
    summary: dict[str, Any] = {}
    for name, sessions in per.items():
        totals = [sum(x) * 1000 for x in sessions]
        steps_all = [v for x in sessions for v in x]
        slow = [
            (i, SESSION_STEPS[j], round(v * 1000, 2))
            for i, x in enumerate(sessions) for j, v in enumerate(x) if v > SLOW_STEP
        ]
        summary[name] = {
            "sessions": len(sessions),
            "session_p50_ms": percentile(totals, 50),
            "session_p99_ms": percentile(totals, 99),
            "steps": {
                step: {
                    "p50_ms": percentile([x[j] * 1000 for x in sessions], 50),
                    "p99_ms": percentile([x[j] * 1000 for x in sessions], 99),
                    "max_ms": max(x[j] * 1000 for x in sessions),
                }
                for j, step in enumerate(SESSION_STEPS)
            },
            "slow_steps": len(slow),
            "steps_total": len(steps_all),
            "slow_share": len(slow) / len(steps_all),
            "slow_examples": slow[:20],
        }
    env.figure("sequential_p50", "Full session p50, one client back to back (ms)",
               {name: summary[name]["session_p50_ms"] for name in per}, 3,
               {name: _block_p50([sum(x) * 1000 for x in v], s.seq_block)
                for name, v in per.items()})
    env.figure("sequential_p99", "Full session p99, one client back to back (ms)",
               {name: summary[name]["session_p99_ms"] for name in per}, 3)
    env.figure("sequential_slow", "Session steps slower than 35 ms (count)",
               {name: float(summary[name]["slow_steps"]) for name in per}, 0)
    rates = {name: len(per[name]) / sum(walls[name]) if sum(walls[name]) else math.nan
             for name in per}
    env.figure("sequential_rate", "Full sessions/s, one client back to back", rates, 0,
               {name: [n / w if w else math.nan for n, w in zip(sizes[name], walls[name],
                                                                 strict=True)]
                for name in per})
    for name, rate in rates.items():
        summary[name]["sessions_per_s"] = rate
    env.results["sequential"] = summary
    d, p = summary["direct"], summary["proxy"]
    f = summary.get("floor")
    log("sessions p50, slow steps: " + ", ".join(
        f"{name} {summary[name]['session_p50_ms']:.2f} ms, {summary[name]['slow_steps']}"
        for name in per))

    def p50_p99(x: dict[str, Any] | None) -> str:
        return "—" if x is None else f"{x['session_p50_ms']:.2f} / {x['session_p99_ms']:.2f}"

    def over(x: dict[str, Any] | None) -> str:
        if x is None:
            return "—"
        return (f"{p['session_p50_ms'] - x['session_p50_ms']:+.2f} / "
                f"{p['session_p99_ms'] - x['session_p99_ms']:+.2f} ms")

    env.rows.append(Row(
        f"Sequential session p50 / p99 (ms, {p['sessions']} each)", p50_p99(d), p50_p99(p),
        over(d), "—", None, floor=p50_p99(f), vs_floor=over(f),
    ))
    env.rows.append(Row(
        "Full sessions/s, one client back to back", fmt(rates["direct"], 0),
        fmt(rates["proxy"], 0), _times(rates["proxy"], rates["direct"]), "—", None,
        floor=_cell(rates, "floor", 0),
        vs_floor=_times(rates["proxy"], rates.get("floor", math.nan)),
    ))

    def slow_text(x: dict[str, Any] | None) -> str:
        if x is None:
            return "—"
        return f"{x['slow_steps']} / {x['steps_total']} ({x['slow_share']:.2%})"

    env.rows.append(Row(
        "Steps slower than 35 ms (count, share)", slow_text(d), slow_text(p),
        f"{p['slow_steps'] - d['slow_steps']:+d}", _bars.STALLS.text,
        _bars.STALLS.judge(p["slow_steps"]), floor=slow_text(f),
        vs_floor="—" if f is None else f"{p['slow_steps'] - f['slow_steps']:+d}",
        key="slow_steps", judged=str(p["slow_steps"]),
    ))


# --------------------------------------------------------------------------
# Scenario 4: session rate with concurrent clients
# --------------------------------------------------------------------------


async def _concurrent_round(
    t: Target, users: Sequence[tuple[str, str]], seconds: float
) -> tuple[int, list[str]]:
    """Sessions completed within ``seconds`` by len(users) clients; errors."""
    return await session_round(
        [(user, partial(full_session, t.host, t.port, user, password))
         for user, password in users],
        seconds,
    )


def bench_concurrent(env: Env) -> None:
    s = env.settings
    users = [(u, env.users[u]) for u in env.conc_users[: s.conc_clients]]
    rates: dict[str, list[float]] = {name: [] for name in env.names}
    errors: dict[str, list[str]] = {name: [] for name in env.names}
    for t in env.targets:  # warm-up
        trio.run(_concurrent_round, t, users, min(1.0, s.conc_seconds))
    meters = env.cpu_meters()
    # The load generator shares the machine: its own CPU per session.
    client_cpu = dict.fromkeys(env.names, 0.0)
    client_sessions = dict.fromkeys(env.names, 0)
    for r in range(s.conc_rounds):
        for t in env.order(r):
            c0 = time.process_time()
            with meters.measure(t):
                done, errs = trio.run(_concurrent_round, t, users, s.conc_seconds)
            client_cpu[t.name] += time.process_time() - c0
            client_sessions[t.name] += done
            rates[t.name].append(done / s.conc_seconds)
            errors[t.name] += errs
            extra = f", {len(errs)} errors" if errs else ""
            log(f"{len(users)} clients round {r + 1}/{s.conc_rounds} {t.name}: "
                f"{done / s.conc_seconds:,.0f} sessions/s{extra}")
            env.check_alive()
    done_per_round = {k: [round(r * s.conc_seconds) for r in v] for k, v in rates.items()}
    cpu = env.record_cpu("concurrent sessions", meters, done_per_round, "session", 1000.0,
                         "ms per session", "cpu_concurrent",
                         f"Proxy CPU per full session, {len(users)} clients (ms)")
    env.cpu_row(f"Proxy CPU per full session, {len(users)} clients (ms)", cpu, "ms", 3,
                _bars.SESSION_CPU, "cpu_concurrent")
    med = {name: median(v) for name, v in rates.items()}
    d, p = med["direct"], med["proxy"]
    env.results["concurrent"] = {
        "clients": len(users), "seconds": s.conc_seconds, "rates": rates,
        **_medians(med), "ratio": _bars.ratio(p, d),
        "errors": {k: len(v) for k, v in errors.items()},
        "client_cpu_ms_per_session": {
            k: client_cpu[k] / client_sessions[k] * 1000 if client_sessions[k] else math.nan
            for k in client_cpu
        },
        "error_examples": {k: v[:10] for k, v in errors.items()},
    }
    env.figure("concurrent_rate", f"Full sessions/s, {len(users)} concurrent clients", med, 0,
               rates)
    n_err = sum(len(v) for v in errors.values())
    ok = _bars.SESSION_RATE.judge(_bars.ratio(p, d))
    env.rows.append(Row(
        f"Full sessions/s, {len(users)} concurrent clients"
        + (f" ({n_err} errors)" if n_err else ""),
        fmt(d, 0), fmt(p, 0), _times(p, d), _bars.SESSION_RATE.text,
        None if ok is None else ok and not errors["proxy"],
        floor=_cell(med, "floor", 0), vs_floor=_times(p, med.get("floor", math.nan)),
        key="concurrent_rate", judged=_times(p, d),
    ))
    if n_err:
        env.notes.append("concurrent sessions, errors: " + ", ".join(
            f"{k} {len(v)}" for k, v in errors.items()))


# --------------------------------------------------------------------------
# Scenario 5: pipelined commands
# --------------------------------------------------------------------------


def _pipeline_once(env: Env, t: Target, batch: bytes, count: int) -> float:
    conn = Conn(t.host, t.port, timeout=30.0)
    try:
        conn.login("pipe", env.users["pipe"])
        sock = conn.sock
        received = bytearray()
        lines = 0
        t0 = time.perf_counter()
        sock.sendall(batch)
        while lines < count:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ProtocolFailure("closed during the pipeline")
            received += chunk
            lines += chunk.count(b"\n")
        elapsed = time.perf_counter() - t0
        replies = bytes(received).split(b"\r\n")[:-1]
        bad = [x for x in replies if not x.startswith(b"+OK")]
        if len(replies) != count or bad:
            raise ProtocolFailure(f"pipeline: {len(replies)} replies, bad: {bad[:3]!r}")
        conn.cmd("QUIT")
    finally:
        conn.close()
    return elapsed


def bench_pipeline(env: Env) -> None:
    s = env.settings
    n = s.pipeline_messages
    batch = b"".join(
        (b"LIST %d\r\n" if i % 2 == 0 else b"UIDL %d\r\n") % (i % n + 1)
        for i in range(s.pipeline_cmds)
    )
    for t in env.targets:  # warm-up
        _pipeline_once(env, t, batch, s.pipeline_cmds)
    times: dict[str, list[float]] = {name: [] for name in env.names}
    meters = env.cpu_meters()
    for r in range(s.pipeline_rounds):
        for t in env.order(r):
            with meters.measure(t):
                times[t.name].append(_pipeline_once(env, t, batch, s.pipeline_cmds) * 1000)
        log(f"pipeline round {r + 1}/{s.pipeline_rounds}: " + ", ".join(
            f"{name} {v[-1]:.2f} ms" for name, v in times.items()))
    # Each measured session is a login, the batch and QUIT: the CPU per
    # command includes a thousandth of a login.
    cpu = env.record_cpu(
        "pipeline (session incl. login)", meters,
        {name: [s.pipeline_cmds] * s.pipeline_rounds for name in env.proxies}, "command",
        1e6, "µs per command", "cpu_pipeline",
        f"Proxy CPU per pipelined command, {s.pipeline_cmds:,} a session (µs)")
    med = {name: median(v) for name, v in times.items()}
    d, p = med["direct"], med["proxy"]
    env.results["pipeline"] = {
        "commands": s.pipeline_cmds, "octets": len(batch), "ms": times,
        **_medians(med), "ratio": _bars.ratio(p, d),
    }
    env.figure("pipeline_ms", f"{s.pipeline_cmds:,} pipelined commands, write → last reply (ms)",
               med, 2, times)
    ratio = _bars.ratio(p, d)
    env.rows.append(Row(
        f"{s.pipeline_cmds:,} pipelined LIST n/UIDL n, write → last reply (ms)",
        fmt(d, 2), fmt(p, 2), _times(p, d), _bars.PIPELINE.text, _bars.PIPELINE.judge(ratio),
        floor=_cell(med, "floor", 2), vs_floor=_times(p, med.get("floor", math.nan)),
        key="pipeline", judged=_times(p, d),
    ))
    env.cpu_row(f"Proxy CPU per pipelined command, {s.pipeline_cmds:,} a session (µs)", cpu,
                "µs", 1, None, "cpu_pipeline")


# --------------------------------------------------------------------------
# Scenario 6: RSS per idle logged-in session
# --------------------------------------------------------------------------


async def _rss_median(pid: int, samples: int = 5, gap: float = 0.1) -> int:
    values = []
    for _ in range(samples):
        values.append(proc_status_kib(pid))
        await trio.sleep(gap)
    return int(statistics.median(values))


async def _idle_sessions(
    t: Target, pid: int, users: Sequence[tuple[str, str]], count: int, concurrency: int
) -> dict[str, Any]:
    conns: list[AsyncConn] = []
    errors: list[str] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def open_one(i: int) -> None:
        user, password = users[i % len(users)]
        async with limiter:
            try:
                with trio.fail_after(30.0):
                    conn = await AsyncConn.open(t.host, t.port)
                    try:
                        await conn.login(user, password)
                    except BaseException:
                        await conn.aclose()
                        raise
                conns.append(conn)
            except ClientErrors as exc:
                if len(errors) < 100:
                    errors.append(f"{user}: {exc!r}")

    # Warm the proxy up: a few sessions opened and closed.
    for i in range(5):
        await open_one(i)
    for conn in conns:
        await conn.cmd("QUIT")
        await conn.aclose()
    conns.clear()
    await trio.sleep(0.5)
    before = await _rss_median(pid)
    t0 = trio.current_time()
    try:
        with trio.move_on_after(max(120.0, count * 0.2)):
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(open_one, i)
        opened_in = trio.current_time() - t0
        # Every session is logged in and idle now; let the proxy settle.
        alive = 0
        for conn in conns:
            with trio.move_on_after(10.0), contextlib.suppress(*ClientErrors):
                await conn.cmd("NOOP")
                alive += 1
        await trio.sleep(1.0)
        after = await _rss_median(pid)
    finally:
        for conn in conns:
            await conn.aclose()
    await trio.sleep(1.0)
    after_close = await _rss_median(pid)
    opened = len(conns)
    return {
        "requested": count, "opened": opened, "alive": alive, "errors": len(errors),
        "error_examples": errors[:10], "open_seconds": opened_in,
        "rss_before_kib": before, "rss_after_kib": after, "rss_after_close_kib": after_close,
        "kib_per_session": (after - before) / opened if opened else math.nan,
    }


def bench_idle(env: Env) -> None:
    s = env.settings
    users = [(u, env.users[u]) for u in env.conc_users]
    found: dict[str, dict[str, Any]] = {}
    # The popproxies only, one after the other: 1,000 sessions each.  (The
    # relay holds two sockets and two tasks a session, nothing to bar.)
    for name, proxy in env.popproxies.items():
        # A fresh proxy process: its RSS growth is all per-session cost, not
        # memory freed by earlier scenarios and reused.
        workdir = env.workdir / f"idle-{name}"
        workdir.mkdir(exist_ok=True)
        fresh = ProxyProcess(
            env.dovecot.port, workdir, max_sessions=s.idle_sessions + 100,
            source_root=proxy.source_root,
            launcher=CLI_LAUNCHER if env.baseline is None else TREE_LAUNCHER,
            extra_config=env.proxy_config(workdir), log_level=env.log_level,
        )
        try:
            fresh.start()
            t = Target(name, fresh.host, fresh.port, fresh.pid)
            res = trio.run(_idle_sessions, t, fresh.pid, users, s.idle_sessions,
                           s.idle_concurrency)
            fresh.check_alive()
            res["proxy_log_lines"] = len(fresh.log_lines())
        finally:
            fresh.stop()
        found[name] = res
        log(f"idle {name}: {res['opened']} sessions in {res['open_seconds']:.1f}s, RSS "
            f"{res['rss_before_kib']} → {res['rss_after_kib']} KiB "
            f"({res['kib_per_session']:.1f} KiB/session), "
            f"after close {res['rss_after_close_kib']} KiB")
    res = found["proxy"]
    env.results["idle"] = res | ({} if env.baseline is None else {"baseline": found["baseline"]})
    env.figure("idle_kib", f"Proxy RSS per idle logged-in session at {s.idle_sessions:,} (KiB)",
               {name: r["kib_per_session"] for name, r in found.items()})
    per = res["kib_per_session"]
    ok = _bars.IDLE_KIB.judge(per)
    if res["opened"] != s.idle_sessions or res["alive"] != res["opened"]:
        ok = False
    note = "" if res["opened"] == s.idle_sessions else f", only {res['opened']} opened"
    env.rows.append(Row(
        f"Proxy RSS per idle logged-in session at {s.idle_sessions:,} (KiB{note})",
        "—",
        f"{res['rss_before_kib'] / 1024:.1f} → {res['rss_after_kib'] / 1024:.1f} MiB",
        f"{per:.1f} KiB", _bars.IDLE_KIB.text, ok, key="idle_kib", judged=f"{per:.1f} KiB",
    ))


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Env], None]] = {
    "throughput": bench_throughput,
    "noop": bench_noop,
    "sequential": bench_sequential,
    "concurrent": bench_concurrent,
    "pipeline": bench_pipeline,
    "idle": bench_idle,
}
#: Other names ``--only`` takes for them.
ALIASES = {"sessions": "sequential", "retr": "throughput", "rss": "idle"}


def _environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "trio": trio.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    binary = dovecot_binary()
    if binary:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([binary, "--version"], capture_output=True, timeout=10)
            info["dovecot"] = out.stdout.decode(errors="replace").strip()
    return info


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop the children."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # A background job of a non-interactive shell ignores SIGINT.
            raise KeyboardInterrupt(f"signal {signum}")
        # As SIGINT, so that inside trio.run it arrives at a safe point.
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _setup_mail(dovecot: Dovecot, settings: Settings, conc_users: Sequence[str]) -> None:
    for i, size in enumerate(settings.sizes_mib):
        dovecot.deliver("big", make_message(size * MIB, f"big-{i + 1}"))
    dovecot.deliver("seq", SAMPLE_MESSAGES[0])
    for i in range(settings.pipeline_messages):
        dovecot.deliver("pipe", SAMPLE_MESSAGES[i % len(SAMPLE_MESSAGES)])
    for user in conc_users:
        dovecot.deliver(user, SAMPLE_MESSAGES[0])


@dataclass
class Outcome:
    """One run of the chosen scenarios."""

    results: dict[str, Any]
    rows: list[Row]
    notes: list[str]
    figures: list[Figure]
    failed: list[str]
    seconds: float


def _run_scenarios(
    env: Env, only: Sequence[str], profile_dir: Path | None,
) -> None:
    for name, bench in SCENARIOS.items():
        if only and name not in only:
            continue
        log(f"--- {name}")
        t0 = time.monotonic()
        try:
            if profile_dir is None:
                bench(env)
            else:
                folded = profile_dir / f"{name}.folded"
                with record(env.proxy.pid, folded):
                    bench(env)
                summary = summarize(folded)
                (profile_dir / f"{name}.summary.txt").write_text(summary + "\n")
                log(f"profile of the proxy during {name}: {folded}")
        except Exception as exc:  # keep going; report it
            log(f"{name} FAILED: {exc!r}")
            env.rows.append(Row(f"{name}: ERROR {exc!r}"[:120], "", "", "", "", False))
            env.notes.append(f"{name} failed: {exc!r}")
            env.failed.append(name)
        env.results.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)
        env.check_alive()


#: The proxy's log level as in production (the default level) and with ``--bare``.
PRODUCTION_LOG_LEVEL = "info"
BARE_LOG_LEVEL = "warning"


def production_config(workdir: Path) -> str:
    """The observers of a proxy run as in production, as TOML sections:
    ``[audit]`` to a hash-chained file in ``workdir`` synced per session,
    and ``[metrics]`` on a free loopback port (see the module docstring)."""
    return (
        "[audit]\n"
        'sink = "file"\n'
        # A JSON string is a TOML basic string (the same escapes).
        f"path = {json.dumps(str(workdir / 'audit.jsonl'))}\n"
        "hash_chain = true\n"
        'fsync = "session"\n'
        'rotate_size = "100MiB"\n'
        'commands = "all"\n'
        "[metrics]\n"
        'address = "127.0.0.1:0"\n'
    )


def bare_config(workdir: Path) -> str:
    """``--bare``: no observer sections (no audit, no metrics endpoint)."""
    return ""


_QUIET_LEVELS = ("debug", "info")


def log_problems(lines: Sequence[str]) -> list[str]:
    """The lines of a proxy's JSON log above info level, and any line that
    is not a JSON log record (a traceback, an interpreter's message)."""
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("level") not in _QUIET_LEVELS:
            out.append(line)
    return out


def metrics_address(lines: Sequence[str]) -> str | None:
    """Where the proxy's metrics endpoint listens, from its ``metrics.listening``
    log record (the port is picked by the kernel); None without one."""
    for line in lines:
        if '"metrics.listening"' not in line:
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("address"), str):
                return str(record["address"])
    return None


def _observer_notes(name: str, proxy: ProxyProcess, lines: Sequence[str]) -> list[str]:
    """What the production observers of ``proxy`` did in the run: the audit
    file's records and whether they are chained, and one scrape of the
    metrics endpoint (after the measurements, so it costs them nothing)."""
    notes = []
    audit = proxy.workdir / "audit.jsonl"
    try:
        with audit.open("rb") as f:
            records = 0
            last = b""
            for line in f:
                records += 1
                last = line
        chained = b'"hash"' in last
        notes.append(f"the {name}'s audit: {records:,} records, "
                     f"{audit.stat().st_size / MIB:.1f} MiB"
                     + (", hash-chained" if chained else ", NOT hash-chained"))
    except OSError as exc:
        notes.append(f"the {name}'s audit file: {exc}")
    address = metrics_address(lines)
    if address is None:
        notes.append(f"the {name} logged no metrics.listening record")
        return notes
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10.0) as reply:
            body = reply.read()
        samples = sum(1 for x in body.splitlines() if x.startswith(b"popproxy_"))
        notes.append(f"the {name}'s metrics on {address}: {samples} popproxy_ samples")
    except OSError as exc:
        notes.append(f"the {name}'s metrics on {address}: {exc}")
    return notes


def _start_proxy(
    stack: contextlib.ExitStack, name: str, proxy: ProxyProcess, common: dict[str, Any],
    baseline: Revision | None,
) -> ProxyProcess:
    """Start ``proxy`` (stopped by ``stack``); in an A/B run, prove its tree."""
    stack.callback(proxy.stop)
    if baseline is None:
        proxy.start()
        log(f"proxy pid {proxy.pid} on 127.0.0.1:{proxy.port}, "
            f"RSS {proc_status_kib(proxy.pid)} KiB")
        return proxy
    what = f"the baseline proxy ({baseline.label})" if name == "baseline" else "the proxy"
    try:
        check_source(proxy)
        proxy.start()
        found = check_source(proxy)
    except RuntimeError as exc:
        raise RuntimeError(f"{what}: {exc}") from None
    if name == "baseline":
        common["baseline"] = {"spec": baseline.spec, "commit": baseline.commit,
                              "subject": baseline.subject, "popproxy_file": str(found)}
        tree = baseline.label
    else:
        tree = describe_worktree()
        common["current"] = {"tree": tree, "popproxy_file": str(found)}
    log(f"{name} pid {proxy.pid} on 127.0.0.1:{proxy.port}, RSS {proc_status_kib(proxy.pid)} "
        f"KiB: {tree}, popproxy from {found}")
    return proxy


def run(
    settings: Settings,
    only: Sequence[str],
    *,
    dovecot_performance: bool = True,
    profile_dir: Path | None = None,
    cprofile: Path | None = None,
    relay: str | None = None,
    baseline: Revision | None = None,
    floor: bool = True,
    bare: bool = False,
    repeat: int = 1,
    on_run: Callable[[int, Outcome, dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[Outcome]]:
    """Start Dovecot and the proxy (and the baseline's, and with ``floor``
    the trio-sockio relay), run the scenarios ``repeat`` times; the facts
    common to the runs and each run's outcome.

    ``bare``: the proxies without the production observers (audit, metrics
    endpoint, info logs).  ``on_run(i, outcome, common)`` is called as each
    run ends.
    """
    reason = ensure_dovecot()
    if reason is not None:
        raise SystemExit(f"benchmark needs Dovecot: {reason}")
    fd_limit = raise_fd_limit(max(8192, settings.idle_sessions * 4 + 1024))
    n_conc = max(settings.conc_clients, 50)
    conc_users = [f"c{i:03d}" for i in range(n_conc)]
    users = {"big": "big-Secret1", "seq": "seq-Secret2", "pipe": "pipe-Secret3"}
    users.update({u: f"{u}-pw" for u in conc_users})
    processes = max(1200, settings.idle_sessions + 300)
    per_user_ip = settings.idle_sessions // len(conc_users) + 100
    proxy_config = bare_config if bare else production_config
    log_level = BARE_LOG_LEVEL if bare else PRODUCTION_LOG_LEVEL
    common: dict[str, Any] = {
        "environment": _environment(), "fd_limit": fd_limit,
        "dovecot_mode": "performance" if dovecot_performance else "default (high-security)",
        "proxy_config": "bare" if bare else "production",
        "floor": FLOOR_RELAY if floor else None,
    }
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="popproxy-bench-")))
        dovecot = Dovecot(
            users,
            max_userip_connections=per_user_ip,
            extra_config=dovecot_extra_config(processes, performance=dovecot_performance),
        )
        stack.callback(dovecot.stop)
        dovecot.start()
        log(f"Dovecot on 127.0.0.1:{dovecot.port} in {dovecot.root} "
            f"(started in {dovecot.startup_seconds:.2f}s)")
        t0 = time.monotonic()
        _setup_mail(dovecot, settings, conc_users)
        log(f"delivered test mail in {time.monotonic() - t0:.1f}s")
        launcher = CLI_LAUNCHER if cprofile is None else (
            "-m", "cProfile", "-o", str(cprofile.resolve()), *CLI_LAUNCHER)
        if relay is not None:  # a minimal relay in the proxy's place
            launcher = ("-m", "benchmarks.floor", "--relay-config", relay)
        if baseline is not None:  # started as the baseline is (see _ab.TREE_LAUNCHER)
            launcher = TREE_LAUNCHER
        max_sessions = max(1000, settings.idle_sessions)
        base_root: Path | None = None
        if baseline is not None:
            base_root = export_package(baseline, workdir / "baseline-src")
            log(f"baseline {baseline.label}: popproxy/ exported to {base_root}")
        for i in range(repeat):
            if repeat > 1:
                log(f"=== run {i + 1} of {repeat}")
            t0 = time.monotonic()
            # Fresh proxy processes for every run: a process keeps for its
            # lifetime whatever the run's noise gave it (in one A/A run the
            # same code measured 0.75x its twin on the pipeline, in both
            # repeats, and about 1.0x with new processes), so that repeats
            # sample it too.  Every other run starts the current one first.
            with contextlib.ExitStack() as run_stack:
                run_dir = workdir / f"run-{i + 1}"
                run_dir.mkdir()
                starts: list[tuple[str, Path, Sequence[str]]] = [
                    ("proxy", REPO_ROOT, launcher)]
                if base_root is not None:
                    starts.insert(i % 2, ("baseline", base_root, TREE_LAUNCHER))
                started: dict[str, ProxyProcess] = {}
                for name, root, how in starts:
                    (run_dir / name).mkdir()
                    started[name] = _start_proxy(
                        run_stack, name, ProxyProcess(
                            dovecot.port, run_dir / name, max_sessions=max_sessions,
                            source_root=root, launcher=how,
                            extra_config=proxy_config(run_dir / name), log_level=log_level),
                        common, baseline)
                relay_floor: ProxyProcess | None = None
                if floor:  # the same process start, with the relay's module
                    (run_dir / "floor").mkdir()
                    relay_floor = ProxyProcess(dovecot.port, run_dir / "floor",
                                               launcher=FLOOR_LAUNCHER)
                    run_stack.callback(relay_floor.stop)
                    relay_floor.start()
                    log(f"{FLOOR_RELAY} relay pid {relay_floor.pid} on "
                        f"127.0.0.1:{relay_floor.port}, "
                        f"RSS {proc_status_kib(relay_floor.pid)} KiB")
                env = Env(settings, dovecot, started["proxy"], run_dir, users, conc_users,
                          started.get("baseline"), relay_floor, proxy_config, log_level)
                _run_scenarios(env, only, profile_dir)
                env.results["failed"] = env.failed
                for name in env.proxies:
                    env.results[f"{name}_cpu"] = env.cpu.get(name, {})
                for name, proc in env.proxies.items():
                    lines = proc.log_lines()
                    problems = log_problems(lines)
                    if problems:
                        env.notes.append(
                            f"the {name} logged {len(problems)} lines above info level "
                            f"(of {len(lines)}), the last: {problems[-1]}")
                    if not bare and relay is None and name != "floor":
                        env.notes += _observer_notes(name, proc, lines)
            outcome = Outcome(env.results, env.rows, env.notes, env.figures, env.failed,
                              round(time.monotonic() - t0, 1))
            outcomes.append(outcome)
            if on_run is not None:
                on_run(i, outcome, common)
    return common, outcomes


def render_steps(results: dict[str, Any], labels: dict[str, str] = LABELS) -> str:
    seq = results.get("sequential")
    if not seq:
        return ""
    names = [n for n in ("direct", "baseline", "proxy", "floor") if n in seq]
    head = " | ".join(f"{labels[n]} p50 / p99 (ms)" for n in names)
    lines = [
        f"| Step (scenario 3) | {head} | {labels['proxy']} max (ms) |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for step in SESSION_STEPS:
        cells = [f"{seq[n]['steps'][step]['p50_ms']:.3f} / {seq[n]['steps'][step]['p99_ms']:.3f}"
                 for n in names]
        lines.append(f"| {step} | " + " | ".join(cells)
                     + f" | {seq['proxy']['steps'][step]['max_ms']:.3f} |")
    return "\n".join(lines)


def render_cpu(results: dict[str, Any], labels: dict[str, str] = LABELS) -> str:
    cpu: dict[str, dict[str, Any]] = results.get("proxy_cpu", {})
    base: dict[str, dict[str, Any]] = results.get("baseline_cpu", {})
    floor: dict[str, dict[str, Any]] = results.get("floor_cpu", {})
    if not cpu:
        return ""
    if not base:
        lines = [
            "| CPU while measured | Process | Wall (s) | CPU user + sys (s) | Busy (one core) "
            "| CPU per unit |",
            "|---|---|---|---|---|---|",
        ]
        for scenario, c in cpu.items():
            for target, x in (("proxy", c), ("floor", floor.get(scenario))):
                if x is None:
                    continue
                lines.append(
                    f"| {scenario} | {labels[target]} | {x['wall_s']:.2f} | "
                    f"{x['user_s']:.2f} + {x['system_s']:.2f} | {x['busy']:.0%} | "
                    f"{x['per_unit']:.3g} {x['per']} |"
                )
        return "\n".join(lines)
    b_label, c_label = labels["baseline"], labels["proxy"]
    lines = [
        f"| Proxy CPU while measured | {b_label}: user + sys (s), busy | "
        f"{c_label}: user + sys (s), busy | {b_label} per unit | {c_label} per unit "
        f"| {c_label} / {b_label} |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in cpu.items():
        b = base.get(name)
        if b is None:
            continue
        ratio = c["per_unit"] / b["per_unit"] if b["per_unit"] else math.nan
        lines.append(
            f"| {name} | {b['user_s']:.2f} + {b['system_s']:.2f}, {b['busy']:.0%} | "
            f"{c['user_s']:.2f} + {c['system_s']:.2f}, {c['busy']:.0%} | "
            f"{b['per_unit']:.3g} {b['per']} | {c['per_unit']:.3g} {c['per']} | "
            f"{fmt(ratio, 2)}x |"
        )
    return "\n".join(lines)


def _print_run(
    i: int, outcome: Outcome, common: dict[str, Any], *, heading: str, repeat: int,
    labels: dict[str, str], names: Sequence[str], ab: bool,
) -> None:
    """One run's tables, printed as soon as it ends (the heading before the first)."""
    if i == 0:
        environment = common["environment"]
        print(f"\n## {heading}; {environment.get('cpus')} CPUs; Dovecot "
              f"{environment.get('dovecot', '?')} in {common['dovecot_mode']} mode)")
        if ab:
            print(f"\nBaseline: {common['baseline']['spec']} = "
                  f"{common['baseline']['commit'][:10]} ({common['baseline']['subject']}), "
                  f"popproxy from {common['baseline']['popproxy_file']}  \n"
                  f"Current: {common['current']['tree']}, "
                  f"popproxy from {common['current']['popproxy_file']}")
    if repeat > 1:
        print(f"\n### Run {i + 1} of {repeat} ({outcome.seconds:.0f}s)")
    print()
    print(render_table(outcome.rows, labels["proxy"],
                       labels["floor"] if "floor" in names else None))
    if ab or repeat > 1 or "floor" in names:
        print("\n" + render_figures(outcome.figures, names, labels))
    for extra in (render_steps(outcome.results, labels), render_cpu(outcome.results, labels)):
        if extra:
            print("\n" + extra)
    for note in outcome.notes:
        print(f"\nNote: {note}")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer rounds, smaller sizes")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    names_help = ", ".join(SCENARIOS) + "; also " + ", ".join(
        f"{a} (= {n})" for a, n in ALIASES.items())
    ap.add_argument("--only", metavar="NAMES", default="",
                    help=f"comma-separated subset of: {names_help}")
    ap.add_argument("--baseline", metavar="REV",
                    help="A/B run: also measure a proxy started from popproxy/ as of git "
                    "revision REV (interleaved with direct and the current tree's proxy) and "
                    "report current / baseline for every figure")
    ap.add_argument("--repeat", metavar="N", type=int, default=1,
                    help="run the chosen scenarios N times (the proxies restarted for each) "
                    "and print each run and the spread (min-max) of every figure")
    ap.add_argument("--dovecot-default-processes", action="store_true",
                    help="run Dovecot in its stock high-security mode (a login and a mail "
                    "process forked per connection) instead of its high-performance mode")
    ap.add_argument("--profile", metavar="DIR", type=Path,
                    help="sample the proxy with py-spy during each scenario; folded stacks "
                    "and a summary per scenario go to DIR (skews the figures)")
    ap.add_argument("--cprofile", metavar="FILE", type=Path,
                    help="run the proxy under cProfile and write its stats to FILE when it "
                    "stops (deterministic, and slower than py-spy: figures are skewed)")
    ap.add_argument("--relay", choices=RELAYS,
                    help="measure a minimal relay from benchmarks.floor in the proxy's place "
                    "(what any extra hop costs; the idle scenario then means little)")
    ap.add_argument("--no-floor", action="store_true",
                    help=f"leave out the {FLOOR_RELAY} relay measured beside the proxy as "
                    "trio's floor (then the NOOP p50 bar has nothing to be judged on)")
    ap.add_argument("--bare", action="store_true",
                    help="run the proxies without the production observers: no audit, no "
                    "metrics endpoint, log level warning (the configuration of earlier runs)")
    args = ap.parse_args(argv)
    only = [ALIASES.get(x, x) for x in (x.strip() for x in args.only.split(",")) if x]
    unknown = [x for x in only if x not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    if not 1 <= args.repeat <= 20:
        ap.error("--repeat: between 1 and 20")
    if args.repeat > 1 and (args.profile or args.cprofile):
        ap.error("--profile and --cprofile profile one run; not with --repeat")
    baseline: Revision | None = None
    if args.baseline is not None:
        skewed = [o for o, v in (("--profile", args.profile), ("--cprofile", args.cprofile),
                                 ("--relay", args.relay)) if v is not None]
        if skewed:
            ap.error(f"--baseline compares two proxies as they run; not with {skewed[0]}")
        try:
            baseline = resolve_revision(args.baseline)
        except ValueError as exc:
            ap.error(f"--baseline: {exc}")
    ab = baseline is not None
    floor = not args.no_floor
    labels = AB_LABELS if ab else LABELS
    names: tuple[str, ...] = ("direct", "baseline", "proxy") if ab else ("direct", "proxy")
    if floor:
        names += ("floor",)
    settings = Settings.quick() if args.quick else Settings()
    if ab:
        settings = settings.for_ab()
    mode = "quick" if args.quick else "full"
    started = time.monotonic()
    subject = "popproxy" if args.relay is None else f"the {args.relay} relay (no POP3 logic)"
    if baseline is not None:
        subject = "popproxy A/B"
    observers = ("bare: no audit, no metrics, warning logs" if args.bare else
                 "as in production: audit to a file with the hash chain, fsync per session, "
                 "metrics endpoint, info logs")
    if args.relay is not None:
        observers = "no POP3 logic, no observers"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    heading = (f"{subject} benchmark ({mode}" + (f", {args.repeat} runs" if args.repeat > 1
                                                else "")
               + f"; {observers}"
               + (f"; beside it the {FLOOR_RELAY} relay" if floor else "; no relay")
               + f"; load average {load} at the start")
    try:
        with _sigterm_as_interrupt():
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
            common, outcomes = run(
                settings, only, dovecot_performance=not args.dovecot_default_processes,
                profile_dir=args.profile, cprofile=args.cprofile, relay=args.relay,
                baseline=baseline, floor=floor, bare=args.bare, repeat=args.repeat,
                on_run=partial(_print_run, heading=heading, repeat=args.repeat,
                               labels=labels, names=names, ab=ab),
            )
    except KeyboardInterrupt:
        print("interrupted; Dovecot and the proxies were stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, ValueError) as exc:  # set-up failed: Dovecot or a proxy
        print(f"benchmark set-up failed: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # from inside a trio nursery
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        print("interrupted; Dovecot and the proxies were stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    if args.repeat > 1:
        print(f"\n### Spread over {args.repeat} runs\n")
        print(render_spread([o.figures for o in outcomes], names, labels))
        tally = render_bars_over_runs([o.rows for o in outcomes])
        if tally:
            print("\n" + tally)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nThe benchmark took {elapsed:.0f}s; load average {load} (1 / 5 / 15 min) "
          "at the end.")
    last = outcomes[-1]
    if args.json:
        doc: dict[str, Any] = {
            "mode": mode, "settings": asdict(settings), "seconds": round(elapsed, 1),
            "rows": [asdict(r) | {"verdict": r.verdict} for r in last.rows],
            "results": common | last.results,
            "figures": [f.as_dict() for f in last.figures],
        }
        if args.repeat > 1:
            doc["runs"] = [
                {"seconds": o.seconds, "rows": [asdict(r) | {"verdict": r.verdict}
                                                for r in o.rows],
                 "results": o.results, "figures": [f.as_dict() for f in o.figures]}
                for o in outcomes
            ]
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
