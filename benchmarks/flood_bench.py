"""What does a client flooding junk before login cost?  (issue 17)

Run from the repository root::

    python -m benchmarks.flood_bench            # about ten seconds
    python -m benchmarks.flood_bench --connections 40

The proxy runs as ``popproxy run`` in a process of its own, with a file
audit trail recording every command (``commands = "all"``, the default), in
front of the built-in demo mailbox server (a flood before login never gets
further than the greeting).  Clients, four at a time, connect and send
``XJUNK <1,000 x A>`` lines as fast as the proxy takes them, until the
proxy closes the connection or five seconds pass.  Measured, per flooding
connection:

- the audit's growth in bytes (``session.open``, the ``command`` records
  written, ``session.close``);
- the proxy process's CPU time (user + system, all threads, from its
  POSIX CPU-time clock), and the same for a connection that only says
  QUIT, so that what the flood adds to a connection is seen;
- how many lines the client got out before the close, and how long it
  was connected.

The first four connections are the issue's case; the rest show the
per-address bound (``audit.prelogin_commands_per_client``) at work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from benchmarks._procs import ProxyProcess, free_port, proc_cpu_clock
from tests.flood import Flood, flood

CLIENTS = 4

DEMO = (
    "import sys, trio\n"
    "from popproxy.demo import MailStore, serve_demo\n"
    "trio.run(serve_demo, MailStore.load_samples(), '127.0.0.1', int(sys.argv[1]))\n"
)


async def quit_only(port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.receive_some(4096)
    await stream.send_all(b"QUIT\r\n")
    while await stream.receive_some(4096):
        pass
    await stream.aclose()


def closes(path: Path) -> int:
    if not path.exists():  # the trail opens its file with the first write
        return 0
    return sum(b'"event":"session.close"' in line for line in path.read_bytes().splitlines())


def settle(path: Path, expected: int, timeout: float = 30.0) -> None:
    """Until the trail has ``expected`` session.close records (bounded poll)."""
    deadline = time.monotonic() + timeout
    while closes(path) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{closes(path)} of {expected} sessions on file")
        time.sleep(0.02)


async def run_floods(port: int, connections: int, seconds: float) -> list[Flood]:
    results: list[Flood] = []

    async def client(count: int) -> None:
        for _ in range(count):
            results.append(await flood(port, seconds=seconds))

    async with trio.open_nursery() as n:
        for i in range(CLIENTS):
            n.start_soon(client, connections // CLIENTS + (i < connections % CLIENTS))
    return results


def measure(proxy: ProxyProcess, audit: Path, done: int, connections: int,
            fn: Callable[[], Awaitable[None]]) -> tuple[float, int]:
    """(CPU seconds, audit bytes) that ``fn`` cost the proxy, once the
    trail has the ``connections`` sessions it made (``done`` were there)."""
    cpu0 = proc_cpu_clock(proxy.pid) or 0.0
    size0 = audit.stat().st_size
    trio.run(fn)
    settle(audit, done + connections)
    cpu = (proc_cpu_clock(proxy.pid) or 0.0) - cpu0
    return cpu, audit.stat().st_size - size0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200,
                        help="flooding connections in all (four at a time)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long one connection floods at most")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="popproxy-flood-bench-") as tmp:
        work = Path(tmp)
        audit = work / "audit.jsonl"
        demo_port = free_port()
        demo = subprocess.Popen([sys.executable, "-c", DEMO, str(demo_port)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                start_new_session=True)
        proxy = ProxyProcess(demo_port, work, extra_config=(
            f'[audit]\nsink = "file"\npath = "{audit}"\n'))
        try:
            time.sleep(0.5)  # the demo server binds; the proxy's probe retries anyway
            proxy.start()
            settle(audit, 1)  # the readiness probe's session
            done = 1
            quits = 40
            cpu_q, bytes_q = measure(proxy, audit, done, quits, lambda: _quits(proxy.port, quits))
            done += quits
            first: list[Flood] = []

            async def four() -> None:
                first.extend(await run_floods(proxy.port, CLIENTS, args.seconds))

            cpu_4, bytes_4 = measure(proxy, audit, done, CLIENTS, four)
            done += CLIENTS
            rest: list[Flood] = []
            more = max(args.connections - CLIENTS, 0)

            async def many() -> None:
                rest.extend(await run_floods(proxy.port, more, args.seconds))

            cpu_n, bytes_n = measure(proxy, audit, done, more, many)
            proxy.check_alive()
        finally:
            proxy.stop()
            demo.terminate()
            demo.wait(timeout=10)
    floods = first + rest
    report = {
        "quit_only": {"connections": quits, "cpu_ms_per_connection": 1e3 * cpu_q / quits,
                      "audit_bytes_per_connection": bytes_q / quits},
        "first_four_flooding": {
            "audit_bytes_total": bytes_4, "audit_bytes_per_connection": bytes_4 / CLIENTS,
            "cpu_ms_per_connection": 1e3 * cpu_4 / CLIENTS},
        "further_flooding": {
            "connections": more,
            "audit_bytes_per_connection": bytes_n / more if more else None,
            "cpu_ms_per_connection": 1e3 * cpu_n / more if more else None},
        "all_closed_by_the_proxy": all(f.closed for f in floods),
        "lines_sent_median": statistics.median(f.sent for f in floods),
        "connected_ms_median": 1e3 * statistics.median(f.seconds for f in floods),
    }
    print(json.dumps(report, indent=2))
    return 0


async def _quits(port: int, count: int) -> None:
    for _ in range(count):
        await quit_only(port)


if __name__ == "__main__":
    raise SystemExit(main())
