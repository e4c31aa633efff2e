"""The HTTP/1.1 client under the auth_http hook: h11 on trio streams, kept alive.

``HttpPool.get(url, headers)`` sends a ``GET`` and returns the status and
header fields (``HttpAnswer``) or a failure with a fixed reason
(``HttpFailure``); the body is read only to keep the connection.  That is
all ``AuthHttpClient`` needs, and all this module does.

Why not httpcore (httpx's engine), which the client used before: in-process
under trio against a kept-alive responder on the development machine, its
pool cost 410-460 µs of CPU per lookup one at a time and 840-1010 µs with
20 in flight; this module, on the same h11 state machine httpcore drives,
costs 190-280 µs and 155-190 µs.  A lookup's CPU is a large part of a
routed session's, and the difference decided the hook's bar in
``benchmarks.routing_bench`` (0.68-0.80x of transparent before, 0.91-0.94x
after).  The project's shape, too: a sans-IO library (h11) and a thin trio
shell, so trio's clock and cancellation govern every socket wait.

Failure reasons are fixed text: h11's exception messages quote the
offending line, and a line can hold a password (the request's
``Auth-Pass``, the hook's).  h11 logs nothing.
"""

from __future__ import annotations

import select
import ssl
import urllib.parse
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import h11
import trio

__all__ = ["IDLE_EXPIRY", "MAX_BODY", "MAX_KEPT", "HttpAnswer", "HttpFailure", "HttpPool"]

#: A response body up to this long is read (and ignored) so that the
#: connection can be kept; a longer one closes the connection instead.
MAX_BODY = 16384
#: Idle connections kept open (the largest sensible
#: ``auth_http_concurrency``): with fewer, a busy proxy opens a new
#: connection for most lookups.
MAX_KEPT = 256
#: Seconds an idle connection is kept: below the keep-alive timeout of
#: common servers (nginx's is 75 s), so that usually the client closes.
IDLE_EXPIRY = 30.0
# One read: a hook's answer is a few hundred bytes.
_RECEIVE_SIZE = 65536


@dataclass(frozen=True, slots=True)
class HttpFailure:
    """No usable response; ``reason`` is fixed text, for logs."""

    reason: str


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A hook's HTTP response as the pool hands it over: status and header fields."""

    status: int
    headers: Sequence[tuple[bytes, bytes]] = field(repr=False)  # may hold an Auth-Pass


@dataclass(frozen=True, slots=True)
class _Target:
    """A hook URL taken apart once: where to connect, and the request line's parts."""

    origin: tuple[str, str, int]  # scheme, host, port: connections are kept per origin
    host_header: bytes
    path: bytes


