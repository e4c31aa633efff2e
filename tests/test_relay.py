"""The trio relay, end to end with the demo server or scripted upstreams.

Time-dependent behaviour (timeouts, drain) runs on trio's autojump clock with
in-memory streams, so nothing here sleeps for real.
"""

from __future__ import annotations

import os
import poplib
import signal
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from popproxy.config import Config, HostPort, LimitsConfig, UpstreamConfig
from popproxy.events import EndReason, MessageComplete, SessionClosed
from popproxy.server import Proxy, serve
from tests.proxy_fixtures import RunningProxy, start_proxy


async def receive_until(stream: trio.abc.Stream, end: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        assert len(data) < limit
    return data


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def connect(running: RunningProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream(running.host, running.port)


class TestWithDemoServer:
    async def test_poplib_session(self, demo_proxy: RunningProxy) -> None:
        def client() -> int:
            p = poplib.POP3(demo_proxy.host, demo_proxy.port, timeout=10)
            p.user("alice")
            p.pass_("wonderland")
            stat = p.stat()
            lines = p.retr(3)[1]
            assert any(line == b"." for line in lines)  # a dot line, unstuffed
            p.quit()
            return int(stat[0])

        with trio.fail_after(10):
            count = await trio.to_thread.run_sync(client)
        assert count == 4
        (done,) = demo_proxy.of_type(MessageComplete)
        assert done.complete
        assert done.msg == 3

    async def test_200_pipelined_commands_answered_in_order(
        self, demo_proxy: RunningProxy
    ) -> None:
        with trio.fail_after(10):
            s = await connect(demo_proxy)
            await receive_until(s, b"\r\n")
            batch = b"USER alice\r\nPASS wonderland\r\n" + b"".join(
                b"LIST %d\r\n" % (i % 5 + 1) for i in range(200)
            )
            await s.send_all(batch + b"QUIT\r\n")
            replies = (await read_all(s)).split(b"\r\n")
        assert replies[0] == b"+OK" or replies[0].startswith(b"+OK")
        lists = replies[2:202]
        for i, line in enumerate(lists):
            n = i % 5 + 1
            if n <= 4:
                assert line.startswith(b"+OK %d " % n), (i, line)
            else:
                assert line.startswith(b"-ERR"), (i, line)
        assert replies[202].startswith(b"+OK")

    async def test_overlong_line_gets_err_and_others_keep_working(
        self, demo_proxy: RunningProxy
    ) -> None:
        with trio.fail_after(10):
            bad = await connect(demo_proxy)
            await receive_until(bad, b"\r\n")
            await bad.send_all(b"USER " + b"A" * 100 * 1024 + b"\r\n")
            assert await read_all(bad) == b"-ERR line too long\r\n"
            good = await connect(demo_proxy)
            assert (await receive_until(good, b"\r\n")).startswith(b"+OK")
            await good.send_all(b"QUIT\r\n")
            assert (await read_all(good)).startswith(b"+OK")

    async def test_nul_and_invalid_utf8_get_err(self, demo_proxy: RunningProxy) -> None:
        with trio.fail_after(10):
            s = await connect(demo_proxy)
            await receive_until(s, b"\r\n")
            await s.send_all(b"US\0ER x\r\nUSER \xff\xfe\r\nQUIT\r\n")
            assert await read_all(s) == (
                b"-ERR malformed command line\r\n"
                b"-ERR command arguments are not valid UTF-8\r\n"
                b"+OK popproxy-demo signing off\r\n"
            )

    async def test_client_disconnect_mid_retr(self, demo_proxy: RunningProxy) -> None:
        with trio.fail_after(10):
            s = await connect(demo_proxy)
            await receive_until(s, b"\r\n")
            await s.send_all(b"USER alice\r\nPASS wonderland\r\nRETR 4\r\n")
            got = b""
            while got.count(b"\r\n") < 10:  # greeting, USER, PASS, RETR and body lines
                got += await s.receive_some(65536)
            await s.aclose()
            await demo_proxy.wait_for(SessionClosed)
        (closed,) = demo_proxy.of_type(SessionClosed)
        assert closed.reason in ("client closed", "peer gone or too slow")

    async def test_session_cap(self, nursery: trio.Nursery, demo_upstream: HostPort) -> None:
        running = await start_proxy(nursery, demo_upstream, LimitsConfig(max_sessions=1))
        with trio.fail_after(10):
            first = await connect(running)
            assert (await receive_until(first, b"\r\n")).startswith(b"+OK")
            second = await connect(running)
            assert await read_all(second) == (
                b"-ERR [SYS/TEMP] too many sessions, try again later\r\n"
            )

    async def test_upstream_unreachable(self, nursery: trio.Nursery) -> None:
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens there now
        running = await start_proxy(nursery, HostPort("127.0.0.1", port))
        with trio.fail_after(10):
            s = await connect(running)
            assert await read_all(s) == b"-ERR [SYS/TEMP] upstream unavailable\r\n"


# ----------------------------------------------------------------------
# Scripted upstreams over memory streams, on the autojump clock.

Script = Callable[[trio.abc.Stream], Awaitable[None]]


async def run_session(
    nursery: trio.Nursery, script: Script, config: Config | None = None
) -> tuple[trio.abc.Stream, list[object]]:
    events: list[object] = []

    async def connect_upstream() -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(script, theirs)
        return ours

    proxy = Proxy(
        config or Config(upstream=UpstreamConfig(address=HostPort("upstream", 110))),
        observers=[lambda info, e: events.append(e)],
        connect_upstream=connect_upstream,
    )
    client, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(proxy.handle, server_side, "127.0.0.1:40000")
    return client, events


async def greet_then(stream: trio.abc.Stream, then: bytes | None, close: bool) -> None:
    """Greet, accept USER/PASS, wait for one command, then send ``then``."""
    await stream.send_all(b"+OK scripted\r\n")
    got = b""
    while not got.endswith(b"PASS p\r\n"):
        got += await stream.receive_some(1024)
    await stream.send_all(b"+OK\r\n+OK in\r\n")
    await stream.receive_some(1024)
    if then is not None:
        await stream.send_all(then)
    if close:
        await stream.aclose()
    else:
        await trio.sleep_forever()


LOGIN = b"USER u\r\nPASS p\r\n"


class TestScriptedUpstream:
    async def test_upstream_dies_mid_retr(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        async def script(s: trio.abc.Stream) -> None:
            await greet_then(s, b"+OK 100 octets\r\nFrom: a\r\n\r\nhalf a me", close=True)

        client, events = await run_session(nursery, script)
        with trio.fail_after(5):
            await client.send_all(LOGIN)
            await receive_until(client, b"+OK in\r\n")
            await client.send_all(b"RETR 1\r\n")
            got = await read_all(client)
        assert got == b"+OK 100 octets\r\nFrom: a\r\n\r\nhalf a me"
        (done,) = [e for e in events if isinstance(e, MessageComplete)]
        assert done.complete is False

    async def test_upstream_never_answers(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        async def script(s: trio.abc.Stream) -> None:
            await greet_then(s, None, close=False)

        config = Config(upstream=UpstreamConfig(HostPort("u", 110), response_timeout=30.0))
        client, events = await run_session(nursery, script, config)
        with trio.fail_after(60):
            await client.send_all(LOGIN)
            await receive_until(client, b"+OK in\r\n")
            start = trio.current_time()
            await client.send_all(b"STAT\r\n")
            got = await read_all(client)
            waited = trio.current_time() - start
        assert got == b"-ERR [SYS/TEMP] upstream response timeout\r\n"
        assert 30.0 <= waited < 31.0
        await trio.testing.wait_all_tasks_blocked()  # the relay's last act: SessionClosed
        (closed,) = [e for e in events if isinstance(e, SessionClosed)]
        assert closed.reason == "upstream response timeout"

    async def test_idle_client_is_disconnected(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        async def script(s: trio.abc.Stream) -> None:
            await s.send_all(b"+OK scripted\r\n")
            await trio.sleep_forever()

        config = Config(
            upstream=UpstreamConfig(HostPort("u", 110)),
            limits=LimitsConfig(idle_timeout=600, login_timeout=3600),  # idleness comes first
        )
        client, _ = await run_session(nursery, script, config)
        with trio.fail_after(700):
            assert await receive_until(client, b"\r\n") == b"+OK scripted\r\n"
            start = trio.current_time()
            got = await read_all(client)
        assert got == b"-ERR [SYS/TEMP] disconnected for inactivity\r\n"
        assert 600 <= trio.current_time() - start < 601

    async def test_upstream_connect_timeout(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        async def never(s: trio.abc.Stream) -> None:
            await trio.sleep_forever()

        async def slow_connect() -> trio.abc.Stream:
            await trio.sleep_forever()
            raise AssertionError

        proxy = Proxy(Config(upstream=UpstreamConfig(HostPort("u", 110), connect_timeout=5)),
                      connect_upstream=slow_connect)
        client, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(proxy.handle, server_side, "c")
        with trio.fail_after(10):
            assert await read_all(client) == b"-ERR [SYS/TEMP] upstream connect timeout\r\n"


class TestDrain:
    async def test_sigterm_stops_accepting_but_lets_sessions_finish(
        self, nursery: trio.Nursery, demo_upstream: HostPort
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        config = Config(upstream=UpstreamConfig(address=demo_upstream))
        stopped = trio.Event()

        async def run(
            task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            await serve(Proxy(config), listeners, task_status=task_status)
            stopped.set()

        with trio.fail_after(10):
            await nursery.start(run)
            port = listeners[0].socket.getsockname()[1]
            client = await trio.open_tcp_stream("127.0.0.1", port)
            assert (await receive_until(client, b"\r\n")).startswith(b"+OK")
            os.kill(os.getpid(), signal.SIGTERM)
            await trio.testing.wait_all_tasks_blocked()
            assert not stopped.is_set()  # draining the open session
            with pytest.raises(OSError, match="connect"):
                await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"QUIT\r\n")
            assert (await read_all(client)).startswith(b"+OK")
            await stopped.wait()


class TestPolicyTimersInRelay:
    async def test_delayed_command_is_sent_when_due(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        from popproxy.policy.config import parse_policy
        from popproxy.policy.engine import PolicyEngine

        sent_at: list[float] = []

        async def script(s: trio.abc.Stream) -> None:
            await s.send_all(b"+OK scripted\r\n")
            got = b""
            while not got.endswith(b"PASS p\r\n"):
                got += await s.receive_some(1024)
            await s.send_all(b"+OK\r\n+OK in\r\n")
            for _ in range(2):
                assert await s.receive_some(1024) == b"NOOP\r\n"
                sent_at.append(trio.current_time())
                await s.send_all(b"+OK\r\n")
            await trio.sleep_forever()

        engine = PolicyEngine(parse_policy({"rules": [{
            "name": "slow-noop", "match": {"commands": ["NOOP"]}, "action": "rate_limit",
            "limit": "1/minute", "on_limit": "delay", "max_delay": "2m"}]}))
        events: list[object] = []

        async def connect_upstream() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(script, theirs)
            return ours

        proxy = Proxy(Config(upstream=UpstreamConfig(HostPort("u", 110))),
                      observers=[lambda info, e: events.append(e)],
                      connect_upstream=connect_upstream, policy=engine)
        client, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(proxy.handle, server_side, "127.0.0.1:1")
        with trio.fail_after(300):
            await client.send_all(LOGIN)
            await receive_until(client, b"+OK in\r\n")
            await client.send_all(b"NOOP\r\nNOOP\r\n")
            assert await receive_until(client, b"+OK\r\n+OK\r\n") == b"+OK\r\n+OK\r\n"
        assert sent_at[1] - sent_at[0] == pytest.approx(60.0, abs=0.1)


async def test_shutdown_answers_owed_replies(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """When the drain deadline cancels a session, an owed reply becomes -ERR [SYS/TEMP]."""

    async def script(s: trio.abc.Stream) -> None:
        await greet_then(s, None, close=False)

    events: list[object] = []

    async def connect_upstream() -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(script, theirs)
        return ours

    proxy = Proxy(Config(upstream=UpstreamConfig(HostPort("u", 110))),
                  observers=[lambda info, e: events.append(e)],
                  connect_upstream=connect_upstream)
    client, server_side = trio.testing.memory_stream_pair()
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await proxy.handle(server_side, "127.0.0.1:1")

    nursery.start_soon(run)
    with trio.fail_after(10):
        await client.send_all(LOGIN)
        await receive_until(client, b"+OK in\r\n")
        await client.send_all(b"STAT\r\n")
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        assert await read_all(client) == b"-ERR [SYS/TEMP] proxy shutting down\r\n"
    await trio.testing.wait_all_tasks_blocked()
    (closed,) = [e for e in events if isinstance(e, SessionClosed)]
    assert closed.reason == "shutdown"


@pytest.mark.parametrize("host", ["::1", "localhost"])
async def test_upstream_by_ipv6_literal_and_by_name(nursery: trio.Nursery, host: str) -> None:
    # An address literal is connected to directly; a name is resolved.
    from popproxy.demo import MailStore, serve_demo

    bind = "::1" if host == "::1" else "127.0.0.1"
    try:
        listeners = await nursery.start(serve_demo, MailStore.load_samples(), bind, 0)
    except OSError as exc:  # pragma: no cover - a host without IPv6 loopback
        pytest.skip(f"cannot listen on {bind}: {exc}")
    port = listeners[0].socket.getsockname()[1]
    running = await start_proxy(nursery, HostPort(host, port))
    with trio.fail_after(10):
        stream = await connect(running)
        async with stream:
            greeting = await receive_until(stream, b"\r\n")
            assert greeting.startswith(b"+OK")
            await stream.send_all(b"USER alice\r\nPASS wonderland\r\nSTAT\r\nQUIT\r\n")
            replies = await read_all(stream)
    assert replies.count(b"+OK") == 4


def test_observers_hear_only_what_they_listen_to() -> None:
    from popproxy.events import Greeting, SessionClosed
    from popproxy.observe import SessionInfo, listens_to

    proxy = Proxy(Config(upstream=UpstreamConfig(address=HostPort("127.0.0.1", 1))))
    heard: dict[str, list[str]] = {"all": [], "closed": [], "late": []}

    def everything(info: SessionInfo, event: object) -> None:
        heard["all"].append(type(event).__name__)

    @listens_to(SessionClosed)
    def closed(info: SessionInfo, event: object) -> None:
        heard["closed"].append(type(event).__name__)

    class Owner:
        event_types = frozenset({Greeting})

        def observe(self, info: SessionInfo, event: object) -> None:
            heard["late"].append(type(event).__name__)

    proxy.observers += [everything, closed]
    info = SessionInfo("s1", "127.0.0.1:1")
    events = [Greeting(True, "ready", False), SessionClosed(EndReason.QUIT, 0.1, 1, 2, 3, 4, 5)]
    proxy._emit(info, events)
    assert heard == {"all": ["Greeting", "SessionClosed"], "closed": ["SessionClosed"],
                     "late": []}
    # Routes follow the list: an observer added later (by bound method,
    # with the types on its object) and one removed.
    proxy.observers.append(Owner().observe)
    proxy.observers.remove(everything)
    proxy._emit(info, events)
    assert heard["all"] == ["Greeting", "SessionClosed"]
    assert heard["closed"] == ["SessionClosed", "SessionClosed"]
    assert heard["late"] == ["Greeting"]
