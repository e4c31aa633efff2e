"""The trio shell: listeners, the upstream connection and the relay.

No protocol knowledge lives here.  For each client the relay connects to the
upstream, then runs one reader task per direction that only moves bytes into
a zero-size channel, and one task (``_relay``) that owns the sans-IO
``Session`` and does every write.  Replies therefore reach the client in the
order the session produced them, without locks, and the unbuffered channel
gives backpressure: a slow client stops the upstream reader, not memory.
"""

from __future__ import annotations

import math
import secrets
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import structlog
import trio

from .config import Config, HostPort
from .events import (
    CommandSent,
    Event,
    SessionClosed,
    SessionOpened,
    UpstreamConnected,
    UpstreamFailed,
)
from .policy import Policy, allow_all
from .session import Output, Session

__all__ = ["Observer", "Proxy", "SessionInfo", "serve"]

logger = structlog.get_logger("popproxy.server")

RECEIVE_SIZE = 65536
Stream = trio.abc.Stream


class SessionInfo:
    """What observers know about the session an event belongs to."""

    __slots__ = ("client", "id", "session")

    def __init__(self, id: str, client: str, session: Session) -> None:
        self.id = id
        self.client = client
        self.session = session

    @property
    def user(self) -> str | None:
        return self.session.user


Observer = Callable[[SessionInfo, Event], None]
ConnectUpstream = Callable[[], Awaitable[Stream]]


# Asked with the client's address before a session starts: a reason refuses it.
Admission = Callable[[str], "str | None"]


@dataclass
class Proxy:
    """The running proxy: configuration, observers and live-session count.

    ``admission`` callables are asked before each new session; one that
    returns a reason refuses the session with ``-ERR [SYS/TEMP] <reason>``
    (the audit's ``fail_closed`` uses this).  ``listening`` is true while the
    listeners accept (for readiness probes).
    """

    config: Config
    observers: list[Observer] = field(default_factory=list)
    connect_upstream: ConnectUpstream | None = None
    admission: list[Admission] = field(default_factory=list)
    policy: Policy = allow_all
    active: int = 0
    listening: bool = False

    async def _connect(self) -> Stream:
        if self.connect_upstream is not None:
            return await self.connect_upstream()
        addr = self.config.upstream.address
        return await trio.open_tcp_stream(addr.host, addr.port)

    def _emit(self, info: SessionInfo, events: Sequence[Event]) -> None:
        for event in events:
            for observe in self.observers:
                try:
                    observe(info, event)
                except Exception:
                    # An observer's failure is reported, never allowed to
                    # break the data path of this or any other session.
                    logger.exception("observer.failed", observer=repr(observe))

    async def handle(self, client: Stream, peer: str) -> None:
        """Serve one client connection until it ends; never raises."""
        limits = self.config.limits
        session = Session(limits.session_limits(), self.policy, client=peer)
        info = SessionInfo(secrets.token_hex(8), peer, session)
        started = trio.current_time()
        stats = _Stats()
        reason = "internal error"
        with structlog.contextvars.bound_contextvars(session=info.id, client=peer):
            self.active += 1
            self._emit(info, [SessionOpened(peer, started)])
            try:
                if self.active > limits.max_sessions:
                    reason = "session limit reached"
                    await _send_quietly(
                        client, b"-ERR [SYS/TEMP] too many sessions, try again later\r\n", stats
                    )
                    return
                for admit in self.admission:
                    refusal = admit(peer)
                    if refusal is not None:
                        reason = refusal
                        line = f"-ERR [SYS/TEMP] {refusal}\r\n".encode()
                        await _send_quietly(client, line, stats)
                        return
                reason = await self._serve_session(client, session, info, stats)
            except trio.Cancelled:
                reason = "shutdown"
                with trio.CancelScope(shield=True):
                    out = session.fail("proxy shutting down", trio.current_time())
                    self._emit(info, out.events)
                    await _send_quietly(client, out.to_client, stats, seconds=1.0)
                raise
            except Exception:
                logger.exception("session.crashed")
                raise
            finally:
                self.active -= 1
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(client)
                now = trio.current_time()
                # Whatever ended the session, the core reports what was cut
                # short (a RETR in flight) before the session is closed.
                end = session.close(reason, now)
                self._emit(
                    info,
                    [*end.events,
                     SessionClosed(reason, now - started, stats.rx, stats.tx, stats.commands)],
                )

    async def _serve_session(
        self, client: Stream, session: Session, info: SessionInfo, stats: _Stats
    ) -> str:
        cfg = self.config
        upstream: Stream | None = None
        begun = trio.current_time()
        with trio.move_on_after(cfg.upstream.connect_timeout) as scope:
            try:
                upstream = await self._connect()
            except OSError as exc:
                logger.warning("upstream.connect_failed", error=str(exc))
        if upstream is not None:
            connected = UpstreamConnected(
                str(cfg.upstream.address), trio.current_time() - begun
            )
            self._emit(info, [connected])
        else:
            timed_out = scope.cancelled_caught
            why = "upstream connect timeout" if timed_out else "upstream unavailable"
            out = session.fail(why, trio.current_time())
            failed = UpstreamFailed("connect_timeout" if timed_out else "connect")
            self._emit(info, [failed, *out.events])
            await _send_quietly(client, out.to_client, stats)
            return why
        try:
            return await self._relay(client, upstream, session, info, stats)
        finally:
            with trio.CancelScope(shield=True):
                # Closing without QUIT: the upstream discards marked
                # deletions (RFC 1939 §6), exactly what the client asked for
                # by not saying QUIT.
                await trio.aclose_forcefully(upstream)

    async def _relay(
        self, client: Stream, upstream: Stream, session: Session, info: SessionInfo, stats: _Stats
    ) -> str:
        send, receive = trio.open_memory_channel[tuple[bool, bytes]](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_into, client, True, send.clone())
            nursery.start_soon(_read_into, upstream, False, send.clone())
            send.close()
            try:
                return await self._relay_loop(client, upstream, session, info, stats, receive)
            finally:
                nursery.cancel_scope.cancel()  # the readers, blocked in receive

    async def _relay_loop(
        self, client: Stream, upstream: Stream, session: Session, info: SessionInfo,
        stats: _Stats, receive: trio.MemoryReceiveChannel[tuple[bool, bytes]],
    ) -> str:
        limits = self.config.limits
        response_timeout = self.config.upstream.response_timeout
        max_duration = self.config.policy.protections.max_session_duration
        last_client = last_upstream = started = trio.current_time()
        ends = started + max_duration if max_duration is not None else math.inf
        while True:
            # The nearest of: a timeout, the session's age limit, or a
            # policy timer (a delayed command or tarpitted refusal).
            if session.owes_upstream_reply:
                deadline, why = last_upstream + response_timeout, "upstream response timeout"
            else:
                deadline, why = last_client + limits.idle_timeout, "idle timeout"
            if ends < deadline:
                deadline, why = ends, "session time limit"
            wake = session.wake_at
            if wake is not None and wake < deadline:
                deadline, why = wake, "tick"
            with trio.move_on_at(deadline):
                from_client, data = await receive.receive()
                now = trio.current_time()
                out = self._feed(session, from_client, data, now, stats)
                if from_client:
                    last_client = now
                # Upstream silence is measured from its last octet or from
                # the moment we last asked it something, whichever is later.
                if not from_client or out.to_upstream:
                    last_upstream = now
                written = await self._write(client, upstream, out, stats, limits.send_timeout)
                # Observers hear of bytes after they were written.
                self._emit(info, out.events)
                if not written:
                    return "peer gone or too slow" if out.close is None else out.close
                if out.close is not None:
                    return out.close
                continue
            now = trio.current_time()
            if why == "tick":
                out = session.tick(now)
                if out.to_upstream:
                    last_upstream = now
                written = await self._write(client, upstream, out, stats, limits.send_timeout)
                self._emit(info, out.events)
                if not written or out.close is not None:
                    return out.close or "peer gone or too slow"
                continue
            # A deadline passed: tell the client why, then close.
            if why == "upstream response timeout":
                out = session.fail(why, now)
                out.events.insert(0, UpstreamFailed("response_timeout"))
            else:
                out = session.close(why, now)
                text = "disconnected for inactivity" if why == "idle timeout" else why
                out.to_client = f"-ERR [SYS/TEMP] {text}\r\n".encode()
            self._emit(info, out.events)
            await _send_quietly(client, out.to_client, stats)
            return why

    def _feed(
        self, session: Session, from_client: bool, data: bytes, now: float, stats: _Stats
    ) -> Output:
        if from_client:
            stats.rx += len(data)
            out = session.receive_client(data, now) if data else session.client_closed(now)
        else:
            out = session.receive_upstream(data, now) if data else session.upstream_closed(now)
        stats.commands += sum(1 for e in out.events if isinstance(e, CommandSent))
        return out

    async def _write(
        self, client: Stream, upstream: Stream, out: Output, stats: _Stats, seconds: float
    ) -> bool:
        """Write what the session produced; False if a peer is gone or stuck."""
        try:
            with trio.fail_after(seconds):
                if out.to_upstream:
                    await upstream.send_all(out.to_upstream)
                if out.to_client:
                    await client.send_all(out.to_client)
                    stats.tx += len(out.to_client)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            return False
        return True


