"""The same cases on both backends: MemoryState and RedisState (a real
redis-server), each on a fake clock (RedisState passes its times to the
script in place of the server's TIME; tests/test_state_redis.py covers the
server's clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from popproxy.policy.ratelimit import Rate
from popproxy.state import Limit, SharedState
from tests.redis_server import RedisServer
from tests.state_support import FakeClock, backend_state

MiB = 1 << 20


def per_minute(n: float, burst: float | None = None, rule: str = "retr", subject: str = "alice"
               ) -> Limit:
    return Limit(rule, subject, Rate(n, 60.0), n if burst is None else burst)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server(backend: str, request: pytest.FixtureRequest) -> RedisServer | None:
    """The session's redis-server for the Redis backend (none for memory)."""
    if backend != "redis":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def state(
    backend: str, clock: FakeClock, server: RedisServer | None, redis_prefix: str
) -> AsyncIterator[SharedState]:
    async with backend_state(backend, clock, server, redis_prefix) as s:
        yield s


async def takes(state: SharedState, limit: Limit, n: int, cost: float = 1.0) -> list[bool]:
    return [(await state.take([(limit, cost)])).allowed for _ in range(n)]


class TestRateLimits:
    async def test_admits_exactly_n_then_says_when(
        self, state: SharedState, clock: FakeClock
    ) -> None:
        limit = per_minute(5)
        assert await takes(state, limit, 5) == [True] * 5
        refused = await state.take([(limit, 1.0)])
        assert not refused.allowed
        assert not refused.charged
        # One token comes back every 60/5 = 12 s.
        assert refused.retry_after == pytest.approx(12.0)
        clock.advance(11.9)
        assert await takes(state, limit, 1) == [False]
        clock.advance(0.1)
        assert await takes(state, limit, 2) == [True, False]

    async def test_a_window_admits_the_rate_and_no_more(
        self, state: SharedState, clock: FakeClock
    ) -> None:
        """A client asking every second gets the burst, then one per interval."""
        limit = per_minute(10, burst=3)  # an interval of 6 s
        admitted = []
        for second in range(61):
            if (await state.take([(limit, 1.0)])).allowed:
                admitted.append(second)
            clock.advance(1.0)
        assert admitted == [0, 1, 2, 6, 12, 18, 24, 30, 36, 42, 48, 54, 60]

    async def test_the_burst_bounds_the_bucket(
        self, state: SharedState, clock: FakeClock
    ) -> None:
        limit = per_minute(10, burst=2)
        assert await takes(state, limit, 3) == [True, True, False]
        clock.advance(3600.0)  # a long idle time refills only up to the burst
        assert await takes(state, limit, 3) == [True, True, False]

    async def test_subjects_and_rules_keep_apart(self, state: SharedState) -> None:
        assert await takes(state, per_minute(1), 2) == [True, False]
        assert await takes(state, per_minute(1, subject="bob"), 1) == [True]
        assert await takes(state, per_minute(1, rule="top"), 1) == [True]
        # A rule name may hold ':' (policy allows it) without meeting another key.
        assert await takes(state, per_minute(1, rule="a:b", subject="c"), 1) == [True]
        assert await takes(state, per_minute(1, rule="a", subject="b:c"), 1) == [True]

    async def test_all_or_nothing(self, state: SharedState, clock: FakeClock) -> None:
        """A command is charged to every limit only if every limit admits it."""
        user, everyone = per_minute(10), per_minute(1, subject="*")
        assert (await state.take([(user, 1.0), (everyone, 1.0)])).allowed
        refused = await state.take([(user, 1.0), (everyone, 1.0)])
        assert refused.waits == pytest.approx((0.0, 60.0))
        assert not refused.charged
        # The user's limit was not charged for the refused command: 9 left.
        assert await takes(state, user, 10) == [True] * 9 + [False]

    async def test_force_charges_even_when_refused(
        self, state: SharedState, clock: FakeClock
    ) -> None:
        """Monitor mode: counted as if allowed."""
        limit = per_minute(1)
        await state.take([(limit, 1.0)])
        monitored = await state.take([(limit, 1.0)], force=True)
        assert not monitored.allowed
        assert monitored.charged
        clock.advance(60.0)  # one interval repays one of the two
        assert await takes(state, limit, 1) == [False]
        clock.advance(60.0)
        assert await takes(state, limit, 1) == [True]

    async def test_octet_budget(self, state: SharedState, clock: FakeClock) -> None:
        """Asked with cost 0 before a RETR, charged the real size after it
        (popproxy.policy's octet budgets: the same figures as its test)."""
        budget = Limit("octets", "alice", Rate(float(MiB), 3600.0, octets=True), float(MiB))
        assert (await state.take([(budget, 0.0)])).allowed
        await state.charge([(budget, 700_000)])
        assert (await state.take([(budget, 0.0)])).allowed  # 348,576 octets left
        await state.charge([(budget, 700_000)])
        overdrawn = await state.take([(budget, 0.0)])
        assert not overdrawn.allowed
        # 351,424 octets overdrawn at 1 MiB/hour (291.27 octets/s).
        assert overdrawn.retry_after == pytest.approx(351_424 * 3600 / MiB)
        assert not overdrawn.charged
        clock.advance(1200.0)
        assert not (await state.take([(budget, 0.0)])).allowed
        clock.advance(100.0)
        assert (await state.take([(budget, 0.0)])).allowed

    async def test_a_cost_above_the_burst_is_admitted_on_a_full_bucket(
        self, state: SharedState, clock: FakeClock
    ) -> None:
        """As ``Bucket.wait_time`` does: the need is capped at the capacity."""
        budget = Limit("big", "alice", Rate(1000.0, 1.0, octets=True), 1000.0)
        assert (await state.take([(budget, 5000.0)])).allowed
        refused = await state.take([(budget, 1.0)])
        assert refused.retry_after == pytest.approx(4.001)


