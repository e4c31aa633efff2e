"""The hook's HTTP/1.1 client (``HttpPool``): kept-alive connections, TLS, any answer.

Through ``AuthHttpClient``, against ``KeptResponder`` (below): a trio
responder on 127.0.0.1 (port 0), in the test's own trio run, that keeps
every connection open until the client closes it, so each test sees what
the client decided: one connection for many lookups, a connection not
kept after ``Connection: close``, an idle one closed after
``IDLE_EXPIRY`` (trio's MockClock), one the hook closed asked again once.
"""

from __future__ import annotations

import os
import resource
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio
import trio.testing
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.addr import HostPort
from popproxy.routing.authhttp import (
    AuthHttpClient,
    AuthRequest,
    HookFailure,
    HookRefusal,
    HookRoute,
    HookSettings,
    escape,
)
from popproxy.routing.httpclient import IDLE_EXPIRY, MAX_BODY, HttpPool
from tests.auth_responder import HookRequest, refuse

#: A password that cannot turn up anywhere by accident.
SECRET = "Zq9 distinctive-p\u00e4ss%word"
SECRET_FORMS = (SECRET, escape(SECRET).decode("latin-1"), "distinctive")


def request(user: str = "alice", password: str = "wonderland") -> AuthRequest:
    return AuthRequest(user, password, client_ip="127.0.0.1")


@dataclass(frozen=True)
class Hangup:
    """``KeptResponder``'s answer: send ``raw`` (maybe nothing), then close."""

    raw: bytes = b""


KeptAnswer = Callable[[HookRequest, int], bytes | Hangup | None]


