"""The policy engine as a pure function of (facts, command, clock)."""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

import pytest

from popproxy.confparse import ConfigError
from popproxy.events import AuthResult, Outcome, Response, State
from popproxy.policy import Allow, Delay, Deny, Facts
from popproxy.policy.config import PolicyConfig, parse_policy, parse_rate
from popproxy.policy.engine import PolicyEngine
from popproxy.policy.ratelimit import Bucket
from popproxy.pop3 import Command

UTC = dt.UTC


def facts(user: str | None = "alice", client: str = "192.0.2.7:40000", tls: bool = False,
          login_user: str | None = None, sizes: dict[int, int] | None = None) -> Facts:
    state = State.TRANSACTION if user else State.AUTHORIZATION
    return Facts(state, user, client, tls, login_user=login_user, sizes=sizes or {})


def engine(rules: list[dict[str, Any]] | None = None, *, mode: str = "enforce",
           protections: dict[str, Any] | None = None,
           wall: dt.datetime | None = None) -> PolicyEngine:
    raw: dict[str, Any] = {"mode": mode, "rules": rules or []}
    if protections:
        raw["protections"] = protections
    when = wall or dt.datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    return PolicyEngine(parse_policy(raw), wallclock=lambda: when)


RETR = Command("RETR", ("1",))
DELE = Command("DELE", ("1",))
READ_ONLY = {"name": "archive-ro", "match": {"users": ["archive*"], "commands": ["DELE"]},
             "action": "deny", "message": "this mailbox is read-only"}


class TestRules:
    def test_read_only_mailbox(self) -> None:
        e = engine([READ_ONLY])
        denied = e.decide(facts("archive1"), DELE, 0)
        assert isinstance(denied, Deny)
        assert denied.reply == b"-ERR [SYS/PERM] this mailbox is read-only\r\n"
        assert denied.rule == "archive-ro"
        assert isinstance(e.decide(facts("alice"), DELE, 0), Allow)
        assert isinstance(e.decide(facts("archive1"), RETR, 0), Allow)

    def test_allow_before_deny_is_an_exception(self) -> None:
        e = engine([
            {"name": "ops-may", "match": {"users": ["archive-ops"]}, "action": "allow"},
            {"name": "no-dele", "match": {"commands": ["DELE"]}, "action": "deny"},
        ])
        assert isinstance(e.decide(facts("archive-ops"), DELE, 0), Allow)
        assert isinstance(e.decide(facts("bob"), DELE, 0), Deny)

    def test_first_matching_deny_wins(self) -> None:
        e = engine([
            {"name": "a", "match": {"commands": ["DELE"]}, "action": "deny", "message": "A"},
            {"name": "b", "match": {"commands": ["DELE"]}, "action": "deny", "message": "B"},
        ])
        result = e.decide(facts(), DELE, 0)
        assert isinstance(result, Deny)
        assert result.rule == "a"

    @pytest.mark.parametrize(
        ("match", "f", "hit"),
        [
            ({"networks": ["192.0.2.0/24"]}, facts(client="192.0.2.9:1"), True),
            ({"networks": ["192.0.2.0/24"]}, facts(client="198.51.100.1:1"), False),
            ({"networks": ["2001:db8::/32"]}, facts(client="[2001:db8::5]:1"), True),
            ({"networks": ["2001:db8::/32"]}, facts(client="[2001:db9::5]:1"), False),
            ({"tls": True}, facts(tls=True), True),
            ({"tls": True}, facts(tls=False), False),
            ({"authenticated": False}, facts(user=None), True),
            ({"authenticated": False}, facts(user="x"), False),
            ({"users": ["al?ce"]}, facts(user="alice"), True),
            ({"users": ["bob"]}, facts(user=None, login_user="bob"), True),
            ({"commands": ["retr"]}, facts(), True),
        ],
    )
    def test_matchers(self, match: dict[str, Any], f: Facts, hit: bool) -> None:
        e = engine([{"name": "r", "match": match, "action": "deny"}])
        assert isinstance(e.decide(f, RETR, 0), Deny) is hit

    def test_monitor_mode_records_but_lets_through(self) -> None:
        e = engine([READ_ONLY], mode="monitor")
        result = e.decide(facts("archive1"), DELE, 0)
        assert isinstance(result, Allow)
        assert [(n.rule, n.action, n.enforced) for n in result.notes] == [
            ("archive-ro", "deny", False)
        ]

    def test_unknown_commands_denied_unless_allowed(self) -> None:
        assert isinstance(engine().decide(facts(), Command("XTND"), 0), Deny)
        e = engine(protections={"extra_commands": ["XTND"]})
        assert isinstance(e.decide(facts(), Command("XTND"), 0), Allow)


