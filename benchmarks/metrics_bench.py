"""What the metrics cost: RETR throughput and NOOP latency, metrics on vs off.

Run from the repository root::

    python -m benchmarks.metrics_bench            # under a minute
    python -m benchmarks.metrics_bench --quick    # a smoke run
    python -m benchmarks.metrics_bench --json out.json

One private Dovecot (``tests/dovecot.py``) holds a large message.  One proxy
process runs in front of it, built exactly as ``popproxy run`` builds it
(``app.build``), with its metrics endpoint.  The benchmark switches the
metrics observer on and off in that process (SIGUSR1) and, while on,
scrapes ``/metrics`` every ``--scrape-interval`` seconds from a thread (like
a Prometheus, but more often).  Rounds alternate the order (on, off, off,
on, ...), so that drift and machine noise hit both alike, and the cost is
the ratio of the medians over all rounds (the median of the per-round
ratios is shown too):

1. RETR throughput: fresh sessions RETR the large message; MB/s of the raw
   reply (median of ``--retrs`` per round and mode).
2. NOOP latency: ``--noops`` sequential NOOP round trips on one logged-in
   session; the median.

For information it also reports the proxy's CPU time per MB and per NOOP
(``/proc/<pid>/stat``) and, measured in this process, what the observer
costs per event and a scrape costs to render: on a machine shared with
other load these are steadier than the wall-clock figures.

The bar: metrics on within 5% of metrics off, for both.  Exit status 1 when
a bar is missed.  Everything is on 127.0.0.1 with ports from binding port 0;
the proxy and Dovecot are stopped on exit and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
BAR = 0.05  # metrics on may cost at most 5%
USER = "alice"


# --------------------------------------------------------------------------
# The proxy under test (child process)
# --------------------------------------------------------------------------


def serve(upstream_port: int) -> None:
    """Child: run a proxy as ``popproxy run`` builds it, with its metrics endpoint.

    Prints "PORTS <pop3> <metrics>" once listening.  SIGUSR1 detaches or
    re-attaches the metrics observer and answers "METRICS on|off".
    """
    import signal

    import trio

    from popproxy.app import build
    from popproxy.config import parse_config
    from popproxy.endpoint import serve_metrics
    from popproxy.logs import configure_logging
    from popproxy.server import serve as serve_proxy

    configure_logging("warning", "json")
    config = parse_config({
        "listen": {"address": "127.0.0.1:0"},
        "upstream": {"address": f"127.0.0.1:{upstream_port}"},
        "metrics": {"address": "127.0.0.1:0"},
    })
    app = build(config)
    observers = app.proxy.observers

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        with trio.open_signal_receiver(signal.SIGUSR1) as toggles:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(serve_metrics, config.metrics, app.metrics, app.proxy)
                await nursery.start(serve_proxy, app.proxy, listeners)
                pop3_port = listeners[0].socket.getsockname()[1]
                print(f"PORTS {pop3_port} {bound.port}", flush=True)
                async for _ in toggles:
                    if app.metrics.observe in observers:
                        observers.remove(app.metrics.observe)
                        print("METRICS off", flush=True)
                    else:
                        observers.append(app.metrics.observe)
                        print("METRICS on", flush=True)

    trio.run(main)


@dataclass
class ProxyChild:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    metrics_on: bool = True

    @classmethod
    def start(cls, upstream_port: int) -> ProxyChild:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.metrics_bench", "--serve", str(upstream_port)],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            start_new_session=True,
        )
        line = cls._read(proc)  # the child prints it once listening
        if not line.startswith("PORTS "):
            proc.kill()
            raise RuntimeError(f"the proxy did not start: {line!r}")
        _, port, metrics_port = line.split()
        return cls(proc, int(port), int(metrics_port))

    @staticmethod
    def _read(proc: subprocess.Popen[bytes]) -> str:
        assert proc.stdout is not None
        return proc.stdout.readline().decode().strip()

    def set_metrics(self, on: bool) -> None:
        if on != self.metrics_on:
            self.proc.send_signal(signal.SIGUSR1)
            answer = self._read(self.proc)
            if answer != f"METRICS {'on' if on else 'off'}":
                raise RuntimeError(f"unexpected answer from the proxy: {answer!r}")
            self.metrics_on = on

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------


class Conn:
    """A blocking POP3 connection that reads raw bytes (no poplib overhead)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("connection closed")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def ok(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"{command!r}: {reply!r}")
        return reply

    def login(self, user: str, password: str) -> None:
        self.line()
        self.ok(b"USER " + user.encode())
        self.ok(b"PASS " + password.encode())

    def retr(self, number: int, scratch: bytearray) -> tuple[int, float]:
        """RETR into ``scratch``: (octets, seconds) until CRLF.CRLF."""
        view = memoryview(scratch)
        total, tail = 0, b""
        t0 = time.perf_counter()
        self.sock.sendall(b"RETR %d\r\n" % number)
        while True:
            n = self.sock.recv_into(view)
            if n == 0:
                raise RuntimeError("closed during RETR")
            if total == 0 and bytes(view[:3]) != b"+OK":
                raise RuntimeError(f"RETR failed: {bytes(view[:n])[:200]!r}")
            total += n
            tail = (tail + bytes(view[max(0, n - 5):n]))[-5:]
            if tail == b"\r\n.\r\n":
                return total, time.perf_counter() - t0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
            self.line()
        self.sock.close()


