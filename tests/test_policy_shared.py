"""Policy with shared state: ``SharedEngine`` asks, ``StateClient`` answers.

Two engines stand for two workers (or replicas) sharing one backend; here
the backend is ``MemoryState`` on a fake clock, so the arithmetic is the
Redis script's without a server (tests/test_shared_state_redis.py runs the
same flows against a real redis-server, and through real Dovecot).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import structlog
import trio

from popproxy.events import AuthResult, EndReason, Outcome, Response, State
from popproxy.policy import (
    ALLOW,
    AcquireLease,
    Allow,
    Ask,
    Charge,
    CheckLogin,
    ClearFailures,
    Decision,
    Delay,
    Deny,
    Facts,
    RecordFailure,
    Take,
)
from popproxy.policy.config import parse_policy
from popproxy.policy.engine import PolicyEngine
from popproxy.policy.shared import IN_USE, IP_CAP, UNAVAILABLE, SharedEngine, engine_for
from popproxy.pop3 import Command
from popproxy.session import Session
from popproxy.state import Limit, MemoryState, StateError, StateHealth, Verdict
from popproxy.state.client import LOG_EVERY, StateClient
from tests.session_helpers import fresh
from tests.state_support import FakeClock

RETR = Command("RETR", ("1",))
NOOP = Command("NOOP")
LIST = Command("LIST")
PASS = Command("PASS", ("pw",))
WHEN = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)
RETR_5 = {"name": "retr-5", "match": {"commands": ["RETR"]}, "action": "rate_limit",
          "limit": "5/minute", "per": "user"}


def facts(user: str | None = "alice", client: str = "192.0.2.7:40000",
          login_user: str | None = None) -> Facts:
    state = State.TRANSACTION if user else State.AUTHORIZATION
    return Facts(state, user, client, False, client_ip=client.rsplit(":", 1)[0],
                 login_user=login_user)


def shared(rules: list[dict[str, Any]] | None = None, *, mode: str = "enforce",
           on_error: str = "local", **protections: Any) -> SharedEngine:
    raw: dict[str, Any] = {"mode": mode, "rules": rules or []}
    if protections:
        raw["protections"] = protections
    return SharedEngine(parse_policy(raw), on_error=on_error, wallclock=lambda: WHEN)


class Backend:
    """One shared state, and a client ("worker") per engine on it."""

    def __init__(self, state: Any = None) -> None:
        self.clock = FakeClock()
        self.state = state if state is not None else MemoryState(clock=self.clock)
        self.errors: Counter[str] = Counter()

    def client(self, lease_time: float = 30.0) -> StateClient:
        return StateClient(self.state, lease_time=lease_time,
                           errors=lambda op: self.errors.update([op]), clock=self.clock)


async def decide(client: StateClient, engine: SharedEngine, f: Facts, cmd: Command,
                 now: float = 0.0, session: str = "s1") -> Decision:
    decision = engine.decide(f, cmd, now)
    if isinstance(decision, Ask):
        return await client.decide(decision, session)
    return decision


async def login(client: StateClient, engine: SharedEngine, user: str, session: str
                ) -> Decision:
    """The per-user cap, asked as the upstream accepts ``user``'s login."""
    ask = engine.admit_login(facts(user), user, 0.0)
    assert isinstance(ask, Ask)
    return await client.decide(ask, session)