class TestRateLimits:
    RULE: ClassVar[dict[str, Any]] = {
        "name": "retr-10", "match": {"commands": ["RETR"]}, "action": "rate_limit",
        "limit": "10/minute", "per": "user",
    }

    def test_eleventh_within_a_minute_is_refused_per_user(self) -> None:
        e = engine([self.RULE])
        for _ in range(10):
            assert isinstance(e.decide(facts("alice"), RETR, 1.0), Allow)
        refused = e.decide(facts("alice"), RETR, 1.0)
        assert isinstance(refused, Deny)
        assert refused.reply.startswith(b"-ERR [SYS/TEMP] rate limit exceeded")
        assert isinstance(e.decide(facts("bob"), RETR, 1.0), Allow)  # another user
        # One token per six seconds comes back.
        assert isinstance(e.decide(facts("alice"), RETR, 7.0), Allow)
        assert isinstance(e.decide(facts("alice"), RETR, 7.0), Deny)

    def test_burst_bounds_the_bucket(self) -> None:
        e = engine([{**self.RULE, "burst": 2}])
        results = [e.decide(facts(), RETR, 0.0) for _ in range(3)]
        assert [type(r) for r in results] == [Allow, Allow, Deny]
        # A long idle time refills only up to the burst.
        results = [e.decide(facts(), RETR, 3600.0) for _ in range(3)]
        assert [type(r) for r in results] == [Allow, Allow, Deny]

    def test_delay_up_to_a_bound(self) -> None:
        e = engine([{**self.RULE, "limit": "1/second", "on_limit": "delay", "max_delay": "5s"}])
        assert isinstance(e.decide(facts(), RETR, 10.0), Allow)
        delayed = e.decide(facts(), RETR, 10.25)
        assert isinstance(delayed, Delay)
        assert delayed.until == pytest.approx(11.0)
        e2 = engine([{**self.RULE, "limit": "1/minute", "on_limit": "delay", "max_delay": "5s"}])
        e2.decide(facts(), RETR, 0.0)
        assert isinstance(e2.decide(facts(), RETR, 0.0), Deny)  # 60 s > max_delay

    def test_per_client_ip_and_global(self) -> None:
        per_ip = engine([{**self.RULE, "limit": "1/minute", "per": "client_ip"}])
        assert isinstance(per_ip.decide(facts("a", "10.0.0.1:1"), RETR, 0), Allow)
        assert isinstance(per_ip.decide(facts("b", "10.0.0.1:2"), RETR, 0), Deny)
        assert isinstance(per_ip.decide(facts("a", "10.0.0.2:1"), RETR, 0), Allow)
        glob = engine([{**self.RULE, "limit": "1/minute", "per": "global"}])
        assert isinstance(glob.decide(facts("a", "10.0.0.1:1"), RETR, 0), Allow)
        assert isinstance(glob.decide(facts("b", "10.0.0.2:1"), RETR, 0), Deny)

    def test_octet_budget_counts_real_reply_sizes(self) -> None:
        e = engine([{**self.RULE, "limit": "1MiB/hour"}])
        f = facts()
        assert isinstance(e.decide(f, RETR, 0), Allow)
        e.observe(f, Response(RETR, True, None, "", 700_000, False, 0, 0, Outcome.OK), 0)
        assert isinstance(e.decide(f, RETR, 0), Allow)  # 348,576 octets left
        e.observe(f, Response(RETR, True, None, "", 700_000, False, 0, 0, Outcome.OK), 0)
        assert isinstance(e.decide(f, RETR, 0), Deny)  # overdrawn
        # 1 MiB per hour refills ~291 octets/s: 351,424 overdrawn, back above zero after 1,207 s.
        assert isinstance(e.decide(f, RETR, 1300), Allow)

    def test_state_survives_reload_for_unchanged_names(self) -> None:
        e = engine([{**self.RULE, "limit": "1/minute"}])
        e.decide(facts(), RETR, 0)
        same = e.reloaded(parse_policy({"rules": [{**self.RULE, "limit": "1/minute"}]}))
        assert isinstance(same.decide(facts(), RETR, 1), Deny)
        renamed = e.reloaded(
            parse_policy({"rules": [{**self.RULE, "name": "other", "limit": "1/minute"}]})
        )
        assert isinstance(renamed.decide(facts(), RETR, 1), Allow)

    def test_bucket_refill_is_continuous(self) -> None:
        b = Bucket(rate=2.0, capacity=4.0, now=0.0)
        for _ in range(4):
            b.take(0.0)
        assert b.wait_time(0.0) == pytest.approx(0.5)
        assert b.wait_time(0.5) == 0.0


