"""What the policy side asks of shared state, whichever backend holds it.

Three kinds of question, each answered in one call (one Redis round trip):

* **Rate limits** (``take``, ``charge``): GCRA, the token bucket of
  ``popproxy.policy.ratelimit`` written as a "theoretical arrival time".  A
  command takes one unit from every limit that applies, all or none; an
  octet budget is asked with cost 0 before a RETR ("not overdrawn?") and
  charged the real size afterwards, which may overdraw it.
* **Failed logins** (``record_failure``, ``count_failures``,
  ``clear_failures``): failures per key within a sliding window.
* **Session caps** (``acquire_lease``, ``renew_leases``, ``release_leases``):
  a lease per session with an expiry, so the slots of a process that died
  come back by themselves.

Nothing here decides policy.  A backend failure comes out as one
``StateError`` naming the operation; the caller applies ``on_error``.  No
method makes a call it was not asked for (no PING per operation): a
command that no shared rule matches costs nothing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..policy.ratelimit import Limit, Verdict

__all__ = [
    "OPS",
    "Limit",
    "SharedState",
    "StateError",
    "StateHealth",
    "Verdict",
]

Clock = Callable[[], float]

#: The operations, as ``StateError.op`` and ``popproxy_state_errors_total{op}``
#: name them ("connect": opening the client at start).
OPS = ("take", "charge", "record_failure", "count_failures", "clear_failures",
       "check_login", "acquire_lease", "renew_leases", "release_leases", "connect")


class StateError(Exception):
    """A shared-state operation failed (unreachable, timed out, bad reply).

    ``op`` is the operation (``take``, ``acquire_lease``, ...), the label of
    ``popproxy_state_errors_total{op}``; ``reason`` is safe to log: it never
    holds credentials.  The caller applies ``on_error``.
    """

    def __init__(self, op: str, reason: str) -> None:
        super().__init__(f"shared state {op}: {reason}")
        self.op = op
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StateHealth:
    """For ``/readyz``: the backend and how its calls have gone lately.

    Times are on the backend's monotonic clock.  ``degraded`` is true while
    the last call failed (or the circuit is open); it turns false with the
    next call that succeeds.
    """

    backend: str
    degraded: bool
    last_ok: float | None = None
    last_error: float | None = None
    last_error_op: str | None = None
    last_error_reason: str | None = None
    errors: int = 0


@dataclass
class HealthTracker:
    """Keeps ``StateHealth``'s fields; read from other threads as plain values."""

    backend: str
    clock: Clock = time.monotonic
    last_ok: float | None = None
    last_error: float | None = None
    last_error_op: str | None = None
    last_error_reason: str | None = None
    errors: Counter[str] = field(default_factory=Counter)

    def ok(self) -> None:
        self.last_ok = self.clock()

    def failed(self, error: StateError) -> None:
        self.errors[error.op] += 1
        self.last_error_op, self.last_error_reason = error.op, error.reason
        self.last_error = self.clock()

    @property
    def degraded(self) -> bool:
        return self.last_error is not None and (
            self.last_ok is None or self.last_error >= self.last_ok)

    def snapshot(self, degraded: bool | None = None) -> StateHealth:
        return StateHealth(
            self.backend,
            self.degraded if degraded is None else degraded,
            self.last_ok,
            self.last_error,
            self.last_error_op,
            self.last_error_reason,
            sum(self.errors.values()),
        )


class SharedState(Protocol):
    """The calls the policy side makes; ``MemoryState`` and ``RedisState``.

    Every method is one round trip to the backend at most, and none at all
    when given nothing to do (an empty sequence).  ``calls`` counts the
    round trips by operation name (for "Redis calls per session").
    """

    calls: Counter[str]

    async def take(
        self, items: Sequence[tuple[Limit, float]], *, force: bool = False
    ) -> Verdict:
        """Take each ``cost`` from its limit if every limit admits it.

        A cost of 0 asks only that the limit is not overdrawn (octet budgets
        before a RETR).  A cost above the burst is admitted on a full bucket
        and overdraws it, as ``Bucket`` does.  ``force`` charges every cost
        whatever the answer (monitor mode: counted as if allowed).
        """
        ...

    async def charge(self, items: Sequence[tuple[Limit, float]]) -> None:
        """Charge costs whether or not the limits admit them (octets after a
        reply, by its real size); may overdraw."""
        ...

    async def record_failure(
        self, keys: Sequence[str], window: float, keep: int
    ) -> tuple[int, ...]:
        """Add a failure now under each key; return each key's failures within
        the last ``window`` seconds, counting this one.  At most the newest
        ``keep`` are kept per key (the threshold: more are never needed)."""
        ...

    async def count_failures(self, keys: Sequence[str], window: float) -> tuple[int, ...]:
        """Each key's failures within the last ``window`` seconds."""
        ...

    async def clear_failures(self, keys: Sequence[str]) -> None:
        """Forget the keys' failures (a successful login)."""
        ...

    async def check_login(
        self, keys: Sequence[str], window: float, limits: Sequence[int],
        cap: str, session: str, cap_limit: int, ttl: float,
    ) -> tuple[tuple[int, ...], bool]:
        """A login, in one call: each key's failures within ``window``
        (``count_failures``), and, unless a count has reached its ``limits``
        entry, a lease of ``cap`` for ``session`` (``acquire_lease``).
        Returns the counts and whether the lease was taken."""
        ...

    async def acquire_lease(self, cap: str, session: str, limit: int, ttl: float) -> bool:
        """Take one of ``limit`` slots of ``cap`` for ``session`` for ``ttl``
        seconds; False when all are held by unexpired leases of other
        sessions.  A session that holds one already keeps it (renewed)."""
        ...

    async def renew_leases(
        self, caps: Sequence[str], session: str, ttl: float
    ) -> tuple[bool, ...]:
        """Extend ``session``'s leases to ``ttl`` from now; per cap, False if
        the lease was gone (expired meanwhile): it is not taken again."""
        ...

    async def release_leases(self, caps: Sequence[str], session: str) -> None:
        """Give ``session``'s slots back (idempotent)."""
        ...

    async def release_many(self, leases: Sequence[tuple[str, str]]) -> None:
        """Give back several sessions' slots at once: (cap, session) pairs
        (counted as ``release_leases``)."""
        ...

    def health(self) -> StateHealth:
        """For ``/readyz``: degraded or not, last success and error."""
        ...
