"""Shared state kept in this process: ``backend = "memory"``, and what
``on_error = "local"`` falls back to.

The same arithmetic as the Redis script (``state.lua``), step for step in
the same order, so that both answer alike to the last bit for the same
times (the property tests hold them to it).  The clock is injected.

Memory is bounded: each table keeps at most ``max_keys`` keys and forgets
the least recently written first.  Forgetting only ever errs towards
admitting: a forgotten limit is a full bucket, forgotten failures are none.
Leases are not forgotten while they are live (each is a session of this
process); expired ones are swept.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import TypeVar

from .base import Clock, HealthTracker, Limit, StateHealth, Verdict

__all__ = ["MemoryState"]

_V = TypeVar("_V")


class MemoryState:
    """Implements ``SharedState`` with this process's own counts."""

    def __init__(self, *, clock: Clock = time.monotonic, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self.calls: Counter[str] = Counter()
        self._tats: dict[str, float] = {}
        self._failures: dict[str, list[float]] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._sweep_at = max_keys
        self._health = HealthTracker("memory", clock)

    @staticmethod
    def _remember(table: dict[str, _V], key: str, value: _V, max_keys: int) -> None:
        """Store as the most recent entry, forgetting the oldest when full."""
        if table.pop(key, None) is None and len(table) >= max_keys:
            del table[next(iter(table))]
        table[key] = value

    # ------------------------------------------------------------- limits

    async def take(
        self, items: Sequence[tuple[Limit, float]], *, force: bool = False
    ) -> Verdict:
        if not items:
            return Verdict((), True)
        self.calls["take"] += 1
        return self._take(items, force)

    async def charge(self, items: Sequence[tuple[Limit, float]]) -> None:
        if items:
            self.calls["charge"] += 1
            self._take(items, True)

    def _take(self, items: Sequence[tuple[Limit, float]], force: bool) -> Verdict:
        now = self.clock()
        tats: list[float] = []
        waits: list[float] = []
        for limit, cost in items:
            interval, tau = limit.interval, limit.tolerance
            tat = self._tats.get(limit.key, 0.0)
            if tat < now:
                tat = now
            tats.append(tat)
            need = min(cost, tau / interval)
            over = (tat - now) + need * interval - tau
            waits.append(over if over > 1e-9 * interval else 0.0)
        charged = force or all(w == 0.0 for w in waits)
        if charged:
            for (limit, cost), tat in zip(items, tats, strict=True):
                if cost > 0:
                    self._remember(self._tats, limit.key, tat + cost * limit.interval,
                                   self.max_keys)
        self._health.ok()
        return Verdict(tuple(waits), charged)

    # ------------------------------------------------------- failed logins

    async def record_failure(
        self, keys: Sequence[str], window: float, keep: int
    ) -> tuple[int, ...]:
        if not keys:
            return ()
        self.calls["record_failure"] += 1
        now = self.clock()
        counts = []
        for key in keys:
            times = [t for t in self._failures.get(key, ()) if t > now - window]
            times.append(now)
            del times[:-keep]
            self._remember(self._failures, key, times, self.max_keys)
            counts.append(len(times))
        self._health.ok()
        return tuple(counts)

    async def count_failures(self, keys: Sequence[str], window: float) -> tuple[int, ...]:
        if not keys:
            return ()
        self.calls["count_failures"] += 1
        now = self.clock()
        self._health.ok()
        return tuple(
            sum(1 for t in self._failures.get(key, ()) if t > now - window) for key in keys
        )

    async def clear_failures(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        self.calls["clear_failures"] += 1
        for key in keys:
            self._failures.pop(key, None)
        self._health.ok()

    # -------------------------------------------------------- session caps

    async def check_login(
        self, keys: Sequence[str], window: float, limits: Sequence[int],
        cap: str, session: str, cap_limit: int, ttl: float,
    ) -> tuple[tuple[int, ...], bool]:
        self.calls["check_login"] += 1
        now = self.clock()
        counts = tuple(
            sum(1 for t in self._failures.get(key, ()) if t > now - window) for key in keys)
        acquired = False
        if all(c < limit for c, limit in zip(counts, limits, strict=True)):
            acquired = self._acquire(cap, session, cap_limit, ttl, now)
        self._health.ok()
        return counts, acquired

    def _live(self, cap: str, now: float) -> dict[str, float]:
        leases = self._leases.get(cap)
        if leases is None:
            return {}
        for session in [s for s, expiry in leases.items() if expiry <= now]:
            del leases[session]
        return leases

    async def acquire_lease(self, cap: str, session: str, limit: int, ttl: float) -> bool:
        self.calls["acquire_lease"] += 1
        self._health.ok()
        return self._acquire(cap, session, limit, ttl, self.clock())

    def _acquire(self, cap: str, session: str, limit: int, ttl: float, now: float) -> bool:
        leases = self._live(cap, now)
        if session not in leases and len(leases) >= limit:
            return False
        if not leases:
            self._sweep(now)
            leases = self._leases[cap] = {}
        leases[session] = now + ttl
        return True

    def _sweep(self, now: float) -> None:
        """Drop caps whose leases all expired, once there are many of them."""
        if len(self._leases) < self._sweep_at:
            return
        for cap in list(self._leases):
            if not self._live(cap, now):
                del self._leases[cap]
        self._sweep_at = max(self.max_keys, 2 * len(self._leases))

    async def renew_leases(
        self, caps: Sequence[str], session: str, ttl: float
    ) -> tuple[bool, ...]:
        if not caps:
            return ()
        self.calls["renew_leases"] += 1
        now = self.clock()
        held = []
        for cap in caps:
            leases = self._live(cap, now)
            if session in leases:
                leases[session] = now + ttl
            held.append(session in leases)
        self._health.ok()
        return tuple(held)

    async def release_leases(self, caps: Sequence[str], session: str) -> None:
        await self.release_many([(cap, session) for cap in caps])

    async def release_many(self, leases: Sequence[tuple[str, str]]) -> None:
        if not leases:
            return
        self.calls["release_leases"] += 1
        for cap, session in leases:
            held = self._leases.get(cap)
            if held is not None:
                held.pop(session, None)
                if not held:
                    del self._leases[cap]
        self._health.ok()

    def leases_held(self, cap: str) -> int:
        """Unexpired leases of ``cap`` (for tests and diagnostics)."""
        return len(self._live(cap, self.clock()))

    def health(self) -> StateHealth:
        return self._health.snapshot()
