"""The trio side of shared state: policy's questions put, its updates made,
each session's leases kept.

The policy engine (``policy.shared.SharedEngine``) is pure: it returns an
``Ask`` when a decision needs the shared state and an ``Effect`` when a
reply changes it.  ``StateClient`` carries them out against a
``SharedState`` backend for the relay and the server:

* ``decide(ask, session)`` puts the question and hands the answer (or the
  ``StateError``) to ``ask.then``, until a decision comes out;
* ``apply(effects)`` makes the updates, in order;
* a lease taken for a session (the per-user and per-IP caps) is recorded
  under its id, renewed by ``maintain`` every third of ``lease_time``
  while the session lives, and given back by ``release(session)`` at its
  end.  A process that dies renews nothing: its slots come back within
  ``lease_time``.

Every call is bounded by ``state.timeout`` (the backend's own bound).  A
failure is counted (``errors(op)``: ``popproxy_state_errors_total``) and
logged, at most once per ``LOG_EVERY`` seconds per operation with the
count of those not logged, and "recovered" once calls work again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import structlog
import trio

from ..policy import (
    AcquireLease,
    Ask,
    Charge,
    CheckLogin,
    ClearFailures,
    CountFailures,
    Decision,
    Effect,
    Query,
    RecordFailure,
    Take,
)
from .base import SharedState, StateError, StateHealth

__all__ = ["LOG_EVERY", "PROBE_EVERY", "RELEASE_WAIT", "StateClient"]

logger = structlog.get_logger("popproxy.state")

LOG_EVERY = 10.0  # seconds between log lines about failing calls, per operation
PROBE_EVERY = 2.0  # seconds between probes of a degraded backend
# How long an ending session's leases wait for others' to go in the same call.
RELEASE_WAIT = 0.01
# A chain of Asks longer than this is a bug in the engine, not a decision.
_MAX_ASKS = 8


def _nothing(op: str) -> None:
    return None


class _Releases:
    """Leases given back together: (cap, session) pairs, and when they are."""

    __slots__ = ("done", "leases")

    def __init__(self, leases: list[tuple[str, str]]) -> None:
        self.leases = leases
        self.done = trio.Event()


class StateClient:
    """See the module docstring.  ``clock`` is trio's (injectable for tests)."""

    def __init__(
        self,
        state: SharedState,
        *,
        lease_time: float,
        errors: Callable[[str], None] = _nothing,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.state = state
        self.lease_time = lease_time
        self._errors = errors
        self._clock = clock
        self.leases: dict[str, set[str]] = {}  # session id -> caps it holds
        self._releasing: _Releases | None = None  # the batch being gathered
        self._logged: dict[str, float] = {}  # op -> when last logged
        self._quiet: dict[str, int] = {}  # op -> failures not logged since
        self._failing = False

    def health(self) -> StateHealth:
        return self.state.health()

    # ------------------------------------------------------------ answers

    async def decide(self, ask: Ask, session: str) -> Decision:
        """What ``ask`` comes to, asking the shared state as often as it says."""
        decision: Decision | Ask = ask
        for _ in range(_MAX_ASKS):
            if not isinstance(decision, Ask):
                return decision
            answer = await self._put(decision.query, session)
            decision = decision.then(answer)
        raise RuntimeError(f"policy asked more than {_MAX_ASKS} questions for one decision")

    async def _put(self, query: Query, session: str) -> object:
        state = self.state
        try:
            if isinstance(query, Take):
                answer: object = await state.take(query.items, force=query.force)
            elif isinstance(query, CountFailures):
                answer = await state.count_failures(query.keys, query.window)
            elif isinstance(query, CheckLogin):
                answer, acquired = await state.check_login(
                    query.keys, query.window, query.limits, query.cap, session,
                    query.cap_limit, self.lease_time)
                if acquired:
                    self.leases.setdefault(session, set()).add(query.cap)
            else:
                assert isinstance(query, AcquireLease)
                if query.cap in self.leases.get(session, ()):
                    return True  # taken with the login's CheckLogin: no call
                answer = await state.acquire_lease(query.cap, session, query.limit,
                                                   self.lease_time)
                if answer:
                    self.leases.setdefault(session, set()).add(query.cap)
        except StateError as exc:
            self._failed(exc)
            return exc
        self._worked()
        return answer

    async def apply(self, effects: Sequence[Effect], session: str) -> None:
        """Make ``session``'s updates, in order; a failure is counted and
        logged, and the rest are still tried (each is bounded)."""
        state = self.state
        for effect in effects:
            try:
                if isinstance(effect, Charge):
                    await state.charge(effect.items)
                elif isinstance(effect, RecordFailure):
                    if effect.keys:
                        await state.record_failure(effect.keys, effect.window, effect.keep)
                    held = self.leases.get(session, set())
                    back = [cap for cap in effect.release if cap in held]
                    if back:
                        held.difference_update(back)
                        await state.release_leases(back, session)
                else:
                    assert isinstance(effect, ClearFailures)
                    await state.clear_failures(effect.keys)
            except StateError as exc:
                self._failed(exc)
            else:
                self._worked()

    # ------------------------------------------------------------- leases

    async def release(self, session: str) -> None:
        """The session ended: give its slots back, returning once they are
        (if the call fails they come back when the leases run out).

        Sessions that end within ``RELEASE_WAIT`` of each other share one
        call: the first waits that long, then releases every lease given
        back meanwhile; the others wait for it.
        """
        caps = self.leases.pop(session, None)
        if not caps:
            return
        batch = self._releasing
        if batch is not None:
            batch.leases += [(cap, session) for cap in sorted(caps)]
            await batch.done.wait()
            return
        batch = self._releasing = _Releases([(cap, session) for cap in sorted(caps)])
        try:
            await trio.sleep(RELEASE_WAIT)
        finally:
            self._releasing = None
            try:
                await self.state.release_many(batch.leases)
            except StateError as exc:
                self._failed(exc)
            else:
                self._worked()
            finally:
                batch.done.set()

    async def maintain(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled: every third of ``lease_time``, extend the
        leases of the sessions still alive (one call per session); and
        while the backend is degraded, probe it every ``PROBE_EVERY``
        seconds, so that ``/readyz`` sees it back even when no session
        asks anything meanwhile."""
        task_status.started()
        renew_at = self._clock() + self.lease_time / 3
        while True:
            wake = renew_at
            if self.state.health().degraded:
                wake = min(wake, self._clock() + PROBE_EVERY)
            await trio.sleep_until(wake)
            try:
                if self._clock() >= renew_at:
                    renew_at = self._clock() + self.lease_time / 3
                    await self.renew_once()
                elif self.state.health().degraded:
                    await self.probe()
            except Exception:
                # A bug here must not take the proxy down with it (this
                # task runs in app.run's nursery): say so, and go on.
                logger.exception("state.upkeep_failed")

    async def probe(self) -> None:
        check = getattr(self.state, "check", None)
        if check is not None and await check():
            self._worked()

    async def renew_once(self) -> None:
        for session, caps in list(self.leases.items()):
            if self.leases.get(session) is not caps:
                continue  # released meanwhile
            # The set may grow while the call is out (the session's login
            # takes its per-user lease): what was renewed is this list.
            names = sorted(caps)
            try:
                kept = await self.state.renew_leases(names, session, self.lease_time)
            except StateError as exc:
                self._failed(exc)
                continue
            self._worked()
            for cap, ok in zip(names, kept, strict=True):
                if not ok:
                    # Expired before it was renewed (the shared state was
                    # away longer than the lease): the slot is not taken
                    # again; the session goes on.
                    caps.discard(cap)
                    logger.warning("state.lease_lost", cap=cap.partition(":")[0])

    # ---------------------------------------------------------- failures

    def _failed(self, exc: StateError) -> None:
        self._errors(exc.op)
        self._failing = True
        now = self._clock()
        last = self._logged.get(exc.op, -math.inf)
        if now - last >= LOG_EVERY:
            logger.error("state.call_failed", op=exc.op, reason=exc.reason,
                         not_logged=self._quiet.pop(exc.op, 0))
            self._logged[exc.op] = now
        else:
            self._quiet[exc.op] = self._quiet.get(exc.op, 0) + 1

    def _worked(self) -> None:
        if self._failing:
            self._failing = False
            self._logged.clear()
            logger.warning("state.recovered", not_logged=sum(self._quiet.values()))
            self._quiet.clear()
