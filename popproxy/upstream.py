"""Opening the upstream connection: pools, TCP, PROXY header, TLS, STLS, XCLIENT.

Everything here happens before the session's first byte: the result is a
stream ready for POP3 and the upstream's greeting, which the session then
relays verbatim (so APOP digests stay valid).  The few lines exchanged here
are parsed with the sans-IO core's ``parse_status``.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import structlog
import trio

from . import proxyproto
from .addr import HostPort, host_of, split_hostport
from .config import Config, UpstreamConfig
from .events import Event, ProtocolAnomaly, TlsEstablished, UpstreamConnected, UpstreamFailed
from .front import Credentials
from .pop3 import parse_status
from .routing import HTTP_UPSTREAM, LookupFailed, NoRoute, Pools, Refused, Router
from .tls import TLSContexts, TLSHandshakeError, handshake

__all__ = [
    "LoginOutcome", "UpstreamError", "UpstreamLink", "log_in", "open_pool", "open_upstream",
    "route_login",
]

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
    server_name: str | None = None,
    greeted: bool = False,
) -> UpstreamLink:
    """Connect and prepare the upstream for a client session.

    ``client`` is the real client's "address:port" (after any PROXY header
    we received), ``local`` the address it connected to.  ``server_name``
    is the name TLS verifies (default: the configured one, else the host).
    With ``greeted`` (routed mode) the greeting is read here and must be
    ``+OK`` (else ``UpstreamError("refused")``); it is not kept, since the
    client got the proxy's own.
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
        name = server_name or cfg.server_name or cfg.address.host
        if cfg.tls == "implicit":
            link.stream = await _start_tls(stream, name, tls_context, handshake_timeout, link)
        if cfg.tls == "starttls" or cfg.forward_client == "xclient" or greeted:
            lines = _Lines(link.stream)
            greeting = await lines.line()
            status = parse_status(greeting.rstrip(b"\r\n"))
            if greeted and (status is None or not status.ok):
                raise UpstreamError("refused", "upstream greeting is not +OK")
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
                    link.stream, name, tls_context, handshake_timeout, link)
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
            link.greeting = lines.buf if greeted else greeting + lines.buf
        return link
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(link.stream)
        raise


async def _start_tls(
    stream: Stream, name: str, ctx: ssl.SSLContext | None, seconds: float,
    link: UpstreamLink,
) -> trio.SSLStream[Stream]:
    assert ctx is not None
    ssl_stream = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        version, cipher, _ = await handshake(ssl_stream, seconds)
    except TLSHandshakeError as exc:
        raise UpstreamError("tls", f"upstream {exc}") from None
    link.events.append(TlsEstablished("upstream", version, cipher, name))
    return ssl_stream


async def log_in(link: UpstreamLink, user: str, password: str, seconds: float) -> bytes:
    """USER and PASS on a greeted link (routed mode): the upstream's last reply.

    The reply line is returned whatever it says (``+OK``, or ``-ERR`` with
    its response code, for the client to see unchanged).  What the upstream
    sends after it stays in ``link.greeting`` for the session.  Neither the
    password nor the user name appear in an error message.
    """
    for field_ in (user, password):
        if any(c in field_ for c in "\r\n\0"):
            raise UpstreamError("protocol", "credentials contain CR, LF or NUL")
    lines = _Lines(link.stream)
    lines.buf = link.greeting
    with trio.move_on_after(seconds) as scope:
        reply = await _command(lines, b"USER " + user.encode("utf-8", "surrogateescape")
                               + b"\r\n")
        if reply.startswith(b"+OK"):
            reply = await _command(
                lines, b"PASS " + password.encode("utf-8", "surrogateescape") + b"\r\n")
    if scope.cancelled_caught:
        raise UpstreamError("response_timeout", "upstream login timed out")
    link.greeting = lines.buf
    return reply


Connect = Callable[[HostPort], Awaitable[Stream]]


