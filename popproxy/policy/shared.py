"""The policy engine with shared state (``[state] backend = "redis"``).

Rate-limit rules, failed-login throttling and the per-user and per-IP
session caps are counted in the shared state, so they hold across workers
and replicas.  The engine stays pure: where the base engine would read this
process's counters it returns an ``Ask`` (the question, and what to make of
the answer), and where it would update them after a reply it returns an
``Effect``; the trio shell (``popproxy.shared``) talks to the backend.

Only commands that a shared rule or cap applies to ask: a NOOP, or a LIST
no rule matches, is decided here without a round trip.

The engine keeps this process's own counts as well (the base engine's
buckets, failure history and session counters): they cost a few
microseconds and are what ``on_error = "local"`` falls back to.  With
``on_error = "deny"`` what needed the shared state is refused instead,
as ``builtin:shared-state``.  The shell passes the backend's ``StateError``
to ``then`` as the answer; the engine only needs to know that it failed.

One difference from the base engine: a ``deny`` rule after a rate limit
decides at once, before the limits are asked about (the base engine would
refuse with the limit's message when that limit was also exhausted).
"""

from __future__ import annotations

import datetime as dt

from ..addr import host_of
from ..events import AuthResult, Event, Response
from ..pop3 import RETRIEVE, Command
from . import (
    ALLOW,
    AcquireLease,
    Allow,
    Ask,
    Charge,
    CheckLogin,
    ClearFailures,
    CountFailures,
    Decision,
    Deny,
    Effect,
    Facts,
    Note,
    RecordFailure,
    Take,
)
from .config import PolicyConfig, Rule
from .engine import _ALLOW, _DENY, _LIMIT, PolicyEngine, PolicyState, Wallclock, _utcnow
from .ratelimit import Bucket, Limit, Verdict

__all__ = ["IN_USE", "IP_CAP", "ON_ERROR", "UNAVAILABLE", "SharedEngine", "engine_for"]

ON_ERROR = ("local", "deny")
UNAVAILABLE = Deny(b"-ERR [SYS/TEMP] service temporarily unavailable, try again later\r\n",
                   "builtin:shared-state")
IN_USE = Deny(b"-ERR [IN-USE] too many sessions for this user\r\n",
              "builtin:max-sessions-per-user")
IP_CAP = Deny(b"-ERR [SYS/TEMP] too many sessions from your address\r\n")
_NO_LIMIT = 2**31  # a failure count never reaches it
# Limits built once per (rule, subject), bounded.
_MAX_LIMITS = 10_000


