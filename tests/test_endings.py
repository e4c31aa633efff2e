"""One session of each ending: the audit and the metrics say the same thing.

How a session ended is one fact (``EndReason``), read by two observers: the
audit's ``session.close`` record (``reason``, and ``outcome``, whose values
are the metric's label values) and ``popproxy_sessions_total{outcome}``.
Each case runs a real session through the proxy as ``popproxy run``
assembles it (``app.build``: policy engine, metrics), with the audit's
record builder beside it, over memory streams on trio's autojump clock
(timeouts pass without waiting), and checks that both observers counted the
session under the same outcome, the expected one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from popproxy.app import App, build
from popproxy.audit import AuditConfig, RecordBuilder
from popproxy.config import Config, HostPort, LimitsConfig, ListenConfig, UpstreamConfig
from popproxy.events import SESSION_OUTCOMES, Event, SessionClosed
from popproxy.observe import SessionInfo
from popproxy.policy.config import PolicyConfig, Protections
from tests.scripted import logged_in_upstream, read_all
from tests.tls_fixtures import CertFiles

Client = trio.abc.Stream


async def receive_until(stream: Client, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


@dataclass
class Bench:
    """One proxy (``app.build``) with the audit's record builder attached."""

    app: App
    nursery: trio.Nursery
    records: list[dict[str, Any]] = field(default_factory=list)
    closed: list[SessionClosed] = field(default_factory=list)
    upstream_down: bool = False
    changed: trio.Event = field(default_factory=trio.Event)

    @classmethod
    def start(cls, nursery: trio.Nursery, config: Config) -> Bench:
        bench = cls(build(config), nursery)
        builder = RecordBuilder(AuditConfig(enabled=True))

        def audit(info: SessionInfo, event: Event) -> None:
            bench.records += builder.observe(info, event)
            if isinstance(event, SessionClosed):
                bench.closed.append(event)
                bench.changed.set()
                bench.changed = trio.Event()

        bench.app.proxy.observers.insert(0, audit)
        bench.app.proxy.connect_upstream = bench.connect_upstream
        return bench

    async def connect_upstream(self) -> trio.abc.Stream:
        if self.upstream_down:
            raise ConnectionRefusedError(111, "Connection refused")
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(logged_in_upstream, theirs, {b"QUIT": b"+OK bye\r\n"})
        return ours

    def connect(self, scope: trio.CancelScope | None = None) -> Client:
        client, server_side = trio.testing.memory_stream_pair()

        async def handle() -> None:
            with scope or trio.CancelScope():
                await self.app.proxy.handle(server_side, "192.0.2.10:40000")

        self.nursery.start_soon(handle)
        return client

    async def wait_closed(self, count: int) -> None:
        while len(self.closed) < count:
            await self.changed.wait()

    def sessions(self, outcome: str) -> float:
        value = self.app.metrics.registry.get_sample_value(
            "popproxy_sessions_total", {"outcome": outcome})
        assert value is not None
        return value


Scenario = Callable[[Bench], Awaitable[None]]


async def quit_(bench: Bench) -> None:
    client = bench.connect()
    await client.send_all(b"USER u\r\nPASS p\r\nQUIT\r\n")
    await read_all(client)


async def client_gone(bench: Bench) -> None:
    client = bench.connect()
    await client.send_all(b"USER u\r\nPASS p\r\n")
    await receive_until(client, b"+OK\r\n+OK\r\n")
    await client.aclose()


async def idle_timeout(bench: Bench) -> None:
    client = bench.connect()
    await client.send_all(b"USER u\r\nPASS p\r\n")
    assert (await read_all(client)).endswith(b"-ERR [SYS/TEMP] disconnected for inactivity\r\n")


async def time_limit(bench: Bench) -> None:
    client = bench.connect()  # the session's age limit (300 s) comes before idleness (600 s)
    await client.send_all(b"USER u\r\nPASS p\r\n")
    assert (await read_all(client)).endswith(b"-ERR [SYS/TEMP] session time limit\r\n")


async def login_timeout(bench: Bench) -> None:
    client = bench.connect()  # never logs in: the login timeout (60 s) comes first
    assert (await read_all(client)).endswith(b"-ERR [SYS/TEMP] login timeout\r\n")


async def unauthenticated_share(bench: Bench) -> None:
    first = bench.connect()
    await receive_until(first, b"\r\n")  # greeted, not logged in: the share is full
    second = bench.connect()
    assert await read_all(second) == (
        b"-ERR [SYS/TEMP] too many sessions not logged in, try again later\r\n")


