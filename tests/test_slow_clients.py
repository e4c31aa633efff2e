"""Slow and hostile peers: the clocks that bound them, and whose fault it is.

Issue 17, items 3, 4, 7 and 9: the login timeout, the idle clock that only
complete lines reset, the share of session slots for sessions not logged in
(``limits.max_unauthenticated``), the upstream response clock that stops
while the proxy waits for a slow client, the drain notice, a client that left
while the upstream hangs, and ``limits.max_listing``.

Everything runs as ``popproxy run`` assembles it (``app.build``: metrics
included) over memory streams on trio's autojump clock, so the timeouts pass
without waiting; the drain test uses real sockets and a real SIGTERM on a
mock clock that only jumps when nothing has happened for a while.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import pytest
import trio
import trio.testing

from popproxy.app import App, build
from popproxy.config import (
    Config,
    ConfigError,
    HostPort,
    LimitsConfig,
    UpstreamConfig,
    parse_config,
)
from popproxy.events import (
    EndReason,
    Event,
    MessageComplete,
    SessionClosed,
    UpstreamFailed,
)
from popproxy.observe import SessionInfo
from popproxy.server import UNAUTHENTICATED_FULL, serve
from popproxy.session import Session
from tests.proxy_fixtures import start_proxy, start_proxy_config
from tests.scripted import logged_in_upstream, read_all, read_until

Script = Callable[[trio.abc.Stream], Awaitable[None]]
E = TypeVar("E", bound=Event)
LOGIN = b"USER u\r\nPASS p\r\n"


@dataclass
class Bench:
    """One proxy as ``app.build`` makes it, upstreams and clients in memory."""

    app: App
    nursery: trio.Nursery
    script: Script
    events: list[Event] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    @classmethod
    def start(cls, nursery: trio.Nursery, script: Script, limits: LimitsConfig | None = None,
              upstream: UpstreamConfig | None = None) -> Bench:
        config = Config(upstream=upstream or UpstreamConfig(HostPort("192.0.2.1", 110)),
                        limits=limits or LimitsConfig())
        bench = cls(build(config), nursery, script)
        bench.app.proxy.observers.append(bench.observe)
        bench.app.proxy.connect_upstream = bench.connect_upstream
        return bench

    def observe(self, info: SessionInfo, event: Event) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = trio.Event()

    async def connect_upstream(self) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.script, theirs)
        return ours

    def connect(self, lockstep: bool = False) -> trio.abc.Stream:
        """A client; ``lockstep``: the proxy's writes wait until it reads them."""
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client, server_side = pair()
        self.nursery.start_soon(self.app.proxy.handle, server_side, "192.0.2.10:40000")
        return client

    def of_type(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]

    def closed(self) -> list[SessionClosed]:
        return [e for e in self.events if isinstance(e, SessionClosed)]

    async def wait_closed(self, count: int = 1) -> list[SessionClosed]:
        while len(self.closed()) < count:
            await self.changed.wait()
        return self.closed()

    def metric(self, name: str, labels: dict[str, str]) -> float:
        return self.app.metrics.registry.get_sample_value(name, labels) or 0.0


def greeter(answers: dict[bytes, bytes] | None = None) -> Script:
    async def script(stream: trio.abc.Stream) -> None:
        await logged_in_upstream(stream, answers or {})
    return script


# ----------------------------------------------------------------------
# Item 4: the login timeout and the idle clock


