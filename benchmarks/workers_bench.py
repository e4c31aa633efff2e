"""Worker processes: the session rate and CPU with ``workers = 1`` and ``2``,
and what one ``/metrics`` over many workers costs, two ways.

Run from the repository root::

    python -m benchmarks.workers_bench            # about two minutes
    python -m benchmarks.workers_bench --quick    # a smoke run
    python -m benchmarks.workers_bench --json out.json

1. **Sessions.**  One private Dovecot (``tests/dovecot.py``, high-performance
   mode) with 50 users; two proxies in front of it, ``popproxy run`` with
   ``[server] workers = 1`` (one process, as before) and ``workers = 2`` (a
   supervisor and two worker processes).  Rounds of full sessions (login,
   STAT, UIDL, RETR 1, QUIT) by 50 concurrent clients, the two proxies
   interleaved (1, 2, 2, 1, ...).  Per proxy: sessions per second and CPU
   per session summed over its whole process tree (``CpuMeter(tree=True)``),
   and the supervisor's own share.  The load generator runs on the same
   machine: its CPU per session is printed too, since on a 2-core machine
   it competes with the workers.
2. **Scrapes.**  ``GET /metrics`` against each proxy, interleaved: the
   single process's own exposition, and the supervisor's merge of its two
   workers' (each asked over its channel at request time); wall time and
   CPU per scrape over the tree.
3. **The other way: prometheus_client's multiprocess mode**, measured in
   child processes with ``PROMETHEUS_MULTIPROC_DIR`` set (every value then
   lives in a per-process mmap file): the metric work of one full session,
   replayed from a real session's events through ``Metrics.observe`` (plus,
   since that mode cannot collect popproxy's custom command collector, the
   command counters and latency histogram as ordinary library metrics),
   against the same in normal mode; and the time to collect and render
   two processes' files with ``MultiProcessCollector``.

Printed, not asserted.  Everything is on 127.0.0.1 with ports from binding
port 0; Dovecot and the proxies are stopped on exit and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from benchmarks._client import full_session, session_round
from benchmarks._procs import (
    REPO_ROOT,
    CpuMeter,
    ProxyProcess,
    dovecot_with_mail,
    free_port,
    raise_fd_limit,
)

__all__ = ["main"]

CLIENTS = 50


@dataclass
class Settings:
    rounds: int = 6
    seconds: float = 5.0
    scrapes: int = 40
    replays: int = 3000

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=2, seconds=2.0, scrapes=10, replays=500)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# 1 and 2: the proxies
# --------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    workers: int
    proxy: ProxyProcess
    metrics_port: int
    rates: list[float] = field(default_factory=list)
    sessions: int = 0
    errors: list[str] = field(default_factory=list)
    client_cpu: float = 0.0
    tree: CpuMeter | None = None
    own: CpuMeter | None = None
    scrape_wall: list[float] = field(default_factory=list)
    scrape_meter: CpuMeter | None = None


def _start(name: str, workers: int, dovecot_port: int, workdir: Path) -> Target:
    metrics_port = free_port()
    (workdir / name).mkdir()
    proxy = ProxyProcess(
        dovecot_port, workdir / name,
        extra_config=f'[server]\nworkers = {workers}\n'
                     f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n',
    )
    proxy.start()
    return Target(name, workers, proxy, metrics_port)


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return bytes(r.read())


def bench_sessions(targets: Sequence[Target], users: dict[str, str], s: Settings) -> None:
    def round_for(t: Target, seconds: float) -> tuple[int, list[str]]:
        sessions = [(u, partial(full_session, "127.0.0.1", t.proxy.port, u, pw))
                    for u, pw in users.items()]
        return trio.run(session_round, sessions, seconds)

    for t in targets:  # warm-up: imports, caches, Dovecot's processes
        round_for(t, 1.0)
        t.tree = CpuMeter(t.proxy.pid, tree=True)
        t.own = CpuMeter(t.proxy.pid)
    for r in range(s.rounds):
        order = targets if r % 2 == 0 else list(reversed(targets))
        for t in order:
            assert t.tree is not None
            assert t.own is not None
            c0 = time.process_time()
            with t.tree.measure(), t.own.measure():
                done, errors = round_for(t, s.seconds)
            t.client_cpu += time.process_time() - c0
            t.sessions += done
            t.rates.append(done / s.seconds)
            t.errors += errors
            log(f"round {r + 1}/{s.rounds} workers={t.workers}: "
                f"{done / s.seconds:,.0f} sessions/s"
                + (f", {len(errors)} errors" if errors else ""))
            t.proxy.check_alive()


def bench_scrapes(targets: Sequence[Target], s: Settings) -> None:
    for t in targets:
        _scrape(t.metrics_port)  # warm-up
        t.scrape_meter = CpuMeter(t.proxy.pid, tree=True)
    for i in range(s.scrapes):
        for t in targets if i % 2 == 0 else list(reversed(targets)):
            assert t.scrape_meter is not None
            with t.scrape_meter.measure():
                w0 = time.perf_counter()
                _scrape(t.metrics_port)
                t.scrape_wall.append(time.perf_counter() - w0)


# --------------------------------------------------------------------------
# 3: multiprocess mode, in child processes
# --------------------------------------------------------------------------


def child(mode: str, replays: int) -> None:
    """``--child normal|mp``: the metric work of one session, replayed."""
    import trio as trio_
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from popproxy.logs import configure_logging
    from popproxy.metrics import COMMAND_LABELS, LATENCY_BUCKETS, Metrics

    configure_logging("warning", "json")
    events = trio_.run(_record_session)
    metrics = Metrics(CollectorRegistry())
    commands = Counter("popproxy_commands_lib", "x", ["command", "outcome"],
                       registry=metrics.registry)
    durations = Histogram("popproxy_command_duration_lib_seconds", "x", ["command"],
                          buckets=LATENCY_BUCKETS, registry=metrics.registry)
    for verb in COMMAND_LABELS:  # every series exists, as in Metrics
        durations.labels(verb)
        for outcome in ("ok", "err", "denied"):
            commands.labels(verb, outcome)
    from popproxy.events import Response

    responses = [e for _, e in events if isinstance(e, Response)]
    children = [(commands.labels(e.command.verb, e.outcome.value),
                 durations.labels(e.command.verb), e.finished - e.started) for e in responses]
    observe = metrics.observe
    t0 = time.process_time()
    for _ in range(replays):
        for info, event in events:
            observe(info, event)
    observer = (time.process_time() - t0) / replays
    t0 = time.process_time()
    for _ in range(replays):
        for counter, histogram, seconds in children:
            counter.inc()
            histogram.observe(seconds)
    library_commands = (time.process_time() - t0) / replays
    print(json.dumps({"mode": mode, "events": len(events), "commands": len(responses),
                      "observer_s": observer, "library_commands_s": library_commands}))


async def _record_session() -> list[Any]:
    """The events of one full session (USER, PASS, STAT, UIDL, RETR 1, QUIT)
    through an in-process proxy in front of the demo mail server."""
    from popproxy.app import build
    from popproxy.config import Config, HostPort, ListenConfig, UpstreamConfig
    from popproxy.demo import MailStore, serve_demo
    from popproxy.server import serve

    recorded: list[Any] = []
    closed = trio.Event()

    def record(info: Any, event: Any) -> None:
        recorded.append((info, event))
        if type(event).__name__ == "SessionClosed":
            closed.set()

    async with trio.open_nursery() as nursery:
        upstream = await nursery.start(serve_demo, MailStore.load_samples(), "127.0.0.1", 0)
        port = upstream[0].socket.getsockname()[1]
        app = build(Config(listeners=(ListenConfig((HostPort("127.0.0.1", 0),)),),
                           upstream=UpstreamConfig(address=HostPort("127.0.0.1", port))))
        app.proxy.observers.append(record)
        listeners = await nursery.start(serve, app.proxy,
                                        await trio.open_tcp_listeners(0, host="127.0.0.1"))
        proxy_port = listeners[0].socket.getsockname()[1]
        await full_session("127.0.0.1", proxy_port, "alice", "wonderland")
        with trio.fail_after(10):
            await closed.wait()
        nursery.cancel_scope.cancel()
    return recorded


def child_scrape(directory: str, scrapes: int) -> None:
    """``--child-scrape DIR``: collect and render the processes' files in DIR."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    size = len(generate_latest(registry))
    t0 = time.perf_counter()
    c0 = time.process_time()
    for _ in range(scrapes):
        generate_latest(registry)
    print(json.dumps({"wall_s": (time.perf_counter() - t0) / scrapes,
                      "cpu_s": (time.process_time() - c0) / scrapes, "bytes": size}))


