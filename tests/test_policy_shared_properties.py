"""Property tests: the same policy decides alike whether its counts live in
this process (``PolicyEngine``), in ``MemoryState`` or in a real
redis-server (``SharedEngine``), whichever of two workers asks.

Random plans of commands, retrievals and failed logins by two users from
two addresses, spread over two "workers" (engines) at random; with one
backend shared by both workers, every decision (allow, or which rule
refused) is the single in-process engine's.  The limiter arithmetic itself
is held to the engine's token bucket in tests/test_state_properties.py.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from popproxy.events import AuthResult, Outcome, Response, State
from popproxy.policy import Ask, Decision, Deny, Facts
from popproxy.policy.config import PolicyConfig, parse_policy
from popproxy.policy.engine import PolicyEngine
from popproxy.policy.shared import SharedEngine
from popproxy.pop3 import Command
from popproxy.state import MemoryState, SharedState
from popproxy.state.client import StateClient
from tests.redis_server import RedisServer
from tests.state_support import FakeClock, redis_state

WHEN = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)
POLICY = parse_policy({
    "rules": [
        {"name": "retr-3", "match": {"commands": ["RETR"]}, "action": "rate_limit",
         "limit": "3/minute", "per": "user"},
        {"name": "top-all", "match": {"commands": ["TOP"]}, "action": "rate_limit",
         "limit": "4/minute", "per": "global", "burst": 2},
        {"name": "octets", "match": {"commands": ["RETR", "TOP"]}, "action": "rate_limit",
         "limit": "10KiB/minute", "per": "client_ip"},
    ],
    "protections": {"login_failures_per_user": 3, "login_failures_per_ip": 4,
                    "login_failure_window": "2m"},
})


@dataclass(frozen=True)
class Step:
    dt: float
    worker: int
    user: str
    ip: str
    kind: str  # "RETR" | "TOP" | "NOOP" | "PASS"; "fail", "ok": a PASS and its outcome
    octets: int


steps = st.lists(
    st.builds(Step,
              # Mostly seconds apart (limits and lockouts bite), now and
              # then long enough for them to wear off.
              st.one_of(st.integers(0, 20).map(lambda k: k / 2), st.integers(0, 20),
                        st.floats(0, 90)),
              st.integers(0, 1), st.sampled_from(["alice", "bob"]),
              st.sampled_from(["192.0.2.1", "192.0.2.2"]),
              st.sampled_from(["RETR", "TOP", "NOOP", "PASS", "fail", "fail", "ok"]),
              st.integers(0, 8000)),
    min_size=1, max_size=60,
)


def facts(step: Step) -> Facts:
    logged_in = step.kind in ("RETR", "TOP", "NOOP")
    return Facts(State.TRANSACTION if logged_in else State.AUTHORIZATION,
                 step.user if logged_in else None, f"{step.ip}:1000", False,
                 client_ip=step.ip, login_user=step.user)


def summary(decision: Decision) -> tuple[str, str | None]:
    return (type(decision).__name__, decision.rule if isinstance(decision, Deny) else None)


async def run_plan(engines: list[Any], clients: list[StateClient | None], clock: FakeClock,
                   plan: list[Step]) -> list[Any]:
    out: list[Any] = []
    for step in plan:
        clock.advance(step.dt)
        now = clock.now
        engine, client = engines[step.worker], clients[step.worker]
        f = facts(step)
        login = step.kind in ("PASS", "fail", "ok")
        cmd = Command("PASS", ("pw",)) if login else Command(
            step.kind, ("1", "0") if step.kind == "TOP" else ("1",) if step.kind == "RETR" else ())
        decision = engine.decide(f, cmd, now)
        if isinstance(decision, Ask):
            assert client is not None
            decision = await client.decide(decision, "s")
        out.append(summary(decision))
        if step.kind in ("fail", "ok") and not isinstance(decision, Deny):
            # The upstream's answer to the PASS the policy let through.
            effect = engine.observe(f, AuthResult("USER", step.user, step.kind == "ok", None),
                                    now)
            if effect is not None:
                assert client is not None
                await client.apply([effect], "s")
            continue
        if step.kind in ("RETR", "TOP") and not isinstance(decision, Deny):
            reply = Response(cmd, True, None, "", step.octets, False, now, now, Outcome.OK)
            effect = engine.observe(f, reply, now)
            if effect is not None:
                assert client is not None
                await client.apply([effect], "s")
    return out


async def local(plan: list[Step]) -> list[Any]:
    clock = FakeClock()
    engine = PolicyEngine(POLICY, wallclock=lambda: WHEN)
    return await run_plan([engine, engine], [None, None], clock, plan)


async def shared_on(state: SharedState, clock: FakeClock, plan: list[Step],
                    config: PolicyConfig = POLICY) -> list[Any]:
    engines = [SharedEngine(config, wallclock=lambda: WHEN) for _ in range(2)]
    clients: list[StateClient | None] = [
        StateClient(state, lease_time=30.0, clock=clock) for _ in range(2)]
    return await run_plan(engines, clients, clock, plan)


# A success between failures clears the user's count, on the other worker.
CLEARED = [Step(1, w, "alice", f"192.0.2.{w + 1}", kind, 0)
           for w, kind in ((0, "fail"), (1, "fail"), (1, "ok"), (0, "fail"), (1, "fail"),
                           (0, "PASS"))]


@settings(max_examples=300, deadline=None)
@given(plan=steps)
@example(plan=CLEARED)
def test_two_workers_on_memory_decide_as_one_process(plan: list[Step]) -> None:
    async def both() -> tuple[list[Any], list[Any]]:
        clock = FakeClock()
        return await local(plan), await shared_on(MemoryState(clock=clock), clock, plan)

    alone, shared = trio.run(both)
    assert shared == alone


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps)
def test_two_workers_on_redis_decide_as_one_process(
    redis_server: RedisServer, plan: list[Step]
) -> None:
    async def both() -> tuple[list[Any], list[Any]]:
        clock = FakeClock()
        async with redis_state(redis_server, f"prop-{uuid.uuid4().hex}:",
                               script_clock=clock) as redis:
            shared = await shared_on(redis, clock, plan)
        return await local(plan), shared

    alone, shared = trio.run(both)
    assert shared == alone
