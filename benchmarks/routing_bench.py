"""What does routed mode cost?  Session rate and proxy CPU, routed vs transparent.

Run from the repository root::

    python -m benchmarks.routing_bench            # about two minutes
    python -m benchmarks.routing_bench --quick    # a smoke run

One private Dovecot (``tests/dovecot.py``, high-performance login mode) and
four proxies in front of it, each ``popproxy run`` in a process of its own:

- ``transparent``: ``[upstream]`` only, as today;
- ``rule``: ``[routing]`` with a ``[[routing.rules]]`` glob matching every
  bench user (routed to ``default``, the same Dovecot);
- ``map``: ``[routing] map_file`` of 100,000 lines, the bench users among
  them (exact names, looked up in a dict);
- ``hook``: ``[routing] auth_http`` to a local nginx-style responder (a
  process of its own, answering ``Auth-Status: OK`` with Dovecot's address
  and port on kept-alive connections).

Rounds interleave the modes (their order rotating) so machine noise hits
all alike: 50 clients do full sessions (USER, PASS, STAT, UIDL, RETR 1,
QUIT) back to back for a few seconds; the figures are medians over rounds,
with the proxy process's CPU per session.  The bars (issue 13): routed with
a rule or the map ≥ 0.9x transparent, with the hook ≥ 0.7x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from benchmarks._client import full_session, session_round
from benchmarks._procs import (
    CpuMeter,
    ProxyProcess,
    dovecot_with_mail,
    free_port,
    raise_fd_limit,
)
from tests.dovecot import ensure_dovecot

MODES = ("transparent", "rule", "map", "hook")
BARS = {"rule": 0.9, "map": 0.9, "hook": 0.7}
MAP_LINES = 100_000


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def serve_hook(port: int, upstream_port: int) -> None:
    """The auth_http responder (``--hook``): OK, go to the Dovecot.

    A ``selectors`` loop that answers every request on a kept-alive
    connection with the same response: as little CPU as a responder can
    take, so the figures are the proxy's cost of asking, not a slow
    responder's (a real one, nginx's own example included, does more).
    """
    response = (
        "HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"
        f"Auth-Port: {upstream_port}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                conn, _ = listener.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                buffers[conn] = b""
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                buffers.pop(sock, None)
                continue
            buf = buffers[sock] + data
            while b"\r\n\r\n" in buf:
                _, buf = buf.split(b"\r\n\r\n", 1)
                sock.sendall(response)
            buffers[sock] = buf


def routing_config(mode: str, workdir: Path, users: list[str], hook_url: str) -> str:
    if mode == "transparent":
        return ""
    if mode == "rule":
        return '[routing]\n[[routing.rules]]\nusers = ["c*"]\nupstream = "default"\n'
    if mode == "map":
        path = workdir / "users.map"
        with path.open("w") as f:
            f.write("# 100,000 users; the bench users among them\n")
            for i in range(MAP_LINES - len(users)):
                f.write(f"user{i:06d}@example.org default\n")
            for user in users:
                f.write(f"{user} default\n")
        return f'[routing]\nmap_file = "{path}"\n'
    return f'[routing]\nauth_http = "{hook_url}"\nauth_http_timeout = "5s"\n'


async def rate_round(port: int, users: list[tuple[str, str]], seconds: float) -> tuple[int, int]:
    done, errors = await session_round(
        [(u, partial(full_session, "127.0.0.1", port, u, p)) for u, p in users], seconds)
    return done, len(errors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="per round and mode")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("--hook", nargs=2, type=int, metavar=("PORT", "UPSTREAM_PORT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hook:
        serve_hook(*args.hook)
        return 0
    rounds = args.rounds or (2 if args.quick else 6)
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    reason = ensure_dovecot()
    if reason is not None:
        raise SystemExit(f"benchmark needs Dovecot: {reason}")
    raise_fd_limit(8192)
    clients = 50
    users = {f"c{i:03d}": f"c{i:03d}-pw" for i in range(clients)}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="routing-bench-")))
        dovecot = dovecot_with_mail(stack, users, 600)
        hook_port = free_port()
        hook = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.routing_bench", "--hook", str(hook_port),
             str(dovecot.port)], stdin=subprocess.DEVNULL)
        stack.callback(hook.wait, 5)
        stack.callback(hook.terminate)
        proxies: dict[str, ProxyProcess] = {}
        for mode in MODES:
            d = workdir / mode
            d.mkdir()
            proxy = ProxyProcess(dovecot.port, d, extra_config=routing_config(
                mode, d, list(users), f"http://127.0.0.1:{hook_port}/auth"))
            problem = proxy.check_config()
            if problem:
                raise SystemExit(f"{mode}: bad configuration: {problem}")
            started = time.monotonic()
            proxy.start()
            stack.callback(proxy.stop)
            log(f"{mode}: pid {proxy.pid} on port {proxy.port}, "
                f"started in {time.monotonic() - started:.2f}s")
            proxies[mode] = proxy
        pairs = list(users.items())
        for mode in MODES:  # warm-up
            trio.run(rate_round, proxies[mode].port, pairs, 1.0)
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        errors = dict.fromkeys(MODES, 0)
        for r in range(rounds):
            order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
            for mode in order:
                meter = CpuMeter(proxies[mode].pid)
                with meter.measure():
                    done, errs = trio.run(rate_round, proxies[mode].port, pairs, seconds)
                rates[mode].append(done / seconds)
                cpu[mode].append(meter.cpu / done * 1000 if done else float("nan"))
                errors[mode] += errs
                log(f"round {r + 1}/{rounds} {mode}: {done / seconds:,.0f} sessions/s, "
                    f"{cpu[mode][-1]:.2f} ms CPU per session" + (f", {errs} errors" if errs
                                                                  else ""))
                proxies[mode].check_alive()
    base = statistics.median(rates["transparent"])
    print(f"\nRouted mode against transparent, {clients} clients, {rounds} rounds of "
          f"{seconds:g} s per mode (medians):\n")
    print("| mode | sessions/s | vs transparent | paired | proxy CPU per session | bar |")
    print("| --- | --- | --- | --- | --- | --- |")
    results: dict[str, Any] = {}
    for mode in MODES:
        rate = statistics.median(rates[mode])
        paired = statistics.median(
            a / b for a, b in zip(rates[mode], rates["transparent"], strict=True))
        bar = BARS.get(mode)
        verdict = "—" if bar is None else (f"≥ {bar:.1f}x: " + ("met" if rate / base >= bar
                                                                  else "MISSED"))
        print(f"| {mode} | {rate:,.0f} | {rate / base:.2f}x | {paired:.2f}x | "
              f"{statistics.median(cpu[mode]):.2f} ms | {verdict} |")
        results[mode] = {"rates": rates[mode], "cpu_ms_per_session": cpu[mode],
                         "errors": errors[mode], "ratio": rate / base, "paired": paired}
    if any(errors.values()):
        print(f"\nerrors: {errors}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
