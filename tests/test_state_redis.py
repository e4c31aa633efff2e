"""RedisState on a real redis-server: the server's clock, shared limits
across connections, key layout and expiry, EVALSHA/NOSCRIPT, the call
counter against the server's own statistics, URLs, authentication, TLS."""

from __future__ import annotations

import functools
import re

import pytest

from popproxy.policy.ratelimit import Rate
from popproxy.state import Limit, StateError, parse_state
from popproxy.state.redis import open_redis_state
from popproxy.state.script import SCRIPT_SHA
from tests.redis_fixtures import running_redis
from tests.redis_server import RedisServer
from tests.state_support import redis_state
from tests.tls_fixtures import CertFiles


def limit(n: float, period: float = 60.0, subject: str = "alice") -> Limit:
    return Limit("retr", subject, Rate(n, period), n)


class TestServerClock:
    """Production passes no time: the script reads the server's TIME."""

    async def test_limit_on_the_servers_clock(
        self, redis_server: RedisServer, redis_prefix: str
    ) -> None:
        async with redis_state(redis_server, redis_prefix) as state:
            hourly = limit(3, 3600.0)
            verdicts = [await state.take([(hourly, 1.0)]) for _ in range(4)]
        assert [v.allowed for v in verdicts] == [True, True, True, False]
        # One comes back every 1200 s; a few ms have passed since the first.
        assert 1190.0 < verdicts[3].retry_after <= 1200.0

    async def test_lease_expiry_on_the_servers_clock(
        self, redis_server: RedisServer, redis_prefix: str
    ) -> None:
        async with redis_state(redis_server, redis_prefix) as state:
            assert await state.acquire_lease("user:alice", "s1", 2, 60.0)
            # A lease of one microsecond has expired by the server's next TIME
            # (a round trip later): its slot is free again.
            assert await state.acquire_lease("user:alice", "brief", 2, 1e-6)
            assert await state.acquire_lease("user:alice", "s2", 2, 60.0)
            assert not await state.acquire_lease("user:alice", "s3", 2, 60.0)
        # The set lives as long as its longest lease (plus a minute's slack).
        pttl = redis_server.integer("PTTL", redis_prefix + "cap:user:alice")
        assert 60_000 < pttl <= 120_000