class TestWhatAsks:
    def test_a_command_no_shared_rule_matches_asks_nothing(self) -> None:
        e = shared([RETR_5])
        for cmd in (NOOP, LIST, Command("STAT"), Command("UIDL"), Command("DELE", ("1",))):
            assert e.decide(facts(), cmd, 0.0) is ALLOW
        assert isinstance(e.decide(facts(), RETR, 0.0), Ask)

    def test_a_login_asks_for_its_failures_by_address_and_user(self) -> None:
        ask = shared().decide(facts(None, login_user="alice"), PASS, 0.0)
        assert isinstance(ask, Ask)
        # ... and takes the per-user lease in the same round trip.
        assert ask.query == CheckLogin(("ip:192.0.2.7", "user:alice"), 900.0, (20, 5),
                                       "user:alice", 10)

    def test_memory_backend_means_the_plain_engine(self) -> None:
        config = parse_policy({"rules": [RETR_5]})
        assert type(engine_for(config, "memory", "local")) is PolicyEngine
        assert type(engine_for(config, "redis", "deny")) is SharedEngine

    def test_limits_are_asked_together_under_the_rules_name_and_subject(self) -> None:
        e = shared([RETR_5, {"name": "all-10", "action": "rate_limit", "limit": "10/minute",
                             "per": "global"}])
        ask = e.decide(facts("bob"), RETR, 0.0)
        assert isinstance(ask, Ask)
        assert isinstance(ask.query, Take)
        assert [(lim.key, cost) for lim, cost in ask.query.items] == [
            ("rl:retr-5/bob", 1.0), ("rl:all-10/*", 1.0)]
        assert not ask.query.force

    def test_a_deny_rule_decides_without_asking(self) -> None:
        e = shared([RETR_5, {"name": "no-retr", "match": {"commands": ["RETR"]},
                             "action": "deny"}])
        decision = e.decide(facts(), RETR, 0.0)
        assert isinstance(decision, Deny)
        assert decision.rule == "no-retr"


class TestRateLimits:
    async def test_five_a_minute_across_two_workers(self) -> None:
        backend = Backend()
        workers = [(shared([RETR_5]), backend.client()) for _ in range(2)]
        results = []
        for i in range(12):
            engine, client = workers[i % 2]
            results.append(await decide(client, engine, facts(), RETR, float(i)))
        assert [type(r) for r in results] == [Allow] * 5 + [Deny] * 7
        refused = results[5]
        assert isinstance(refused, Deny)
        assert refused.rule == "retr-5"
        assert refused.reply.startswith(b"-ERR [SYS/TEMP] rate limit exceeded, try again in ")
        # Another user has a budget of their own.
        engine, client = workers[0]
        assert isinstance(await decide(client, engine, facts("bob"), RETR), Allow)
        # A minute on the shared clock refills it for both.
        backend.clock.advance(60)
        assert isinstance(await decide(*workers[1][::-1], facts(), RETR), Allow)

    async def test_delay_waits_what_the_shared_state_says(self) -> None:
        backend = Backend()
        e = shared([{**RETR_5, "limit": "1/second", "on_limit": "delay"}])
        client = backend.client()
        assert isinstance(await decide(client, e, facts(), RETR, 100.0), Allow)
        backend.clock.advance(0.25)
        held = await decide(client, e, facts(), RETR, 100.25)
        assert isinstance(held, Delay)
        assert held.until == pytest.approx(100.25 + 0.75)

    async def test_monitor_mode_counts_as_allowed_and_notes(self) -> None:
        backend = Backend()
        e = shared([{**RETR_5, "limit": "1/minute"}], mode="monitor")
        client = backend.client()
        first = await decide(client, e, facts(), RETR)
        second = await decide(client, e, facts(), RETR)
        assert first is ALLOW
        assert isinstance(second, Allow)
        assert [(n.rule, n.action, n.enforced) for n in second.notes] == [
            ("retr-5", "rate_limit", False)]

    async def test_an_octet_budget_is_charged_after_the_reply(self) -> None:
        backend = Backend()
        rule = {"name": "mb", "match": {"commands": ["RETR"]}, "action": "rate_limit",
                "limit": "1KiB/hour", "per": "user"}
        workers = [(shared([rule]), backend.client()) for _ in range(2)]
        engine, client = workers[0]
        assert isinstance(await decide(client, engine, facts(), RETR), Allow)
        effect = engine.observe(facts(), Response(RETR, True, None, "", 5000, False, 0, 1,
                                                  Outcome.OK), 1.0)
        assert isinstance(effect, Charge)
        assert [(lim.key, cost) for lim, cost in effect.items] == [("rl:mb/alice", 5000.0)]
        await client.apply([effect], "s")
        engine, client = workers[1]  # the other worker sees the overdrawn budget
        refused = await decide(client, engine, facts(), RETR)
        assert isinstance(refused, Deny)
        assert refused.rule == "mb"