async def per_ip_cap(bench: Bench) -> None:
    first = bench.connect()
    await receive_until(first, b"\r\n")  # greeted: it holds the one slot
    second = bench.connect()
    assert await read_all(second) == b"-ERR [SYS/TEMP] too many sessions from your address\r\n"


async def per_user_cap(bench: Bench) -> None:
    first = bench.connect()
    await first.send_all(b"USER u\r\nPASS p\r\n")
    await receive_until(first, b"+OK\r\n+OK\r\n")
    second = bench.connect()
    await second.send_all(b"USER u\r\nPASS p\r\n")
    assert (await read_all(second)).endswith(b"-ERR [IN-USE] too many sessions for this user\r\n")


async def upstream_down(bench: Bench) -> None:
    bench.upstream_down = True
    client = bench.connect()
    assert await read_all(client) == b"-ERR [SYS/TEMP] upstream unavailable\r\n"


async def tls_failure(bench: Bench) -> None:
    client = bench.connect()
    await client.send_all(b"USER u\r\n")  # plaintext where a TLS ClientHello is due
    await read_all(client)


async def protocol_error(bench: Bench) -> None:
    client = bench.connect()
    await client.send_all(b"NOOP " + b"x" * 2000 + b"\r\n")
    assert (await read_all(client)).endswith(b"-ERR line too long\r\n")


async def shutdown(bench: Bench) -> None:
    scope = trio.CancelScope()
    client = bench.connect(scope)
    await client.send_all(b"USER u\r\nPASS p\r\nSTAT\r\n")
    await receive_until(client, b"+OK\r\n+OK\r\n+OK\r\n")
    scope.cancel()  # what the drain deadline and SIGINT do to a session
    await read_all(client)


CASES: list[tuple[str, Scenario, str, str]] = [
    # (name, scenario, metric outcome, audit reason)
    ("quit", quit_, "ok", "quit"),
    ("client gone", client_gone, "client_closed", "client gone"),
    ("idle timeout", idle_timeout, "timeout", "idle timeout"),
    ("session time limit", time_limit, "timeout", "time limit"),
    ("login timeout", login_timeout, "timeout", "login timeout"),
    ("unauthenticated share", unauthenticated_share, "refused", "refused"),
    ("per-IP cap", per_ip_cap, "refused", "refused"),
    ("per-user cap", per_user_cap, "refused", "refused"),
    ("upstream down", upstream_down, "upstream_error", "upstream error"),
    ("TLS failure", tls_failure, "tls_error", "client error"),
    ("protocol error", protocol_error, "protocol_error", "client error"),
    ("shutdown", shutdown, "shutdown", "shutdown"),
]


def config_for(name: str, cert: CertFiles) -> Config:
    protections = Protections(max_session_duration=300.0 if name == "session time limit" else None,
                              max_sessions_per_ip=1 if name == "per-IP cap" else 100,
                              max_sessions_per_user=1 if name == "per-user cap" else 10)
    listener = ListenConfig((HostPort("127.0.0.1", 0),))
    if name == "TLS failure":
        listener = ListenConfig((HostPort("127.0.0.1", 0),), tls="implicit", cert=cert.cert,
                                key=cert.key)
    return Config(
        listeners=(listener,),
        upstream=UpstreamConfig(HostPort("192.0.2.1", 110)),
        limits=LimitsConfig(idle_timeout=600.0, max_sessions=2 if name == "unauthenticated share"
                            else 1000),
        policy=PolicyConfig(protections=protections),
    )


@pytest.mark.parametrize(("name", "scenario", "outcome", "reason"), CASES,
                         ids=[c[0] for c in CASES])
async def test_audit_and_metrics_agree_on_how_a_session_ended(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, proxy_cert: CertFiles,
    name: str, scenario: Scenario, outcome: str, reason: str,
) -> None:
    assert outcome in SESSION_OUTCOMES
    bench = Bench.start(nursery, config_for(name, proxy_cert))
    before = {o: bench.sessions(o) for o in SESSION_OUTCOMES}
    with trio.fail_after(7200):
        await scenario(bench)
        await bench.wait_closed(1)
        await trio.testing.wait_all_tasks_blocked()
    # Exactly one session ended (in the cap cases the first one is still open).
    (ended,) = bench.closed
    (record,) = [r for r in bench.records if r["event"] == "session.close"]
    counted = {o: bench.sessions(o) - before[o] for o in SESSION_OUTCOMES
               if bench.sessions(o) != before[o]}
    # The audit's outcome is the metric's label: the same session, the same word.
    assert counted == {record["outcome"]: 1}
    assert (record["outcome"], record["reason"]) == (outcome, reason)
    assert ended.reason.outcome == outcome
