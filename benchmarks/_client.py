"""Minimal POP3 clients for the load generator: blocking sockets and trio.

These read raw bytes and find line ends and the ``CRLF.CRLF`` terminator
themselves; poplib's line-by-line reading would measure poplib, not the
servers.  Every read has a timeout, so no loop here can hang.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence

import trio

__all__ = ["TERM", "AsyncConn", "ClientErrors", "Conn", "ProtocolFailure", "full_session",
           "session_round"]

TERM = b"\r\n.\r\n"
_RECV = 1 << 16



def take_multiline(buf: bytearray, start: int = 0) -> bytes | None:
    """Cut a ``+OK`` multi-line reply, terminator included, off ``buf``;
    None while it is incomplete (search from ``start``)."""
    # The status line's CRLF starts the terminator of an empty body.
    i = buf.find(TERM, start)
    if i >= 0:
        out = bytes(buf[: i + 5])
        del buf[: i + 5]
        if not out.startswith(b"+OK"):
            raise ProtocolFailure(f"expected +OK, got {out[:200]!r}")
        return out
    if buf[:1] == b"-" and b"\r\n" in buf:
        raise ProtocolFailure(f"expected +OK, got {bytes(buf[:200])!r}")
    return None

class ProtocolFailure(RuntimeError):
    """The server answered something other than what the benchmark expects."""


class Conn:
    """A blocking POP3 connection with its own read buffer.

    With ``tls`` (a client context) the connection is implicit TLS (POP3S):
    the handshake is done here, for ``server_hostname`` (default ``host``),
    and ``sock`` is the ``ssl.SSLSocket``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = 30.0,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self.buf = bytearray()

    # -------------------------------------------------------------- reading

    def _fill(self) -> None:
        data = self.sock.recv(_RECV)
        if not data:
            raise ProtocolFailure("connection closed by the server")
        self.buf += data

    def line(self) -> bytes:
        """One reply line, CRLF included."""
        start = 0
        while True:
            i = self.buf.find(b"\r\n", start)
            if i >= 0:
                out = bytes(self.buf[: i + 2])
                del self.buf[: i + 2]
                return out
            start = max(0, len(self.buf) - 1)
            self._fill()

    def ok_line(self) -> bytes:
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise ProtocolFailure(f"expected +OK, got {reply[:200]!r}")
        return reply

    def multiline(self) -> bytes:
        """A ``+OK`` status line and its body, terminator included."""
        start = 0
        while (out := take_multiline(self.buf, start)) is None:
            start = max(0, len(self.buf) - 4)
            self._fill()
        return out

    # ------------------------------------------------------------- commands

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.ok_line()

    def cmd_multi(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.multiline()

    def login(self, user: str, password: str) -> None:
        self.ok_line()  # greeting
        self.cmd(f"USER {user}")
        self.cmd(f"PASS {password}")

    def retr_raw(self, number: int, scratch: bytearray) -> tuple[int, float]:
        """RETR ``number`` reading into ``scratch``: (octets received, seconds).

        The reply is over when the stream received so far ends with
        ``CRLF.CRLF`` (byte-stuffing guarantees it cannot occur earlier and
        the server sends nothing after it unasked).
        """
        if self.buf:
            raise ProtocolFailure("unread data before RETR")
        view = memoryview(scratch)
        tail = b""
        total = 0
        first = b""
        t0 = time.perf_counter()
        self.sock.sendall(b"RETR %d\r\n" % number)
        while True:
            n = self.sock.recv_into(view)
            if n == 0:
                raise ProtocolFailure("connection closed during RETR")
            if not first:
                first = bytes(view[: min(n, 4)])
                if not first.startswith(b"+OK"):
                    raise ProtocolFailure(f"RETR failed: {bytes(view[:min(n, 200)])!r}")
            total += n
            end = (tail + bytes(view[max(0, n - 5) : n]))[-5:]
            if end == TERM:
                return total, time.perf_counter() - t0
            tail = end[-4:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class AsyncConn:
    """The same for trio: one stream, one buffer."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> AsyncConn:
        """Connect; with ``tls``, implicit TLS (the handshake done here)."""
        tcp = await trio.open_tcp_stream(host, port)
        if tls is None:
            return cls(tcp)
        stream = trio.SSLStream(tcp, tls, server_hostname=server_hostname or host)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return cls(stream)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(_RECV)
        if not data:
            raise ProtocolFailure("connection closed by the server")
        self.buf += data

    async def ok_line(self) -> bytes:
        start = 0
        while True:
            i = self.buf.find(b"\r\n", start)
            if i >= 0:
                out = bytes(self.buf[: i + 2])
                del self.buf[: i + 2]
                if not out.startswith(b"+OK"):
                    raise ProtocolFailure(f"expected +OK, got {out[:200]!r}")
                return out
            start = max(0, len(self.buf) - 1)
            await self._fill()

    async def multiline(self) -> bytes:
        start = 0
        while (out := take_multiline(self.buf, start)) is None:
            start = max(0, len(self.buf) - 4)
            await self._fill()
        return out

    async def cmd(self, text: str) -> bytes:
        await self.stream.send_all(text.encode() + b"\r\n")
        return await self.ok_line()

    async def cmd_multi(self, text: str) -> bytes:
        await self.stream.send_all(text.encode() + b"\r\n")
        return await self.multiline()

    async def login(self, user: str, password: str) -> None:
        await self.ok_line()
        await self.cmd(f"USER {user}")
        await self.cmd(f"PASS {password}")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


# What a load-generating client survives and counts as an error.
ClientErrors = (OSError, ProtocolFailure, trio.BrokenResourceError, trio.TooSlowError)


async def full_session(
    host: str, port: int, user: str, password: str, *,
    tls: ssl.SSLContext | None = None, uidl: bool = True,
) -> None:
    """One session as the benchmarks count it: login, STAT, UIDL, RETR 1, QUIT."""
    conn = await AsyncConn.open(host, port, tls=tls)
    try:
        await conn.login(user, password)
        await conn.cmd("STAT")
        if uidl:
            await conn.cmd_multi("UIDL")
        await conn.cmd_multi("RETR 1")
        await conn.cmd("QUIT")
    finally:
        await conn.aclose()


async def session_round(
    clients: Sequence[tuple[str, Callable[[], Awaitable[None]]]], seconds: float,
) -> tuple[int, list[str]]:
    """Each (label, session) client runs its session back to back for
    ``seconds``; returns the sessions completed in time and the errors.

    Bounded: a session has 15 s, a client at most 100,000 sessions, the
    round ``seconds`` + 30 s.
    """
    deadline = trio.current_time() + seconds
    done = 0
    errors: list[str] = []

    async def client(label: str, session: Callable[[], Awaitable[None]]) -> None:
        nonlocal done
        for _ in range(100_000):  # the deadline ends it long before
            if trio.current_time() >= deadline:
                return
            try:
                with trio.fail_after(15.0):
                    await session()
            except ClientErrors as exc:
                if len(errors) < 1000:
                    errors.append(f"{label}: {exc!r}")
                await trio.sleep(0.01)
                continue
            if trio.current_time() <= deadline:
                done += 1

    with trio.move_on_after(seconds + 30.0):
        async with trio.open_nursery() as nursery:
            for label, session in clients:
                nursery.start_soon(client, label, session)
    return done, errors