class TestLogins:
    async def test_failed_logins_count_across_workers(self) -> None:
        backend = Backend()
        workers = [(shared(login_failures_per_user=3), backend.client()) for _ in range(2)]
        for i in range(3):
            engine, client = workers[i % 2]
            f = facts(None, client=f"198.51.100.{i}:1000", login_user="alice")
            assert isinstance(await decide(client, engine, f, PASS), Allow)
            effect = engine.observe(f, AuthResult("USER", "alice", False, "AUTH"), 0.0)
            assert effect == RecordFailure((f"ip:198.51.100.{i}", "user:alice"), 900.0, 20,
                                           ("user:alice",))
            await client.apply([effect], "s")
        engine, client = workers[1]
        refused = await decide(client, engine,
                               facts(None, client="203.0.113.9:1", login_user="alice"), PASS)
        assert isinstance(refused, Deny)
        assert refused.rule == "builtin:login-throttle"
        # A login that worked clears the user's count, wherever it happened.
        ok = workers[0][0].observe(facts("alice"), AuthResult("USER", "alice", True, None), 0.0)
        assert ok == ClearFailures(("user:alice",))
        await workers[0][1].apply([ok], "s")
        allowed = await decide(client, engine,
                               facts(None, client="203.0.113.9:1", login_user="alice"), PASS)
        assert isinstance(allowed, Allow)

    def test_a_busy_mailbox_is_not_a_guess(self) -> None:
        """Not counted; but the lease its login took still goes back."""
        e = shared()
        assert e.observe(facts(None), AuthResult("USER", "alice", False, "IN-USE"), 0) == (
            RecordFailure((), 900.0, 20, ("user:alice",)))


class TestFewerCalls:
    """A login's failure count and its per-user lease share one round trip;
    sessions ending together give their leases back in one."""

    async def test_the_login_takes_its_lease_with_the_count(self) -> None:
        backend = Backend()
        client = backend.client()
        engine = shared(max_sessions_per_user=1)
        f = facts(None, login_user="alice")
        assert isinstance(await decide(client, engine, f, PASS, session="a"), Allow)
        assert await login(client, engine, "alice", "a") == ALLOW
        assert backend.state.calls == {"check_login": 1}  # no acquire_lease call
        # The cap holds: another session's login finds the slot taken at
        # its own PASS, and asks again when the upstream accepts.
        assert isinstance(await decide(client, engine, f, PASS, session="b"), Allow)
        assert await login(client, engine, "alice", "b") == IN_USE
        assert backend.state.calls["acquire_lease"] == 1

    async def test_a_failed_login_gives_its_lease_back(self) -> None:
        backend = Backend()
        client = backend.client()
        engine = shared(max_sessions_per_user=1)
        f = facts(None, login_user="alice")
        await decide(client, engine, f, PASS, session="a")
        assert client.leases == {"a": {"user:alice"}}
        effect = engine.observe(f, AuthResult("USER", "alice", False, "AUTH"), 0.0)
        assert effect is not None
        await client.apply([effect], "a")
        assert client.leases == {"a": set()}
        assert await login(client, engine, "alice", "b") == ALLOW  # the slot is free

    async def test_a_throttled_login_takes_no_lease(self) -> None:
        backend = Backend()
        client = backend.client()
        engine = shared(login_failures_per_user=1)
        f = facts(None, login_user="alice")
        await client.apply([RecordFailure(("user:alice",), 900.0, 5)], "x")
        refused = await decide(client, engine, f, PASS, session="a")
        assert isinstance(refused, Deny)
        assert refused.rule == "builtin:login-throttle"
        assert "a" not in client.leases

    async def test_sessions_ending_together_release_in_one_call(
        self, autojump_clock: trio.testing.MockClock
    ) -> None:
        state = MemoryState(clock=trio.current_time)
        client = StateClient(state, lease_time=30.0)
        engine = shared(max_sessions_per_user=3)
        for s in ("a", "b", "c"):
            assert await login(client, engine, "alice", s) == ALLOW
        async with trio.open_nursery() as nursery:
            for s in ("a", "b", "c"):
                nursery.start_soon(client.release, s)
        assert state.calls["release_leases"] == 1
        assert state.leases_held("user:alice") == 0
        assert client.leases == {}


