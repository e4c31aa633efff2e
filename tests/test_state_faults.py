"""Redis faults: every call is bounded by the timeout and comes out as a
``StateError`` naming its operation; a Redis that went away (stopped,
frozen, not there at start) is used again without a restart; ``health()``
says degraded meanwhile.

Each test has a redis-server of its own (``private_redis``) to stop, freeze
and restart.  The circuit's clock is a ``FakeClock``, so the tests move past
the retry interval without waiting for it; what they do wait for is Redis
itself, in calls each bounded by the timeout and bounded in number.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest

from popproxy.policy.ratelimit import Rate
from popproxy.state import Limit, StateError
from popproxy.state.redis import RETRY_INTERVAL, RedisState
from tests.redis_server import RedisServer
from tests.state_support import FakeClock, redis_state

TIMEOUT = 0.25
# What "within the timeout" allows on top, on a shared two-core machine.
SLACK = 0.5
LIMIT = Limit("retr", "alice", Rate(100.0, 60.0), 100.0)


async def until_back(state: RedisState, clock: FakeClock, attempts: int = 40) -> int:
    """Take from LIMIT until Redis answers again; how many attempts failed.

    Each failed attempt took at most the timeout; the circuit's interval is
    skipped on the fake clock rather than waited for.
    """
    for failed in range(attempts):
        clock.advance(RETRY_INTERVAL)
        try:
            await state.take([(LIMIT, 1.0)])
            return failed
        except StateError:
            continue
    pytest.fail(f"Redis not used again after {attempts} attempts")


async def timed(call: Callable[[], Awaitable[object]]) -> tuple[StateError, float]:
    t0 = time.monotonic()
    with pytest.raises(StateError) as info:
        await call()
    return info.value, time.monotonic() - t0


async def test_stopped_then_restarted_on_the_same_port(private_redis: RedisServer) -> None:
    clock = FakeClock()
    async with redis_state(private_redis, "f:", clock=clock) as state:
        assert (await state.take([(LIMIT, 1.0)])).allowed
        private_redis.kill()

        error, took = await timed(lambda: state.take([(LIMIT, 1.0)]))
        assert error.op == "take"
        assert took < TIMEOUT + SLACK
        health = state.health()
        assert health.degraded
        assert health.last_error_op == "take"
        assert health.errors == 1

        # Known to be away: the next calls fail at once instead of waiting.
        error, took = await timed(lambda: state.acquire_lease("user:a", "s1", 2, 30.0))
        assert error.op == "acquire_lease"
        assert took < 0.1
        assert "unavailable" in error.reason

        private_redis.restart()
        await until_back(state, clock)
        assert not state.health().degraded
        # The restarted server lost its scripts: reloaded without a word.
        assert state.calls["script_load"] >= 2
        assert await state.acquire_lease("user:a", "s1", 1, 30.0)
        assert not await state.acquire_lease("user:a", "s2", 1, 30.0)


async def test_frozen_redis_cannot_hang_a_caller(private_redis: RedisServer) -> None:
    """SIGSTOP: the connection stays up and nothing answers (half-open)."""
    clock = FakeClock()
    async with redis_state(private_redis, "f:", clock=clock) as state:
        assert await state.acquire_lease("user:a", "s1", 1, 60.0)
        await state.record_failure(["user:a"], 60.0, 5)
        private_redis.pause()
        try:
            for call in (
                lambda: state.count_failures(["user:a"], 60.0),
                lambda: state.take([(LIMIT, 1.0)]),
            ):
                clock.advance(RETRY_INTERVAL)  # past the circuit: really ask
                error, took = await timed(call)
                assert took < TIMEOUT + SLACK
                assert "no answer within 0.25s" in error.reason or "Timeout" in error.reason
        finally:
            private_redis.resume()
        clock.advance(RETRY_INTERVAL)
        # Every answer now is the right one: none of the abandoned calls'
        # replies is handed to a later caller.
        assert not await state.acquire_lease("user:a", "s2", 1, 60.0)
        assert await state.count_failures(["user:a", "user:b"], 60.0) == (1, 0)
        assert await state.renew_leases(["user:a"], "s1", 60.0) == (True,)
        assert not state.health().degraded


async def test_redis_down_at_start(private_redis: RedisServer) -> None:
    """The proxy starts without Redis (on_error applies) and uses it once it is up."""
    private_redis.kill()
    clock = FakeClock()
    async with redis_state(private_redis, "f:", clock=clock) as state:
        error, took = await timed(lambda: state.record_failure(["ip:x"], 60.0, 5))
        assert error.op == "record_failure"
        assert took < TIMEOUT + SLACK
        assert not await state.check()
        private_redis.restart()
        for _ in range(40):
            clock.advance(RETRY_INTERVAL)
            if await state.check():
                break
        assert not state.health().degraded
        assert await state.record_failure(["ip:x"], 60.0, 5) == (1,)
        assert state.calls["ping"] >= 2


OPERATIONS: dict[str, Callable[[RedisState], Awaitable[object]]] = {
    "take": lambda s: s.take([(LIMIT, 1.0)]),
    "charge": lambda s: s.charge([(LIMIT, 1.0)]),
    "record_failure": lambda s: s.record_failure(["ip:x"], 60.0, 5),
    "count_failures": lambda s: s.count_failures(["ip:x"], 60.0),
    "clear_failures": lambda s: s.clear_failures(["ip:x"]),
    "acquire_lease": lambda s: s.acquire_lease("user:a", "s1", 2, 30.0),
    "renew_leases": lambda s: s.renew_leases(["user:a"], "s1", 30.0),
    "release_leases": lambda s: s.release_leases(["user:a"], "s1"),
}


async def test_every_operation_fails_as_a_state_error_naming_it(
    private_redis: RedisServer,
) -> None:
    clock = FakeClock()
    async with redis_state(private_redis, "f:", clock=clock) as state:
        private_redis.kill()
        for op, call in OPERATIONS.items():
            clock.advance(RETRY_INTERVAL)
            error, took = await timed(lambda call=call: call(state))  # type: ignore[misc]
            assert error.op == op
            assert took < TIMEOUT + SLACK
            assert str(error).startswith(f"shared state {op}: ")
        assert state.health().errors == len(OPERATIONS)