def _target(url: str) -> _Target | HttpFailure:
    # The configuration has checked the URL (config._url); these failures are
    # for settings built by hand.
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        host_header = parts.netloc.rpartition("@")[2].encode("idna")
        path = ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode("ascii")
    except ValueError:  # UnicodeError included
        return HttpFailure("the request to the hook failed (InvalidURL)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return HttpFailure("the request to the hook failed (UnsupportedProtocol)")
    default_port = 443 if parts.scheme == "https" else 80
    return _Target((parts.scheme, parts.hostname, port or default_port), host_header, path)


class _Connection:
    """One connection to the hook: a trio stream and its h11 state machine."""

    __slots__ = ("http", "idle_since", "origin", "socket", "stream")

    def __init__(self, origin: tuple[str, str, int], stream: trio.abc.Stream,
                 socket: trio.socket.SocketType) -> None:
        self.origin = origin
        self.stream = stream
        self.socket = socket  # the TCP socket under a TLS stream too
        self.http = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def close(self) -> None:
        """Close at once, without a TLS close_notify (as ``trio.aclose_forcefully``).

        Synchronous on purpose: closing never waits on the hook, and a
        cancelled lookup closes its connection on the way out.
        """
        self.socket.close()

    def stale(self) -> bool:
        """Whether the idle connection has something to read: the hook closed
        it (EOF), or sent what nobody asked for.  Either way it cannot carry
        the next request."""
        # poll, not select: select cannot watch descriptors from 1024 up,
        # and a busy proxy has those.
        poller = select.poll()
        try:
            poller.register(self.socket.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


# What ``_exchange`` says of a kept connection that the hook had closed
# (nothing of the response came): ``get`` asks again on a fresh one, and
# never returns this.
_STALE = HttpFailure("the hook closed a kept connection")
_MALFORMED = "the hook sent a malformed HTTP response"


class HttpPool:
    """``GET`` requests to the hook on kept-alive HTTP/1.1 connections.

    h11 on trio streams: ``trio.open_tcp_stream``, and ``trio.SSLStream``
    for https (stdlib ``ssl``, the system's trust store unless
    ``ssl_context`` is given, the host name checked and sent as SNI).
    Deadlines and cancellation are the caller's (``AuthHttpClient.lookup``):
    a cancelled request closes its connection, and is never retried.

    Idle connections are kept up to ``max_kept``, used most recent first,
    and closed once ``idle_expiry`` seconds unused (checked when a request
    looks for one, on trio's clock).  A kept connection that the hook closed
    meanwhile is noticed before use (it reads as ready) or, when the close
    crosses the request, by the end of the stream before any of the
    response: then the request goes once more, on a fresh connection.  A
    response is kept only when h11 says so (HTTP/1.1 without
    ``Connection: close``), its body (read, ignored) is at most
    ``MAX_BODY`` and nothing follows it.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None,
                 max_kept: int = MAX_KEPT, idle_expiry: float = IDLE_EXPIRY) -> None:
        self._ssl_context = ssl_context
        self._max_kept = max_kept
        self._idle_expiry = idle_expiry
        self._idle: deque[_Connection] = deque()  # least recently used first
        self._targets: dict[str, _Target | HttpFailure] = {}
        self._closed = False

    @property
    def kept(self) -> int:
        """Idle connections held now."""
        return len(self._idle)

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        await trio.lowlevel.checkpoint()

    async def get(self, url: str, headers: list[tuple[bytes, bytes]]) -> HttpAnswer | HttpFailure:
        """``GET url`` with ``headers`` (``Host`` is added): the answer or a failure.

        A failure's reason is fixed text: exception messages (h11's quote
        the offending line) and header values never reach it.
        """
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 16:  # URLs come from reloads: a handful
                self._targets.clear()
            target = self._targets[url] = _target(url)
        if isinstance(target, HttpFailure):
            return target
        head = [(b"Host", target.host_header), *headers]
        kept = self._take(target.origin)
        if kept is not None:
            answer = await self._exchange(kept, target.path, head, fresh=False)
            if answer is not _STALE:
                return answer
        connection = await self._connect(target)
        if connection is None:
            return HttpFailure("cannot connect to the hook")
        return await self._exchange(connection, target.path, head, fresh=True)

    def _take(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        expired = trio.current_time() - self._idle_expiry
        while idle and idle[0].idle_since <= expired:
            idle.popleft().close()
        while idle:
            connection = idle.pop()
            # Another origin: a reload changed the URL, the old ones are done.
            if connection.origin == origin and not connection.stale():
                return connection
            connection.close()
        return None

    def _keep(self, connection: _Connection) -> None:
        if self._closed:
            connection.close()
            return
        connection.idle_since = trio.current_time()
        self._idle.append(connection)
        if len(self._idle) > self._max_kept:
            self._idle.popleft().close()

    async def _connect(self, target: _Target) -> _Connection | None:
        scheme, host, port = target.origin
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError:
            return None
        if scheme == "http":
            return _Connection(target.origin, tcp, tcp.socket)
        try:
            tls = trio.SSLStream(tcp, self._ssl(), server_hostname=host, https_compatible=True)
            await tls.do_handshake()
        except (trio.BrokenResourceError, OSError, ValueError):
            # Certificate or name mismatch, a hook speaking no TLS, ...
            tcp.socket.close()
            return None
        except BaseException:
            tcp.socket.close()
            raise
        return _Connection(target.origin, tls, tcp.socket)

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # On first use: the trust store costs milliseconds to load, and
            # most proxies never talk to an https hook (or any hook).
            context = ssl.create_default_context()  # the system's trust store
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    async def _exchange(self, connection: _Connection, path: bytes,
                        headers: list[tuple[bytes, bytes]], *, fresh: bool
                        ) -> HttpAnswer | HttpFailure:
        keep = False
        try:
            http = connection.http
            stream = connection.stream
            try:
                data = (http.send(h11.Request(method=b"GET", target=path, headers=headers))
                        or b"") + (http.send(h11.EndOfMessage()) or b"")
            except h11.LocalProtocolError:
                # A header value h11 will not send (settings made in code: the
                # configuration checks them); the reason the client always gave.
                return HttpFailure(_MALFORMED)
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, OSError):
                if not fresh:
                    return _STALE
                return HttpFailure("the connection to the hook broke (WriteError)")
            received = False
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    try:
                        chunk = await stream.receive_some(_RECEIVE_SIZE)
                    except (trio.BrokenResourceError, OSError):
                        if not (fresh or received):
                            return _STALE
                        return HttpFailure("the connection to the hook broke (ReadError)")
                    if not chunk and not received:
                        return HttpFailure(_MALFORMED) if fresh else _STALE
                    received = True
                    http.receive_data(bytes(chunk))
                elif isinstance(event, h11.Response):
                    answer = HttpAnswer(event.status_code, event.headers)
                    break
                elif not isinstance(event, h11.InformationalResponse):  # 1xx: more follows
                    return HttpFailure(_MALFORMED)  # h11 raises first; never spin
            if http.our_state is h11.MUST_CLOSE:
                # HTTP/1.0 or Connection: close: not kept, so the body (if
                # any) is not worth waiting for; nginx ignores it too.
                return answer
            size = 0
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    try:
                        chunk = await stream.receive_some(_RECEIVE_SIZE)
                    except (trio.BrokenResourceError, OSError):
                        return HttpFailure("the connection to the hook broke (ReadError)")
                    http.receive_data(bytes(chunk))
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_BODY:
                        return answer  # not kept: reading on costs more than a connection
                elif isinstance(event, h11.EndOfMessage):
                    # Bytes after the response would be read as the next
                    # lookup's answer: such a connection is not kept.
                    if http.their_state is h11.DONE and http.trailing_data == (b"", False):
                        http.start_next_cycle()
                        keep = True
                    return answer
                else:
                    return HttpFailure(_MALFORMED)  # h11 raises first; never spin
        except h11.RemoteProtocolError:
            return HttpFailure(_MALFORMED)
        finally:
            if keep:
                self._keep(connection)
            else:
                connection.close()
