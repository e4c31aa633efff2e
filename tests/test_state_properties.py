"""Property tests: for random arrival sequences, RedisState (a real
redis-server, the script given the times) answers exactly as MemoryState,
and MemoryState's GCRA admits exactly what the engine's token ``Bucket``
admits.  Together: the shared limits keep the policy's semantics."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.policy.ratelimit import Bucket, Rate
from popproxy.state import Limit, MemoryState, SharedState
from tests.redis_server import RedisServer
from tests.state_support import FakeClock, redis_state


@dataclass(frozen=True)
class Step:
    dt: float  # seconds since the previous step
    kind: str  # "command" | "check" | "charge" | "force"
    amount: float  # octets for "charge"


limits = st.builds(
    lambda n, period, burst, octets: Limit(
        "rule", "subject", Rate(float(n), period, octets=octets), float(burst)),
    st.integers(1, 20),
    st.sampled_from([1.0, 60.0, 3600.0]),
    st.integers(1, 20),
    st.booleans(),
)
# Times on a tenth-of-a-second grid hit "exactly when the token is back"
# often; arbitrary floats the rest.
gaps = st.one_of(
    st.integers(0, 300).map(lambda k: k / 10),
    st.floats(0, 100, allow_nan=False, allow_infinity=False),
)
steps = st.lists(
    st.builds(Step, gaps, st.sampled_from(["command", "check", "charge", "force"]),
              st.integers(0, 50).map(float)),
    min_size=1,
    max_size=40,
)


async def run_limits(state: SharedState, clock: FakeClock, limit_a: Limit, limit_b: Limit,
                     plan: list[Step]) -> list[Any]:
    """Apply ``plan`` to two limits at once; what each step answered."""
    out: list[Any] = []
    for step in plan:
        clock.advance(step.dt)
        if step.kind == "command":
            out.append(await state.take([(limit_a, 1.0), (limit_b, 1.0)]))
        elif step.kind == "check":
            out.append(await state.take([(limit_a, 0.0), (limit_b, 0.0)]))
        elif step.kind == "force":
            out.append(await state.take([(limit_a, 1.0)], force=True))
        else:
            await state.charge([(limit_b, step.amount)])
            out.append(None)
    return out


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit_a=limits, limit_b=limits, plan=steps)
def test_redis_answers_as_memory(
    redis_server: RedisServer, limit_a: Limit, limit_b: Limit, plan: list[Step]
) -> None:
    limit_b = Limit("other", "subject", limit_b.rate, limit_b.burst)

    async def both() -> tuple[list[Any], list[Any]]:
        memory_clock, redis_clock = FakeClock(), FakeClock()
        memory = await run_limits(MemoryState(clock=memory_clock), memory_clock,
                                  limit_a, limit_b, plan)
        prefix = f"prop-{uuid.uuid4().hex}:"
        async with redis_state(redis_server, prefix, script_clock=redis_clock) as redis:
            remote = await run_limits(redis, redis_clock, limit_a, limit_b, plan)
        return memory, remote

    memory, remote = trio.run(both)
    assert remote == memory  # waits equal to the last bit, charged alike


@dataclass(frozen=True)
class CapStep:
    dt: float
    kind: str  # "acquire" | "renew" | "release" | "fail" | "count" | "clear" | "login" | "many"
    session: int


cap_steps = st.lists(
    st.builds(CapStep, st.integers(0, 40).map(float),
              st.sampled_from(["acquire", "renew", "release", "fail", "count", "clear", "login",
                               "many"]),
              st.integers(0, 4)),
    min_size=1,
    max_size=40,
)


async def run_caps(state: SharedState, clock: FakeClock, plan: list[CapStep]) -> list[Any]:
    out: list[Any] = []
    for step in plan:
        clock.advance(step.dt)
        session = f"s{step.session}"
        if step.kind == "acquire":
            out.append(await state.acquire_lease("user:u", session, 2, 30.0))
        elif step.kind == "renew":
            out.append(await state.renew_leases(["user:u"], session, 30.0))
        elif step.kind == "release":
            await state.release_leases(["user:u"], session)
            out.append(None)
        elif step.kind == "fail":
            out.append(await state.record_failure([f"user:{session}", "ip:x"], 60.0, 3))
        elif step.kind == "count":
            out.append(await state.count_failures([f"user:{session}", "ip:x"], 60.0))
        elif step.kind == "login":
            out.append(await state.check_login([f"user:{session}", "ip:x"], 60.0, (2, 3),
                                               "user:u", session, 2, 30.0))
        elif step.kind == "many":
            await state.release_many([("user:u", session), ("user:u", "s0")])
            out.append(None)
        else:
            await state.clear_failures([f"user:{session}"])
            out.append(None)
    return out


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=cap_steps)
def test_redis_leases_and_failures_answer_as_memory(
    redis_server: RedisServer, plan: list[CapStep]
) -> None:
    async def both() -> tuple[list[Any], list[Any]]:
        memory_clock, redis_clock = FakeClock(), FakeClock()
        memory = await run_caps(MemoryState(clock=memory_clock), memory_clock, plan)
        async with redis_state(redis_server, f"prop-{uuid.uuid4().hex}:",
                               script_clock=redis_clock) as redis:
            remote = await run_caps(redis, redis_clock, plan)
        return memory, remote

    memory, remote = trio.run(both)
    assert remote == memory


@settings(max_examples=300, deadline=None)
@given(limit=limits, plan=steps)
def test_memory_gcra_admits_what_the_engine_bucket_admits(limit: Limit, plan: list[Step]) -> None:
    """The engine's ``Bucket`` (tokens) and this GCRA (arrival times) are the
    same limiter: same admissions, same waits (to float precision)."""
    clock = FakeClock(0.0)
    state = MemoryState(clock=clock)
    bucket = Bucket(limit.rate.per_second, limit.burst, 0.0)

    async def run() -> None:
        for step in plan:
            clock.advance(step.dt)
            now = clock.now
            if step.kind in ("command", "check"):
                cost = 1.0 if step.kind == "command" else 0.0
                wait = bucket.wait_time(now, cost)
                verdict = await state.take([(limit, cost)])
                assert verdict.allowed == (wait == 0.0), (step, wait, verdict)
                assert abs(verdict.retry_after - wait) <= 1e-6 * max(1.0, wait)
                if wait == 0.0 and cost:
                    bucket.spend(cost)
            elif step.kind == "force":
                await state.take([(limit, 1.0)], force=True)
                bucket.take(now, 1.0)
            else:
                await state.charge([(limit, step.amount)])
                bucket.take(now, step.amount)

    trio.run(run)