class TestLoginTimeout:
    async def test_a_session_that_never_logs_in_is_closed_at_the_login_timeout(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        bench = Bench.start(nursery, greeter(), LimitsConfig(login_timeout=60.0))
        start = trio.current_time()
        client = bench.connect()
        with trio.fail_after(300):
            await read_until(client, b"+OK scripted\r\n")
            # Complete lines keep it from being idle, but not from the login timeout.
            for _ in range(5):
                await trio.sleep(10)
                await client.send_all(b"USER u\r\n")
                assert await read_until(client, b"\r\n") == b"+OK\r\n"
            got = await read_all(client)
            ended = trio.current_time() - start
            (closed,) = await bench.wait_closed()
        assert got == b"-ERR [SYS/TEMP] login timeout\r\n"
        assert 60.0 <= ended < 61.0
        assert closed.reason is EndReason.LOGIN_TIMEOUT
        assert bench.metric("popproxy_sessions_total", {"outcome": "timeout"}) == 1

    async def test_the_login_timeout_stops_at_a_successful_login(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        bench = Bench.start(nursery, greeter(), LimitsConfig(login_timeout=60.0))
        client = bench.connect()
        with trio.fail_after(600):
            await read_until(client, b"+OK scripted\r\n")
            await trio.sleep(50)
            await client.send_all(LOGIN)
            await read_until(client, b"+OK\r\n+OK\r\n")
            for _ in range(10):  # well past the login timeout
                await trio.sleep(30)
                await client.send_all(b"NOOP\r\n")
                assert await read_until(client, b"\r\n") == b"+OK\r\n"
            await client.send_all(b"QUIT\r\n")
            assert (await read_all(client)).startswith(b"+OK")
            (closed,) = await bench.wait_closed()
        assert closed.reason is EndReason.QUIT


class TestIdleClock:
    async def test_a_client_dribbling_an_unfinished_line_is_idle(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        """A byte every 2 s with idle_timeout = 5 s: closed at 5 s."""
        bench = Bench.start(nursery, greeter(), LimitsConfig(idle_timeout=5.0))
        client = bench.connect()
        start = trio.current_time()
        got = b""

        async def dribble() -> None:
            try:
                for _ in range(100):  # bounded: 200 s at most
                    await client.send_all(b"N")
                    await trio.sleep(2)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        with trio.fail_after(60):
            async with trio.open_nursery() as inner:
                inner.start_soon(dribble)
                got = await read_all(client)
                ended = trio.current_time() - start
                inner.cancel_scope.cancel()
            (closed,) = await bench.wait_closed()
        assert got == b"+OK scripted\r\n-ERR [SYS/TEMP] disconnected for inactivity\r\n"
        assert 5.0 <= ended < 6.0
        assert closed.reason is EndReason.IDLE_TIMEOUT

    async def test_complete_lines_reset_the_idle_clock(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        """The same pace, but each line finished within 5 s: it lives on."""
        bench = Bench.start(nursery, greeter(), LimitsConfig(idle_timeout=5.0))
        client = bench.connect()
        with trio.fail_after(60):
            await read_until(client, b"+OK scripted\r\n")
            await client.send_all(LOGIN)
            await read_until(client, b"+OK\r\n+OK\r\n")
            for _ in range(10):  # 40 s, eight idle timeouts' worth
                await trio.sleep(2)
                await client.send_all(b"NOOP")
                await trio.sleep(2)
                await client.send_all(b"\r\n")
                assert await read_until(client, b"\r\n") == b"+OK\r\n"
            await client.send_all(b"QUIT\r\n")
            await read_all(client)
            (closed,) = await bench.wait_closed()
        assert closed.reason is EndReason.QUIT


class TestUnauthenticatedShare:
    async def test_sessions_not_logged_in_keep_to_their_share(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        bench = Bench.start(nursery, greeter(),
                            LimitsConfig(max_sessions=4, max_unauthenticated=2))
        proxy = bench.app.proxy
        with trio.fail_after(10):
            first, second = bench.connect(), bench.connect()
            await read_until(first, b"+OK scripted\r\n")
            await read_until(second, b"+OK scripted\r\n")
            assert proxy.unauthenticated == 2
            third = bench.connect()
            assert await read_all(third) == (
                b"-ERR [SYS/TEMP] too many sessions not logged in, try again later\r\n")
            (refused,) = await bench.wait_closed()
            assert refused.reason is EndReason.SESSION_LIMIT
            assert refused.detail == UNAUTHENTICATED_FULL
            # A login gives its slot back: the next client gets in.
            await first.send_all(LOGIN)
            await read_until(first, b"+OK\r\n+OK\r\n")
            assert proxy.unauthenticated == 1
            fourth = bench.connect()
            await read_until(fourth, b"+OK scripted\r\n")
            await fourth.send_all(LOGIN)
            await read_until(fourth, b"+OK\r\n+OK\r\n")
            assert (proxy.active, proxy.unauthenticated) == (3, 1)
            # A session that ends before its login gives it back too.
            await second.aclose()
            await bench.wait_closed(2)
            assert (proxy.active, proxy.unauthenticated) == (2, 0)
            for client in (first, fourth):
                await client.send_all(b"QUIT\r\n")
                await read_all(client)
            await bench.wait_closed(4)
        assert (proxy.active, proxy.unauthenticated) == (0, 0)
        assert bench.metric("popproxy_sessions_total", {"outcome": "refused"}) == 1


# ----------------------------------------------------------------------
# Item 3: the upstream's clock stops while the client is slow to read


def big_retr(size: int = 1 << 20) -> bytes:
    line = b"x" * 78 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (size // len(line))
    return b"+OK %d octets\r\n" % len(body) + body + b".\r\n"


class TestResponseClock:
    LIMITS = LimitsConfig(send_timeout=20.0)
    UPSTREAM = UpstreamConfig(HostPort("192.0.2.1", 110), response_timeout=10.0)

    async def test_a_client_pausing_past_response_timeout_gets_its_message_whole(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        reply = big_retr()
        bench = Bench.start(nursery, greeter({b"RETR": reply}), self.LIMITS, self.UPSTREAM)
        client = bench.connect(lockstep=True)
        with trio.fail_after(120):
            await read_until(client, b"+OK scripted\r\n")
            await client.send_all(LOGIN + b"RETR 1\r\n")
            got = await read_until(client, b"+OK\r\n+OK\r\n")
            got = b""
            while len(got) < 300_000:  # part of the body, then a pause
                got += await client.receive_some(65536)
            await trio.sleep(12)
            got += await read_until(client, b"\r\n.\r\n")
            await client.send_all(b"QUIT\r\n")
            got += await read_all(client)
            (closed,) = await bench.wait_closed()
        assert got.startswith(reply)
        assert closed.reason is EndReason.QUIT
        (done,) = bench.of_type(MessageComplete)
        assert done.complete
        assert bench.of_type(UpstreamFailed) == []

    async def test_a_client_paused_past_send_timeout_is_the_clients_fault(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        bench = Bench.start(nursery, greeter({b"RETR": big_retr()}), self.LIMITS, self.UPSTREAM)
        client = bench.connect(lockstep=True)
        with trio.fail_after(120):
            await read_until(client, b"+OK scripted\r\n")
            await client.send_all(LOGIN + b"RETR 1\r\n")
            await read_until(client, b"+OK\r\n+OK\r\n")
            await client.receive_some(65536)
            start = trio.current_time()
            (closed,) = await bench.wait_closed()  # and never reads again
            waited = trio.current_time() - start
        assert closed.reason is EndReason.PEER_GONE
        assert 20.0 <= waited < 21.0
        assert (closed.reason.outcome, closed.reason.audit) == ("client_closed", "client gone")
        assert bench.of_type(UpstreamFailed) == []
        assert bench.metric("popproxy_upstream_errors_total",
                            {"reason": "response_timeout"}) == 0
        assert bench.metric("popproxy_sessions_total", {"outcome": "client_closed"}) == 1
        (done,) = bench.of_type(MessageComplete)
        assert not done.complete

    async def test_a_silent_upstream_still_times_out(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        bench = Bench.start(nursery, greeter({b"STAT": b""}), self.LIMITS, self.UPSTREAM)
        client = bench.connect(lockstep=True)
        with trio.fail_after(120):
            await client.send_all(LOGIN + b"STAT\r\n")
            await read_until(client, b"+OK\r\n+OK\r\n")
            start = trio.current_time()
            got = await read_all(client)
            waited = trio.current_time() - start
            (closed,) = await bench.wait_closed()
        assert got == b"-ERR [SYS/TEMP] upstream response timeout\r\n"
        assert 10.0 <= waited < 11.0
        assert closed.reason is EndReason.UPSTREAM_TIMEOUT
        assert bench.metric("popproxy_upstream_errors_total",
                            {"reason": "response_timeout"}) == 1


# ----------------------------------------------------------------------
# Item 9: a client that left, and listings without end


class TestClientLeft:
    async def test_a_client_that_leaves_while_the_upstream_hangs_ends_at_once(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        bench = Bench.start(nursery, greeter({b"STAT": b""}), upstream=UpstreamConfig(
            HostPort("192.0.2.1", 110), response_timeout=60.0))
        client = bench.connect()
        with trio.fail_after(120):
            await client.send_all(LOGIN)
            await read_until(client, b"+OK\r\n+OK\r\n")
            await client.send_all(b"STAT\r\n")
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await client.aclose()
            (closed,) = await bench.wait_closed()
        assert trio.current_time() - start < 0.1
        assert closed.reason is EndReason.CLIENT_CLOSED
        assert bench.of_type(UpstreamFailed) == []

    async def test_a_half_close_after_quit_still_gets_the_replies(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        async def slow(stream: trio.abc.Stream) -> None:
            await stream.send_all(b"+OK scripted\r\n")
            replies = {b"USER": b"+OK\r\n", b"PASS": b"+OK\r\n", b"STAT": b"+OK 2 320\r\n",
                       b"QUIT": b"+OK bye\r\n"}
            buf = b""
            while replies:
                buf += await stream.receive_some(4096)
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    await trio.sleep(20)  # slow, but within response_timeout
                    await stream.send_all(replies.pop(line[:4]))

        bench = Bench.start(nursery, slow)
        client, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(bench.app.proxy.handle, server_side, "192.0.2.10:40000")
        with trio.fail_after(120):
            await client.send_all(LOGIN + b"STAT\r\nQUIT\r\n")
            await client.send_eof()
            got = await read_all(client)
            (closed,) = await bench.wait_closed()
        assert got == b"+OK scripted\r\n+OK\r\n+OK\r\n+OK 2 320\r\n+OK bye\r\n"
        assert closed.reason is EndReason.QUIT

    def test_sans_io_eof_without_quit_ends_the_session(self) -> None:
        s = Session()
        s.receive_upstream(b"+OK hi\r\n", 0)
        s.receive_client(LOGIN, 1)
        s.receive_upstream(b"+OK\r\n+OK\r\n", 2)
        s.receive_client(b"STAT\r\nLIST\r\n", 3)
        assert s.client_closed(4).close is EndReason.CLIENT_CLOSED

    def test_sans_io_eof_after_quit_waits_for_the_replies(self) -> None:
        s = Session()
        s.receive_upstream(b"+OK hi\r\n", 0)
        s.receive_client(LOGIN + b"STAT\r\nQUIT\r\n", 1)
        assert s.client_closed(2).close is None
        out = s.receive_upstream(b"+OK\r\n+OK\r\n", 3)  # the PASS barrier lifts
        assert out.to_upstream == b"STAT\r\nQUIT\r\n"
        out = s.receive_upstream(b"+OK 0 0\r\n+OK bye\r\n", 4)
        assert out.to_client == b"+OK 0 0\r\n+OK bye\r\n"
        assert out.close is EndReason.QUIT


async def endless_uidl(stream: trio.abc.Stream) -> None:
    """Greets, accepts the login, and answers UIDL with a listing that never ends."""
    await stream.send_all(b"+OK scripted\r\n")
    buf = b""
    while not buf.endswith(b"UIDL\r\n"):
        data = await stream.receive_some(4096)
        buf += data
        await stream.send_all(b"+OK\r\n" * data.count(b"\r\n"))
    try:
        for n in range(1, 1_000_000):  # bounded: about 20 MB
            await stream.send_all(b"%d UID%016d\r\n" % (n, n))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


class TestMaxListing:
    async def test_an_endless_listing_is_cut_at_max_listing(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        bench = Bench.start(nursery, endless_uidl, LimitsConfig(max_listing=65536))
        client = bench.connect()
        with trio.fail_after(60):
            await client.send_all(LOGIN + b"UIDL\r\n")
            got = await read_all(client)
            (closed,) = await bench.wait_closed()
        head = b"+OK scripted\r\n+OK\r\n+OK\r\n"
        assert got.startswith(head + b"+OK\r\n1 UID")
        assert got.endswith(b"\r\n-ERR [SYS/TEMP] upstream reply too long\r\n")
        assert b"\r\n.\r\n" not in got  # never a terminator: the client sees it cut
        listing = len(got) - len(head)
        assert listing <= 65536 + 64
        assert closed.reason is EndReason.UPSTREAM_PROTOCOL_ERROR
        assert (closed.reason.outcome, closed.reason.audit) == ("upstream_error", "upstream error")
        assert bench.metric("popproxy_upstream_errors_total", {"reason": "protocol"}) == 1

    async def test_a_message_is_not_bound_by_max_listing(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        reply = big_retr(1 << 20)
        bench = Bench.start(nursery, greeter({b"RETR": reply}), LimitsConfig(max_listing=65536))
        client = bench.connect()
        with trio.fail_after(60):
            await client.send_all(LOGIN + b"RETR 1\r\nQUIT\r\n")
            got = await read_all(client)
            (closed,) = await bench.wait_closed()
        assert reply in got
        assert closed.reason is EndReason.QUIT


# ----------------------------------------------------------------------
# Item 7: the drain deadline


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Jumps only after 50 ms of real time with nothing to do: real loopback
    I/O completes long before, so time passes only where the proxy waits on it."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_at_the_drain_deadline_every_session_is_told(
    nursery: trio.Nursery, patient_clock: trio.testing.MockClock
) -> None:
    """SIGTERM; at drain_timeout an idle session and one owed a reply both
    get -ERR [SYS/TEMP] proxy shutting down before the close."""
    bench = Bench.start(nursery, greeter({b"STAT": b""}), LimitsConfig(drain_timeout=30.0))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stopped = trio.Event()

    async def run(
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await serve(bench.app.proxy, listeners, task_status=task_status)
        stopped.set()

    with trio.fail_after(120):
        await nursery.start(run)
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        waiting = await trio.open_tcp_stream("127.0.0.1", port)
        for client in (idle, waiting):
            await client.send_all(LOGIN)
            await read_until(client, b"+OK scripted\r\n+OK\r\n+OK\r\n")
        await waiting.send_all(b"STAT\r\n")  # never answered
        await trio.testing.wait_all_tasks_blocked(0.01)
        start = trio.current_time()
        os.kill(os.getpid(), signal.SIGTERM)
        told = [await read_all(idle), await read_all(waiting)]
        drained = trio.current_time() - start
        await stopped.wait()
    assert told == [b"-ERR [SYS/TEMP] proxy shutting down\r\n"] * 2
    assert 30.0 <= drained < 31.0
    assert [c.reason for c in bench.closed()] == [EndReason.SHUTDOWN] * 2


# ----------------------------------------------------------------------
# The [limits] keys


class TestLimitsKeys:
    @staticmethod
    def limits(**keys: object) -> LimitsConfig:
        return parse_config({"upstream": {"address": "127.0.0.1:110"}, "limits": keys}).limits

    def test_defaults(self) -> None:
        limits = self.limits()
        assert limits.login_timeout == 60.0
        assert limits.max_listing == 64 << 20
        assert limits.max_unauthenticated is None
        assert limits.unauthenticated_cap == 500  # half of max_sessions

    def test_values(self) -> None:
        limits = self.limits(login_timeout="90s", max_listing="1MiB", max_sessions=10,
                             max_unauthenticated=7)
        assert (limits.login_timeout, limits.max_listing, limits.unauthenticated_cap) == (
            90.0, 1 << 20, 7)
        assert self.limits(max_sessions=1).unauthenticated_cap == 1
        assert self.limits(max_sessions=9).unauthenticated_cap == 4

    @pytest.mark.parametrize(("keys", "error"), [
        ({"login_timeout": "0s"}, "limits.login_timeout"),
        ({"login_timeout": True}, "limits.login_timeout"),
        ({"max_listing": "lots"}, "limits.max_listing"),
        ({"max_unauthenticated": 0}, "limits.max_unauthenticated"),
        ({"max_unauthenticated": "half"}, "limits.max_unauthenticated"),
        ({"max_sessions": 10, "max_unauthenticated": 11}, "limits.max_unauthenticated"),
    ])
    def test_bad_values_name_the_key(self, keys: dict[str, object], error: str) -> None:
        with pytest.raises(ConfigError, match=error):
            self.limits(**keys)


async def test_a_routed_login_leaves_the_unauthenticated_share(nursery: trio.Nursery) -> None:
    """Routed mode: the proxy greets and holds the login; the session counts
    as logged in from the routed login's +OK."""

    async def upstream(stream: trio.SocketStream) -> None:
        await logged_in_upstream(stream, {b"STAT": b"+OK 0 0\r\n", b"QUIT": b"+OK bye\r\n"})

    listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    running = await start_proxy_config(nursery, parse_config({
        "listen": {"address": "127.0.0.1:0"},
        "upstreams": {"legacy": {"address": f"127.0.0.1:{port}"}},
        "routing": {"default": "legacy"}}))
    proxy = running.proxy
    with trio.fail_after(30):
        client = await trio.open_tcp_stream(running.host, running.port)
        await read_until(client, b"\r\n")
        assert (proxy.active, proxy.unauthenticated) == (1, 1)
        await client.send_all(LOGIN)
        await read_until(client, b"+OK\r\n+OK\r\n")
        assert (proxy.active, proxy.unauthenticated) == (1, 0)
        await client.send_all(b"STAT\r\nQUIT\r\n")
        assert await read_all(client) == b"+OK 0 0\r\n+OK bye\r\n"
        await running.wait_for(SessionClosed)
    assert (proxy.active, proxy.unauthenticated) == (0, 0)


async def test_a_client_reset_while_the_upstream_hangs_ends_at_once(
    nursery: trio.Nursery,
) -> None:
    """Real sockets: the client resets its connection (SO_LINGER 0) while
    STAT waits on an upstream that never answers; the session ends when the
    reset arrives, not at response_timeout (an hour here)."""

    async def upstream(stream: trio.SocketStream) -> None:
        await logged_in_upstream(stream, {b"STAT": b""})

    listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    running = await start_proxy(
        nursery, HostPort("127.0.0.1", port),
        upstream_config=UpstreamConfig(HostPort("127.0.0.1", port), response_timeout=3600.0))
    with trio.fail_after(30):
        client = await trio.open_tcp_stream(running.host, running.port)
        await client.send_all(LOGIN)
        await read_until(client, b"+OK scripted\r\n+OK\r\n+OK\r\n")
        await client.send_all(b"STAT\r\n")
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.socket.close()  # a reset, not a FIN
        await running.wait_for(SessionClosed)
    (closed,) = running.of_type(SessionClosed)
    assert closed.reason is EndReason.CLIENT_CLOSED
    assert running.proxy.active == 0
