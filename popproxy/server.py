"""The trio shell: listeners, accepting a client, opening its upstream.

For each connection, ``Proxy.handle``: a PROXY header from a trusted load
balancer, then admission (implicit TLS, the session caps and admission
gates), then the session's lifecycle: the upstream (``upstream.py``), the
relay (``relay.py``), and whatever ends it, the close and the last event.
Shutdown (SIGTERM drain, SIGINT) is here too.  No protocol knowledge lives
here: the sans-IO ``Session`` has it all.
"""

from __future__ import annotations

import ipaddress
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial

import structlog
import trio

from . import proxyproto, sockio
from .addr import HostPort, host_of
from .config import Config, LimitsConfig, ListenConfig
from .events import (
    CommandSent,
    EndReason,
    Event,
    SessionClosed,
    SessionOpened,
    TlsEstablished,
    TlsFailed,
)
from .exits import CannotListen
from .front import Credentials
from .observe import Dispatcher, Observer, SessionInfo
from .policy import Policy, allow_all
from .pop3 import State
from .relay import RECEIVE_SIZE, Connection, Relay, Stats, send_quietly
from .routed import RoutedSession
from .routing import Pools, Router
from .session import Session, SessionLimits
from .state.client import StateClient
from .tls import TLSContexts, TLSHandshakeError, handshake
from .upstream import LoginOutcome, open_pool, route_login

__all__ = ["Proxy", "serve", "session_limits"]

logger = structlog.get_logger("popproxy.server")

SHUTDOWN_NOTICE = b"-ERR [SYS/TEMP] " + EndReason.SHUTDOWN.notice.encode() + b"\r\n"
LINGER_SECONDS = 1.0
LINGER_OCTETS = 1 << 20
# The PROXY protocol spec asks receivers to wait at least 3 s for the header.
PROXY_HEADER_TIMEOUT = 5.0
# Without [routing], how long an upstream address that failed is skipped
# (when [upstream] lists several); routing.down_time otherwise.
DOWN_TIME = 10.0
Stream = trio.abc.Stream
ConnectUpstream = Callable[[], Awaitable[Stream]]
# Asked with the client's address before a session starts: a reason refuses it.
Admission = Callable[[str], "str | None"]
# Asked after every Admission said yes: may await (the shared per-IP cap).
Gate = Callable[[SessionInfo], Awaitable["str | None"]]


def session_limits(limits: LimitsConfig) -> SessionLimits:
    """The sans-IO session's limits from the ``[limits]`` configuration."""
    return SessionLimits(
        command_line=limits.command_line,
        sasl_line=limits.sasl_line,
        max_pipeline=limits.max_pipeline,
        max_refused_before_login=limits.max_refused_before_login,
        max_listing=limits.max_listing,
    )


@dataclass
class _Ending:
    """How a session ended, as it becomes known."""

    reason: EndReason = EndReason.INTERNAL_ERROR
    detail: str = ""


#: The refusal when ``limits.max_unauthenticated`` sessions wait to log in.
UNAUTHENTICATED_FULL = "too many sessions not logged in, try again later"


class _LoginSlot:
    """A session's place among those not logged in yet (``Proxy.unauthenticated``),
    taken when it is accepted and given back at its login or its end."""

    __slots__ = ("held", "proxy", "started")

    def __init__(self, proxy: Proxy, started: float) -> None:
        self.proxy = proxy
        self.started = started
        self.held = True
        proxy.unauthenticated += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.proxy.unauthenticated -= 1