def kept_ok(*extra: str, version: str = "1.1", body: bytes = b"") -> bytes:
    """A keep-alive answer: Auth-Status OK, Content-Length set, ``extra`` header lines."""
    lines = [f"HTTP/{version} 200 OK", "Auth-Status: OK", "Auth-Server: 127.0.0.1",
             "Auth-Port: 1110", *extra]
    if not any(e.lower().startswith("transfer-encoding") for e in extra):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class KeptResponder:
    """An HTTP/1.1 responder that keeps every connection until the client closes it.

    ``answer(request, nth)`` gives the raw answer to the ``nth`` request on
    its connection (1, 2, ...): bytes (sent; the connection stays open
    whatever they say, ``Connection: close`` included, so tests see what the
    client decides), ``Hangup(raw)`` (sent, then the responder closes), or
    None (no answer; held until the client closes).  With ``tls`` it
    speaks TLS.  ``gate``, when given, holds every answer until it is set.
    """

    def __init__(self, answer: KeptAnswer, *, tls: ssl.SSLContext | None = None,
                 gate: trio.Event | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.gate = gate
        #: Connections accepted, and of them those the client closed.
        self.connections = 0
        self.closed_by_client = 0
        #: Every request with the number of its connection (1, 2, ...).
        self.requests: list[tuple[int, HookRequest]] = []
        self._waiting: dict[trio.CancelScope, trio.abc.Stream] = {}
        self.url = ""

    @property
    def per_connection(self) -> list[int]:
        """The connection number of each request, in order."""
        return [number for number, _ in self.requests]

    async def serve(self, *, task_status: trio.TaskStatus[KeptResponder] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/auth"
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def drop_idle(self) -> int:
        """Close the connections waiting for a request, as a keep-alive timeout does."""
        await trio.testing.wait_all_tasks_blocked()  # they are back to waiting
        scopes = list(self._waiting)
        for scope in scopes:
            scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        return len(scopes)

    async def send_idle(self, raw: bytes) -> int:
        """Send ``raw`` on the connections waiting for a request (nobody asked)."""
        await trio.testing.wait_all_tasks_blocked()
        streams = list(self._waiting.values())
        for stream in streams:
            await stream.send_all(raw)
        return len(streams)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        stream: trio.abc.Stream = (
            trio.SSLStream(tcp, self.tls, server_side=True) if self.tls else tcp)
        try:
            with trio.CancelScope() as scope:
                await self._converse(stream, number, scope)
        finally:
            await trio.aclose_forcefully(stream)

    async def _converse(self, stream: trio.abc.Stream, number: int,
                        scope: trio.CancelScope) -> None:
        buffer = b""
        nth = 0
        while True:
            if not buffer:
                self._waiting[scope] = stream
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
            finally:
                self._waiting.pop(scope, None)
            if not chunk:
                self.closed_by_client += 1
                return
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                req = HookRequest(method, target, tuple(
                    (k, v.strip()) for k, _, v in (line.partition(":") for line in lines)))
                nth += 1
                self.requests.append((number, req))
                answer = self.answer(req, nth)
                if self.gate is not None:
                    await self.gate.wait()
                if answer is None:
                    # Hold it: the client's timeout ends it.
                    while await stream.receive_some(65536):
                        pass
                    self.closed_by_client += 1
                    return
                if isinstance(answer, Hangup):
                    if answer.raw:
                        await stream.send_all(answer.raw)
                    return
                await stream.send_all(answer)


KeptServe = Callable[..., Awaitable[KeptResponder]]


@pytest.fixture
async def kept(nursery: trio.Nursery) -> KeptServe:
    async def start(answer: KeptAnswer, **kw: object) -> KeptResponder:
        responder: KeptResponder = await nursery.start(KeptResponder(answer, **kw).serve)  # type: ignore[arg-type]
        return responder

    return start


ROUTE = HookRoute(HostPort("127.0.0.1", 1110), "alice", "wonderland")


async def test_keep_alive_one_connection_for_many_lookups(kept: KeptServe) -> None:
    responder = await kept(lambda req, nth: kept_ok())
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        for _ in range(20):
            assert await client.lookup(request()) == ROUTE
        assert responder.connections == 1
        assert len(responder.requests) == 20
        assert responder.closed_by_client == 0
    # aclose closed the idle connection.
    await trio.testing.wait_all_tasks_blocked()
    assert responder.closed_by_client == 1


async def test_concurrent_lookups_use_at_most_concurrency_connections(kept: KeptServe) -> None:
    responder = await kept(lambda req, nth: kept_ok())
    async with AuthHttpClient(HookSettings(responder.url, concurrency=4)) as client:
        async def worker() -> None:
            for _ in range(10):
                assert await client.lookup(request()) == ROUTE

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(worker)
    assert len(responder.requests) == 80
    assert 1 <= responder.connections <= 4


async def test_idle_connections_are_kept_up_to_max_kept(kept: KeptServe) -> None:
    gate = trio.Event()
    responder = await kept(lambda req, nth: kept_ok(), gate=gate)
    pool = HttpPool(max_kept=2)
    async with AuthHttpClient(HookSettings(responder.url), pool=pool) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(client.lookup, request())
            await trio.testing.wait_all_tasks_blocked()
            assert responder.connections == 4  # four at once: four connections
            gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert pool.kept == 2
        assert responder.closed_by_client == 2  # as they came back, beyond max_kept
    await trio.testing.wait_all_tasks_blocked()
    assert responder.closed_by_client == 4  # aclose closed the kept ones
    assert pool.kept == 0


async def test_a_kept_connection_the_hook_closed_is_noticed(kept: KeptServe) -> None:
    responder = await kept(lambda req, nth: kept_ok())
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        assert await client.lookup(request()) == ROUTE
        assert await responder.drop_idle() == 1  # the hook's keep-alive timeout
        assert await client.lookup(request()) == ROUTE
        assert await client.lookup(request()) == ROUTE
    assert responder.per_connection == [1, 2, 2]  # not sent on the closed one


async def test_a_kept_connection_with_unasked_bytes_is_not_used(kept: KeptServe) -> None:
    """Bytes on an idle connection would be read as the next lookup's answer."""
    responder = await kept(lambda req, nth: kept_ok())
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        assert await client.lookup(request()) == ROUTE
        stray = b"HTTP/1.1 200 OK\r\nAuth-Status: stray\r\nContent-Length: 0\r\n\r\n"
        assert await responder.send_idle(stray) == 1
        assert await client.lookup(request()) == ROUTE
    assert responder.per_connection == [1, 2]


async def test_kept_connections_on_descriptors_from_1024_up(kept: KeptServe) -> None:
    """A busy proxy's sockets have such numbers, which select() cannot watch."""
    responder = await kept(lambda req, nth: kept_ok())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files ({hard}) is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]
    try:
        pool = HttpPool()
        async with AuthHttpClient(HookSettings(responder.url), pool=pool) as client:
            for _ in range(3):
                assert await client.lookup(request()) == ROUTE
            assert pool.kept == 1
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert responder.per_connection == [1, 1, 1]


async def test_a_kept_connection_closed_under_the_request_is_retried_once(
    kept: KeptServe,
) -> None:
    """The hook closes a kept connection as the request arrives: asked again, freshly."""
    responder = await kept(lambda req, nth: Hangup() if nth == 2 else kept_ok())
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        assert await client.lookup(request()) == ROUTE
        assert await client.lookup(request()) == ROUTE
    assert responder.per_connection == [1, 1, 2]


async def test_the_retry_is_only_once(kept: KeptServe) -> None:
    answers = iter([kept_ok()])
    responder = await kept(lambda req, nth: next(answers, Hangup()))
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        assert await client.lookup(request()) == ROUTE
        assert await client.lookup(request()) == HookFailure(
            "the hook sent a malformed HTTP response")
    assert responder.per_connection == [1, 1, 2]  # the fresh connection is not retried


async def test_no_retry_once_part_of_the_answer_came(kept: KeptServe) -> None:
    responder = await kept(lambda req, nth: Hangup(kept_ok()[:30]) if nth == 2 else kept_ok())
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        assert await client.lookup(request()) == ROUTE
        assert await client.lookup(request()) == HookFailure(
            "the hook sent a malformed HTTP response")
    assert responder.per_connection == [1, 1]


async def test_no_retry_after_a_timeout(
    kept: KeptServe, autojump_clock: trio.testing.MockClock
) -> None:
    responder = await kept(lambda req, nth: None if nth == 2 else kept_ok())
    async with AuthHttpClient(HookSettings(responder.url, timeout=2.0)) as client:
        assert await client.lookup(request()) == ROUTE
        start = trio.current_time()
        assert await client.lookup(request()) == HookFailure(
            "no answer from the hook within 2s", "timeout")
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert responder.closed_by_client == 1  # the timed-out connection is not kept
        assert await client.lookup(request()) == ROUTE
    assert responder.per_connection == [1, 1, 2]


async def test_idle_connections_expire(
    kept: KeptServe, autojump_clock: trio.testing.MockClock
) -> None:
    responder = await kept(lambda req, nth: kept_ok())
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        assert await client.lookup(request()) == ROUTE
        await trio.sleep(IDLE_EXPIRY - 1)
        assert await client.lookup(request()) == ROUTE  # still kept: idle 29 s
        await trio.sleep(IDLE_EXPIRY + 1)
        assert await client.lookup(request()) == ROUTE
        await trio.testing.wait_all_tasks_blocked()
        assert responder.per_connection == [1, 1, 2]
        assert responder.closed_by_client == 1  # the expired one, by the client


@pytest.mark.parametrize("raw", [
    kept_ok("Connection: close"),
    kept_ok("Connection: keep-alive, Close"),
    kept_ok(version="1.0"),
    kept_ok("Connection: keep-alive", version="1.0"),  # h11 keeps no HTTP/1.0 connection
    # not kept, so the body is not waited for: nginx reads none either
    b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 1110\r\n\r\n",
])
async def test_connections_the_hook_will_close_are_not_kept(
    kept: KeptServe, raw: bytes
) -> None:
    responder = await kept(lambda req, nth: raw)
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        for _ in range(3):
            assert await client.lookup(request()) == ROUTE
        await trio.testing.wait_all_tasks_blocked()
        assert responder.per_connection == [1, 2, 3]
        assert responder.closed_by_client == 3


@pytest.mark.parametrize(("raw", "kept_alive"), [
    (kept_ok(body=b"x" * MAX_BODY), True),
    (kept_ok(body=b"x" * (MAX_BODY + 1)), False),
    (kept_ok("Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"), True),
    (kept_ok("Transfer-Encoding: chunked",
             body=b"%x\r\n" % (MAX_BODY + 1) + b"x" * (MAX_BODY + 1) + b"\r\n0\r\n\r\n"), False),
    # Two answers to one request: the second must not answer the next lookup.
    (kept_ok() + refuse("stray answer"), False),
])
async def test_the_body_is_read_and_ignored_up_to_max_body(
    kept: KeptServe, raw: bytes, kept_alive: bool
) -> None:
    responder = await kept(lambda req, nth: raw)
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        assert await client.lookup(request()) == ROUTE
        assert await client.lookup(request()) == ROUTE
    assert responder.per_connection == ([1, 1] if kept_alive else [1, 2])


async def test_reconfigure_to_another_hook_leaves_the_old_connections(kept: KeptServe) -> None:
    first = await kept(lambda req, nth: kept_ok())
    second = await kept(lambda req, nth: kept_ok())
    async with AuthHttpClient(HookSettings(first.url)) as client:
        assert await client.lookup(request()) == ROUTE
        client.reconfigure(HookSettings(second.url))
        assert await client.lookup(request()) == ROUTE
        await trio.testing.wait_all_tasks_blocked()
        assert (first.closed_by_client, second.closed_by_client) == (1, 0)
        assert (len(first.requests), len(second.requests)) == (1, 1)


async def test_cancelled_lookups_close_their_connection(
    kept: KeptServe, autojump_clock: trio.testing.MockClock
) -> None:
    responder = await kept(lambda req, nth: None)
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        with trio.move_on_after(1.0):
            await client.lookup(request())
        await trio.testing.wait_all_tasks_blocked()
        assert responder.closed_by_client == 1


# --- https ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hook_ca() -> trustme.CA:
    return trustme.CA(organization_name="popproxy hook tests")


def server_context(ca: trustme.CA, *names: str, seen: list[str | None] | None = None
                   ) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    if seen is not None:
        def sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
            seen.append(name)

        context.sni_callback = sni
    return context


def trusting(ca: trustme.CA) -> HttpPool:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return HttpPool(ssl_context=context)


async def test_an_https_hook(kept: KeptServe, hook_ca: trustme.CA) -> None:
    names: list[str | None] = []
    responder = await kept(lambda req, nth: kept_ok(),
                           tls=server_context(hook_ca, "localhost", "127.0.0.1", seen=names))
    async with AuthHttpClient(HookSettings(responder.url), pool=trusting(hook_ca)) as client:
        for _ in range(3):
            assert await client.lookup(request()) == ROUTE
        assert responder.connections == 1  # kept, TLS too
        # By name: the name is checked and sent as SNI (an address is not).
        client.reconfigure(HookSettings(responder.url.replace("127.0.0.1", "localhost")))
        assert await client.lookup(request()) == ROUTE
    assert names == [None, "localhost"]


@pytest.mark.parametrize("case", ["other name", "other CA"])
async def test_an_https_hook_that_cannot_be_trusted(
    kept: KeptServe, hook_ca: trustme.CA, case: str
) -> None:
    tls = {
        "other name": server_context(hook_ca, "hook.example.org"),
        "other CA": server_context(trustme.CA(), "127.0.0.1"),
    }[case]
    responder = await kept(lambda req, nth: kept_ok(), tls=tls)
    async with AuthHttpClient(HookSettings(responder.url), pool=trusting(hook_ca)) as client:
        assert await client.lookup(request(password=SECRET)) == HookFailure(
            "cannot connect to the hook")
    assert responder.requests == []  # the password never went out


async def test_an_https_url_for_a_plain_http_hook(
    nursery: trio.Nursery, hook_ca: trustme.CA
) -> None:
    async def plain(stream: trio.SocketStream) -> None:
        # What an HTTP server answers to a TLS ClientHello.
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, plain, listeners)
    (listener,) = listeners
    url = f"https://127.0.0.1:{listener.socket.getsockname()[1]}/auth"
    async with AuthHttpClient(HookSettings(url), pool=trusting(hook_ca)) as client:
        assert await client.lookup(request()) == HookFailure("cannot connect to the hook")