class Scraper:
    """Scrapes ``/metrics`` every ``interval`` seconds in a thread, like
    Prometheus (but more often), while ``active`` is set."""

    def __init__(self, port: int, interval: float) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.scrapes = 0
        self.octets = 0
        self.active = threading.Event()
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.active.is_set():
                with self._opener.open(self.url, timeout=10) as r:
                    self.octets = len(r.read())
                self.scrapes += 1

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


def make_message(size: int) -> bytes:
    """About ``size`` octets of text in 80-octet lines; every 64th starts with a dot."""
    header = (b"From: bench@example.org\nTo: alice@example.org\nSubject: metrics bench\n"
              b"Message-ID: <metrics-bench@example.org>\n\n")
    block = b"".join(
        (b"." if i % 64 == 0 else b"") + b"%06d lorem ipsum dolor sit amet, consectetur "
        b"adipiscing elit, sed do eiusmod tempor\n" % i
        for i in range(4096)
    )
    body = (block * (size // len(block) + 1))[:size]
    return header + body[: body.rfind(b"\n") + 1]


@dataclass
class Results:
    """Per round and mode: the median RETR MB/s and NOOP µs; per mode, the
    proxy's CPU seconds and the work done (MB retrieved, NOOPs)."""

    retr_mbps: dict[str, list[float]] = field(default_factory=lambda: {"on": [], "off": []})
    noop_us: dict[str, list[float]] = field(default_factory=lambda: {"on": [], "off": []})
    retr_cpu: dict[str, float] = field(default_factory=lambda: {"on": 0.0, "off": 0.0})
    retr_mb: dict[str, float] = field(default_factory=lambda: {"on": 0.0, "off": 0.0})
    noop_cpu: dict[str, float] = field(default_factory=lambda: {"on": 0.0, "off": 0.0})
    noops: dict[str, int] = field(default_factory=lambda: {"on": 0, "off": 0})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (Linux), all threads."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def retr_once(proxy: ProxyChild, password: str, scratch: bytearray) -> tuple[float, int]:
    """(MB/s, octets) of one session's RETR of the large message."""
    conn = Conn(proxy.port)
    try:
        conn.login(USER, password)
        octets, seconds = conn.retr(1, scratch)
    finally:
        conn.close()
    return octets / seconds / 1e6, octets


def noop_round(conn: Conn, count: int) -> float:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        conn.ok(b"NOOP")
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def observer_costs() -> dict[str, float]:
    """In-process: µs per NOOP's events, per retrieved message's event; ms per scrape."""
    import timeit

    from prometheus_client import CollectorRegistry, generate_latest

    from popproxy.events import CommandSent, MessageComplete, Outcome, Response, SessionOpened
    from popproxy.metrics import Metrics
    from popproxy.observe import SessionInfo
    from popproxy.pop3 import Command

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    info = SessionInfo("bench", "127.0.0.1:1")
    metrics.observe(info, SessionOpened("127.0.0.1:1", 0.0))
    noop = Command("NOOP")
    sent = CommandSent(noop, 1.0)
    reply = Response(noop, True, None, "", 5, False, 1.0, 1.0002, Outcome.OK)
    message = MessageComplete(Command("RETR", ("1",)), 1, 65536, "00" * 32, None, True)

    def command() -> None:
        metrics.observe(info, sent)
        metrics.observe(info, reply)

    n = 100_000
    return {
        "us_per_command": timeit.timeit(command, number=n) / n * 1e6,
        "us_per_message": timeit.timeit(lambda: metrics.observe(info, message), number=n)
        / n * 1e6,
        "ms_per_scrape": timeit.timeit(lambda: generate_latest(registry), number=50) / 50 * 1e3,
    }


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def paired_cost(on: list[float], off: list[float], higher_is_better: bool) -> float:
    """Median over rounds of what metrics cost in that round (0.03 = 3% worse)."""
    ratios = [(f / n if higher_is_better else n / f) - 1 for n, f in zip(on, off, strict=True)]
    return statistics.median(ratios)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO_ROOT))
    from tests.dovecot import Dovecot, ensure_dovecot

    reason = ensure_dovecot()
    if reason is not None:
        raise SystemExit(f"Dovecot is needed for this benchmark: {reason}")
    results = Results()
    with contextlib.ExitStack() as stack:
        dovecot = Dovecot()
        stack.callback(dovecot.stop)
        dovecot.start()
        password = dovecot.users[USER]
        dovecot.reset_mailbox(USER, [make_message(args.size_mib * MIB)])
        proxy = ProxyChild.start(dovecot.port)
        stack.callback(proxy.stop)
        scraper = stack.enter_context(Scraper(proxy.metrics_port, args.scrape_interval))
        scratch = bytearray(MIB)
        noop_conn = Conn(proxy.port)
        noop_conn.login(USER, password)
        stack.callback(noop_conn.close)
        for on in (True, False):  # warm-up: page cache, Dovecot's index, code paths
            proxy.set_metrics(on)
            retr_once(proxy, password, scratch)
            noop_round(noop_conn, 100)

        for r in range(args.rounds):
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                proxy.set_metrics(mode == "on")
                if mode == "on":
                    scraper.active.set()
                else:
                    scraper.active.clear()
                pid = proxy.proc.pid
                cpu0 = cpu_seconds(pid)
                retrs = [retr_once(proxy, password, scratch) for _ in range(args.retrs)]
                cpu1 = cpu_seconds(pid)
                results.retr_mbps[mode].append(statistics.median(m for m, _ in retrs))
                results.noop_us[mode].append(noop_round(noop_conn, args.noops))
                cpu2 = cpu_seconds(pid)
                results.retr_cpu[mode] += cpu1 - cpu0
                results.retr_mb[mode] += sum(n for _, n in retrs) / 1e6
                results.noop_cpu[mode] += cpu2 - cpu1
                results.noops[mode] += args.noops
            log(f"round {r + 1}/{args.rounds}: "
                f"RETR on {results.retr_mbps['on'][-1]:,.0f} / off "
                f"{results.retr_mbps['off'][-1]:,.0f} MB/s; NOOP on "
                f"{results.noop_us['on'][-1]:.0f} / off {results.noop_us['off'][-1]:.0f} µs")
        scraper.active.clear()
        scrapes, scrape_octets = scraper.scrapes, scraper.octets

    retr_on, retr_off = (statistics.median(results.retr_mbps[m]) for m in ("on", "off"))
    noop_on, noop_off = (statistics.median(results.noop_us[m]) for m in ("on", "off"))
    retr_cost = retr_off / retr_on - 1  # throughput lost with metrics on
    noop_cost = noop_on / noop_off - 1  # latency added with metrics on
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "scrapes": scrapes,
        "scrape_octets": scrape_octets,
        "retr_mbps": {
            "on": retr_on, "off": retr_off, "cost": retr_cost,
            "paired_cost": paired_cost(results.retr_mbps["on"], results.retr_mbps["off"], True),
            "rounds": results.retr_mbps,
        },
        "noop_us": {
            "on": noop_on, "off": noop_off, "cost": noop_cost,
            "paired_cost": paired_cost(results.noop_us["on"], results.noop_us["off"], False),
            "rounds": results.noop_us,
        },
        "cpu": {
            "retr_ms_per_mb": {m: results.retr_cpu[m] / results.retr_mb[m] * 1e3
                               for m in ("on", "off")},
            "noop_us_per_op": {m: results.noop_cpu[m] / results.noops[m] * 1e6
                               for m in ("on", "off")},
        },
        "observer": observer_costs(),
        "pass": retr_cost <= BAR and noop_cost <= BAR,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def render(r: dict[str, Any]) -> str:
    s = r["settings"]
    rows = [
        ("", "metrics off", "metrics on", "cost", "paired", "bar"),
        (f"RETR {s['size_mib']} MiB (MB/s, median)", f"{r['retr_mbps']['off']:,.0f}",
         f"{r['retr_mbps']['on']:,.0f}", f"{r['retr_mbps']['cost']:+.1%}",
         f"{r['retr_mbps']['paired_cost']:+.1%}", f"≤ {BAR:.0%}"),
        ("NOOP round trip (µs, median)", f"{r['noop_us']['off']:.0f}",
         f"{r['noop_us']['on']:.0f}", f"{r['noop_us']['cost']:+.1%}",
         f"{r['noop_us']['paired_cost']:+.1%}", f"≤ {BAR:.0%}"),
    ]
    cpu = r["cpu"]
    for label, key, unit in (("RETR", "retr_ms_per_mb", "ms/MB"),
                             ("NOOP", "noop_us_per_op", "µs/NOOP")):
        off, on = cpu[key]["off"], cpu[key]["on"]
        rows.append((f"proxy CPU, {label} ({unit})", f"{off:.2f}" if off < 10 else f"{off:.0f}",
                     f"{on:.2f}" if on < 10 else f"{on:.0f}", f"{on / off - 1:+.1%}", "", "info"))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.append(
        f"{s['rounds']} interleaved rounds in one proxy process; cost: ratio of the "
        f"medians (paired: median of the per-round ratios); /metrics scraped {r['scrapes']} times "
        f"({r['scrape_octets']:,} octets each), every {s['scrape_interval']} s while on"
    )
    o = r["observer"]
    lines.append(
        f"in-process: the observer takes {o['us_per_command']:.1f} µs per forwarded command "
        f"and {o['us_per_message']:.2f} µs per retrieved message; a scrape renders in "
        f"{o['ms_per_scrape']:.1f} ms"
    )
    lines.append("PASS" if r["pass"] else "FAIL: metrics cost more than the bar")
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_interrupt() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        log("interrupted")
        raise SystemExit(130) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a smaller message")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--retrs", type=int, default=5, help="RETRs per mode per round")
    parser.add_argument("--noops", type=int, default=1000, help="NOOPs per mode per round")
    parser.add_argument("--size-mib", type=int, default=None)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    del args.serve
    if args.rounds is None:
        args.rounds = 4 if args.quick else 20
    if args.size_mib is None:
        args.size_mib = 8 if args.quick else 32
    with _quiet_interrupt():
        results = bench(args)
    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