class SharedEngine(PolicyEngine):
    """``PolicyEngine`` whose counts live in the shared state."""

    def __init__(
        self,
        config: PolicyConfig,
        *,
        on_error: str = "local",
        wallclock: Wallclock = _utcnow,
        state: PolicyState | None = None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error: {on_error!r}")
        super().__init__(config, wallclock=wallclock, state=state)
        self.on_error = on_error
        self._limits: dict[tuple[str, str], Limit] = {}
        # Users a login's question found without failed logins: their
        # success needs no clearing (a round trip saved on most logins).
        self._clean: dict[str, None] = {}

    def reloaded(self, config: PolicyConfig) -> SharedEngine:
        return SharedEngine(config, on_error=self.on_error, wallclock=self.wallclock,
                            state=self.state)

    def _failed(self, notes: list[Note]) -> Deny | None:
        """The shared state did not answer: ``UNAVAILABLE`` with ``deny``
        (enforced, noted), None with ``local`` (decide from local counts)."""
        if self.on_error != "deny":
            return None
        notes.append(Note("builtin:shared-state", "deny", True))
        return Deny(UNAVAILABLE.reply, UNAVAILABLE.rule, notes=tuple(notes))

    def _seen(self, key: str, *, clean: bool) -> None:
        if not clean:
            self._clean.pop(key, None)
            return
        if len(self._clean) >= _MAX_LIMITS:
            del self._clean[next(iter(self._clean))]
        self._clean[key] = None

    def _limit(self, rule: Rule, subject: str) -> Limit:
        key = (rule.name, subject)
        limit = self._limits.get(key)
        if limit is None:
            assert rule.limit is not None
            if len(self._limits) >= _MAX_LIMITS:
                self._limits.clear()
            limit = self._limits[key] = Limit(rule.name, subject, rule.limit, rule.capacity)
        return limit

    # ------------------------------------------------------------------
    # Decisions

    def _login_throttle(
        self, facts: Facts, command: Command, now: float, notes: list[Note]
    ) -> Decision | Ask:
        keys = self._failure_keys(facts, command)
        if not keys:
            return self._throttle(keys, (), facts, command, now, notes)

        def then(answer: object) -> Decision | Ask:
            if isinstance(answer, Exception):
                refused = self._failed(notes)
                if refused is not None:
                    return refused
                counts = self._local_failures(keys, now)
            else:
                counts = answer  # type: ignore[assignment]
                for key, count in zip(keys, counts, strict=True):
                    if key.startswith("user:"):
                        self._seen(key, clean=not count)
            return self._throttle(keys, counts, facts, command, now, notes)

        p = self.config.protections
        user_key = next((k for k in keys if k.startswith("user:")), None)
        if user_key is None:  # AUTH names the user only in its SASL data
            return Ask(CountFailures(keys, p.login_failure_window), then)
        # The per-user lease is taken in the same round trip, ahead of the
        # upstream's answer; the client hears of the cap only after the
        # upstream accepted the password, and a failed login gives the
        # lease back (``observe``).  Monitor mode takes it whatever the counts.
        limits = tuple(
            _NO_LIMIT if self.monitor
            else p.login_failures_per_ip if k.startswith("ip:") else p.login_failures_per_user
            for k in keys)
        return Ask(CheckLogin(keys, p.login_failure_window, limits, user_key,
                              p.max_sessions_per_user), then)

    def _rules(self, facts: Facts, verb: str, now: float, notes: list[Note]) -> Decision | Ask:
        """The rules in order; the rate limits that apply are asked of the
        shared state together, all or none taken (as the base engine does)."""
        before = list(notes)
        when: dt.datetime | None = None
        items: list[tuple[Limit, float]] = []
        asked: list[tuple[int, Rule, Bucket]] = []
        for kind, rule, bucket, window, subject in self._candidates(facts, verb, now):
            if window is not None:
                if when is None:
                    when = self._wall(now)
                if not self._in_window(window, when):
                    continue
            if kind == _ALLOW:
                notes.append(Note(rule.name, "allow", not self.monitor))
                if not self.monitor:
                    break
            elif kind == _DENY:
                result = self._enforce(self._denial(rule), notes, "deny")
                if result is not None:
                    return result
            else:
                assert bucket is not None
                assert subject is not None
                items.append((self._limit(rule, subject), 1.0 if kind == _LIMIT else 0.0))
                asked.append((kind, rule, bucket))
        if not items:
            return Allow(tuple(notes)) if notes else ALLOW

        def then(answer: object) -> Decision | Ask:
            if not isinstance(answer, Verdict):
                refused = self._failed(notes)
                if refused is not None:
                    return refused
                return PolicyEngine._rules(self, facts, verb, now, before)
            for (_, rule, _), wait in zip(asked, answer.waits, strict=True):
                if wait > 0.0:
                    result = self._over_limit(rule, wait, notes, now)
                    if result is not None:
                        return result
            if answer.charged:  # this process's counts follow, for a fallback
                for kind, _, bucket in asked:
                    if kind == _LIMIT:
                        bucket.take(now, 1.0)
            return Allow(tuple(notes)) if notes else ALLOW

        return Ask(Take(tuple(items), force=self.monitor), then)

    # ------------------------------------------------------------------
    # Feedback from the session

    def observe(self, facts: Facts, event: Event, now: float) -> Effect | None:
        super().observe(facts, event, now)  # this process's counts
        if isinstance(event, AuthResult):
            if event.ok:
                # Not when the login's question found none (AUTH does not
                # name the user in time: then always).  A failure another
                # session recorded in between stays until the window ends.
                if not event.user:
                    return None
                key = f"user:{event.user}"
                if key in self._clean:
                    del self._clean[key]
                    return None
                return ClearFailures((key,))
            keys = self._failed_login_keys(facts, event)
            # The per-user lease a CheckLogin may have taken goes back.
            release = (f"user:{event.user}",) if event.user else ()
            if not keys and not release:
                return None
            return RecordFailure(keys, self.config.protections.login_failure_window,
                                 self._failures_kept(), release)
        if (
            isinstance(event, Response) and event.ok and not event.local
            and event.command.verb in RETRIEVE
        ):
            budgets = self._octet_budgets(facts, event.command.verb, now)
            if budgets:
                return Charge(tuple((self._limit(rule, key), float(event.octets))
                                    for rule, key in budgets))
        return None

    def admit_login(self, facts: Facts, user: str, now: float) -> Deny | Ask | None:
        """The per-user cap as a lease in the shared state (the shell keeps
        it renewed while the session lives and gives it back at the end)."""
        local = super().admit_login  # what "local" falls back to

        def then(answer: object) -> Decision | Ask:
            if not isinstance(answer, bool):
                refused = self._failed([])
                if refused is not None:
                    return refused
                return local(facts, user, now) or ALLOW
            if not answer and not self.monitor:
                return IN_USE
            self.state.sessions_per_user[user] += 1  # un-counted by session_ended
            return ALLOW

        return Ask(AcquireLease(f"user:{user}", self.config.protections.max_sessions_per_user),
                   then)

    def client_lease(self, client: str) -> Ask | None:
        """The per-IP cap, asked by the shell as a new connection is admitted
        (after ``admit_client``, which keeps this process's count): the
        ``Ask``'s decision is ``ALLOW`` or a ``Deny`` whose rule says why."""
        ip = host_of(client)
        if ip is None:
            return None
        local_over = self.state.sessions_per_ip[ip] > self.config.protections.max_sessions_per_ip

        def then(answer: object) -> Decision | Ask:
            if not isinstance(answer, bool):
                refused = self._failed([])
                if refused is not None:
                    return refused
                over = local_over
            else:
                over = not answer
            return IP_CAP if over and not self.monitor else ALLOW

        return Ask(AcquireLease(f"ip:{ip}", self.config.protections.max_sessions_per_ip), then)

    def admit_client(self, client: str) -> str | None:
        """Only counts: the cap itself is ``client_lease``'s."""
        super().admit_client(client)
        return None


def engine_for(config: PolicyConfig, backend: str, on_error: str) -> PolicyEngine:
    """The engine a ``[state]`` backend calls for: the base engine with
    ``memory`` (this process's counts, no questions), else ``SharedEngine``."""
    if backend == "memory":
        return PolicyEngine(config)
    return SharedEngine(config, on_error=on_error)