async def test_the_system_trust_store_by_default(kept: KeptServe, hook_ca: trustme.CA) -> None:
    # A test CA is in no system store: refused, as an unknown CA must be.
    responder = await kept(lambda req, nth: kept_ok(),
                           tls=server_context(hook_ca, "127.0.0.1"))
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        assert await client.lookup(request()) == HookFailure("cannot connect to the hook")
    assert responder.requests == []


# --- any answer at all, on a kept connection --------------------------------

_status_lines = st.sampled_from([
    b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK",
    b"HTTP/1.1 502 Bad Gateway", b"HTTP/2 200", b"garbage", b"",
])
_lines = st.sampled_from([
    b"Auth-Status: OK", b"Auth-Status: go away", b"Auth-Server: 127.0.0.1", b"Auth-Port: 1110",
    b"Auth-Pass: " + SECRET.encode(), b"Echo-" + SECRET.encode(), b"X-Echo: " + SECRET.encode(),
    b"Content-Length: 0", b"Content-Length: 5", b"Content-Length: 99999", b"Content-Length: x",
    b"Transfer-Encoding: chunked", b"Connection: close", b"Auth-Wait: 1", b"\x00\xff",
])
_bodies = st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"\r\n",
                           b"HTTP/1.1 200 OK\r\nAuth-Status: stray\r\nContent-Length: 0\r\n\r\n"])


