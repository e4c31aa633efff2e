"""Token buckets on an injected clock (``now`` in seconds, monotonic)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Bucket", "BucketTable", "Limit", "Rate", "Verdict"]


@dataclass(frozen=True, slots=True)
class Rate:
    """``amount`` units (commands or octets) per ``period`` seconds."""

    amount: float
    period: float
    octets: bool = False  # counts octets retrieved rather than commands

    @property
    def per_second(self) -> float:
        return self.amount / self.period


@dataclass(frozen=True, slots=True)
class Limit:
    """One budget: rule ``rule``'s limit for one ``subject`` (user, address, "*").

    ``burst`` is the bucket's capacity in units (commands or octets); the
    policy's ``Rule.capacity``.  Two Limits with the same rule and subject
    share one budget, whichever process asks.
    """

    rule: str
    subject: str
    rate: Rate
    burst: float

    def __post_init__(self) -> None:
        if "/" in self.rule:
            raise ValueError(f"a rule name for shared state has no '/': {self.rule!r}")
        if not (self.rate.amount > 0 and self.rate.period > 0 and self.burst > 0):
            raise ValueError("rate and burst must be greater than zero")

    @property
    def interval(self) -> float:
        """Seconds per unit (GCRA's emission interval)."""
        return self.rate.period / self.rate.amount

    @property
    def tolerance(self) -> float:
        """How far ahead of now the arrival time may run: the burst, in seconds."""
        return self.burst * self.interval

    @property
    def key(self) -> str:
        """The key within the backend (before the prefix); unambiguous since
        rule names have no ``/``."""
        return f"rl:{self.rule}/{self.subject}"



@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to ``take``: per limit, in the order asked, the seconds to
    wait before it would admit (0.0: it admits now); ``charged`` says whether
    the costs were taken (only when all admit, or when forced)."""

    waits: tuple[float, ...]
    charged: bool

    @property
    def allowed(self) -> bool:
        return all(w == 0.0 for w in self.waits)

    @property
    def retry_after(self) -> float:
        """The longest wait (0.0 when allowed)."""
        return max(self.waits, default=0.0)


class Bucket:
    """A token bucket holding at most ``capacity`` tokens.

    Commands take one token before they run.  Octet budgets are charged
    after the reply, by its real size, so a bucket may go negative; while it
    is negative nothing more is allowed.
    """

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def wait_time(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available (0: available now).

        Refills first, so ``spend`` may follow at the same ``now``.
        """
        if now > self.updated:  # _refill, inlined: this runs for every command
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        need = min(cost, self.capacity) if cost > 0 else 0.0
        # The epsilon absorbs float error: a refill computed to land exactly
        # on a token must not come out a hair short.
        if self.tokens + 1e-9 >= need and self.tokens > -1e-9:
            return 0.0
        return (need - self.tokens) / self.rate if self.rate > 0 else float("inf")

    def take(self, now: float, cost: float = 1.0) -> None:
        self._refill(now)
        self.tokens -= cost

    def spend(self, cost: float = 1.0) -> None:
        """Take tokens right after ``wait_time`` said they are there."""
        self.tokens -= cost


class BucketTable:
    """Buckets by key, bounded: the oldest are forgotten first.

    Forgetting a bucket only ever gives a client a fresh, full bucket, so
    the bound protects memory without ever denying wrongly.  The lookup is
    a plain dict get: it runs for every matching rule of every command.
    """

    __slots__ = ("_buckets", "max_keys")

    def __init__(self, max_keys: int = 100_000) -> None:
        self._buckets: dict[str, Bucket] = {}
        self.max_keys = max_keys

    def get(self, key: str, rate: Rate, capacity: float, now: float) -> Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]  # the oldest
            bucket = self._buckets[key] = Bucket(rate.per_second, capacity, now)
        return bucket

    def retune(self, rate: Rate, capacity: float) -> None:
        """A reload changed the rule's limit: existing buckets follow it."""
        for bucket in self._buckets.values():
            bucket.rate = rate.per_second
            bucket.capacity = capacity
            bucket.tokens = min(bucket.tokens, capacity)

    def __len__(self) -> int:
        return len(self._buckets)
