"""The ``[policy]`` section, its ``[policy.protections]`` and ``[[policy.rules]]``.

Parsed once into frozen values; every error names the rule and the key:
``policy.rules[2] (retr-per-user).limit: expected "100/minute" ...``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..confparse import (
    ConfigError,
    Section,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_int,
    parse_size,
)
from .ratelimit import Rate

__all__ = [
    "Match",
    "PolicyConfig",
    "Protections",
    "Rule",
    "TimeWindow",
    "parse_policy",
    "parse_rate",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*/\s*(second|minute|hour|day)\s*")
_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Days of the week and a time-of-day range in a time zone.

    ``start > end`` crosses midnight: the window belongs to the day it
    starts on (a Friday 22:00-06:00 window covers Saturday 03:00).
    """

    days: frozenset[int]  # 0 = Monday
    start: dt.time
    end: dt.time
    tz: dt.tzinfo

    def contains(self, when: dt.datetime) -> bool:
        local = when.astimezone(self.tz)
        t = local.time().replace(tzinfo=None)
        day = local.weekday()
        if self.start <= self.end:
            return day in self.days and self.start <= t < self.end
        if t >= self.start:
            return day in self.days
        return t < self.end and (day - 1) % 7 in self.days


@dataclass(frozen=True, slots=True)
class Match:
    """What a rule applies to; a key left out matches everything."""

    commands: frozenset[str] | None = None
    users: tuple[str, ...] | None = None  # fnmatch globs, case-sensitive
    networks: tuple[IPNetwork, ...] | None = None
    tls: bool | None = None
    authenticated: bool | None = None
    time: TimeWindow | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    match: Match
    action: str  # "deny" | "allow" | "rate_limit"
    message: str | None = None
    limit: Rate | None = None
    per: str = "user"  # "user" | "client_ip" | "global"
    burst: float | None = None
    on_limit: str = "deny"  # "deny" | "delay"
    max_delay: float = 10.0

    @property
    def capacity(self) -> float:
        assert self.limit is not None
        return self.burst if self.burst is not None else self.limit.amount


@dataclass(frozen=True, slots=True)
class Protections:
    """Built-in protections, on by default with conservative values."""

    login_failures_per_user: int = 5
    login_failures_per_ip: int = 20
    login_failure_window: float = 900.0
    login_failure_delay: float = 2.0
    max_sessions_per_user: int = 10
    max_sessions_per_ip: int = 100
    max_message_size: int | None = 1 << 30
    max_session_duration: float | None = 8 * 3600.0
    # Verbs allowed beyond the standard ones (e.g. a server's X-commands).
    extra_commands: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    mode: str = "enforce"  # "enforce" | "monitor"
    rules: tuple[Rule, ...] = ()
    protections: Protections = field(default_factory=Protections)


def parse_rate(value: object, key: str) -> Rate:
    """``"100/minute"`` (commands) or ``"500MiB/hour"`` (octets retrieved)."""
    m = _RATE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigError(
            f'{key}: expected a rate such as "100/minute" or "500MiB/hour", got {value!r}'
        )
    amount, unit, period = m.groups()
    if unit is None:
        rate = Rate(float(amount), _PERIODS[period])
    else:
        rate = Rate(float(parse_size(amount + unit, key)), _PERIODS[period], octets=True)
    if rate.amount <= 0:
        raise ConfigError(f"{key}: must be greater than zero, got {value!r}")
    return rate