def bench_multiprocess_mode(s: Settings, workdir: Path) -> dict[str, Any]:
    def run(args: list[str], env: dict[str, str]) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "benchmarks.workers_bench", *args],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=600, check=True)
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    directory = workdir / "multiproc"
    directory.mkdir()
    normal_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    mp_env = {**normal_env, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    out: dict[str, Any] = {"normal": [], "mp": []}
    for i in range(2):  # two processes of each, as two workers would be
        for mode, env in (("normal", normal_env), ("mp", mp_env)) if i % 2 == 0 else (
                ("mp", mp_env), ("normal", normal_env)):
            out[mode].append(run(["--child", mode, "--replays", str(s.replays)], env))
            log(f"metric work per session, {mode}: "
                f"{out[mode][-1]['observer_s'] * 1e6:.1f} µs observer, "
                f"{out[mode][-1]['library_commands_s'] * 1e6:.1f} µs library command metrics")
    out["mp_scrape"] = run(["--child-scrape", str(directory), "--scrapes", str(s.scrapes)],
                           normal_env)
    return out


# --------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(settings: Settings) -> dict[str, Any]:
    from tests.dovecot import ensure_dovecot

    reason = ensure_dovecot()
    if reason is not None:
        raise SystemExit(f"benchmark needs Dovecot: {reason}")
    raise_fd_limit(8192)
    users = {f"c{i:03d}": f"c{i:03d}-pw" for i in range(CLIENTS)}
    results: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "clients": CLIENTS}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="popproxy-w-")))
        dovecot = dovecot_with_mail(stack, users, 400)
        targets = []
        for name, workers in (("workers=1", 1), ("workers=2", 2)):
            target = _start(name, workers, dovecot.port, workdir)
            stack.callback(target.proxy.stop)
            targets.append(target)
            log(f"{name}: pid {target.proxy.pid} on 127.0.0.1:{target.proxy.port}")
        bench_sessions(targets, users, settings)
        bench_scrapes(targets, settings)
        for t in targets:
            assert t.tree is not None
            assert t.own is not None
            assert t.scrape_meter is not None
            results[t.name] = {
                "sessions_per_s": t.rates,
                "median_sessions_per_s": _median(t.rates),
                "cpu_ms_per_session_tree": t.tree.cpu / t.sessions * 1000,
                "cpu_ms_per_session_supervisor": (t.own.cpu / t.sessions * 1000
                                                  if t.workers > 1 else None),
                "client_cpu_ms_per_session": t.client_cpu / t.sessions * 1000,
                "errors": len(t.errors),
                "scrape_ms_p50": _median(t.scrape_wall) * 1000,
                "scrape_ms_max": max(t.scrape_wall) * 1000,
                "scrape_cpu_ms_tree": t.scrape_meter.cpu / len(t.scrape_wall) * 1000,
                "scrape_bytes": len(_scrape(t.metrics_port)),
            }
        results["multiprocess_mode"] = bench_multiprocess_mode(settings, workdir)
    return results