@given(_status_lines, st.lists(_lines, max_size=6), _bodies, st.booleans())
@settings(max_examples=150, deadline=None)
def test_any_answer_then_the_next_lookup_is_sound(
    status: bytes, lines: list[bytes], body: bytes, hang_up: bool
) -> None:
    """Whatever the first answer on a connection, the lookup ends in time with a
    typed result naming no secret, and the next lookup gets its own answer:
    a connection is never handed on with the previous answer's leftovers."""
    raw = b"\r\n".join([status, *lines]) + b"\r\n\r\n" + body
    results: list[object] = []

    async def main() -> None:
        def answer(req: HookRequest, nth: int) -> bytes | Hangup:
            if req.header("Auth-User") == "first":
                return Hangup(raw) if hang_up else raw
            return kept_ok()

        async with trio.open_nursery() as nursery:
            responder: KeptResponder = await nursery.start(KeptResponder(answer).serve)
            async with AuthHttpClient(HookSettings(responder.url, timeout=3.0)) as client:
                start = trio.current_time()
                results.append(await client.lookup(request("first", SECRET)))
                assert trio.current_time() - start <= 3.0 + 0.01
                results.append(await client.lookup(request("second", SECRET)))
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    first, second = results
    assert isinstance(first, HookRoute | HookRefusal | HookFailure)
    assert not any(s in repr(first) + getattr(first, "reason", "") for s in SECRET_FORMS)
    assert second == HookRoute(HostPort("127.0.0.1", 1110), "second", SECRET)