class TestLoginThrottle:
    def test_after_n_failures_logins_are_refused_with_a_delay(self) -> None:
        e = engine(protections={"login_failures_per_user": 3, "login_failure_delay": "2s"})
        f = facts(user=None, login_user="bob")
        passw = Command("PASS", ("guess",))
        for i in range(3):
            assert isinstance(e.decide(f, passw, i), Allow)
            e.observe(f, AuthResult("USER", "bob", False, "AUTH"), i)
        refused = e.decide(f, passw, 3)
        assert isinstance(refused, Deny)
        assert refused.reply.startswith(b"-ERR [AUTH]")
        assert refused.delay == 2.0
        # The window passes: allowed again.
        assert isinstance(e.decide(f, passw, 3 + 900), Allow)

    def test_per_ip_counts_across_users(self) -> None:
        e = engine(protections={"login_failures_per_ip": 2})
        for user in ("a", "b"):
            f = facts(user=None, login_user=user)
            e.observe(f, AuthResult("USER", user, False, "AUTH"), 0)
        assert isinstance(e.decide(facts(user=None, login_user="c"),
                                   Command("PASS", ("x",)), 1), Deny)
        other_ip = facts(user=None, login_user="c", client="203.0.113.1:5")
        assert isinstance(e.decide(other_ip, Command("PASS", ("x",)), 1), Allow)

    def test_in_use_is_not_a_failed_guess(self) -> None:
        e = engine(protections={"login_failures_per_user": 1})
        f = facts(user=None, login_user="bob")
        e.observe(f, AuthResult("USER", "bob", False, "IN-USE"), 0)
        assert isinstance(e.decide(f, Command("PASS", ("x",)), 1), Allow)


class TestProtections:
    def test_message_size_known_from_list(self) -> None:
        e = engine(protections={"max_message_size": "1MiB"})
        big = facts(sizes={1: 2 << 20})
        assert isinstance(e.decide(big, RETR, 0), Deny)
        assert isinstance(e.decide(facts(sizes={1: 100}), RETR, 0), Allow)
        assert e.admit_size(facts(), RETR, 2 << 20) is not None
        assert e.admit_size(facts(), RETR, 100) is None

    def test_sessions_per_user_and_ip(self) -> None:
        e = engine(protections={"max_sessions_per_user": 1, "max_sessions_per_ip": 2})
        assert e.admit_login(facts(), "bob", 0) is None
        assert e.admit_login(facts(), "bob", 0) is not None
        e.session_ended("192.0.2.7:1", "bob")
        assert e.admit_login(facts(), "bob", 0) is None
        assert e.admit_client("192.0.2.8:1") is None
        assert e.admit_client("192.0.2.8:2") is None
        assert e.admit_client("192.0.2.8:3") == "too many sessions from your address"
        e.session_ended("192.0.2.8:3", None)
        e.session_ended("192.0.2.8:2", None)
        assert e.admit_client("192.0.2.8:4") is None