def render(r: dict[str, Any]) -> str:
    one, two = r["workers=1"], r["workers=2"]
    mp = r["multiprocess_mode"]
    normal_obs = _median([x["observer_s"] for x in mp["normal"]]) * 1e6
    mp_obs = _median([x["observer_s"] for x in mp["mp"]]) * 1e6
    normal_lib = _median([x["library_commands_s"] for x in mp["normal"]]) * 1e6
    mp_lib = _median([x["library_commands_s"] for x in mp["mp"]]) * 1e6
    lines = [
        f"== workers, 50 clients, {r['cpus']} CPUs",
        f"{'':34}{'workers = 1':>14}{'workers = 2':>14}{'ratio':>8}",
        f"{'full sessions/s (median)':34}{one['median_sessions_per_s']:>14,.0f}"
        f"{two['median_sessions_per_s']:>14,.0f}"
        f"{two['median_sessions_per_s'] / one['median_sessions_per_s']:>7.2f}x",
        f"{'proxy CPU per session, tree (ms)':34}{one['cpu_ms_per_session_tree']:>14.2f}"
        f"{two['cpu_ms_per_session_tree']:>14.2f}"
        f"{two['cpu_ms_per_session_tree'] / one['cpu_ms_per_session_tree']:>7.2f}x",
        f"{'  of which the supervisor (ms)':34}{'':>14}"
        f"{two['cpu_ms_per_session_supervisor']:>14.3f}",
        f"{'load generator CPU/session (ms)':34}{one['client_cpu_ms_per_session']:>14.2f}"
        f"{two['client_cpu_ms_per_session']:>14.2f}",
        f"{'session errors':34}{one['errors']:>14}{two['errors']:>14}",
        f"{'GET /metrics p50 (ms)':34}{one['scrape_ms_p50']:>14.1f}{two['scrape_ms_p50']:>14.1f}",
        f"{'GET /metrics max (ms)':34}{one['scrape_ms_max']:>14.1f}{two['scrape_ms_max']:>14.1f}",
        f"{'CPU per scrape, tree (ms)':34}{one['scrape_cpu_ms_tree']:>14.1f}"
        f"{two['scrape_cpu_ms_tree']:>14.1f}",
        f"{'exposition (bytes)':34}{one['scrape_bytes']:>14,}{two['scrape_bytes']:>14,}",
        "",
        "== one /metrics over workers: aggregation (above) against multiprocess mode",
        f"metric work per session, replayed ({mp['normal'][0]['events']} events, "
        f"{mp['normal'][0]['commands']} commands):",
        f"  Metrics.observe, normal values:           {normal_obs:7.1f} µs",
        f"  Metrics.observe, multiprocess (mmap):     {mp_obs:7.1f} µs",
        f"  command metrics as library metrics: normal {normal_lib:5.1f} µs, "
        f"multiprocess {mp_lib:5.1f} µs (the custom collector cannot be used there)",
        f"  so per session: aggregation {normal_obs:.1f} µs, multiprocess mode about "
        f"{mp_obs + mp_lib:.1f} µs",
        f"MultiProcessCollector over 2 processes' files: {mp['mp_scrape']['wall_s'] * 1000:.1f} ms"
        f" wall, {mp['mp_scrape']['cpu_s'] * 1000:.1f} ms CPU per scrape "
        f"({mp['mp_scrape']['bytes']:,} bytes)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a smoke run")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    p.add_argument("--child", choices=["normal", "mp"], help=argparse.SUPPRESS)
    p.add_argument("--child-scrape", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--replays", type=int, default=Settings().replays, help=argparse.SUPPRESS)
    p.add_argument("--scrapes", type=int, default=Settings().scrapes, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.replays)
        return 0
    if args.child_scrape:
        child_scrape(args.child_scrape, args.scrapes)
        return 0
    settings = Settings.quick() if args.quick else Settings()
    results = run(settings)
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
