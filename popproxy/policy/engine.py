"""The policy engine: configured rules plus built-in protections.

Evaluation order for a command:
1. the command allow-list (standard verbs plus ``extra_commands``);
2. failed-login throttling (PASS, APOP, AUTH) per client IP and per user;
3. the maximum message size, when an earlier LIST told the size;
4. the rules, in order: the first matching ``allow`` or ``deny`` decides;
   every matching ``rate_limit`` applies.
In monitor mode everything is evaluated and recorded (``Note`` with
``enforced=False``) and the command goes through.

State (token buckets, failure history, session counts) lives in the engine
and is handed to the next engine on reload: buckets of rules whose name did
not change survive.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import re
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..addr import host_of, normalize_host
from ..events import AuthResult, Event, Response
from ..pop3 import RETRIEVE, STANDARD_VERBS, Command, completes_login, message_number
from . import ALLOW, Allow, Ask, Decision, Delay, Deny, Effect, Facts, Note
from .config import Match, PolicyConfig, Rule, TimeWindow
from .ratelimit import Bucket, BucketTable

__all__ = ["BUILTIN_RULE_NAMES", "PolicyEngine", "PolicyState", "SwitchablePolicy"]

# The rule names built-in protections decide under (all of action "deny").
BUILTIN_RULE_NAMES = (
    "builtin:command-allowlist",
    "builtin:login-throttle",
    "builtin:max-message-size",
    "builtin:max-sessions-per-user",
    "builtin:shared-state",  # [state] on_error = "deny" while the shared state fails
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Kinds of candidate rule, for the per-command loop in ``decide``.
_ALLOW, _DENY, _LIMIT, _OCTETS = range(4)
# (kind, rule, this process's bucket, time window, the bucket's subject)
_Candidate = tuple[int, Rule, Bucket | None, TimeWindow | None, str | None]
# RFC 2449/3206 codes that say the credentials were not the problem.
_NOT_CREDENTIAL_FAILURES = frozenset({"IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM"})
Wallclock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Failures:
    """Recent failure times per key, bounded in keys and in entries per key."""

    __slots__ = ("_by_key", "max_keys")

    def __init__(self, max_keys: int = 100_000) -> None:
        self._by_key: OrderedDict[str, deque[float]] = OrderedDict()
        self.max_keys = max_keys

    def add(self, key: str, now: float, keep: int) -> None:
        times = self._by_key.get(key)
        if times is None:
            times = self._by_key[key] = deque(maxlen=keep)
            if len(self._by_key) > self.max_keys:
                self._by_key.popitem(last=False)
        self._by_key.move_to_end(key)
        times.append(now)

    def count(self, key: str, now: float, window: float) -> int:
        times = self._by_key.get(key)
        if not times:
            return 0
        while times and times[0] <= now - window:
            times.popleft()
        return len(times)

    def clear(self, key: str) -> None:
        self._by_key.pop(key, None)


@dataclass
class PolicyState:
    """Everything that must outlive a reload."""

    buckets: dict[str, BucketTable] = field(default_factory=dict)  # by rule name
    failures: _Failures = field(default_factory=_Failures)
    sessions_per_ip: Counter[str] = field(default_factory=Counter)
    sessions_per_user: Counter[str] = field(default_factory=Counter)


class PolicyEngine:
    """Implements the ``Policy`` protocol for a ``PolicyConfig``."""

    def __init__(
        self,
        config: PolicyConfig,
        *,
        wallclock: Wallclock = _utcnow,
        state: PolicyState | None = None,
    ) -> None:
        self.config = config
        self.monitor = config.mode == "monitor"
        self.wallclock = wallclock
        self.state = state or PolicyState()
        # Keep the buckets of rules that are still there; forget the rest.
        tables: dict[str, BucketTable] = {}
        for rule in config.rules:
            if rule.action == "rate_limit" and rule.limit is not None:
                table = self.state.buckets.get(rule.name)
                if table is None:
                    table = BucketTable()
                else:
                    table.retune(rule.limit, rule.capacity)
                tables[rule.name] = table
        self.state.buckets = tables
        p = config.protections
        self._allowed_verbs = STANDARD_VERBS | p.extra_commands
        # Verbs no rule can match and no protection looks at (NOOP, STAT,
        # LIST... unless a rule names them): allowed without a look at the
        # session, which is most commands of most sessions.
        named = set().union(*(r.match.commands or () for r in config.rules))
        self._plain_verbs = frozenset() if any(
            r.match.commands is None for r in config.rules
        ) else frozenset(self._allowed_verbs - named - {"PASS", "APOP", "AUTH", "RETR"})
        # User globs compiled once into one regex per rule.
        self._globs: dict[tuple[str, ...], Callable[[str], object]] = {
            r.match.users: re.compile("|".join(fnmatch.translate(g) for g in r.match.users)).match
            for r in config.rules if r.match.users is not None
        }
        self._last_ip: tuple[str | None, IPAddress | None] = (None, None)
        self._candidate_cache: dict[tuple[object, ...], tuple[_Candidate, ...]] = {}
        self._wall_at: float | None = None
        self._wall_now = dt.datetime.min
        self._window_results: dict[TimeWindow, bool] = {}

    def reloaded(self, config: PolicyConfig) -> PolicyEngine:
        """A new engine for ``config`` that keeps this one's state."""
        return PolicyEngine(config, wallclock=self.wallclock, state=self.state)

    # ------------------------------------------------------------------
    # Decisions

    def decide(self, facts: Facts, command: Command, now: float) -> Decision | Ask:
        if command.verb in self._plain_verbs:
            return ALLOW
        notes: list[Note] = []
        if command.verb not in self._allowed_verbs:
            deny = Deny(b"-ERR unknown command\r\n", "builtin:command-allowlist")
            result = self._enforce(deny, notes, "deny")
            if result is not None:
                return result
        if completes_login(command):
            return self._login_throttle(facts, command, now, notes)
        return self._after_throttle(facts, command, now, notes)

    def _login_throttle(
        self, facts: Facts, command: Command, now: float, notes: list[Note]
    ) -> Decision | Ask:
        keys = self._failure_keys(facts, command)
        return self._throttle(keys, self._local_failures(keys, now), facts, command, now, notes)

    def _failure_keys(self, facts: Facts, command: Command) -> tuple[str, ...]:
        """The failed-login keys of a login: its client address and its user."""
        ip = facts.client_ip or host_of(facts.client)
        user = facts.login_user if command.verb != "APOP" else (command.args or ("",))[0]
        return tuple(k for k in (f"ip:{ip}" if ip else "", f"user:{user}" if user else "") if k)

    def _local_failures(self, keys: tuple[str, ...], now: float) -> tuple[int, ...]:
        w = self.config.protections.login_failure_window
        return tuple(self.state.failures.count(k, now, w) for k in keys)

    def _throttle(
        self, keys: tuple[str, ...], counts: tuple[int, ...], facts: Facts, command: Command,
        now: float, notes: list[Note],
    ) -> Decision | Ask:
        """Failed-login throttling (PASS, APOP, AUTH) per client IP and per user."""
        p = self.config.protections
        for key, count in zip(keys, counts, strict=True):
            limit = p.login_failures_per_ip if key.startswith("ip:") else p.login_failures_per_user
            if count >= limit:
                deny = Deny(
                    b"-ERR [AUTH] too many failed logins, try again later\r\n",
                    "builtin:login-throttle",
                    delay=p.login_failure_delay,
                )
                result = self._enforce(deny, notes, "deny")
                if result is not None:
                    return result
                break
        return self._after_throttle(facts, command, now, notes)

    def _after_throttle(
        self, facts: Facts, command: Command, now: float, notes: list[Note]
    ) -> Decision | Ask:
        p = self.config.protections
        if command.verb == "RETR" and p.max_message_size is not None and command.args:
            number = message_number(command.args[0])
            size = facts.sizes.get(number) if number is not None else None
            if size is not None and size > p.max_message_size:
                result = self._enforce(self._too_large(), notes, "deny")
                if result is not None:
                    return result
        return self._rules(facts, command.verb, now, notes)

    def _rules(self, facts: Facts, verb: str, now: float, notes: list[Note]) -> Decision | Ask:
        """The configured rules, in order, with this process's token buckets."""
        when: dt.datetime | None = None
        limited: list[Bucket] = []
        for kind, rule, bucket, window, _ in self._candidates(facts, verb, now):
            if window is not None:
                if when is None:
                    when = self._wall(now)
                if not self._in_window(window, when):
                    continue
            if kind == _LIMIT:
                # A command limit takes a token if every rule allows; an
                # octet budget (cost 0) only asks not to be overdrawn.
                assert bucket is not None
                if bucket.wait_time(now, 1.0) == 0.0:
                    limited.append(bucket)
                    continue
            elif kind == _OCTETS:
                assert bucket is not None
                if bucket.wait_time(now, 0.0) == 0.0:
                    continue
            elif kind == _ALLOW:
                notes.append(Note(rule.name, "allow", not self.monitor))
                if not self.monitor:
                    break
                continue
            else:  # _DENY
                result = self._enforce(self._denial(rule), notes, "deny")
                if result is not None:
                    return result
                continue
            # Over the limit.
            assert bucket is not None
            result = self._over_limit(rule, bucket.wait_time(now, 0.0 if kind == _OCTETS else 1.0),
                                      notes, now)
            if result is not None:
                return result
            if kind == _LIMIT:
                limited.append(bucket)  # monitor mode: counted as if allowed
        # Tokens are taken only once the command is allowed by every rule.
        for b in limited:
            b.spend()
        return Allow(tuple(notes)) if notes else ALLOW

    @staticmethod
    def _denial(rule: Rule) -> Deny:
        message = (rule.message or "denied by policy").encode("utf-8", "replace")
        return Deny(b"-ERR [SYS/PERM] " + message + b"\r\n", rule.name)

    def _over_limit(
        self, rule: Rule, wait: float, notes: list[Note], now: float
    ) -> Decision | None:
        """A rate limit refused: ``on_limit`` (delay or deny); None in monitor mode."""
        if rule.on_limit == "delay" and wait <= rule.max_delay:
            return self._enforce(Delay(now + wait, rule.name), notes, "rate_limit")
        seconds = max(1, round(wait))
        deny = Deny(f"-ERR [SYS/TEMP] rate limit exceeded, try again in {seconds}s\r\n".encode(),
                    rule.name)
        return self._enforce(deny, notes, "rate_limit")

    def _candidates(self, facts: Facts, verb: str, now: float) -> tuple[_Candidate, ...]:
        """The rules whose match holds for this session and verb, time aside,
        each with its token bucket (rate limits) resolved.

        Everything but the time window is fixed for a session state, and the
        bucket key (user, address) is part of that state, so the answer is
        remembered (bounded) instead of testing every rule on every command.
        Each comes as (kind, rule, bucket, time window), the fields the
        per-command loop needs, so that it looks nothing else up; a rate
        limit with nothing to count by (per user, before login) is left out.
        """
        key = (verb, facts.user, facts.login_user, facts.tls,
               facts.client_ip or host_of(facts.client))
        hit = self._candidate_cache.get(key)
        if hit is None:
            entries: list[_Candidate] = []
            for r in self.config.rules:
                if not self._matches(r.match, facts, verb, None, static=True):
                    continue
                bucket = None
                bucket_key = None
                if r.action == "rate_limit":
                    bucket_key = self._bucket_key(r, facts)
                    if r.limit is None or bucket_key is None:
                        continue
                    bucket = self.state.buckets[r.name].get(
                        bucket_key, r.limit, r.capacity, now)
                    kind = _OCTETS if r.limit.octets else _LIMIT
                else:
                    kind = _ALLOW if r.action == "allow" else _DENY
                entries.append((kind, r, bucket, r.match.time, bucket_key))
            hit = tuple(entries)
            if len(self._candidate_cache) >= 4096:
                self._candidate_cache.clear()
            self._candidate_cache[key] = hit
        return hit

    def _enforce(self, decision: Deny | Delay, notes: list[Note], action: str) -> Decision | None:
        """The decision in enforce mode; in monitor mode, a note and go on."""
        rule = decision.rule or "builtin"
        if self.monitor:
            notes.append(Note(rule, action, False))
            return None
        notes.append(Note(rule, action, True))
        if isinstance(decision, Deny):
            return Deny(decision.reply, decision.rule, decision.delay, tuple(notes))
        return Delay(decision.until, decision.rule, tuple(notes))

    @staticmethod
    def _too_large() -> Deny:
        return Deny(
            b"-ERR [SYS/PERM] message exceeds the size this proxy allows\r\n",
            "builtin:max-message-size",
        )

    def _matches(
        self, m: Match, facts: Facts, verb: str, when: dt.datetime | None, *,
        static: bool = False,
    ) -> bool:
        """Whether a rule's match holds; ``static`` leaves the time window out."""
        if m.commands is not None and verb not in m.commands:
            return False
        if m.authenticated is not None and m.authenticated != (facts.user is not None):
            return False
        if m.tls is not None and m.tls != facts.tls:
            return False
        if m.users is not None:
            user = facts.user or facts.login_user
            if user is None or not self._globs[m.users](user):
                return False
        if m.networks is not None:
            addr = self._address(facts)
            if addr is None or not any(addr in net for net in m.networks):
                return False
        return static or m.time is None or (when is not None and m.time.contains(when))

    def _address(self, facts: Facts) -> IPAddress | None:
        """The client's address, parsed once per client rather than per rule."""
        text = facts.client_ip or host_of(facts.client)
        if self._last_ip[0] != text:
            try:
                # An IPv4-mapped IPv6 client matches IPv4 networks.
                addr: IPAddress | None = ipaddress.ip_address(normalize_host(text or ""))
            except ValueError:
                addr = None
            self._last_ip = (text, addr)
        return self._last_ip[1]

    def _wall(self, now: float) -> dt.datetime:
        """The wall clock, read at most once a second: windows are in minutes."""
        if self._wall_at is None or not 0 <= now - self._wall_at < 1.0:
            self._wall_at = now
            self._wall_now = self.wallclock()
            self._window_results.clear()
        return self._wall_now

    def _in_window(self, window: TimeWindow, when: dt.datetime) -> bool:
        """``window.contains(when)``, worked out once per wall-clock reading."""
        hit = self._window_results.get(window)
        if hit is None:
            hit = self._window_results[window] = window.contains(when)
        return hit

    @staticmethod
    def _bucket_key(rule: Rule, facts: Facts) -> str | None:
        if rule.per == "global":
            return "*"
        if rule.per == "client_ip":
            return facts.client_ip or host_of(facts.client)
        return facts.user or facts.login_user

    # ------------------------------------------------------------------
    # Feedback from the session

    def observe(self, facts: Facts, event: Event, now: float) -> Effect | None:
        if isinstance(event, AuthResult):
            if event.ok:
                if event.user:
                    self.state.failures.clear("user:" + event.user)
                return None
            keys = self._failed_login_keys(facts, event)
            keep = self._failures_kept()
            for key in keys:
                self.state.failures.add(key, now, keep)
        elif (
            isinstance(event, Response) and event.ok and not event.local
            and event.command.verb in RETRIEVE
        ):
            for rule, key in self._octet_budgets(facts, event.command.verb, now):
                assert rule.limit is not None
                bucket = self.state.buckets[rule.name].get(key, rule.limit, rule.capacity, now)
                bucket.take(now, event.octets)
        return None

    @staticmethod
    def _failed_login_keys(facts: Facts, event: AuthResult) -> tuple[str, ...]:
        """The keys a failed login counts under (none when the credentials
        were not the problem: right password, busy mailbox)."""
        if event.code in _NOT_CREDENTIAL_FAILURES:
            return ()
        ip = facts.client_ip or host_of(facts.client)
        return tuple(k for k in (f"ip:{ip}" if ip else "",
                                 f"user:{event.user}" if event.user else "") if k)

    def _failures_kept(self) -> int:
        p = self.config.protections
        return max(p.login_failures_per_ip, p.login_failures_per_user)

    def _octet_budgets(
        self, facts: Facts, verb: str, now: float
    ) -> list[tuple[Rule, str]]:
        """The octet-budget rules a retrieval is charged to, with their keys."""
        found: list[tuple[Rule, str]] = []
        when: dt.datetime | None = None
        for rule in self.config.rules:
            if rule.action != "rate_limit" or rule.limit is None or not rule.limit.octets:
                continue
            if rule.match.time is not None and when is None:
                when = self._wall(now)
            if not self._matches(rule.match, facts, verb, when):
                continue
            key = self._bucket_key(rule, facts)
            if key is not None:
                found.append((rule, key))
        return found

    def admit_login(self, facts: Facts, user: str, now: float) -> Deny | Ask | None:
        limit = self.config.protections.max_sessions_per_user
        if self.state.sessions_per_user[user] >= limit and not self.monitor:
            return Deny(
                b"-ERR [IN-USE] too many sessions for this user\r\n",
                "builtin:max-sessions-per-user",
            )
        self.state.sessions_per_user[user] += 1
        return None

    def admit_size(self, facts: Facts, command: Command, octets: int) -> Deny | None:
        limit = self.config.protections.max_message_size
        if command.verb == "RETR" and limit is not None and octets > limit and not self.monitor:
            return self._too_large()
        return None

    # ------------------------------------------------------------------
    # Session lifecycle (from the relay)

    def admit_client(self, client: str) -> str | None:
        """Called for each new connection, before any upstream work.

        Every call is matched by one ``session_ended``, admitted or not.
        """
        ip = host_of(client)
        if ip is None:
            return None
        self.state.sessions_per_ip[ip] += 1
        over = self.state.sessions_per_ip[ip] > self.config.protections.max_sessions_per_ip
        if over and not self.monitor:
            return "too many sessions from your address"
        return None

    def session_ended(self, client: str, user: str | None) -> None:
        for counter, key in ((self.state.sessions_per_ip, host_of(client)),
                             (self.state.sessions_per_user, user)):
            if key is not None and key in counter:
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]


class SwitchablePolicy:
    """The policy every session consults; ``current`` is swapped on reload.

    Live sessions hold this object, so new rules apply to their next
    command without touching them.
    """

    def __init__(self, current: PolicyEngine) -> None:
        self.current = current

    def decide(self, facts: Facts, command: Command, now: float) -> Decision | Ask:
        return self.current.decide(facts, command, now)

    def observe(self, facts: Facts, event: Event, now: float) -> Effect | None:
        return self.current.observe(facts, event, now)

    def admit_login(self, facts: Facts, user: str, now: float) -> Deny | Ask | None:
        return self.current.admit_login(facts, user, now)

    def admit_size(self, facts: Facts, command: Command, octets: int) -> Deny | None:
        return self.current.admit_size(facts, command, octets)