async def test_two_connections_share_one_limit(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Two clients, as two workers or hosts would have: one budget."""
    async with (
        redis_state(redis_server, redis_prefix) as one,
        redis_state(redis_server, redis_prefix) as two,
    ):
        five = limit(5, 3600.0)
        answers = []
        for i in range(10):
            state = one if i % 2 else two
            answers.append((await state.take([(five, 1.0)])).allowed)
        assert answers == [True] * 5 + [False] * 5
        assert await one.acquire_lease("user:bob", "w1-s1", 2, 60.0)
        assert await two.acquire_lease("user:bob", "w2-s1", 2, 60.0)
        assert not await one.acquire_lease("user:bob", "w1-s2", 2, 60.0)
        assert not await two.acquire_lease("user:bob", "w2-s2", 2, 60.0)
        await one.record_failure(["user:bob"], 900.0, 5)
        assert await two.record_failure(["user:bob"], 900.0, 5) == (2,)


async def test_keys_are_prefixed_and_expire(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Nothing is left behind for ever: every key has a TTL."""
    async with redis_state(redis_server, redis_prefix) as state:
        await state.take([(limit(10), 1.0)])
        await state.record_failure(["ip:192.0.2.7"], 900.0, 5)
        await state.acquire_lease("ip:192.0.2.7", "s1", 5, 30.0)
    keys = {
        redis_prefix + "rl:retr/alice": (60_000, 66_000),         # 6 s of debt + slack
        redis_prefix + "lf:ip:192.0.2.7": (900_000, 960_000),     # the window + slack
        redis_prefix + "cap:ip:192.0.2.7": (30_000, 90_000),      # the lease + slack
    }
    for key, (low, high) in keys.items():
        assert low < redis_server.integer("PTTL", key) <= high, key


async def test_calls_are_the_servers_script_calls(private_redis: RedisServer) -> None:
    """``calls`` counts what reaches Redis: no hidden PING or lookup per
    operation; a NOSCRIPT (first use, or after the server lost its scripts)
    costs one EVAL, after which EVALSHA works again."""
    async with redis_state(private_redis, "p:") as state:
        private_redis.command("CONFIG", "RESETSTAT")
        await state.take([(limit(5), 1.0)])
        await state.charge([(limit(5), 1.0)])
        await state.acquire_lease("user:a", "s1", 2, 30.0)
        await state.renew_leases(["user:a"], "s1", 30.0)
        await state.release_leases(["user:a"], "s1")
        await state.record_failure(["user:a"], 60.0, 5)
        await state.count_failures(["user:a"], 60.0)
        await state.clear_failures(["user:a"])
        private_redis.command("SCRIPT", "FLUSH")
        await state.take([(limit(5), 1.0)])
        assert state.calls == {
            "take": 2, "charge": 1, "acquire_lease": 1, "renew_leases": 1,
            "release_leases": 1, "record_failure": 1, "count_failures": 1,
            "clear_failures": 1, "script_load": 2,
        }
    stats = private_redis.command("INFO", "commandstats").decode()
    calls = {m[0]: int(m[1]) for m in re.findall(r"cmdstat_(\w+):calls=(\d+)", stats)}
    assert calls.get("evalsha", 0) == 9  # every operation: one EVALSHA ...
    assert calls.get("eval", 0) == 2     # ... and one EVAL after each NOSCRIPT
    assert calls.get("ping", 0) == 0
    assert "1" in private_redis.command("SCRIPT", "EXISTS", SCRIPT_SHA).decode()


async def test_unix_socket_and_database(redis_server: RedisServer, redis_prefix: str) -> None:
    url = f"unix://{redis_server.unix_socket}?db=2"
    async with redis_state(redis_server, redis_prefix, url=url) as state:
        assert await state.acquire_lease("user:u", "s1", 1, 30.0)
    assert redis_server.integer("EXISTS", redis_prefix + "cap:user:u", db=2) == 1
    assert redis_server.integer("EXISTS", redis_prefix + "cap:user:u", db=0) == 0


async def test_password_in_the_url(redis_available: None) -> None:
    password = "pw-Hunter2-x"
    with running_redis(functools.partial(RedisServer, password=password)) as server:
        good = f"redis://:{password}@127.0.0.1:{server.port}/0"
        async with redis_state(server, "p:", url=good) as state:
            assert await state.acquire_lease("user:u", "s1", 1, 30.0)
        bad = f"redis://default:wrong-{password}@127.0.0.1:{server.port}/0"
        config = parse_state({"backend": "redis", "url": bad, "timeout": "1s"})
        with pytest.raises(StateError) as info:
            async with open_redis_state(config) as state:
                await state.acquire_lease("user:u", "s2", 1, 30.0)
        assert password not in str(info.value)
        assert password not in repr(info.value)
        assert info.value.op in ("connect", "acquire_lease")


async def test_rediss_checks_the_servers_certificate(
    redis_available: None,
    upstream_cert: CertFiles,
    other_ca_cert: CertFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """rediss:// verifies the server against the platform's trust store
    (here: SSL_CERT_FILE naming the tests' CA, which glide honours)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(upstream_cert.ca))
    trusted = functools.partial(RedisServer, tls_cert=upstream_cert.cert, tls_key=upstream_cert.key)
    with running_redis(trusted) as server:
        assert server.url.startswith("rediss://127.0.0.1:")
        async with redis_state(server, "tls:") as state:
            assert await state.acquire_lease("user:u", "s1", 1, 30.0)
        assert server.integer("EXISTS", "tls:cap:user:u") == 1
    untrusted = functools.partial(
        RedisServer, tls_cert=other_ca_cert.cert, tls_key=other_ca_cert.key)
    with running_redis(untrusted) as server:
        async with redis_state(server, "tls:") as state:
            with pytest.raises(StateError) as info:
                await state.acquire_lease("user:u", "s1", 1, 30.0)
        assert info.value.op == "acquire_lease"
        assert server.integer("EXISTS", "tls:cap:user:u") == 0