async def open_pool(
    cfg: UpstreamConfig,
    addresses: Sequence[HostPort],
    *,
    pools: Pools | None,
    connect: Connect,
    tls: TLSContexts,
    client: str,
    local: str,
    session_id: str,
    handshake_timeout: float,
    greeted: bool = False,
) -> tuple[UpstreamLink | None, list[Event], UpstreamError | None]:
    """The first of ``addresses`` that connects (and greets, with ``greeted``).

    An address that fails, or takes longer than ``connect_timeout``, is
    marked down in ``pools`` (skipped for ``routing.down_time``) and the next
    is tried; a server the auth hook named is in no pool (``pools`` None).
    Returns the link (None if none worked), the events for observers, and
    the last error.
    """
    ctx = tls.upstream(cfg) if cfg.tls != "none" else None
    events: list[Event] = []
    error: UpstreamError | None = None
    for address in addresses:
        begun = trio.current_time()
        link: UpstreamLink | None = None
        failure: UpstreamError | None = None
        with trio.move_on_after(cfg.connect_timeout):
            try:
                link = await open_upstream(
                    cfg, partial(connect, address), tls_context=ctx, client=client, local=local,
                    session_id=session_id, handshake_timeout=handshake_timeout,
                    server_name=cfg.server_name or address.host, greeted=greeted,
                )
            except UpstreamError as exc:
                failure = exc
        if link is None:
            error = failure or UpstreamError("connect_timeout", "upstream connect timeout")
            logger.warning("upstream.failed", upstream=cfg.name, address=str(address),
                           reason=error.reason, error=str(error))
            events.append(UpstreamFailed(error.reason))
            if pools is not None:
                pools.mark_down(cfg.name, address)
            continue
        if pools is not None:
            pools.mark_up(cfg.name, address)
        events += [UpstreamConnected(str(address), trio.current_time() - begun, cfg.name),
                   *link.events]
        return link, events, None
    return None, events, error


@dataclass
class LoginOutcome:
    """What a routed login came to.

    ``reply`` is the status line for the client; ``upstream`` the stream,
    logged in, when it succeeded (``rest``: what the upstream sent after its
    reply); ``events`` what happened on the way, for observers.
    """

    reply: bytes
    upstream: Stream | None = None
    rest: bytes = b""
    name: str | None = None  # the upstream that answered
    route: str | None = None  # what chose it
    events: list[Event] = field(default_factory=list)


async def route_login(
    credentials: Credentials,
    *,
    router: Router,
    config: Config,
    pools: Pools,
    connect: Connect,
    tls: TLSContexts,
    client: str,
    local: str,
    session_id: str,
    attempt: int,
    client_tls: bool,
) -> LoginOutcome:
    """Routed mode: look the route up, connect, log in as the route says.

    Every step is bounded (the hook's timeout, ``connect_timeout`` per
    address, ``response_timeout`` for the login); a failure is a ``-ERR`` for
    the client (``[SYS/TEMP]`` when no upstream could answer), never an
    exception, and no message quotes the credentials.
    """
    result = await router.lookup(
        credentials.user, credentials.password, client_ip=host_of(client) or "",
        login_attempt=attempt, tls=client_tls,
    )
    if isinstance(result, NoRoute):
        return LoginOutcome(b"-ERR [AUTH] authentication failed\r\n")
    if isinstance(result, Refused):
        if result.wait:
            await trio.sleep(result.wait)  # nginx's Auth-Wait: hold the refusal
        text = result.text.encode("utf-8", "replace")
        return LoginOutcome(b"-ERR " + (b"" if text.startswith(b"[") else b"[AUTH] ") + text
                            + b"\r\n")
    if isinstance(result, LookupFailed):
        logger.warning("routing.lookup_failed", reason=result.reason, kind=result.kind)
        return LoginOutcome(b"-ERR [SYS/TEMP] authentication service unavailable, "
                            b"try again later\r\n")
    if result.upstream == HTTP_UPSTREAM:
        # A server the hook named: the default upstream's settings (TLS,
        # timeouts, forwarding) at the hook's address.
        assert result.address is not None
        cfg = replace(config.upstream, name=HTTP_UPSTREAM, address=result.address, fallbacks=())
        addresses: Sequence[HostPort] = (result.address,)
        pool: Pools | None = None
    else:
        cfg = config.named_upstream(result.upstream)
        addresses = pools.candidates(result.upstream)
        pool = pools
    link, events, _ = await open_pool(
        cfg, addresses, pools=pool, connect=connect, tls=tls, client=client, local=local,
        session_id=session_id, handshake_timeout=config.limits.handshake_timeout, greeted=True,
    )
    outcome = LoginOutcome(b"-ERR [SYS/TEMP] upstream unavailable\r\n", name=cfg.name,
                           route=result.source, events=events)
    if link is None:
        return outcome
    try:
        reply = await log_in(link, result.backend_user, result.password, cfg.response_timeout)
    except (UpstreamError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        reason = exc.reason if isinstance(exc, UpstreamError) else "closed"
        events.append(UpstreamFailed(reason))
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(link.stream)
        outcome.reply = b"-ERR [SYS/TEMP] upstream login failed, try again\r\n"
        return outcome
    outcome.reply = reply
    if reply.startswith(b"+OK"):
        outcome.upstream, outcome.rest = link.stream, link.greeting
    else:
        # A refused login: this connection is done (some servers close it
        # anyway after a failed PASS); the next attempt opens a new one.
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(link.stream)
    return outcome