class TestSessionCaps:
    async def test_two_sessions_per_user_across_workers(self) -> None:
        backend = Backend()
        workers = [(shared(max_sessions_per_user=2), backend.client()) for _ in range(3)]
        answers = []
        for i, (engine, client) in enumerate(workers):
            ask = engine.admit_login(facts(), "alice", 0.0)
            assert isinstance(ask, Ask)
            assert ask.query == AcquireLease("user:alice", 2)
            answers.append(await client.decide(ask, f"session-{i}"))
        assert answers == [ALLOW, ALLOW, IN_USE]
        assert IN_USE.reply == b"-ERR [IN-USE] too many sessions for this user\r\n"
        # The first session ends: its slot goes back, a new one gets it.
        await workers[0][1].release("session-0")
        engine, client = workers[2]
        assert await login(client, engine, "alice", "session-3") == ALLOW

    async def test_a_worker_that_died_leaks_no_slot(self) -> None:
        backend = Backend()
        dead, alive = backend.client(lease_time=30), backend.client(lease_time=30)
        engine = shared(max_sessions_per_user=1)
        assert await login(dead, engine, "alice", "a") == ALLOW
        # The survivor's session renews; the dead worker's does not.
        assert await login(alive, engine, "bob", "b") == ALLOW
        backend.clock.advance(20)
        await alive.renew_once()
        assert await login(alive, engine, "alice", "c") == IN_USE
        backend.clock.advance(10.5)  # past the dead session's lease
        await alive.renew_once()
        assert await login(alive, engine, "alice", "c") == ALLOW
        # bob's renewed lease still holds the slot.
        assert await login(dead, engine, "bob", "d") == IN_USE

    async def test_per_address_cap(self) -> None:
        backend = Backend()
        engine = shared(max_sessions_per_ip=1)
        client = backend.client()
        engine.admit_client("192.0.2.7:1")
        ask = engine.client_lease("192.0.2.7:1")
        assert isinstance(ask, Ask)
        assert await client.decide(ask, "a") == ALLOW
        ask = engine.client_lease("192.0.2.7:2")
        assert isinstance(ask, Ask)
        assert await client.decide(ask, "b") == IP_CAP
        assert engine.admit_client("192.0.2.7:2") is None  # the lease decides, not the count