class TestTimeWindows:
    NIGHT: ClassVar[dict[str, Any]] = {"name": "night", "action": "deny",
             "match": {"commands": ["RETR"],
                       "time": {"days": ["fri"], "start": "22:00", "end": "06:00",
                                "timezone": "Europe/Berlin"}}}

    @pytest.mark.parametrize(
        ("when", "denied"),
        [
            # Friday 2026-11-27, Berlin is UTC+1 in November.
            (dt.datetime(2026, 11, 27, 21, 30, tzinfo=UTC), True),   # Fri 22:30
            (dt.datetime(2026, 11, 28, 2, 0, tzinfo=UTC), True),     # Sat 03:00, Friday's window
            (dt.datetime(2026, 11, 28, 5, 0, tzinfo=UTC), False),    # Sat 06:00 sharp
            (dt.datetime(2026, 11, 27, 20, 59, tzinfo=UTC), False),  # Fri 21:59
            (dt.datetime(2026, 11, 29, 2, 0, tzinfo=UTC), False),    # Sun 03:00
        ],
    )
    def test_window_across_midnight(self, when: dt.datetime, denied: bool) -> None:
        assert isinstance(engine([self.NIGHT], wall=when).decide(facts(), RETR, 0), Deny) is denied

    def test_window_follows_dst(self) -> None:
        """08:00-09:00 Berlin is 07:00 UTC in winter and 06:00 UTC in summer."""
        rule = {"name": "morning", "action": "deny",
                "match": {"time": {"start": "08:00", "end": "09:00",
                                   "timezone": "Europe/Berlin"}}}
        winter = dt.datetime(2026, 1, 14, 7, 30, tzinfo=UTC)
        summer = dt.datetime(2026, 7, 15, 6, 30, tzinfo=UTC)
        summer_off = dt.datetime(2026, 7, 15, 7, 30, tzinfo=UTC)
        assert isinstance(engine([rule], wall=winter).decide(facts(), RETR, 0), Deny)
        assert isinstance(engine([rule], wall=summer).decide(facts(), RETR, 0), Deny)
        assert isinstance(engine([rule], wall=summer_off).decide(facts(), RETR, 0), Allow)


class TestConfig:
    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            ({"rules": [{"action": "deny"}]}, r"policy\.rules\[0\]\.name: required"),
            ({"rules": [{"name": "x", "action": "block"}]}, r"policy\.rules\[0\] \(x\)\.action"),
            ({"rules": [{"name": "x", "action": "rate_limit"}]}, r"\(x\)\.limit: required"),
            ({"rules": [{"name": "x", "action": "rate_limit", "limit": "lots"}]},
             r"\(x\)\.limit: expected a rate"),
            ({"rules": [{"name": "x", "action": "deny", "match": {"networks": ["300.1.2.3/8"]}}]},
             r"\(x\)\.match\.networks\[0\]"),
            ({"rules": [{"name": "x", "action": "deny", "match": {"usr": ["a"]}}]},
             r"\(x\)\.match\.usr: unknown key"),
            ({"rules": [{"name": "x", "action": "deny",
                         "match": {"time": {"start": "25:00", "end": "01:00"}}}]},
             r"\(x\)\.match\.time\.start"),
            ({"rules": [{"name": "x", "action": "deny",
                         "match": {"time": {"start": "01:00", "end": "02:00",
                                            "timezone": "Mars/Olympus"}}}]},
             r"\(x\)\.match\.time\.timezone: unknown time zone"),
            ({"rules": [{"name": "x", "action": "deny"}, {"name": "x", "action": "deny"}]},
             r"duplicate rule name"),
            ({"mode": "audit"}, r"policy\.mode"),
            ({"protections": {"max_sessions_per_user": 0}}, r"max_sessions_per_user"),
        ],
    )
    def test_errors_name_the_rule_and_key(self, raw: dict[str, Any], message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            parse_policy(raw)

    def test_rates(self) -> None:
        assert parse_rate("100/minute", "k").per_second == pytest.approx(100 / 60)
        octets = parse_rate("500MiB/hour", "k")
        assert octets.octets
        assert octets.amount == 500 * 2**20

    def test_protections_can_be_turned_off(self) -> None:
        cfg = parse_policy({"protections": {"max_message_size": "off",
                                            "max_session_duration": False}})
        assert cfg.protections.max_message_size is None
        assert cfg.protections.max_session_duration is None
        assert PolicyConfig().protections.max_message_size == 1 << 30
