"""What does any extra hop cost?  NOOP round trips through minimal relays.

    python -m benchmarks.floor [--count 20000]

Puts minimal relays in front of one Dovecot and measures NOOP round trips
(as scenario 2 of ``benchmarks.run``) direct and through each, interleaved
in blocks, with each relay process's CPU time per NOOP:

- ``selectors``: a plain ``selectors`` loop, about the least a Python
  process can do per forwarded chunk;
- ``trio-pump``: trio, one task per direction doing receive_some/send_all;
- ``trio-sockio``: the same pumps on ``popproxy.sockio`` (one pass of
  trio's run loop per chunk instead of two): the least trio allows;
- ``trio-channel``: a reader task per side, a zero-size memory channel and
  one task doing every write (the relay shape DESIGN.md first described);
- ``popproxy``: the real proxy (``python -m popproxy run``).

The gaps between the lines split the proxy's overhead into the cost of a
second process on the path, of trio, and of the POP3 session logic.  Relays
run as ``python -m benchmarks.floor --relay MODE LISTEN_PORT
UPSTREAM_PORT``, or with ``--relay-config MODE FILE`` taking both ports from
a popproxy configuration file: that is how ``python -m benchmarks.run
--relay MODE`` puts one in the proxy's place for every scenario.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

import trio

from benchmarks._client import Conn
from benchmarks._procs import REPO_ROOT, ProxyProcess, free_port, proc_cpu_seconds
from popproxy import sockio
from tests.dovecot import Dovecot, ensure_dovecot

RELAYS = ("selectors", "trio-pump", "trio-sockio", "trio-channel")
_CHUNK = 65536


# --------------------------------------------------------------------------
# The relays (each runs in its own process)
# --------------------------------------------------------------------------


def _selectors_relay(listen_port: int, upstream_port: int) -> None:
    sel = selectors.DefaultSelector()
    server = socket.create_server(("127.0.0.1", listen_port))
    server.setblocking(False)
    sel.register(server, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                client, _ = server.accept()
                upstream = socket.create_connection(("127.0.0.1", upstream_port))
                for s in (client, upstream):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.setblocking(False)
                sel.register(client, selectors.EVENT_READ, upstream)
                sel.register(upstream, selectors.EVENT_READ, client)
                continue
            src: socket.socket = key.fileobj  # type: ignore[assignment]
            dst: socket.socket = key.data
            if src.fileno() < 0:
                continue  # closed with its peer earlier in this batch of events
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = b""
            if data:
                dst.setblocking(True)
                try:
                    dst.sendall(data)
                except OSError:
                    data = b""
                finally:
                    dst.setblocking(False)
            if not data:
                for s in (src, dst):
                    if s.fileno() >= 0:
                        sel.unregister(s)
                        s.close()


async def _pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    while data := await src.receive_some(_CHUNK):
        await dst.send_all(data)


async def _sockio_pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    while data := await sockio.receive(src, _CHUNK):
        if not await sockio.send_all(dst, data, trio.current_time() + 60.0):
            return


async def _reader(
    stream: trio.SocketStream, to_upstream: bool,
    channel: trio.MemorySendChannel[tuple[bool, bytes]],
) -> None:
    async with channel:
        while True:
            data = await stream.receive_some(_CHUNK)
            await channel.send((to_upstream, data))
            if not data:
                return


async def _trio_relay(mode: str, listen_port: int, upstream_port: int) -> None:
    async def handle(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
        async with upstream, client, trio.open_nursery() as nursery:
            if mode in ("trio-pump", "trio-sockio"):
                pump = _pump if mode == "trio-pump" else _sockio_pump
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)
                return
            send, receive = trio.open_memory_channel[tuple[bool, bytes]](0)
            nursery.start_soon(_reader, client, True, send.clone())
            nursery.start_soon(_reader, upstream, False, send.clone())
            send.close()
            async for to_upstream, data in receive:
                if not data:
                    break
                with trio.fail_after(60.0):
                    await (upstream if to_upstream else client).send_all(data)
            nursery.cancel_scope.cancel()

    await trio.serve_tcp(handle, listen_port, host="127.0.0.1")


def run_relay(mode: str, listen_port: int, upstream_port: int) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        if mode == "selectors":
            _selectors_relay(listen_port, upstream_port)
        else:
            trio.run(_trio_relay, mode, listen_port, upstream_port)


# --------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        time.sleep(0.05)
    raise RuntimeError(f"relay on port {port} did not come up")


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(q / 100 * len(ordered) + 0.5) - 1))]


def measure(count: int, block: int) -> str:
    reason = ensure_dovecot()
    if reason is not None:
        raise SystemExit(f"needs Dovecot: {reason}")
    names = ["direct", *RELAYS, "popproxy"]
    users = {f"f{i}": f"f{i}-pw" for i in range(len(names))}
    relays: list[subprocess.Popen[bytes]] = []
    conns: dict[str, Conn] = {}
    with contextlib.ExitStack() as stack:
        dovecot = Dovecot(users)
        stack.callback(dovecot.stop)
        dovecot.start()
        targets: dict[str, tuple[int, int | None]] = {"direct": (dovecot.port, None)}
        for mode in RELAYS:
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.floor", "--relay", mode, str(port),
                 str(dovecot.port)],
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            relays.append(proc)
            stack.callback(_stop, proc)
            targets[mode] = (port, proc.pid)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="popproxy-floor-")))
        proxy = ProxyProcess(dovecot.port, workdir)
        stack.callback(proxy.stop)
        proxy.start()
        targets["popproxy"] = (proxy.port, proxy.pid)
        for port, _ in targets.values():
            _wait_listening(port)
        for (name, (port, _)), user in zip(targets.items(), users, strict=True):
            conn = Conn("127.0.0.1", port)
            stack.callback(conn.close)
            conn.login(user, users[user])
            for _ in range(200):
                conn.cmd("NOOP")
            conns[name] = conn
        lat: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [0.0, 0.0] for n in names}
        deadline = time.monotonic() + 300.0
        for _ in range(max(1, count // block)):
            for name in names:
                conn, pid = conns[name], targets[name][1]
                before = proc_cpu_seconds(pid) if pid else (0.0, 0.0)
                clock = time.perf_counter_ns
                out = lat[name]
                for _ in range(block):
                    t0 = clock()
                    conn.sock.sendall(b"NOOP\r\n")
                    conn.ok_line()
                    out.append((clock() - t0) / 1000.0)
                if pid:
                    after = proc_cpu_seconds(pid)
                    cpu[name][0] += after[0] - before[0]
                    cpu[name][1] += after[1] - before[1]
            if time.monotonic() > deadline:
                break
    base = _pct(lat["direct"], 50)
    lines = [
        "| Path | NOOP p50 (µs) | p99 (µs) | p50 over direct (µs) | relay CPU per NOOP, "
        "user + sys (µs) |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        values = lat[name]
        p50 = _pct(values, 50)
        user_us, sys_us = (x / len(values) * 1e6 for x in cpu[name])
        cpu_text = "—" if name == "direct" else f"{user_us:.0f} + {sys_us:.0f}"
        lines.append(
            f"| {name} | {p50:.1f} | {_pct(values, 99):.1f} | +{p50 - base:.1f} | {cpu_text} |"
        )
    return "\n".join(lines)


def _config_ports(path: Path) -> tuple[int, int]:
    """The listening and the upstream port of a popproxy configuration file."""
    with path.open("rb") as f:
        config = tomllib.load(f)
    listen = config["listen"]["address"]
    upstream = config["upstream"]["address"]
    return int(listen.rsplit(":", 1)[1]), int(upstream.rsplit(":", 1)[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10.0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20_000, help="NOOPs per path")
    ap.add_argument("--block", type=int, default=1_000, help="NOOPs per interleaved block")
    ap.add_argument("--relay", nargs=3, metavar=("MODE", "LISTEN_PORT", "UPSTREAM_PORT"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--relay-config", nargs=2, metavar=("MODE", "FILE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.relay or args.relay_config:
        if args.relay:
            mode, listen, upstream = args.relay
        else:
            mode, path = args.relay_config
            listen, upstream = _config_ports(Path(path))
        if mode not in RELAYS:
            ap.error(f"unknown relay {mode!r}")
        run_relay(mode, int(listen), int(upstream))
        return 0
    try:
        print(measure(args.count, args.block))
    except KeyboardInterrupt:
        print("interrupted; Dovecot and the relays were stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"set-up failed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
