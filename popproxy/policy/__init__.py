"""Policy: pure decisions of (session facts, command, clock) -> verdict.

The session asks ``decide`` before a command goes upstream.  A ``Deny`` is
answered locally and keeps its place in the pipelining order; a ``Delay``
holds the command back until a given time; an ``Ask`` (only with shared
state, ``[state] backend = "redis"``) holds it until the trio shell has put
the ``Ask``'s question to the shared state and handed the answer to
``Ask.then``, which decides.  ``observe`` may return an ``Effect``: shared
state to update, with no answer awaited.  Nothing in here does I/O or
reads a clock of its own: ``now`` is passed in (and the wall clock for
time-of-day windows is injected into the engine).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..events import Event, State
from ..pop3 import Command
from .ratelimit import Limit

__all__ = [
    "ALLOW",
    "AcquireLease",
    "Allow",
    "AllowAll",
    "Ask",
    "Charge",
    "CheckLogin",
    "ClearFailures",
    "CountFailures",
    "Decision",
    "Delay",
    "Deny",
    "Effect",
    "Facts",
    "Note",
    "Policy",
    "Query",
    "RecordFailure",
    "Take",
    "allow_all",
]


@dataclass(frozen=True, slots=True)
class Facts:
    """What policy may know about a session when it judges a command."""

    state: State
    user: str | None  # authenticated user
    client: str | None = None  # "address:port"
    tls: bool = False
    client_ip: str | None = None
    login_user: str | None = None  # asserted by USER/APOP, before it is proven
    sizes: Mapping[int, int] = field(default_factory=dict)  # from LIST replies


@dataclass(frozen=True, slots=True)
class Note:
    """A rule that matched, for the record (``policy.decision`` events)."""

    rule: str
    action: str
    enforced: bool


@dataclass(frozen=True, slots=True)
class Allow:
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True, slots=True)
class Deny:
    """Refuse: ``reply`` is the full ``-ERR ...\\r\\n`` line, sent after ``delay``."""

    reply: bytes
    rule: str | None = None
    delay: float = 0.0
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True, slots=True)
class Delay:
    """Hold the command back and ask again at ``until``."""

    until: float
    rule: str
    notes: tuple[Note, ...] = ()


Decision = Allow | Deny | Delay
ALLOW = Allow()


# Questions for the shared state (``popproxy.state.SharedState``), each one
# round trip; the shell adds the session's id where one is needed.

@dataclass(frozen=True, slots=True)
class Take:
    """Take each cost from its limit if all admit (``force``: whatever they say)."""

    items: tuple[tuple[Limit, float], ...]
    force: bool = False


@dataclass(frozen=True, slots=True)
class CountFailures:
    keys: tuple[str, ...]
    window: float


@dataclass(frozen=True, slots=True)
class AcquireLease:
    """One of ``limit`` slots of ``cap`` for this session."""

    cap: str
    limit: int


@dataclass(frozen=True, slots=True)
class CheckLogin:
    """A login's failures (``CountFailures``) and, unless a count has
    reached its entry of ``limits``, a lease of ``cap`` taken for the
    session already, in one round trip: the answer is the counts.  The
    lease serves the ``AcquireLease`` asked when the upstream accepts the
    login; a login that fails gives it back (``RecordFailure.release``)."""

    keys: tuple[str, ...]
    window: float
    limits: tuple[int, ...]
    cap: str
    cap_limit: int


Query = Take | CountFailures | AcquireLease | CheckLogin


@dataclass(frozen=True, slots=True)
class Ask:
    """A decision that needs the shared state: put ``query``, hand the answer
    (or the ``StateError``) to ``then``, which decides (or asks again)."""

    query: Query
    then: Callable[[object], Decision | Ask]


# Updates of the shared state that need no answer (after a reply).

@dataclass(frozen=True, slots=True)
class Charge:
    items: tuple[tuple[Limit, float], ...]


@dataclass(frozen=True, slots=True)
class RecordFailure:
    """A failed login: count it under ``keys`` (none: a failure that is not
    a guess), and give back the session's ``release`` caps (taken by a
    ``CheckLogin``) if it holds them."""

    keys: tuple[str, ...]
    window: float
    keep: int
    release: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClearFailures:
    keys: tuple[str, ...]


Effect = Charge | RecordFailure | ClearFailures


class Policy(Protocol):
    def decide(self, facts: Facts, command: Command, now: float) -> Decision | Ask: ...

    def observe(self, facts: Facts, event: Event, now: float) -> Effect | None:
        """Hear a completed reply or login outcome (octet budgets, throttling)."""

    def admit_login(self, facts: Facts, user: str, now: float) -> Deny | Ask | None:
        """After the upstream accepted a login: may this user have one more session?
        (An ``Ask``'s ``then`` answers with ``ALLOW`` or a ``Deny``.)"""

    def admit_size(self, facts: Facts, command: Command, octets: int) -> Deny | None:
        """A RETR reply announced its size: may it stream?"""


class AllowAll:
    """The policy when none is configured."""

    def decide(self, facts: Facts, command: Command, now: float) -> Decision:
        return ALLOW

    def observe(self, facts: Facts, event: Event, now: float) -> Effect | None:
        return None

    def admit_login(self, facts: Facts, user: str, now: float) -> Deny | Ask | None:
        return None

    def admit_size(self, facts: Facts, command: Command, octets: int) -> Deny | None:
        return None


allow_all = AllowAll()
