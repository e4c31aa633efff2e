"""The relay: one session's bytes between the client and the upstream.

It holds no protocol knowledge: it feeds what it reads to the sans-IO
``Session`` and carries out the ``Output`` it gets back, in order.  The
protocol decisions, including when to start TLS after STLS, are the
session's; the relay only knows how to do I/O, keep time and stop.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace

import structlog
import trio

from . import sockio
from .config import Config, ListenConfig
from .events import EndReason, Event, MessageComplete, TlsEstablished, TlsFailed, UpstreamFailed
from .front import Credentials
from .observe import SessionInfo
from .pop3 import LOGGED_IN
from .routed import RoutedSession
from .session import Output, Session
from .state.client import StateClient
from .tls import TLSContexts, TLSHandshakeError, handshake
from .upstream import LoginOutcome

__all__ = ["RECEIVE_SIZE", "Connection", "Emit", "Relay", "RouteLogin", "Stats", "send_quietly"]

logger = structlog.get_logger("popproxy.relay")

RECEIVE_SIZE = 262144
Stream = trio.abc.Stream
Emit = Callable[[SessionInfo, Iterable[Event]], None]


# Routed mode: route and log in with a session's credentials.
RouteLogin = Callable[[Credentials], Awaitable[LoginOutcome]]


@dataclass
class Stats:
    """Octets each way and to each side, for ``SessionClosed``."""

    rx: int = 0
    tx: int = 0
    up_rx: int = 0
    up_tx: int = 0


class Connection:
    """The client side of one session: its stream may be upgraded to TLS."""

    def __init__(self, client: Stream, listener: ListenConfig, local: str) -> None:
        self.client = client
        self.listener = listener
        self.local = local


class Relay:
    """Moves one session's bytes: a pump per direction and a watchdog.

    Each pump reads its stream and, holding the session lock, feeds the
    sans-IO session and writes what it says, in order.  Holding the lock
    across the writes keeps replies ordered and gives backpressure (a slow
    client stalls the upstream pump, not memory), and unlike a channel to a
    third task it costs no task switch per read.  The watchdog enforces the
    idle, response and session-age limits and the policy timers; its cancel
    scope's deadline is moved after every read, which is cheap.
    """

    def __init__(
        self, config: Config, tls: TLSContexts, emit: Emit, conn: Connection,
        upstream: Stream | None, session: Session, info: SessionInfo, stats: Stats,
        route_login: RouteLogin | None = None, state: StateClient | None = None,
        *, login_by: float | None = None, on_login: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.tls = tls
        self._emit = emit
        self.conn = conn
        # In routed mode there is none until a login succeeded.
        self.upstream = upstream
        self.route_login = route_login
        self.state = state  # puts policy's questions to the shared state
        self.session = session
        self.info = info
        self.stats = stats
        self.lock = trio.Lock()
        self.reason: EndReason | None = None
        self.finished = trio.Event()
        self.timer = trio.CancelScope()
        self.client_scope = trio.CancelScope()
        self.client_pump_done = trio.Event()
        self.nursery: trio.Nursery | None = None
        now = trio.current_time()
        self.last_client = self.last_upstream = now
        limit = config.policy.protections.max_session_duration
        self.ends = now + limit if limit is not None else math.inf
        # limits.login_timeout: by when the client must have logged in (from
        # its connection, ``login_by``); ``on_login`` is told when it has.
        self.login_by = login_by if login_by is not None else now + config.limits.login_timeout
        self.on_login = on_login
        self.logged_in = False

    def finish(self, reason: EndReason) -> None:
        if self.reason is None:
            self.reason = reason
            self.finished.set()

    async def run(self, greeting: bytes) -> EndReason:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                if isinstance(self.session, RoutedSession):
                    async with self.lock:  # the proxy greets; no upstream yet
                        await self.deliver(self.session.start(trio.current_time()), False)
                elif greeting:
                    # Read while opening the link (STLS or XCLIENT needed it).
                    async with self.lock:
                        await self.process(False, greeting)
                if self.reason is None:
                    nursery.start_soon(self.pump_client, self.client_scope,
                                       self.client_pump_done)
                    if self.upstream is not None:
                        nursery.start_soon(self.pump_upstream)
                    nursery.start_soon(self.watchdog)
                    await self.finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            if self.route_login is not None and self.upstream is not None:
                with trio.CancelScope(shield=True):
                    # Closing without QUIT: the upstream discards marks.
                    await sockio.close(self.upstream)
        assert self.reason is not None
        return self.reason

    async def pump_client(self, scope: trio.CancelScope, done: trio.Event) -> None:
        try:
            with scope:
                await self._pump(True)
        finally:
            done.set()

    async def pump_upstream(self) -> None:
        await self._pump(False)

    async def _pump(self, from_client: bool) -> None:
        while self.reason is None:
            stream = self.conn.client if from_client else self.upstream
            assert stream is not None
            broken = False
            try:
                data = await sockio.receive(stream, RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data, broken = b"", True
            # Take the lock without a trip through the scheduler when it is
            # free (trio.Lock.acquire always yields once): the receive above
            # already was this task's checkpoint.
            lock = self.lock
            if lock.locked():
                await lock.acquire()
            else:
                lock.acquire_nowait()
            try:
                if self.reason is not None:
                    return
                await self.process(from_client, data, broken)
            finally:
                lock.release()
            if not data:
                return

    async def process(self, from_client: bool, data: bytes, broken: bool = False) -> None:
        """Feed the session and carry out what it says (the lock is held)."""
        now = trio.current_time()
        out = self.feed(self.session, from_client, data, now, self.stats, broken)
        if from_client:
            # Only a complete line is activity: a client dribbling the bytes
            # of an unfinished line does not keep its session alive.
            if b"\n" in data:
                self.last_client = now
            # Upstream silence is measured from the moment we last asked it
            # something ...
            if out.to_upstream:
                self.last_upstream = now
            await self.deliver(out, from_client)
        else:
            await self.deliver(out, from_client)
            # ... or from its last octet, once passed on: while a write to a
            # slow client blocks, this pump does not read the upstream, and
            # that wait is send_timeout's, not the upstream's silence.
            self.last_upstream = trio.current_time()
        self.reschedule()

    def next_deadline(self) -> tuple[float, EndReason | None]:
        """When the watchdog must act, and why (None: the session's own timer)."""
        why: EndReason | None
        if not self.logged_in and self.session.state in LOGGED_IN:
            # The login succeeded (transparent mode: the upstream's +OK to
            # PASS, APOP or AUTH; routed mode: the routed login): the login
            # clock stops and the session leaves the unauthenticated share.
            self.logged_in = True
            self.login_by = math.inf
            if self.on_login is not None:
                self.on_login()
        if self.session.owes_upstream_reply:
            deadline = self.last_upstream + self.config.upstream.response_timeout
            why = EndReason.UPSTREAM_TIMEOUT
        else:
            deadline = self.last_client + self.config.limits.idle_timeout
            why = EndReason.IDLE_TIMEOUT
        if self.ends < deadline:
            deadline, why = self.ends, EndReason.TIME_LIMIT
        if self.login_by < deadline:
            deadline, why = self.login_by, EndReason.LOGIN_TIMEOUT
        wake = self.session.wake_at
        if wake is not None and wake < deadline:
            deadline, why = wake, None
        return deadline, why

    def reschedule(self) -> None:
        # Only ever bring the watchdog's wake-up forward.  Activity mostly
        # pushes the deadline later, and moving a cancel scope's deadline
        # costs trio a heap update per read; a watchdog that wakes early
        # finds the deadline moved, and sleeps again (once per timeout).
        deadline = self.next_deadline()[0]
        if deadline < self.timer.deadline:
            self.timer.deadline = deadline

    async def watchdog(self) -> None:
        while self.reason is None:
            self.timer = trio.CancelScope(deadline=self.next_deadline()[0])
            with self.timer:
                await trio.sleep_forever()
            async with self.lock:
                if self.reason is not None:
                    return
                deadline, why = self.next_deadline()
                now = trio.current_time()
                if deadline > now:
                    continue  # activity moved the deadline meanwhile
                if why is None:
                    out = self.session.tick(now)
                    if out.to_upstream:
                        self.last_upstream = now
                    await self.deliver(out, False)
                    continue
                # A limit passed: tell the client why, then close.
                if why is EndReason.UPSTREAM_TIMEOUT:
                    out = self.session.fail(why, now)
                    out.events.insert(0, UpstreamFailed("response_timeout"))
                else:
                    out = self.session.expire(why)
                self._emit(self.info, out.events)
                await send_quietly(self.conn.client, out.to_client, self.stats)
                self.finish(why)

    async def deliver(self, out: Output, from_client: bool) -> None:
        """Write an output, tell observers, upgrade to TLS if asked."""
        limits = self.config.limits
        while True:
            if out.start_tls and not from_client:
                # STLS answered while the client pump is reading: stop it
                # *before* the +OK goes out, since what the client sends after
                # the +OK is the TLS handshake and no plaintext reader may take
                # it.  (When the client pump itself is here, it is not reading.)
                self.client_scope.cancel()
                await self.client_pump_done.wait()
            written = await self.write(
                self.conn.client, self.upstream, out, self.stats, limits.send_timeout)
            if not written:
                # A message whose end was in this write did not surely reach
                # the client: the audit must not call it delivered.
                out.events = [
                    replace(e, complete=False) if isinstance(e, MessageComplete) else e
                    for e in out.events
                ]
            # Observers hear of bytes after they were written.
            self._emit(self.info, out.events)
            if not written:
                self.finish(out.close or EndReason.PEER_GONE)
                return
            if out.close is not None:
                self.finish(out.close)
                return
            if out.effects or out.ask is not None:
                # Shared state: updates first (a failed login is counted
                # before the next one is judged), then the question the
                # session waits on.  Each call is bounded by state.timeout.
                assert self.state is not None
                await self.state.apply(out.effects, self.info.id)
                if out.ask is not None:
                    decision = await self.state.decide(out.ask, self.info.id)
                    out = self.session.answered(decision, trio.current_time())
                    continue
            if out.login is not None:
                out = await self.log_in(out.login)
                continue
            if not out.start_tls:
                return
            if not await self.start_client_tls():
                self.finish(EndReason.TLS_FAILED)
                return
            if not from_client:
                assert self.nursery is not None
                self.client_scope = trio.CancelScope()
                self.client_pump_done = trio.Event()
                self.nursery.start_soon(self.pump_client, self.client_scope,
                                        self.client_pump_done)
            out = self.session.tls_started(trio.current_time())

    async def log_in(self, credentials: Credentials) -> Output:
        """Routed mode: look the route up, connect, log in upstream.

        Runs with the lock held: the session waits for this login anyway
        (PASS and AUTH are barriers), and every step is bounded (the hook's
        timeout, connect_timeout, response_timeout).
        """
        session = self.session
        assert isinstance(session, RoutedSession)
        assert self.route_login is not None
        outcome = await self.route_login(credentials)
        del credentials  # the password is not needed any more
        self._emit(self.info, outcome.events)
        now = trio.current_time()
        self.last_upstream = now
        if outcome.upstream is not None:
            self.upstream = outcome.upstream
            assert self.nursery is not None
            self.nursery.start_soon(self.pump_upstream)
        out = session.routed_login(outcome.reply, now, upstream=outcome.name,
                                   route=outcome.route)
        if outcome.rest:
            more = session.receive_upstream(outcome.rest, now)
            out.to_client += more.to_client
            out.to_upstream += more.to_upstream
            out.events += more.events
            out.close = out.close or more.close
        return out

    async def start_client_tls(self) -> bool:
        """STLS (RFC 2595): the handshake on the raw client stream."""
        conn = self.conn
        ssl_stream = trio.SSLStream(conn.client, self.tls.server(conn.listener),
                                    server_side=True)
        conn.client = ssl_stream
        try:
            version, cipher, sni = await handshake(
                ssl_stream, self.config.limits.handshake_timeout)
        except TLSHandshakeError as exc:
            self._emit(self.info, [TlsFailed("client", str(exc))])
            logger.info("client.tls_failed", error=str(exc))
            return False
        self._emit(self.info, [TlsEstablished("client", version, cipher, sni)])
        return True

    def feed(
        self, session: Session, from_client: bool, data: bytes, now: float, stats: Stats,
        broken: bool = False,
    ) -> Output:
        if from_client:
            stats.rx += len(data)
            if data:
                out = session.receive_client(data, now)
            elif broken:
                out = session.close(EndReason.CLIENT_CLOSED)
            else:  # EOF: a half-close still gets its replies
                out = session.client_closed(now)
        else:
            stats.up_rx += len(data)
            out = session.receive_upstream(data, now) if data else session.upstream_closed(now)
        return out

    async def write(
        self, client: Stream, upstream: Stream | None, out: Output, stats: Stats,
        seconds: float,
    ) -> bool:
        """Write what the session produced; False if a peer is gone or stuck."""
        deadline = trio.current_time() + seconds
        try:
            if out.to_upstream:
                assert upstream is not None
                if not await sockio.send_all(upstream, out.to_upstream, deadline):
                    return False
                stats.up_tx += len(out.to_upstream)
            if out.to_client:
                if not await sockio.send_all(client, out.to_client, deadline):
                    return False
                stats.tx += len(out.to_client)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


async def send_quietly(
    stream: Stream, data: bytes, stats: Stats, seconds: float = 5.0
) -> None:
    if not data:
        return
    with trio.move_on_after(seconds):
        try:
            await stream.send_all(data)
            stats.tx += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
