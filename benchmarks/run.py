"""Load generator: popproxy in front of a real Dovecot, against Dovecot direct.

Run from the repository root::

    python -m benchmarks.run            # the full run (about a minute)
    python -m benchmarks.run --quick    # a smoke run: fewer rounds, smaller sizes
    python -m benchmarks.run --json results.json
    python -m benchmarks.run --only noop,pipeline --profile /tmp/prof   # py-spy
    python -m benchmarks.run --baseline main --only noop,sessions,concurrent,pipeline
    python -m benchmarks.run --baseline HEAD~3 --repeat 2 --quick

It starts one private Dovecot (``tests/dovecot.py``) on a free loopback
port, delivers the test messages, starts the proxy as a separate process
(``python -m popproxy run -c FILE``) in front of it, and measures each
scenario DIRECT (client -> Dovecot) and through the PROXY, interleaved
(direct, proxy, direct, proxy, ...) so that machine noise hits both alike:

1. RETR throughput of a 20 MiB and a 100 MiB message, and the proxy's RSS
   while it streams the 100 MiB one (sampled every 2 ms, and the kernel's
   peak-RSS mark reset before the transfer).
2. NOOP round trip p50/p99 on one logged-in session.
3. One client doing full sessions back to back (greeting, USER, PASS, STAT,
   UIDL, RETR 1, QUIT): latency per session and per step, and the steps
   slower than 35 ms (the Nagle / delayed-ACK trap costs 40 ms).
4. Full sessions per second with 50 concurrent clients (one user each).
5. 1,000 pipelined LIST n / UIDL n commands in one write.
6. Proxy RSS per idle logged-in session at 1,000 open sessions (on a fresh
   proxy process, so that memory freed by earlier scenarios is not reused).

Besides the table of figures and bars it prints the per-step latencies of
scenario 3 and the proxy process's CPU time while it was being measured
(user + system, and per MB / NOOP / session / pipelined command), which
tells whether a figure is bound by the proxy's CPU.

A/B mode: ``--baseline REV`` (any git revision of this repository) exports
``popproxy/`` as of REV (``git archive``, into the run's temporary
directory) and starts a second proxy from it beside the current tree's,
with the same interpreter, virtualenv and configuration, in front of the
same Dovecot.  Both proxies are started the same way (``runpy``, with the
editable install's import finder dropped: see ``_ab.TREE_LAUNCHER``), so
that they differ in their code only, and a child run the same way first
proves where each one's ``popproxy`` comes from.  Every scenario then
measures three targets interleaved, direct, baseline and current (the two
proxies swap places every other round), and a second table gives each
figure for all three with the current / baseline ratio, both of medians
and "paired" (the median of the rounds' own ratios, which a drift of the
machine between rounds moves less), and each proxy's CPU per NOOP,
session, pipelined command and MB.  Scenario 4 runs twice as many rounds,
half as long, in this mode.

``--repeat N`` runs the chosen scenarios N times, each run with freshly
started proxies (Dovecot stays), and ends with each figure's spread
(min-max) and every run's ratio: this 2-core VM drifts by up to 1.5x
within minutes, and a proxy process can keep a bias of its own for its
lifetime, so one run's ratio is not the noise.  ``--only`` also takes
``sessions`` (= sequential), ``retr`` (= throughput) and ``rss`` (= idle).

Dovecot runs in its documented high-performance mode (login processes
serve many connections, mail processes are reused); with
``--dovecot-default-processes`` it forks a login and a mail process per
connection as it does out of the box, which on a small machine makes
Dovecot's process churn, not the proxy, the limit of the session rate.

Every loop is bounded in count and in time; everything is on 127.0.0.1 with
ports picked by binding port 0; Dovecot and the proxy are stopped on exit,
Ctrl-C, SIGTERM and errors.  MB/s means 10^6 octets per second of the raw
reply.  ``python -m benchmarks.floor`` measures what a minimal relay costs.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import trio

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
    name: str  # "direct" | "baseline" | "proxy" (the current tree's)
    host: str
    port: int
    pid: int | None = None  # a proxy's process, whose CPU is metered


#: Column titles of the targets; "proxy" is "Current" in an A/B run.
LABELS = {"direct": "Direct", "baseline": "Baseline", "proxy": "Proxy"}
AB_LABELS = LABELS | {"proxy": "Current"}


@dataclass
class Row:
    figure: str
    direct: str
    proxy: str
    compare: str
    bar: str
    ok: bool | None  # None: no bar (informational)

    @property
    def verdict(self) -> str:
        return "—" if self.ok is None else ("PASS" if self.ok else "MISS")


@dataclass
class Env:
    """The processes under test and one run's findings.

    ``baseline``: the proxy started from an earlier revision's tree, in an
    A/B run; it is measured as a third target, named "baseline", between
    direct and the current tree's "proxy".
    """

    settings: Settings
    dovecot: Dovecot
    proxy: ProxyProcess
    workdir: Path
    users: dict[str, str]
    conc_users: list[str]
    baseline: ProxyProcess | None = None
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
    def proxies(self) -> dict[str, ProxyProcess]:
        """The proxy processes by target name: "baseline" (A/B runs) and "proxy"."""
        out = {} if self.baseline is None else {"baseline": self.baseline}
        return out | {"proxy": self.proxy}

    @property
    def targets(self) -> tuple[Target, ...]:
        return self.order(0)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.targets)

    def order(self, round_: int) -> tuple[Target, ...]:
        """The targets in the order round ``round_`` measures them.

        Direct first, as always; in an A/B run the two proxies swap places
        every other round, so that a drift within a round does not favour
        the one measured first.
        """
        proxies = [Target(name, p.host, p.port, p.pid) for name, p in self.proxies.items()]
        if round_ % 2:
            proxies.reverse()
        return (self.direct, *proxies)

    def cpu_meters(self) -> Meters:
        return Meters({name: CpuMeter(p.pid) for name, p in self.proxies.items()})

    def check_alive(self) -> None:
        for p in self.proxies.values():
            p.check_alive()

    def figure(self, key: str, label: str, values: dict[str, float], digits: int = 1,
               rounds: dict[str, list[float]] | None = None) -> None:
        self.figures.append(Figure(key, label, values, digits, rounds or {}))

    def record_cpu(self, scenario: str, meters: Meters, units: Mapping[str, Sequence[float]],
                   unit: str, scale: float, per: str, key: str, label: str) -> None:
        """Each proxy's CPU while it was measured: busy share and CPU per unit.

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
        env.record_cpu(f"RETR {size_mib} MiB", meters,
                       {name: [octets / 1e6] * s.retr_rounds for name in env.proxies}, "MB",
                       1000.0, "ms per MB", f"cpu_retr_{size_mib}mib",
                       f"Proxy CPU per MB, RETR {size_mib} MiB (ms)")
        med = {name: median(v) for name, v in speeds.items()}
        d, p = med["direct"], med["proxy"]
        env.results[f"retr_{size_mib}mib"] = {
            "octets": octets, "mbps": speeds, "median_direct": d, "median_proxy": p,
            "ratio": p / d, "proxy_rss": rss_rounds["proxy"],
        } | ({} if env.baseline is None else {
            "median_baseline": med["baseline"], "baseline_rss": rss_rounds["baseline"],
        })
        env.figure(f"retr_{size_mib}mib_mbps", f"RETR {size_mib} MiB throughput (MB/s)", med, 0,
                   speeds)
        env.rows.append(Row(
            f"RETR {size_mib} MiB throughput (MB/s)", fmt(d, 0), fmt(p, 0),
            f"{p / d:.2f}x", "≥ 0.70x", p / d >= 0.7,
        ))
        if largest and rss_rounds["proxy"]:
            worst = {name: max(v, key=lambda x: x["growth_kib"])
                     for name, v in rss_rounds.items() if v}
            env.figure(f"retr_{size_mib}mib_rss_growth",
                       f"Proxy RSS growth streaming {size_mib} MiB (MiB, worst)",
                       {name: w["growth_kib"] / 1024 for name, w in worst.items()})
            w = worst["proxy"]
            growth_mib = w["growth_kib"] / 1024
            env.rows.append(Row(
                f"Proxy RSS streaming {size_mib} MiB (MiB, worst of {len(rss_rounds['proxy'])})",
                "—",
                f"{w['before_kib'] / 1024:.1f} → peak {w['peak_kib'] / 1024:.1f}",
                f"+{growth_mib:.1f} MiB", "≤ +10 MiB", growth_mib <= 10.0,
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
    env.record_cpu("NOOP", meters,
                   {k: [s.noop_block] * (len(v) // s.noop_block) for k, v in lat.items()},
                   "NOOP", 1e6,
                   "µs per NOOP", "cpu_noop", "Proxy CPU per NOOP round trip (µs)")
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
    d50, p50 = summary["direct"]["p50_us"], summary["proxy"]["p50_us"]
    d99, p99 = summary["direct"]["p99_us"], summary["proxy"]["p99_us"]
    log("NOOP p50 / p99: " + ", ".join(
        f"{name} {summary[name]['p50_us']:.1f} / {summary[name]['p99_us']:.1f} µs"
        for name in lat))
    n = summary["count"]["proxy"]
    env.rows.append(Row(
        f"NOOP round trip p50 (µs, {n:,} each)", fmt(d50), fmt(p50),
        f"+{p50 - d50:.1f} µs", "≤ +100 µs", p50 - d50 <= 100.0,
    ))
    env.rows.append(Row(
        "NOOP round trip p99 (µs)", fmt(d99), fmt(p99), f"+{p99 - d99:.1f} µs", "—", None,
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
            with meters.measure(t):
                for _ in range(size):
                    per[t.name].append(_full_session(t, user, env.users[user]))
            spent[t.name] += time.monotonic() - t0
            progressed = True
        if not progressed:
            env.notes.append("sequential sessions: stopped early at the time bound")
            break
    env.record_cpu("sequential sessions", meters, sizes,
                   "session", 1000.0, "ms per session", "cpu_sequential",
                   "Proxy CPU per full session, one client (ms)")
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
    env.results["sequential"] = summary
    d, p = summary["direct"], summary["proxy"]
    log("sessions p50, slow steps: " + ", ".join(
        f"{name} {summary[name]['session_p50_ms']:.2f} ms, {summary[name]['slow_steps']}"
        for name in per))
    env.rows.append(Row(
        f"Sequential session p50 / p99 (ms, {p['sessions']} each)",
        f"{d['session_p50_ms']:.2f} / {d['session_p99_ms']:.2f}",
        f"{p['session_p50_ms']:.2f} / {p['session_p99_ms']:.2f}",
        f"+{p['session_p50_ms'] - d['session_p50_ms']:.2f} / "
        f"+{p['session_p99_ms'] - d['session_p99_ms']:.2f} ms",
        "—", None,
    ))
    env.rows.append(Row(
        "Steps slower than 35 ms (count, share)",
        f"{d['slow_steps']} / {d['steps_total']} ({d['slow_share']:.2%})",
        f"{p['slow_steps']} / {p['steps_total']} ({p['slow_share']:.2%})",
        f"{p['slow_steps'] - d['slow_steps']:+d}", "proxy = 0", p["slow_steps"] == 0,
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
    env.record_cpu("concurrent sessions", meters, done_per_round, "session", 1000.0,
                   "ms per session", "cpu_concurrent",
                   f"Proxy CPU per full session, {len(users)} clients (ms)")
    med = {name: median(v) for name, v in rates.items()}
    d, p = med["direct"], med["proxy"]
    env.results["concurrent"] = {
        "clients": len(users), "seconds": s.conc_seconds, "rates": rates,
        "median_direct": d, "median_proxy": p, "ratio": p / d,
        "errors": {k: len(v) for k, v in errors.items()},
        "client_cpu_ms_per_session": {
            k: client_cpu[k] / client_sessions[k] * 1000 if client_sessions[k] else math.nan
            for k in client_cpu
        },
        "error_examples": {k: v[:10] for k, v in errors.items()},
    } | ({} if env.baseline is None else {"median_baseline": med["baseline"]})
    env.figure("concurrent_rate", f"Full sessions/s, {len(users)} concurrent clients", med, 0,
               rates)
    n_err = sum(len(v) for v in errors.values())
    env.rows.append(Row(
        f"Sessions/s, {len(users)} concurrent clients" + (f" ({n_err} errors)" if n_err else ""),
        fmt(d, 0), fmt(p, 0), f"{p / d:.2f}x", "≥ 0.60x", p / d >= 0.6 and not errors["proxy"],
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
    env.record_cpu("pipeline (session incl. login)", meters,
                   {name: [s.pipeline_cmds] * s.pipeline_rounds for name in env.proxies},
                   "command",
                   1e6, "µs per command", "cpu_pipeline",
                   f"Proxy CPU per pipelined command, {s.pipeline_cmds:,} a session (µs)")
    med = {name: median(v) for name, v in times.items()}
    d, p = med["direct"], med["proxy"]
    env.results["pipeline"] = {
        "commands": s.pipeline_cmds, "octets": len(batch), "ms": times,
        "median_direct": d, "median_proxy": p, "ratio": p / d,
    } | ({} if env.baseline is None else {"median_baseline": med["baseline"]})
    env.figure("pipeline_ms", f"{s.pipeline_cmds:,} pipelined commands, write → last reply (ms)",
               med, 2, times)
    env.rows.append(Row(
        f"{s.pipeline_cmds:,} pipelined LIST n/UIDL n, write → last reply (ms)",
        fmt(d, 2), fmt(p, 2), f"{p / d:.2f}x", "≤ 2.00x", p / d <= 2.0,
    ))


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
    for name, proxy in env.proxies.items():  # one after the other: 1,000 sessions each
        # A fresh proxy process: its RSS growth is all per-session cost, not
        # memory freed by earlier scenarios and reused.
        fresh = ProxyProcess(
            env.dovecot.port, env.workdir / f"idle-{name}", max_sessions=s.idle_sessions + 100,
            source_root=proxy.source_root,
            launcher=CLI_LAUNCHER if env.baseline is None else TREE_LAUNCHER,
        )
        fresh.workdir.mkdir(exist_ok=True)
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
    ok = res["opened"] == s.idle_sessions and res["alive"] == res["opened"] and per <= 48.0
    note = "" if res["opened"] == s.idle_sessions else f", only {res['opened']} opened"
    env.rows.append(Row(
        f"Proxy RSS per idle logged-in session at {s.idle_sessions:,} (KiB{note})",
        "—",
        f"{res['rss_before_kib'] / 1024:.1f} → {res['rss_after_kib'] / 1024:.1f} MiB",
        f"{per:.1f} KiB", "≤ 48 KiB", ok,
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
    repeat: int = 1,
    on_run: Callable[[int, Outcome, dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[Outcome]]:
    """Start Dovecot and the proxy (and the baseline's), run the scenarios
    ``repeat`` times; the facts common to the runs and each run's outcome.

    ``on_run(i, outcome, common)`` is called as each run ends.
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
    common: dict[str, Any] = {
        "environment": _environment(), "fd_limit": fd_limit,
        "dovecot_mode": "performance" if dovecot_performance else "default (high-security)",
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
                            source_root=root, launcher=how),
                        common, baseline)
                env = Env(settings, dovecot, started["proxy"], run_dir, users, conc_users,
                          started.get("baseline"))
                _run_scenarios(env, only, profile_dir)
                env.results["failed"] = env.failed
                env.results["proxy_cpu"] = env.cpu.get("proxy", {})
                if "baseline" in started:
                    env.results["baseline_cpu"] = env.cpu.get("baseline", {})
                for name, proc in env.proxies.items():
                    lines = proc.log_lines()
                    if lines:
                        env.notes.append(
                            f"the {name} logged {len(lines)} lines, the last: {lines[-1]}")
            outcome = Outcome(env.results, env.rows, env.notes, env.figures, env.failed,
                              round(time.monotonic() - t0, 1))
            outcomes.append(outcome)
            if on_run is not None:
                on_run(i, outcome, common)
    return common, outcomes


def render_table(rows: Sequence[Row], proxy: str = "Proxy") -> str:
    head = ("Figure", "Direct", proxy, f"{proxy} vs direct", "Bar", "Result")
    body = [(r.figure, r.direct, r.proxy, r.compare, r.bar, r.verdict) for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def render_steps(results: dict[str, Any], labels: dict[str, str] = LABELS) -> str:
    seq = results.get("sequential")
    if not seq:
        return ""
    names = [n for n in ("direct", "baseline", "proxy") if n in seq]
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
    if not cpu:
        return ""
    if not base:
        lines = [
            "| Proxy CPU while measured | Wall (s) | CPU user + sys (s) | Busy (one core) "
            "| CPU per unit |",
            "|---|---|---|---|---|",
        ]
        for name, c in cpu.items():
            lines.append(
                f"| {name} | {c['wall_s']:.2f} | {c['user_s']:.2f} + {c['system_s']:.2f} | "
                f"{c['busy']:.0%} | "
                f"{c['per_unit']:.3g} {c['per']} |"
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
    print(render_table(outcome.rows, labels["proxy"]))
    if ab or repeat > 1:
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
    labels = AB_LABELS if ab else LABELS
    names = ("direct", "baseline", "proxy") if ab else ("direct", "proxy")
    settings = Settings.quick() if args.quick else Settings()
    if ab:
        settings = settings.for_ab()
    mode = "quick" if args.quick else "full"
    started = time.monotonic()
    subject = "popproxy" if args.relay is None else f"the {args.relay} relay (no POP3 logic)"
    if baseline is not None:
        subject = "popproxy A/B"
    heading = f"{subject} benchmark ({mode}" + (f", {args.repeat} runs" if args.repeat > 1
                                               else "")
    try:
        with _sigterm_as_interrupt():
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
            common, outcomes = run(
                settings, only, dovecot_performance=not args.dovecot_default_processes,
                profile_dir=args.profile, cprofile=args.cprofile, relay=args.relay,
                baseline=baseline, repeat=args.repeat,
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
    print(f"\nThe benchmark took {elapsed:.0f}s.")
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
