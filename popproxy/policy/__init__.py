"""Policy: pure decisions of (session facts, command, clock) -> verdict.

The session asks ``decide`` before a command goes upstream.  A ``Deny`` is
answered locally and keeps its place in the pipelining order; a ``Delay``
holds the command back until a given time.  Nothing in here does I/O or
reads a clock of its own: ``now`` is passed in (and the wall clock for
time-of-day windows is injected into the engine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..events import Event, State
from ..pop3 import Command

__all__ = [
    "ALLOW",
    "Allow",
    "AllowAll",
    "Decision",
    "Delay",
    "Deny",
    "Facts",
    "Note",
    "Policy",
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


class Policy(Protocol):
    def decide(self, facts: Facts, command: Command, now: float) -> Decision: ...

    def observe(self, facts: Facts, event: Event, now: float) -> None:
        """Hear a completed reply or login outcome (octet budgets, throttling)."""

    def admit_login(self, facts: Facts, user: str, now: float) -> Deny | None:
        """After the upstream accepted a login: may this user have one more session?"""

    def admit_size(self, facts: Facts, command: Command, octets: int) -> Deny | None:
        """A RETR reply announced its size: may it stream?"""


class AllowAll:
    """The policy when none is configured."""

    def decide(self, facts: Facts, command: Command, now: float) -> Decision:
        return ALLOW

    def observe(self, facts: Facts, event: Event, now: float) -> None:
        return None

    def admit_login(self, facts: Facts, user: str, now: float) -> Deny | None:
        return None

    def admit_size(self, facts: Facts, command: Command, octets: int) -> Deny | None:
        return None


allow_all = AllowAll()
