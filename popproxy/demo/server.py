"""Trio shell for the demo POP3 server: sockets in, :class:`DemoSession` out.

All protocol decisions are made by :class:`~popproxy.demo.mailbox.DemoSession`;
this module only frames lines, writes replies and owns the connection's
lifetime.
"""

from __future__ import annotations

from functools import partial

import structlog
import trio

from .mailbox import DemoSession
from .store import MailStore

__all__ = ["IDLE_TIMEOUT", "serve_demo"]

logger = structlog.get_logger("popproxy.demo")

#: RFC 1939 section 3: an autologout timer "MUST be of at least 10 minutes".
IDLE_TIMEOUT: float = 600.0

# Bytes asked of the socket per read.
_RECEIVE_SIZE = 16 * 1024
# Replies to pipelined commands are sent once this many bytes have piled up,
# so a burst of "RETR 4" lines never builds an unbounded write buffer.
_FLUSH_SIZE = 64 * 1024
# After the final reply: how long to wait for the client to close first, and
# how much it may still send meanwhile (closing with unread input makes the
# kernel send RST, which can destroy the reply in flight).
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 64 * 1024


class _LineBuffer:
    """Splits received bytes into LF-terminated lines, with bounded memory.

    A line longer than the limit is handed out cut to ``limit`` octets (so the
    session rejects it as too long) as soon as that is certain, and the rest
    of it is discarded up to its LF. The buffer therefore never holds more than
    ``limit`` octets plus one read.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self, limit: int) -> bytes | None:
        """The next line with its terminator, a cut overlong line, or None."""
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if self._skipping:
                    self._buf.clear()
                elif len(self._buf) > limit:
                    head = bytes(self._buf[:limit])
                    self._buf.clear()
                    self._skipping = True
                    return head
                return None
            line = bytes(self._buf[: end + 1])
            del self._buf[: end + 1]
            if self._skipping:  # the tail of a line already rejected
                self._skipping = False
                continue
            return line


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then read (and drop) until the client closes, within bounds."""
    received = 0
    with trio.move_on_after(_LINGER_SECONDS):
        await stream.send_eof()
        while received <= _LINGER_BYTES:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                break
            received += len(data)


async def _serve_connection(store: MailStore, stream: trio.SocketStream) -> None:
    """Run one POP3 session on *stream* (closed by the caller, serve_listeners)."""
    stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)
    session = DemoSession(store)
    client = _peer(stream)
    lines = _LineBuffer()
    commands = 0
    reason = "eof"
    try:
        await stream.send_all(session.greeting())
        while True:
            with trio.move_on_after(IDLE_TIMEOUT) as idle:
                data = await stream.receive_some(_RECEIVE_SIZE)
            if idle.cancelled_caught:
                reason = "idle"
                # RFC 1939 says close without UPDATE; telling the client why
                # is what Dovecot does too.
                await stream.send_all(b"-ERR [SYS/TEMP] disconnected for inactivity\r\n")
                break
            if not data:
                break
            lines.feed(data)
            out = bytearray()
            close = False
            while not close and (line := lines.next_line(session.max_line_length)) is not None:
                reply, close = session.handle_line(line)
                commands += 1
                out += reply
                if len(out) >= _FLUSH_SIZE:
                    await stream.send_all(bytes(out))
                    out.clear()
            if out:
                await stream.send_all(bytes(out))
            if close:
                reason = "quit"
                await _linger(stream)
                break
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        reason = "broken"
    finally:
        session.close()
        logger.info(
            "demo.session",
            client=client,
            user=session.user,
            commands=commands,
            reason=reason,
        )


async def serve_demo(
    store: MailStore,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the demo mailboxes in *store* over POP3 until cancelled.

    Opens TCP listeners on *host*:*port* (0 picks a free port) and reports
    them with ``task_status.started(listeners)``, so that
    ``listeners = await nursery.start(serve_demo, store)`` returns once the
    server accepts connections.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    await trio.serve_listeners(
        partial(_serve_connection, store), listeners, task_status=task_status
    )
