"""Where does the proxy's CPU go?  Per NOOP round trip and per full session.

Run from the repository root::

    python -m benchmarks.breakdown            # about two minutes
    python -m benchmarks.breakdown --quick    # a smoke run
    python -m benchmarks.breakdown --json breakdown.json --keep /tmp/stacks

One private Dovecot (``tests/dovecot.py``, high-performance login mode) and
one proxy in front of it, ``popproxy run`` in a process of its own and
configured as in production: the audit to a file with the hash chain
(``fsync = "session"``, the default), the metrics endpoint on (not
scraped during the run), operational logs at ``info`` (the default) to a
file, the default policy (its per-IP and per-user session caps raised: a
load test is one address).  Two workloads, in rounds:

- NOOP: one logged-in session, blocks of NOOP round trips;
- sessions: 50 clients doing USER, PASS, STAT, UIDL, RETR 1, QUIT back to
  back (each session counted when it completes, also after the block's
  deadline, as the CPU of its tail is metered too).

Each round measures each workload twice, once with py-spy attached
(``record --gil --format raw``, a new py-spy per block) and once without,
the order swapped every other round, so that the cost of sampling is
measured in the same run and under the same noise: the "sampling
overhead" line compares the CPU per unit of the two.

How the table is made.  The process's CPU over the sampled blocks comes
from its CPU-time clock (all threads), split into user and system time by
``/proc/<pid>/stat``.  The kernel's line is the system time (``stime``):
what the process spends inside send, recv, epoll_wait, accept, connect,
close, write and fdatasync, as the kernel accounts it; it is measured, not
sampled.  py-spy samples only while a thread holds the GIL, which CPython
drops around every blocking system call, so its samples are the process's
Python time, and they share out the user time (``utime``): a category's
figure is its share of the samples times the user CPU per unit.  The lines
add up to the measured CPU per NOOP and per session.  Each sample is
charged to the innermost frame of popproxy or of a library that decides
a category (``benchmarks/_stacks.py``): time in prometheus_client under
``metrics.py`` is metrics, time in trio under ``sockio.py`` is trio,
structlog's is the audit's or the logs' by its caller.

Why these py-spy options: ``--nonblocking`` (reading the stacks without
stopping the process) lost 10-28 % of its samples to read errors in a
trial, and those are the samples of fast-changing stacks, not a random
subset; ``--native`` (to see the system calls as frames) needs the process
stopped too, costs about 25 % more CPU per NOOP, and counts threads that
sleep in futex or poll waits as running (they are runnable for a moment
after every stop).  The "coverage" line checks the premise: GIL samples
per second over the sampling rate times the user CPU share of wall time
is about 1 when the samples track user time (above 1: the process held
the GIL while preempted; below: samples lost to errors).

Which build: the pure-Python package by default (``POPPROXY_PURE=1``).
The mypyc-compiled core of ``make`` runs its functions without Python
frames, so py-spy charges their time to the frame that called them (the
relay's), and the framing, session and event lines read zero; the
pure build shows each category, and ``benchmarks.run`` measures what
compiling saves (``--baseline HEAD`` runs the pure sources of the same
commit beside the compiled tree).  ``--compiled`` samples the compiled
build anyway.

What the figures do not show: CPython's garbage collector and the
interpreter's own work are charged to the Python frame that was running;
CPU the proxy causes in Dovecot or in the client is not the proxy's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from benchmarks._client import ClientErrors, Conn, full_session
from benchmarks._procs import (
    CpuMeter,
    ProxyProcess,
    dovecot_with_mail,
    free_port,
    raise_fd_limit,
)
from benchmarks._profile import find_py_spy
from benchmarks._stacks import (
    CATEGORIES,
    OTHER,
    Breakdown,
    Categorizer,
    allocate,
    parse_folded,
    shares,
)
from tests.dovecot import ensure_dovecot

WORKLOADS = ("noop", "sessions")
UNIT = {"noop": "NOOP", "sessions": "session"}
ARMS = ("sampled", "plain")
CLIENTS = 50
TIME_BOUND = 900.0  # seconds for all rounds; a round that starts later is not run
SETTLE = 0.05  # seconds metered after a session block, for the proxy's tail of it


@dataclass(frozen=True)
class Settings:
    rounds: int = 10
    noops: int = 10_000  # per NOOP block: about 2 s
    session_seconds: float = 3.0  # per session block
    rate: int = 250  # py-spy samples per second

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=2, noops=1500, session_seconds=1.0)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# py-spy
# --------------------------------------------------------------------------


@dataclass
class SampleRun:
    """One py-spy attachment: its folded-stack file and what it reported."""

    output: Path
    samples: int = 0
    errors: int = 0


@contextlib.contextmanager
def attach(pid: int, output: Path, rate: int, timeout: float = 20.0) -> Iterator[SampleRun]:
    """py-spy samples ``pid`` (GIL holders only, process stopped per sample)
    from when it says it is sampling until the block ends."""
    binary = find_py_spy()
    if binary is None:
        raise RuntimeError("needs py-spy: pip install -e '.[dev]'")
    proc = subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--output", str(output), "--format", "raw",
         "--rate", str(rate), "--gil"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    run = SampleRun(output)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:  # bounded by the deadline
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise RuntimeError("py-spy did not start sampling: "
                                   + _drain(proc.stderr).strip()[-500:])
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                line = proc.stdout.readline().decode(errors="replace")
                if "Sampling process" in line:
                    break
        yield run
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            out, _ = proc.communicate(timeout=30.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=5.0)
        m = re.search(rb"Samples: (\d+) Errors: (\d+)", out or b"")
        if m:
            run.samples, run.errors = int(m[1]), int(m[2])


def _drain(stream: Any) -> str:
    with contextlib.suppress(OSError, ValueError):
        return stream.read().decode(errors="replace")  # type: ignore[no-any-return]
    return ""


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


def noop_block(conn: Conn, count: int) -> int:
    sock = conn.sock
    for _ in range(count):
        sock.sendall(b"NOOP\r\n")
        conn.ok_line()
    return count


async def session_block(port: int, users: Sequence[tuple[str, str]],
                        seconds: float) -> tuple[int, int]:
    """Every client does full sessions back to back until ``seconds`` pass:
    (sessions completed, failed).  Bounded: 15 s a session, 100,000 a client,
    ``seconds`` + 30 s in all."""
    deadline = trio.current_time() + seconds
    done = failed = 0

    async def client(user: str, password: str) -> None:
        nonlocal done, failed
        for _ in range(100_000):  # the deadline ends it long before
            if trio.current_time() >= deadline:
                return
            try:
                with trio.fail_after(15.0):
                    await full_session("127.0.0.1", port, user, password)
            except ClientErrors:
                failed += 1
                await trio.sleep(0.01)
                continue
            done += 1

    with trio.move_on_after(seconds + 30.0):
        async with trio.open_nursery() as nursery:
            for user, password in users:
                nursery.start_soon(client, user, password)
    return done, failed


# --------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------


@dataclass
class Arm:
    """One workload's blocks with or without py-spy: CPU and units, in sum
    and per block (in round order)."""

    cpu: float = 0.0  # seconds, CPU-time clock
    user: float = 0.0  # seconds, /proc ticks
    system: float = 0.0
    wall: float = 0.0
    units: int = 0
    failed: int = 0
    per_block: list[float] = field(default_factory=list)  # CPU seconds per unit

    def add(self, meter: CpuMeter, units: int) -> None:
        self.cpu += meter.cpu
        self.user += meter.user
        self.system += meter.system
        self.wall += meter.wall
        self.units += units
        self.per_block.append(meter.cpu / units if units else math.nan)

    @property
    def per_unit(self) -> float:
        return self.cpu / self.units if self.units else math.nan

    @property
    def system_fraction(self) -> float:
        ticks = self.user + self.system
        return self.system / ticks if ticks else math.nan


def _source_line_reader(root: Path) -> Callable[[str, int], str]:
    """``source_line(file, line)`` over the files under ``root`` (cached)."""
    @functools.cache
    def lines(file: str) -> tuple[str, ...]:
        path = Path(file) if Path(file).is_absolute() else root / file
        try:
            return tuple(path.read_text(errors="replace").splitlines())
        except OSError:
            return ()

    def source_line(file: str, line: int) -> str:
        text = lines(file)
        return text[line - 1] if 0 < line <= len(text) else ""

    return source_line


def event_class_names() -> frozenset[str]:
    """The names of ``popproxy.events.Event`` and its subclasses (none if it moved)."""
    try:
        from popproxy import events
    except ImportError:
        return frozenset()
    base = getattr(events, "Event", None)
    if not isinstance(base, type):
        return frozenset()
    names: set[str] = set()
    todo = [base]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return frozenset(names)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def production_config(workdir: Path, metrics_port: int) -> str:
    """The ``[audit]`` and ``[metrics]`` sections of a production set-up."""
    return (
        "[audit]\n"
        'sink = "file"\n'
        f'path = "{workdir / "audit.jsonl"}"\n'
        "hash_chain = true\n"
        "[metrics]\n"
        f'address = "127.0.0.1:{metrics_port}"\n'
    )


def measure(settings: Settings, keep: Path | None) -> dict[str, Any]:
    reason = ensure_dovecot()
    if reason is not None:
        raise SystemExit(f"benchmark needs Dovecot: {reason}")
    if find_py_spy() is None:
        raise SystemExit("benchmark needs py-spy: pip install -e '.[dev]'")
    raise_fd_limit(8192)
    users = {f"c{i:03d}": f"c{i:03d}-pw" for i in range(CLIENTS)}
    users["noop"] = "noop-pw"
    pairs = [(u, p) for u, p in users.items() if u != "noop"]
    arms = {w: {a: Arm() for a in ARMS} for w in WORKLOADS}
    runs: dict[str, list[SampleRun]] = {w: [] for w in WORKLOADS}
    facts: dict[str, Any] = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="breakdown-")))
        stacks_dir = keep if keep is not None else workdir / "stacks"
        stacks_dir.mkdir(parents=True, exist_ok=True)
        dovecot = dovecot_with_mail(stack, users, 400)
        metrics_port = free_port()
        proxy = ProxyProcess(dovecot.port, workdir, log_level="info",
                             extra_config=production_config(workdir, metrics_port))
        problem = proxy.check_config()
        if problem:
            raise SystemExit(f"bad configuration: {problem}")
        proxy.start()
        stack.callback(proxy.stop)
        log(f"proxy pid {proxy.pid} on port {proxy.port}, Dovecot on {dovecot.port}")
        trio.run(session_block, proxy.port, pairs, 1.0)  # warm-up
        conn = Conn("127.0.0.1", proxy.port, timeout=30.0)
        stack.callback(conn.close)
        conn.login("noop", users["noop"])
        noop_block(conn, 500)
        deadline = time.monotonic() + TIME_BOUND
        rounds = 0
        for r in range(settings.rounds):
            if time.monotonic() > deadline:
                log(f"stopped after {r} rounds at the time bound")
                break
            order = ARMS if r % 2 == 0 else ARMS[::-1]
            for workload in WORKLOADS:
                for arm in order:
                    sampler: contextlib.AbstractContextManager[SampleRun | None]
                    if arm == "sampled":
                        out = stacks_dir / f"{workload}-{r + 1}.folded"
                        sampler = attach(proxy.pid, out, settings.rate)
                    else:
                        sampler = contextlib.nullcontext()
                    meter = CpuMeter(proxy.pid)
                    failed = 0
                    with sampler as run, meter.measure():
                        if workload == "noop":
                            units = noop_block(conn, settings.noops)
                        else:
                            units, failed = trio.run(session_block, proxy.port, pairs,
                                                     settings.session_seconds)
                            time.sleep(SETTLE)
                    arms[workload][arm].add(meter, units)
                    arms[workload][arm].failed += failed
                    if run is not None:
                        runs[workload].append(run)
                    unit_cost = meter.cpu / units * 1e6 if units else math.nan
                    log(f"round {r + 1}/{settings.rounds} {workload} {arm}: {units} "
                        f"{UNIT[workload]}s, {unit_cost:,.1f} µs CPU each"
                        + (f", {run.samples} samples, {run.errors} errors" if run else "")
                        + (f", {failed} failed" if failed else ""))
            proxy.check_alive()
            rounds += 1
        conn.cmd("QUIT")
        facts["rounds"] = rounds
        facts["audit_records"] = _count_lines(workdir / "audit.jsonl")
        facts["metrics_endpoint"] = _metrics_ok(metrics_port)
        facts["load_after"] = os.getloadavg()
        categorizer = Categorizer(event_class_names(), _source_line_reader(proxy.source_root))
        breakdowns = {w: _merge(runs[w], categorizer) for w in WORKLOADS}
    return _results(settings, arms, runs, breakdowns, facts)


def _merge(runs: Sequence[SampleRun], categorizer: Categorizer) -> Breakdown:
    stacks: Counter[Any] = Counter()
    for run in runs:
        with contextlib.suppress(OSError):
            stacks.update(parse_folded(run.output.read_text(errors="replace")))
    return Breakdown.of(stacks, categorizer)


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _metrics_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5.0) as resp:
            return resp.status == 200 and b"popproxy_" in resp.read()
    except OSError:
        return False


def _results(settings: Settings, arms: Mapping[str, Mapping[str, Arm]],
             runs: Mapping[str, Sequence[SampleRun]], breakdowns: Mapping[str, Breakdown],
             facts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": asdict(settings), "facts": facts, "workloads": {}}
    for w in WORKLOADS:
        sampled, plain = arms[w]["sampled"], arms[w]["plain"]
        b = breakdowns[w]
        share = shares(b.samples)
        per_unit_us = sampled.per_unit * 1e6
        sys_frac = sampled.system_fraction
        us = allocate(share, per_unit_us * (1 - sys_frac), per_unit_us * sys_frac)
        user_us = per_unit_us * (1 - sys_frac)
        paired = [s / p - 1 for s, p in zip(sampled.per_block, plain.per_block, strict=False)
                  if p and not math.isnan(s) and not math.isnan(p)]
        n_samples = sum(r.samples for r in runs[w])
        user_seconds = sampled.cpu * (1 - sys_frac)
        coverage = n_samples / (settings.rate * user_seconds) if user_seconds else math.nan
        out["workloads"][w] = {
            "unit": UNIT[w],
            "us_per_unit": us,
            "share_of_cpu": {k: v / per_unit_us for k, v in us.items()} if per_unit_us else {},
            "share_of_samples": share,
            "cpu_us_sampled": per_unit_us,
            "cpu_us_plain": plain.per_unit * 1e6,
            "user_us_sampled": user_us,
            "system_us_sampled": per_unit_us * sys_frac,
            "system_fraction_plain": plain.system_fraction,
            "overhead": sampled.per_unit / plain.per_unit - 1,
            "overhead_paired": statistics.median(paired) if paired else math.nan,
            "samples": n_samples,
            "errors": sum(r.errors for r in runs[w]),
            "samples_categorized": b.total,
            "coverage": coverage,
            "sampled_seconds": sampled.wall,
            "units": {"sampled": sampled.units, "plain": plain.units},
            "failed": {"sampled": sampled.failed, "plain": plain.failed},
            "per_block_us": {"sampled": [x * 1e6 for x in sampled.per_block],
                             "plain": [x * 1e6 for x in plain.per_block]},
            "top_frames": [
                {"category": cat, "frame": label, "samples": n,
                 "us": n / b.total * user_us if b.total else math.nan}
                for (cat, label), n in b.frames.most_common(40)
            ],
            "trio_for": [
                {"frame": label, "samples": n,
                 "us": n / b.total * user_us if b.total else math.nan}
                for label, n in b.trio_for.most_common(15)
            ],
        }
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def render(results: Mapping[str, Any]) -> str:
    ws = results["workloads"]
    noop, sess = ws["noop"], ws["sessions"]
    facts = results["facts"]
    s = results["settings"]
    lines = [
        "| where the proxy's CPU goes | µs per NOOP | % | µs per session | % |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, label in CATEGORIES:
        a, b = noop["us_per_unit"][key], sess["us_per_unit"][key]
        lines.append(f"| {label} | {a:,.1f} | {_pct(a, noop['cpu_us_sampled'])} | "
                     f"{b:,.0f} | {_pct(b, sess['cpu_us_sampled'])} |")
    lines.append(f"| **total: measured CPU while sampled** | **{noop['cpu_us_sampled']:,.1f}** "
                 f"| 100 | **{sess['cpu_us_sampled']:,.0f}** | 100 |")
    lines.append(f"| without py-spy, same run | {noop['cpu_us_plain']:,.1f} | | "
                 f"{sess['cpu_us_plain']:,.0f} | |")
    lines.append("")
    for w in WORKLOADS:
        r = ws[w]
        lines.append(
            f"- {w}: {r['samples']:,} samples ({r['errors']} errors) over "
            f"{r['sampled_seconds']:.1f} s at {s['rate']} Hz; {r['units']['sampled']:,} "
            f"{r['unit']}s sampled, {r['units']['plain']:,} not; sampling overhead "
            f"{r['overhead']:+.1%} of CPU per {r['unit']} (paired per round: "
            f"{r['overhead_paired']:+.1%}); system time "
            f"{r['system_us_sampled'] / r['cpu_us_sampled']:.1%} of CPU sampled, "
            f"{r['system_fraction_plain']:.1%} not; coverage "
            f"{r['coverage']:.2f}"
            + (f"; failed sessions {r['failed']}" if any(r["failed"].values()) else ""))
    lb, la = facts["load_before"], facts["load_after"]
    lines.append(
        f"- {facts['rounds']} rounds; {facts['cpus']} CPUs; load average before "
        f"{lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}, after {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; "
        f"audit records written {facts['audit_records']:,}; metrics endpoint "
        + ("answered" if facts["metrics_endpoint"] else "DID NOT ANSWER"))
    for w in WORKLOADS:
        r = ws[w]
        lines += ["", f"Top deciding frames, {w} (µs per {r['unit']} of user time):", ""]
        lines += ["| µs | % of samples | category | frame |", "| ---: | ---: | --- | --- |"]
        total = r["samples_categorized"] or 1
        for f in r["top_frames"][:15]:
            lines.append(f"| {f['us']:,.1f} | {100 * f['samples'] / total:.1f} | "
                         f"{f['category']} | `{f['frame']}` |")
        lines.append("")
        lines.append(f"trio's time per {r['unit']} by the popproxy frame it ran for: " + "; ".join(
            f"`{f['frame']}` {f['us']:,.1f} µs" for f in r["trio_for"][:8]))
        others = [f for f in r["top_frames"] if f["category"] == OTHER][:5]
        if others:
            lines.append("")
            lines.append("in other: " + "; ".join(
                f"`{f['frame']}` {f['us']:,.1f} µs" for f in others))
    return "\n".join(lines)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}" if whole else "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.breakdown",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two short rounds")
    ap.add_argument("--rounds", type=int, help="rounds (each: both workloads, both arms)")
    ap.add_argument("--rate", type=int, help="py-spy samples per second (default 250)")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("--keep", metavar="DIR", type=Path,
                    help="keep py-spy's folded stacks (one file per sampled block) here")
    ap.add_argument("--compiled", action="store_true",
                    help="sample the mypyc-compiled build (its core runs without Python "
                         "frames, so its time shows under the shell that calls it); "
                         "by default the proxy runs as pure Python (POPPROXY_PURE=1)")
    args = ap.parse_args(argv)
    if not args.compiled:
        os.environ["POPPROXY_PURE"] = "1"  # inherited by the proxy process
    settings = Settings.quick() if args.quick else Settings()
    if args.rounds:
        settings = Settings(args.rounds, settings.noops, settings.session_seconds, settings.rate)
    if args.rate:
        settings = Settings(settings.rounds, settings.noops, settings.session_seconds, args.rate)
    try:
        results = measure(settings, args.keep)
    except KeyboardInterrupt:
        print("interrupted; Dovecot and the proxy were stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print()
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