def _strings(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a non-empty list of strings, got {value!r}")
    return tuple(value)


def _clock(value: object, key: str) -> dt.time:
    m = _CLOCK.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigError(f'{key}: expected a time of day such as "08:30", got {value!r}')
    return dt.time(int(m.group(1)), int(m.group(2)))


def _window(raw: object, key: str) -> TimeWindow:
    s = Section(raw, key)
    days_raw = s.get("days", list(_DAYS))
    days = _strings(days_raw, s.key("days"))
    bad = [d for d in days if d.lower() not in _DAYS]
    if bad:
        raise ConfigError(f"{s.key('days')}: unknown day {bad[0]!r}; use {', '.join(_DAYS)}")
    tz_name = s.get("timezone", "UTC")
    try:
        tz: dt.tzinfo = zoneinfo.ZoneInfo(str(tz_name))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{s.key('timezone')}: unknown time zone {tz_name!r}") from None
    if not s.has("start") or not s.has("end"):
        raise ConfigError(f"{key}: needs both start and end")
    window = TimeWindow(
        frozenset(_DAYS.index(d.lower()) for d in days),
        _clock(s.get("start"), s.key("start")),
        _clock(s.get("end"), s.key("end")),
        tz,
    )
    s.finish()
    return window


def _match(raw: object, key: str) -> Match:
    s = Section(raw, key)
    networks = None
    if s.has("networks"):
        nets = []
        for i, text in enumerate(_strings(s.get("networks"), s.key("networks"))):
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ConfigError(
                    f"{s.key('networks')}[{i}]: not a network in CIDR form: {text!r}"
                ) from None
        networks = tuple(nets)
    commands = None
    if s.has("commands"):
        commands = frozenset(c.upper() for c in _strings(s.get("commands"), s.key("commands")))
    users = _strings(s.get("users"), s.key("users")) if s.has("users") else None
    tls = parse_bool(s.get("tls"), s.key("tls")) if s.has("tls") else None
    authenticated = (
        parse_bool(s.get("authenticated"), s.key("authenticated"))
        if s.has("authenticated") else None
    )
    window = _window(s.get("time"), s.key("time")) if s.has("time") else None
    s.finish()
    return Match(commands, users, networks, tls, authenticated, window)


def _rule(raw: object, index: int, seen: set[str]) -> Rule:
    where = f"policy.rules[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
        raise ConfigError(
            f"{where}.name: required, 1-64 characters of letters, digits, '_.:-'; got {name!r}"
        )
    if name in seen:
        raise ConfigError(f"{where}.name: duplicate rule name {name!r}")
    seen.add(name)
    s = Section(raw, f"{where} ({name})")
    s.get("name")
    action = parse_choice(s.get("action"), s.key("action"), ("deny", "allow", "rate_limit"))
    match = _match(s.get("match", {}), s.key("match"))
    rule = Rule(name, match, action)
    if action == "deny":
        message = s.get("message", f"denied by policy ({name})")
        if not isinstance(message, str) or any(c in message for c in "\r\n\0"):
            raise ConfigError(f"{s.key('message')}: expected one line of text")
        rule = Rule(name, match, action, message=message)
    elif action == "rate_limit":
        if not s.has("limit"):
            raise ConfigError(f'{s.key("limit")}: required for rate_limit, e.g. "100/minute"')
        limit = parse_rate(s.get("limit"), s.key("limit"))
        burst = s.get("burst")
        rule = Rule(
            name, match, action,
            limit=limit,
            per=parse_choice(s.get("per", "user"), s.key("per"), ("user", "client_ip", "global")),
            burst=float(parse_int(burst, s.key("burst"), 1, 10**15)) if burst is not None else None,
            on_limit=parse_choice(s.get("on_limit", "deny"), s.key("on_limit"), ("deny", "delay")),
            max_delay=parse_duration(s.get("max_delay", 10.0), s.key("max_delay")),
        )
    s.finish()
    return rule


def _protections(raw: object) -> Protections:
    s = Section(raw, "policy.protections")
    d = Protections()

    def optional(key: str, default: Any, parse: Any) -> Any:
        value = s.get(key, "default")
        if value == "default":
            return default
        if value is False or value == "off":
            return None
        return parse(value, s.key(key))

    extra = s.get("extra_commands", [])
    if not isinstance(extra, list) or not all(isinstance(v, str) for v in extra):
        raise ConfigError(f"{s.key('extra_commands')}: expected a list of command names")
    cfg = Protections(
        login_failures_per_user=parse_int(
            s.get("login_failures_per_user", d.login_failures_per_user),
            s.key("login_failures_per_user"), 1, 10**6),
        login_failures_per_ip=parse_int(
            s.get("login_failures_per_ip", d.login_failures_per_ip),
            s.key("login_failures_per_ip"), 1, 10**6),
        login_failure_window=parse_duration(
            s.get("login_failure_window", d.login_failure_window), s.key("login_failure_window")),
        login_failure_delay=parse_duration(
            s.get("login_failure_delay", d.login_failure_delay), s.key("login_failure_delay")),
        max_sessions_per_user=parse_int(
            s.get("max_sessions_per_user", d.max_sessions_per_user),
            s.key("max_sessions_per_user"), 1, 10**6),
        max_sessions_per_ip=parse_int(
            s.get("max_sessions_per_ip", d.max_sessions_per_ip),
            s.key("max_sessions_per_ip"), 1, 10**6),
        max_message_size=optional("max_message_size", d.max_message_size, parse_size),
        max_session_duration=optional(
            "max_session_duration", d.max_session_duration, parse_duration),
        extra_commands=frozenset(v.upper() for v in extra),
    )
    s.finish()
    return cfg


def parse_policy(raw: object) -> PolicyConfig:
    s = Section(raw, "policy")
    mode = parse_choice(s.get("mode", "enforce"), s.key("mode"), ("enforce", "monitor"))
    rules_raw = s.get("rules", [])
    if not isinstance(rules_raw, list):
        raise ConfigError("policy.rules: expected an array of tables ([[policy.rules]])")
    seen: set[str] = set()
    rules = tuple(_rule(r, i, seen) for i, r in enumerate(rules_raw))
    protections = _protections(s.get("protections", {}))
    s.finish()
    return PolicyConfig(mode, rules, protections)