@dataclass
class Proxy:
    """The running proxy: configuration, observers and live-session count.

    ``admission`` callables are asked before each new session; one that
    returns a reason refuses the session with ``-ERR [SYS/TEMP] <reason>``
    (the audit's ``fail_closed`` uses this).  ``gates`` are asked after
    them, only when all said yes, and may wait (the shared state's per-IP
    cap).  ``state``: the shared state, when policy asks it questions.
    ``listening`` is true while the listeners accept (for readiness
    probes).  ``observers`` may be changed at any time (see
    ``observe.Dispatcher``).
    """

    config: Config
    observers: list[Observer] = field(default_factory=list)
    connect_upstream: ConnectUpstream | None = None
    admission: list[Admission] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)
    # Why every new session would be refused now (the audit's fail_closed),
    # for /readyz: asked from the HTTP thread, so they only look.
    refusals: list[Callable[[], str | None]] = field(default_factory=list)
    policy: Policy = allow_all
    state: StateClient | None = None
    tls: TLSContexts = field(default_factory=lambda: TLSContexts())
    active: int = 0
    # Of ``active``, those not logged in yet (``limits.max_unauthenticated``).
    unauthenticated: int = 0
    listening: bool = False
    # Routed mode (``[routing]``): where logins go.  ``pools``: the upstreams'
    # addresses and which are down (made from the configuration when None).
    router: Router | None = None
    pools: Pools | None = None
    _dispatcher: Dispatcher = field(default_factory=lambda: Dispatcher([]), repr=False)

    async def _connect(self, address: HostPort) -> Stream:
        if self.connect_upstream is not None:
            return await self.connect_upstream()
        family = _ip_family(address.host)
        if family is None:  # a name: resolve, and try its addresses in turn
            return await trio.open_tcp_stream(address.host, address.port)
        # An address: one socket and one connect.  open_tcp_stream's
        # happy-eyeballs machinery (a nursery, a task per attempt) is a
        # fifth of the proxy's CPU per session when there is nothing to race.
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect((address.host, address.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)  # sets TCP_NODELAY

    def pools_for(self, config: Config) -> Pools:
        """The address pools of ``config``'s upstreams (kept across reloads)."""
        upstreams = {u.name: u.addresses for u in config.upstreams or (config.upstream,)}
        down_time = config.routing.down_time if config.routing else DOWN_TIME
        if self.pools is None:
            self.pools = Pools(upstreams, down_time, clock=trio.current_time)
        else:
            self.pools.reconfigure(upstreams, down_time)
        return self.pools

    def _hears(self, kind: type[Event]) -> bool:
        """Whether an observer listens for events of type ``kind``."""
        self._dispatcher.observers = self.observers  # the list may have been replaced
        return bool(self._dispatcher.route(kind))

    def _emit(self, info: SessionInfo, events: Iterable[Event]) -> None:
        dispatcher = self._dispatcher
        dispatcher.observers = self.observers  # the list may have been replaced
        dispatcher.emit(info, events)

    async def handle(
        self, client: Stream, peer: str, listener: ListenConfig | None = None,
        local: str = "unknown",
    ) -> None:
        """Serve one client connection until it ends; never raises."""
        listener = listener or self.config.listeners[0]
        via: str | None = None
        if listener.proxy_protocol:
            header = await self._read_proxy_header(client, peer, listener)
            if header is None:
                await trio.aclose_forcefully(client)
                return
            client, real = header
            if real is not None:
                via, peer = peer, real
        kind = RoutedSession if self.config.routing is not None else Session
        session = kind(
            session_limits(self.config.limits), self.policy, client=peer,
            tls=listener.tls == "implicit", starttls=listener.tls == "starttls",
            require_tls_for_auth=listener.require_tls_for_auth,
            resolve_uidl=self.config.audit.enabled and self.config.audit.resolve_uidl,
        )
        session.announce_sent = self._hears(CommandSent)
        info = SessionInfo(secrets.token_hex(8), peer)
        with structlog.contextvars.bound_contextvars(session=info.id, client=peer):
            await self._lifecycle(Connection(client, listener, local), via, session, info)

    async def _lifecycle(
        self, conn: Connection, via: str | None, session: Session, info: SessionInfo
    ) -> None:
        """Admit, serve, close; whatever ends the session, ``SessionClosed``
        is its last event."""
        started = trio.current_time()
        stats = Stats()
        ending = _Ending()
        self.active += 1
        slot = _LoginSlot(self, started)
        try:
            if await self._admit(conn, via, session, info, started, stats, ending):
                ending.reason = await self._serve_session(conn, session, info, stats, slot)
        except BaseException as exc:
            if _is_bug(exc):
                # A bug met by one session ends that session, never the
                # proxy: re-raising would cancel every other session.
                ending.reason = EndReason.INTERNAL_ERROR
                logger.exception("session.crashed")
                return
            if not _is_cancellation(exc):
                raise  # KeyboardInterrupt, SystemExit
            # Shutdown (drain deadline, SIGINT): every owed reply becomes
            # -ERR [SYS/TEMP], and a session owed nothing is told too (as
            # Dovecot tells its clients), unless a body is being written.
            ending.reason = EndReason.SHUTDOWN
            with trio.CancelScope(shield=True):
                told = session.state is not State.CLOSED and not session.mid_reply
                out = session.fail(EndReason.SHUTDOWN, trio.current_time())
                if told and not out.to_client:
                    out.to_client = SHUTDOWN_NOTICE
                self._emit(info, out.events)
                await send_quietly(conn.client, out.to_client, stats, seconds=1.0)
            raise
        finally:
            self.active -= 1
            slot.release()
            with trio.CancelScope(shield=True):
                if ending.reason is EndReason.PROTOCOL_ERROR:
                    await _linger(conn.client)
                await sockio.close(conn.client)
            now = trio.current_time()
            # Whatever ended the session, the core reports what was cut
            # short (a RETR in flight, marks) before the session is closed.
            end = session.close(ending.reason)
            if self.state is not None:
                # Session-cap slots go back (bounded by state.timeout).
                await self.state.release(info.id)
                now = trio.current_time()
            self._emit(info, [
                *end.events,
                SessionClosed(ending.reason, now - started, stats.rx, stats.tx,
                              session.commands_sent, stats.up_rx, stats.up_tx, ending.detail),
            ])

    async def _admit(
        self, conn: Connection, via: str | None, session: Session, info: SessionInfo,
        started: float, stats: Stats, ending: _Ending,
    ) -> bool:
        """Implicit TLS, ``SessionOpened``, then the caps and admission gates.

        False (with ``ending`` set) when the session is not to be served.
        """
        listener = conn.listener
        # Implicit TLS first, so that session.open can say how the client
        # is protected (version, cipher, SNI).
        handshake_result: TlsEstablished | TlsFailed | None = None
        if listener.tls == "implicit":
            tls_client, handshake_result = await self._accept_tls(conn.client, listener)
            if tls_client is not None:
                conn.client = tls_client
        opened = SessionOpened(info.client, started, via)
        if isinstance(handshake_result, TlsEstablished):
            opened = replace(opened, tls=handshake_result.version,
                             cipher=handshake_result.cipher, sni=handshake_result.sni)
        self._emit(info, [opened, *([handshake_result] if handshake_result else [])])
        if isinstance(handshake_result, TlsFailed):
            ending.reason = EndReason.TLS_FAILED
            return False
        # Every gate is asked, even after a refusal: some count sessions,
        # and SessionClosed un-counts them all.
        refusals = [admit(info.client) for admit in self.admission]
        refusal = next((r for r in refusals if r is not None), None)
        limits = self.config.limits
        over = self.active > limits.max_sessions
        # Sessions not logged in keep to their share, so that a slowloris
        # cannot take the slots of users who do log in.
        crowded = self.unauthenticated > limits.unauthenticated_cap
        for gate in self.gates if refusal is None and not over and not crowded else ():
            refusal = await gate(info)
            if refusal is not None:
                break
        if over:
            ending.reason = EndReason.SESSION_LIMIT
        elif crowded:
            ending.reason, ending.detail = EndReason.SESSION_LIMIT, UNAUTHENTICATED_FULL
        elif refusal is not None:
            ending.reason, ending.detail = EndReason.REFUSED, refusal
        else:
            return True
        out = session.expire(ending.reason, ending.detail or None)
        self._emit(info, out.events)
        await send_quietly(conn.client, out.to_client, stats)
        return False

    async def _read_proxy_header(
        self, stream: Stream, peer: str, listener: ListenConfig
    ) -> tuple[Stream, str | None] | None:
        """Read a PROXY v1/v2 header from a trusted load balancer.

        Returns the stream (with any bytes after the header put back) and the
        real client, or None when the connection must be dropped: a source not
        in ``trusted_proxies``, or a missing, malformed or slow header.
        """
        try:
            addr = ipaddress.ip_address(host_of(peer) or "")
        except ValueError:
            addr = None
        if addr is None or not any(addr in net for net in listener.trusted_proxies):
            logger.warning("proxy_protocol.untrusted", peer=peer)
            return None
        buf = b""
        try:
            with trio.fail_after(PROXY_HEADER_TIMEOUT):
                while True:
                    parsed = proxyproto.parse_header(buf)
                    if parsed is not None:
                        break
                    data = await stream.receive_some(4096)
                    if not data:
                        logger.warning("proxy_protocol.eof", peer=peer)
                        return None
                    buf += data
        except (proxyproto.ProxyProtocolError, trio.TooSlowError,
                trio.BrokenResourceError) as exc:
            logger.warning("proxy_protocol.bad_header", peer=peer, error=str(exc))
            return None
        header, used = parsed
        rest = buf[used:]
        return (_Prefixed(stream, rest) if rest else stream), header.client

    async def _accept_tls(
        self, client: Stream, listener: ListenConfig
    ) -> tuple[trio.SSLStream[Stream] | None, TlsEstablished | TlsFailed]:
        ssl_stream = trio.SSLStream(client, self.tls.server(listener), server_side=True)
        try:
            version, cipher, sni = await handshake(
                ssl_stream, self.config.limits.handshake_timeout)
        except TLSHandshakeError as exc:
            logger.info("client.tls_failed", error=str(exc))
            return None, TlsFailed("client", str(exc))
        return ssl_stream, TlsEstablished("client", version, cipher, sni)

    async def _serve_session(
        self, conn: Connection, session: Session, info: SessionInfo, stats: Stats,
        slot: _LoginSlot,
    ) -> EndReason:
        cfg = self.config
        # The login clock runs from the connection's acceptance.
        login_by = slot.started + cfg.limits.login_timeout
        pools = self.pools or self.pools_for(cfg)
        if isinstance(session, RoutedSession):
            attempts = 0

            async def login(credentials: Credentials) -> LoginOutcome:
                nonlocal attempts
                attempts += 1
                assert self.router is not None
                return await route_login(
                    credentials, router=self.router, config=cfg, pools=pools,
                    connect=self._connect, tls=self.tls, client=info.client, local=conn.local,
                    session_id=info.id, attempt=attempts,
                    client_tls=isinstance(conn.client, trio.SSLStream),
                )

            relay = Relay(cfg, self.tls, self._emit, conn, None, session, info, stats, login,
                          self.state, login_by=login_by, on_login=slot.release)
            return await relay.run(b"")
        link, events, error = await open_pool(
            cfg.upstream, pools.candidates(cfg.upstream.name), pools=pools,
            connect=self._connect, tls=self.tls, client=info.client, local=conn.local,
            session_id=info.id, handshake_timeout=cfg.limits.handshake_timeout,
        )
        if link is None:
            if error is None or error.reason == "connect_timeout":
                why = EndReason.UPSTREAM_CONNECT_TIMEOUT
            elif error.reason == "tls":
                why = EndReason.UPSTREAM_TLS_FAILED
            else:
                why = EndReason.UPSTREAM_UNAVAILABLE
            out = session.fail(why, trio.current_time())
            self._emit(info, [*events, *out.events])
            await send_quietly(conn.client, out.to_client, stats)
            return why
        self._emit(info, events)
        try:
            relay = Relay(cfg, self.tls, self._emit, conn, link.stream, session, info, stats,
                          state=self.state, login_by=login_by, on_login=slot.release)
            return await relay.run(link.greeting)
        finally:
            with trio.CancelScope(shield=True):
                # Closing without QUIT: the upstream discards marked
                # deletions (RFC 1939 §6), exactly what the client asked for
                # by not saying QUIT.
                await sockio.close(link.stream)


def _is_bug(exc: BaseException) -> bool:
    """An ordinary exception (perhaps grouped, perhaps beside cancellations
    it caused), as opposed to a shutdown or an interrupt."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(exc.exceptions)
        return any(_is_bug(e) for e in leaves) and all(
            _is_bug(e) or _is_cancellation(e) for e in leaves)
    return isinstance(exc, Exception)


@lru_cache(maxsize=16)
def _ip_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an address literal, None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _is_cancellation(exc: BaseException) -> bool:
    """trio.Cancelled, alone or in a group of nothing but cancellations."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cancellation(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


class _Prefixed(trio.abc.Stream):
    """A stream that first returns bytes already read (after a PROXY header)."""

    def __init__(self, stream: Stream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _linger(stream: Stream) -> None:
    """Close gently on a client that is still sending (after an over-long line).

    Closing a socket with unread input makes the kernel send a reset, which
    can destroy our -ERR before the client reads it.  So: half-close, then
    read and drop what is still coming, bounded in time and octets.
    """
    with trio.move_on_after(LINGER_SECONDS):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            dropped = 0
            while dropped < LINGER_OCTETS:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                dropped += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _endpoint(stream: Stream, which: str) -> str:
    """"host:port" ("[v6]:port") of a socket stream's peer or local end."""
    sock = getattr(stream, "socket", None)
    try:
        addr = getattr(sock, which)() if sock is not None else None
    except OSError:
        addr = None
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(HostPort.of(str(addr[0]), int(addr[1])))
    return "unknown"


def _peer_name(stream: Stream) -> str:
    return _endpoint(stream, "getpeername")


def _local_name(stream: Stream) -> str:
    return _endpoint(stream, "getsockname")


async def open_listeners(addresses: Sequence[HostPort]) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    for addr in addresses:
        try:
            listeners += await trio.open_tcp_listeners(addr.port, host=addr.host)
        except OSError as exc:
            for lst in listeners:
                lst.socket.close()
            raise CannotListen("listen", addr, exc) from None
    return listeners


ListenerGroup = tuple[ListenConfig, Sequence[trio.SocketListener]]


async def serve(
    proxy: Proxy,
    listeners: Sequence[trio.SocketListener] | Sequence[ListenerGroup] | None = None,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept clients until SIGTERM (drain) or SIGINT (stop now).

    ``listeners`` are opened from the configuration when not given; plain
    socket listeners (tests) serve with the first listener's settings.
    On SIGTERM the listeners close at once; live sessions get up to
    ``limits.drain_timeout`` to finish, then are told ``-ERR [SYS/TEMP]``
    and closed.
    """
    cfg = proxy.config
    groups: list[ListenerGroup] = []
    if listeners is None:
        for lc in cfg.listeners:
            groups.append((lc, await open_listeners(lc.addresses)))
    elif listeners and isinstance(listeners[0], tuple):
        groups = [g for g in listeners if isinstance(g, tuple)]
    else:
        groups = [(cfg.listeners[0],
                   [x for x in listeners if isinstance(x, trio.SocketListener)])]
    for lc, _ in groups:
        if lc.tls != "none":
            proxy.tls.server(lc)  # fail now, not at the first client
    if cfg.upstream.tls != "none" and not cfg.upstream.verify:
        logger.warning("upstream.tls_unverified",
                       detail="upstream.verify = false: the upstream's certificate is not checked")

    def handler_for(index: int, lc: ListenConfig) -> Callable[[Stream], Awaitable[None]]:
        async def handler(stream: Stream) -> None:
            # After a reload, the listener's settings (certificates, TLS
            # for auth, trusted proxies) come from the new configuration.
            current = proxy.config.listeners
            settings = current[index] if index < len(current) else lc
            await proxy.handle(stream, _peer_name(stream), settings, _local_name(stream))
        return handler

    all_listeners = [x for _, group in groups for x in group]
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as sessions, trio.open_nursery() as accepting:
            for index, (lc, group) in enumerate(groups):
                await accepting.start(partial(
                    trio.serve_listeners, handler_for(index, lc), list(group),
                    handler_nursery=sessions))
                for lst in group:
                    logger.info("listening", address=_sockname(lst), tls=lc.tls,
                                proxy_protocol=lc.proxy_protocol)
            proxy.listening = True
            task_status.started(all_listeners)
            async for signum in signals:
                proxy.listening = False
                accepting.cancel_scope.cancel()  # closes the listeners
                if signum == signal.SIGTERM:
                    drain = cfg.limits.drain_timeout
                    logger.info("shutdown.drain", sessions=proxy.active, timeout=drain)
                    sessions.cancel_scope.deadline = trio.current_time() + drain
                else:
                    logger.info("shutdown.now", sessions=proxy.active)
                    sessions.cancel_scope.cancel()
                break
    logger.info("shutdown.done")


def _sockname(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return str(HostPort.of(host, port))
