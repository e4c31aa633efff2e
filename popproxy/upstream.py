"""Opening the upstream connection: TCP, PROXY header, TLS, STLS, XCLIENT.

Everything here happens before the session's first byte: the result is a
stream ready for POP3 and the upstream's greeting, which the session then
relays verbatim (so APOP digests stay valid).  The few lines exchanged here
are parsed with the sans-IO core's ``parse_status``.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import trio

from . import proxyproto
from .addr import split_hostport
from .config import UpstreamConfig
from .events import Event, ProtocolAnomaly, TlsEstablished
from .pop3 import parse_status
from .tls import TLSHandshakeError, handshake

__all__ = ["UpstreamError", "UpstreamLink", "open_upstream"]

logger = structlog.get_logger("popproxy.upstream")

Stream = trio.abc.Stream
_MAX_LINE = 8192


class UpstreamError(Exception):
    """Setting up the upstream failed; ``reason`` is an ``UpstreamFailed`` reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class UpstreamLink:
    stream: Stream
    greeting: bytes = b""  # read here (STLS/XCLIENT need it first); b"": not yet
    events: list[Event] = field(default_factory=list)


class _Lines:
    """Reads CRLF lines from a stream, remembering what came after them."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.buf = b""

    async def line(self) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > _MAX_LINE:
                raise UpstreamError("protocol", "upstream line too long")
            try:
                data = await self.stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise UpstreamError("closed", f"upstream connection lost: {exc}") from None
            if not data:
                raise UpstreamError("closed", "upstream closed the connection")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


async def _command(lines: _Lines, command: bytes) -> bytes:
    await lines.stream.send_all(command)
    reply = await lines.line()
    status = parse_status(reply.rstrip(b"\r\n"))
    if status is None:
        raise UpstreamError("protocol", f"upstream reply to {command.split()[0]!r} is not POP3")
    return reply


async def open_upstream(
    cfg: UpstreamConfig,
    open_stream: Callable[[], Awaitable[Stream]],
    *,
    tls_context: ssl.SSLContext | None,
    client: str,
    local: str,
    session_id: str,
    handshake_timeout: float,
) -> UpstreamLink:
    """Connect and prepare the upstream for a client session.

    ``client`` is the real client's "address:port" (after any PROXY header
    we received), ``local`` the address it connected to.
    """
    try:
        stream = await open_stream()
    except OSError as exc:
        raise UpstreamError("connect", f"cannot connect to upstream: {exc}") from None
    link = UpstreamLink(stream)
    try:
        if cfg.forward_client in ("proxy-v1", "proxy-v2"):
            src, dst = split_hostport(client), split_hostport(local)
            encode = proxyproto.encode_v1 if cfg.forward_client == "proxy-v1" else (
                proxyproto.encode_v2)
            await stream.send_all(encode(src, dst))
        if cfg.tls == "implicit":
            link.stream = await _start_tls(stream, cfg, tls_context, handshake_timeout, link)
        if cfg.tls == "starttls" or cfg.forward_client == "xclient":
            lines = _Lines(link.stream)
            greeting = await lines.line()
            status = parse_status(greeting.rstrip(b"\r\n"))
            if status is None or not status.ok:
                # Let the session relay a refusal (or reject garbage) itself.
                link.greeting = greeting + lines.buf
                return link
            if cfg.tls == "starttls":
                reply = await _command(lines, b"STLS\r\n")
                if not reply.startswith(b"+OK"):
                    raise UpstreamError("tls", f"upstream refused STLS: {reply.strip()!r}")
                if lines.buf:
                    # Response injection: bytes after the +OK, before TLS, are
                    # never trusted (the mirror of the client-side rule).
                    link.events.append(ProtocolAnomaly(
                        "upstream", "data-after-stls", f"{len(lines.buf)} octets"))
                    lines.buf = b""
                link.stream = await _start_tls(
                    link.stream, cfg, tls_context, handshake_timeout, link)
                lines = _Lines(link.stream)
            if cfg.forward_client == "xclient":
                # Dovecot announces trust with [XCLIENT] in its greeting; it
                # answers an untrusted XCLIENT with +OK too, so only the
                # marker proves anything.
                if b"[XCLIENT]" in greeting:
                    ip, port = split_hostport(client)
                    reply = await _command(
                        lines, f"XCLIENT ADDR={ip} PORT={port} SESSION={session_id}\r\n".encode())
                    if not reply.startswith(b"+OK"):
                        logger.warning("upstream.xclient_refused", reply=reply.strip().decode(
                            "utf-8", "replace"))
                else:
                    logger.warning("upstream.xclient_untrusted",
                                   detail="greeting has no [XCLIENT]: not forwarding the address")
            link.greeting = greeting + lines.buf
        return link
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(link.stream)
        raise


async def _start_tls(
    stream: Stream, cfg: UpstreamConfig, ctx: ssl.SSLContext | None, seconds: float,
    link: UpstreamLink,
) -> trio.SSLStream[Stream]:
    assert ctx is not None
    name = cfg.server_name or cfg.address.host
    ssl_stream = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        version, cipher, _ = await handshake(ssl_stream, seconds)
    except TLSHandshakeError as exc:
        raise UpstreamError("tls", f"upstream {exc}") from None
    link.events.append(TlsEstablished("upstream", version, cipher, name))
    return ssl_stream