class Failing:
    """A backend that is down: every call raises ``StateError``."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def _fail(self, op: str) -> StateError:
        self.calls[op] += 1
        return StateError(op, "no answer within 0.25s (redis://127.0.0.1:1/0)")

    async def take(self, items: Sequence[tuple[Limit, float]], *, force: bool = False
                   ) -> Verdict:
        raise self._fail("take")

    async def charge(self, items: Sequence[tuple[Limit, float]]) -> None:
        raise self._fail("charge")

    async def record_failure(self, keys: Sequence[str], window: float, keep: int
                             ) -> tuple[int, ...]:
        raise self._fail("record_failure")

    async def count_failures(self, keys: Sequence[str], window: float) -> tuple[int, ...]:
        raise self._fail("count_failures")

    async def clear_failures(self, keys: Sequence[str]) -> None:
        raise self._fail("clear_failures")

    async def acquire_lease(self, cap: str, session: str, limit: int, ttl: float) -> bool:
        raise self._fail("acquire_lease")

    async def check_login(
        self, keys: Sequence[str], window: float, limits: Sequence[int],
        cap: str, session: str, cap_limit: int, ttl: float,
    ) -> tuple[tuple[int, ...], bool]:
        raise self._fail("check_login")

    async def release_many(self, leases: Sequence[tuple[str, str]]) -> None:
        raise self._fail("release_leases")

    async def renew_leases(self, caps: Sequence[str], session: str, ttl: float
                           ) -> tuple[bool, ...]:
        raise self._fail("renew_leases")

    async def release_leases(self, caps: Sequence[str], session: str) -> None:
        raise self._fail("release_leases")

    def health(self) -> StateHealth:
        return StateHealth("redis", True)


class TestWhenTheSharedStateFails:
    async def test_local_falls_back_to_this_processs_counts(self) -> None:
        backend = Backend(Failing())
        client = backend.client()
        e = shared([RETR_5], on_error="local", max_sessions_per_user=1)
        results = [await decide(client, e, facts(), RETR, float(i)) for i in range(7)]
        assert [type(r) for r in results] == [Allow] * 5 + [Deny] * 2
        assert await login(client, e, "alice", "a") == ALLOW
        second = await login(client, e, "alice", "b")
        assert isinstance(second, Deny)
        assert second.rule == "builtin:max-sessions-per-user"
        assert backend.errors == {"take": 7, "acquire_lease": 2}

    async def test_deny_refuses_what_needed_it_and_nothing_else(self) -> None:
        backend = Backend(Failing())
        client = backend.client()
        e = shared([RETR_5], on_error="deny")
        refused = await decide(client, e, facts(), RETR)
        assert isinstance(refused, Deny)
        assert refused.reply == UNAVAILABLE.reply
        assert [(n.rule, n.enforced) for n in refused.notes] == [("builtin:shared-state", True)]
        assert await decide(client, e, facts(), NOOP) is ALLOW
        refused_login = await login(client, e, "alice", "a")
        assert isinstance(refused_login, Deny)
        assert refused_login.rule == "builtin:shared-state"
        ip = e.client_lease("192.0.2.7:1")
        assert ip is not None
        assert await client.decide(ip, "b") == refused_login

    async def test_failures_are_counted_and_logged_sparingly(self) -> None:
        backend = Backend(Failing())
        client = backend.client()
        e = shared([RETR_5])
        with structlog.testing.capture_logs() as logs:
            for _ in range(50):
                await decide(client, e, facts(), RETR)
            await client.apply([Charge(())], "s")
            backend.clock.advance(LOG_EVERY)
            await decide(client, e, facts(), RETR)
        failed = [entry for entry in logs if entry["event"] == "state.call_failed"]
        # One line per operation, then at most one per LOG_EVERY saying how
        # many were not logged.
        assert [(f["op"], f["not_logged"]) for f in failed] == [
            ("take", 0), ("charge", 0), ("take", 49)]
        assert backend.errors["take"] == 51
        assert backend.errors["charge"] == 1

    async def test_recovery_is_picked_up_and_said(self) -> None:
        failing = Failing()
        backend = Backend(failing)
        client = backend.client()
        e = shared([RETR_5], on_error="deny")
        assert isinstance(await decide(client, e, facts(), RETR), Deny)
        client.state = MemoryState(clock=backend.clock)  # the server is back
        with structlog.testing.capture_logs() as logs:
            assert isinstance(await decide(client, e, facts(), RETR), Allow)
        assert [entry["event"] for entry in logs] == ["state.recovered"]


async def test_a_question_takes_no_longer_than_the_backend_allows() -> None:
    """StateClient adds no waiting of its own: a backend that hangs is the
    backend's timeout to bound (RedisState: state.timeout), and a cancelled
    question cancels cleanly."""

    class Hanging(Failing):
        async def take(self, items: Sequence[tuple[Limit, float]], *, force: bool = False
                       ) -> Verdict:
            await trio.sleep_forever()
            raise AssertionError

    client = Backend(Hanging()).client()
    ask = shared([RETR_5]).decide(facts(), RETR, 0)
    assert isinstance(ask, Ask)
    with trio.move_on_after(0.05) as scope:
        await client.decide(ask, "s")
    assert scope.cancelled_caught


def shared_session(engine: SharedEngine, user: bytes = b"alice") -> Session:
    """A session logged in through ``engine``, each question answered ALLOW."""
    s = fresh(policy=engine, client="192.0.2.7:1")
    out = s.receive_client(b"USER " + user + b"\r\nPASS pw\r\n", 0)
    assert out.to_upstream == b"USER " + user + b"\r\n"
    assert isinstance(out.ask, Ask)  # PASS: the failed logins so far
    assert isinstance(out.ask.query, CheckLogin)
    assert s.answered(ALLOW, 0).to_upstream == b"PASS pw\r\n"
    s.receive_upstream(b"+OK\r\n", 0)
    out = s.receive_upstream(b"+OK logged in\r\n", 0)
    assert out.to_client == b""  # the +OK waits for the per-user cap
    assert isinstance(out.ask, Ask)
    assert out.ask.query == AcquireLease("user:" + user.decode(), 10)
    assert s.answered(ALLOW, 0).to_client == b"+OK logged in\r\n"
    assert s.state is State.TRANSACTION
    return s


class TestTheSessionWaits:
    """The sans-IO session holds what waits on an ``Ask``, in order."""

    def test_a_command_waits_for_its_answer_and_those_behind_it_too(self) -> None:
        s = shared_session(shared([RETR_5]))
        out = s.receive_client(b"RETR 1\r\nNOOP\r\n", 1.0)
        assert isinstance(out.ask, Ask)
        assert isinstance(out.ask.query, Take)
        assert out.to_upstream == b""
        assert s.receive_client(b"STAT\r\n", 1.1).to_upstream == b""  # still waiting
        out = s.answered(ALLOW, 1.2)
        assert out.to_upstream == b"RETR 1\r\nNOOP\r\nSTAT\r\n"
        assert out.ask is None

    def test_a_refusal_keeps_its_place(self) -> None:
        s = shared_session(shared([RETR_5]))
        s.receive_client(b"RETR 1\r\nNOOP\r\n", 1.0)
        out = s.answered(UNAVAILABLE, 1.1)
        assert out.to_upstream == b"NOOP\r\n"
        assert out.to_client == UNAVAILABLE.reply
        assert s.receive_upstream(b"+OK\r\n", 1.2).to_client == b"+OK\r\n"

    def test_a_login_the_cap_refuses_ends_the_session(self) -> None:
        s = fresh(policy=shared())
        s.receive_client(b"USER alice\r\nPASS pw\r\n", 0)
        s.answered(ALLOW, 0)
        s.receive_upstream(b"+OK\r\n", 0)
        out = s.receive_upstream(b"+OK logged in\r\n+OK 2 320\r\n", 0)
        assert isinstance(out.ask, Ask)
        out = s.answered(IN_USE, 0)
        assert out.to_client == IN_USE.reply
        assert out.close is EndReason.LOGIN_REFUSED
        assert s.user is None

    def test_an_admitted_login_goes_on_with_what_came_behind_it(self) -> None:
        s = fresh(policy=shared())
        s.receive_client(b"USER alice\r\nPASS pw\r\n", 0)
        s.answered(ALLOW, 0)
        s.receive_upstream(b"+OK\r\n", 0)
        s.receive_client(b"STAT\r\n", 0)
        out = s.receive_upstream(b"+OK logged in\r\n", 0)
        assert isinstance(out.ask, Ask)
        out = s.answered(ALLOW, 0)
        assert out.to_client == b"+OK logged in\r\n"
        assert out.to_upstream == b"STAT\r\n"
        assert s.state is State.TRANSACTION

    def test_a_failed_login_is_an_effect(self) -> None:
        s = fresh(policy=shared(), client="192.0.2.7:1")
        s.receive_client(b"USER alice\r\nPASS wrong\r\n", 0)
        s.answered(ALLOW, 0)
        s.receive_upstream(b"+OK\r\n", 0)
        out = s.receive_upstream(b"-ERR [AUTH] invalid\r\n", 0)
        assert out.to_client == b"-ERR [AUTH] invalid\r\n"
        assert out.effects == [RecordFailure(("ip:192.0.2.7", "user:alice"), 900.0, 20,
                                             ("user:alice",))]

    def test_noop_after_login_asks_nothing(self) -> None:
        s = shared_session(shared([RETR_5]))
        out = s.receive_client(b"NOOP\r\nLIST\r\n", 1.0)
        assert out.ask is None
        assert out.to_upstream == b"NOOP\r\nLIST\r\n"


class TestUpkeep:
    """``StateClient.maintain``: leases renewed, a degraded backend probed."""

    async def test_leases_renewed_every_third_of_the_lease(
        self, autojump_clock: trio.testing.MockClock
    ) -> None:
        state = MemoryState(clock=trio.current_time)  # the mock clock, for both
        client = StateClient(state, lease_time=30.0)
        engine = shared(max_sessions_per_user=1)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.maintain)
            assert await login(client, engine, "alice", "s1") == ALLOW
            await trio.sleep(40.5)  # past the lease, renewed at 10, 20, 30, 40 s
            assert state.calls["renew_leases"] == 4
            other = StateClient(state, lease_time=30.0)
            assert await login(other, engine, "alice", "s2") == IN_USE
            nursery.cancel_scope.cancel()

    async def test_a_degraded_backend_is_probed_until_it_answers(
        self, autojump_clock: trio.testing.MockClock
    ) -> None:
        class Down(Failing):
            up = False
            probes = 0

            async def check(self) -> bool:
                self.probes += 1
                return self.up

        down = Down()
        client = StateClient(down, lease_time=300.0)
        await decide(client, shared([RETR_5]), facts(), RETR)  # fails: degraded
        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(client.maintain)
                await trio.sleep(5 * 2.0 + 0.5)
                assert down.probes == 5
                down.up = True
                await trio.sleep(2.0)
                nursery.cancel_scope.cancel()
        assert down.probes == 6
        assert [e["event"] for e in logs] == ["state.recovered"]

    async def test_a_lease_taken_while_a_renewal_is_out(self) -> None:
        """The session's per-user lease arrives while its per-IP lease is
        being renewed: the renewal accounts for what it sent, no more."""
        class Slow(MemoryState):
            def __init__(self) -> None:
                super().__init__(clock=trio.current_time)
                self.renewing = trio.Event()
                self.go_on = trio.Event()

            async def renew_leases(self, caps: Sequence[str], session: str, ttl: float
                                   ) -> tuple[bool, ...]:
                self.renewing.set()
                await self.go_on.wait()
                return await super().renew_leases(caps, session, ttl)

        state = Slow()
        client = StateClient(state, lease_time=30.0)
        engine = shared()
        ask = engine.client_lease("192.0.2.7:1")
        assert ask is not None
        assert await client.decide(ask, "s1") == ALLOW
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.renew_once)
            await state.renewing.wait()
            assert await login(client, engine, "alice", "s1") == ALLOW
            state.go_on.set()
        assert client.leases["s1"] == {"ip:192.0.2.7", "user:alice"}