class TestFailedLogins:
    async def test_counted_within_the_window(
        self, state: SharedState, clock: FakeClock
    ) -> None:
        for i in range(3):
            counts = await state.record_failure(["user:bob", "ip:192.0.2.7"], 900.0, 5)
            assert counts == (i + 1, i + 1)
            clock.advance(100.0)
        assert await state.count_failures(["user:bob", "ip:192.0.2.7", "user:x"], 900.0) == (
            3, 3, 0)
        clock.advance(600.0)  # the first failure is now exactly 900 s old: out
        assert await state.count_failures(["user:bob"], 900.0) == (2,)
        clock.advance(200.0)
        assert await state.count_failures(["user:bob"], 900.0) == (0,)

    async def test_only_the_newest_are_kept(self, state: SharedState, clock: FakeClock) -> None:
        for _ in range(10):
            counts = await state.record_failure(["user:bob"], 900.0, 3)
            clock.advance(1.0)
        assert counts == (3,)
        assert await state.count_failures(["user:bob"], 900.0) == (3,)

    async def test_cleared_on_success(self, state: SharedState) -> None:
        await state.record_failure(["user:bob", "user:carol"], 900.0, 5)
        await state.clear_failures(["user:bob"])
        assert await state.count_failures(["user:bob", "user:carol"], 900.0) == (0, 1)


class TestLeases:
    async def test_a_cap_of_two(self, state: SharedState, clock: FakeClock) -> None:
        assert await state.acquire_lease("user:alice", "s1", 2, 60.0)
        assert await state.acquire_lease("user:alice", "s2", 2, 60.0)
        assert not await state.acquire_lease("user:alice", "s3", 2, 60.0)
        # Holding one already is not a second slot.
        assert await state.acquire_lease("user:alice", "s1", 2, 60.0)
        # Other caps are not affected.
        assert await state.acquire_lease("ip:192.0.2.7", "s3", 2, 60.0)

    async def test_a_released_slot_is_reusable(self, state: SharedState) -> None:
        for s in ("s1", "s2"):
            assert await state.acquire_lease("user:alice", s, 2, 60.0)
        await state.release_leases(["user:alice", "ip:192.0.2.7"], "s1")
        await state.release_leases(["user:alice"], "s1")  # idempotent
        assert await state.acquire_lease("user:alice", "s3", 2, 60.0)
        assert not await state.acquire_lease("user:alice", "s4", 2, 60.0)

    async def test_an_expired_lease_frees_its_slot(
        self, state: SharedState, clock: FakeClock
    ) -> None:
        """A process killed with sessions open renews nothing: its slots come
        back when their leases run out."""
        assert await state.acquire_lease("user:alice", "dead-1", 2, 30.0)
        clock.advance(10.0)
        assert await state.acquire_lease("user:alice", "live", 2, 30.0)
        assert not await state.acquire_lease("user:alice", "new", 2, 30.0)
        clock.advance(20.0)  # dead-1 expires exactly now
        assert await state.acquire_lease("user:alice", "new", 2, 30.0)
        assert not await state.acquire_lease("user:alice", "newer", 2, 30.0)

    async def test_renewal_keeps_a_lease(self, state: SharedState, clock: FakeClock) -> None:
        assert await state.acquire_lease("user:alice", "s1", 1, 30.0)
        assert await state.acquire_lease("ip:192.0.2.7", "s1", 1, 30.0)
        for _ in range(5):
            clock.advance(20.0)
            assert await state.renew_leases(["user:alice", "ip:192.0.2.7"], "s1", 30.0) == (
                True, True)
        assert not await state.acquire_lease("user:alice", "s2", 1, 30.0)
        clock.advance(31.0)
        # Lost: a renewal does not take it again (that could exceed the cap).
        assert await state.renew_leases(["user:alice"], "s1", 30.0) == (False,)
        assert await state.acquire_lease("user:alice", "s2", 1, 30.0)
        assert await state.renew_leases(["user:alice"], "s1", 30.0) == (False,)


async def test_nothing_to_do_costs_no_call(state: SharedState) -> None:
    """The caller decides when shared state is needed; empty asks are free."""
    assert (await state.take([])).allowed
    await state.charge([])
    assert await state.record_failure([], 900.0, 5) == ()
    assert await state.count_failures([], 900.0) == ()
    await state.clear_failures([])
    assert await state.renew_leases([], "s1", 30.0) == ()
    await state.release_leases([], "s1")
    assert sum(state.calls.values()) == 0
    await state.take([(per_minute(1), 1.0), (per_minute(2, rule="b"), 1.0)])
    await state.acquire_lease("user:alice", "s1", 2, 60.0)
    await state.release_leases(["user:alice", "ip:192.0.2.7"], "s1")
    assert {k: v for k, v in state.calls.items() if k != "script_load"} == {
        "take": 1, "acquire_lease": 1, "release_leases": 1}


async def test_health_is_not_degraded_after_successes(state: SharedState) -> None:
    await state.take([(per_minute(1), 1.0)])
    health = state.health()
    assert not health.degraded
    assert health.last_ok is not None
    assert health.errors == 0