@dataclass
class _Stats:
    rx: int = 0
    tx: int = 0
    commands: int = 0


async def _read_into(
    stream: Stream, from_client: bool, channel: trio.MemorySendChannel[tuple[bool, bytes]]
) -> None:
    """Move bytes from ``stream`` to the relay; b"" marks the end."""
    async with channel:
        while True:
            try:
                data = bytes(await stream.receive_some(RECEIVE_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            try:
                await channel.send((from_client, data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return


async def _send_quietly(
    stream: Stream, data: bytes, stats: _Stats, seconds: float = 5.0
) -> None:
    if not data:
        return
    with trio.move_on_after(seconds):
        try:
            await stream.send_all(data)
            stats.tx += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _peer_name(stream: Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        addr = sock.getpeername() if sock is not None else None
    except OSError:
        addr = None
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unknown"


async def open_listeners(addresses: Sequence[HostPort]) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    for addr in addresses:
        listeners += await trio.open_tcp_listeners(addr.port, host=addr.host)
    return listeners


async def serve(
    proxy: Proxy,
    listeners: Sequence[trio.SocketListener] | None = None,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept clients until SIGTERM (drain) or SIGINT (stop now).

    On SIGTERM the listeners close at once; live sessions get up to
    ``limits.drain_timeout`` to finish, then are told ``-ERR [SYS/TEMP]``
    and closed.
    """
    cfg = proxy.config
    if listeners is None:
        listeners = await open_listeners(cfg.listen.addresses)
    listeners = list(listeners)

    async def handler(stream: Stream) -> None:
        await proxy.handle(stream, _peer_name(stream))

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as sessions, trio.open_nursery() as accepting:
            await accepting.start(
                partial(trio.serve_listeners, handler, listeners, handler_nursery=sessions)
            )
            for lst in listeners:
                logger.info("listening", address=_sockname(lst))
            proxy.listening = True
            task_status.started(listeners)
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
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
