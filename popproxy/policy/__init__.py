"""Policy: pure decisions of (session facts, command, clock) -> verdict.

The session asks ``decide`` before a command goes upstream.  A ``Deny`` is
answered locally and keeps its place in the pipelining order.  Nothing in
here does I/O or reads the clock: ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..events import State
from ..pop3 import Command

__all__ = ["ALLOW", "Allow", "Decision", "Deny", "Facts", "Policy", "allow_all"]


@dataclass(frozen=True, slots=True)
class Facts:
    """What policy may know about a session when it judges a command."""

    state: State
    user: str | None
    client: str | None = None
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Allow:
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class Deny:
    """Refuse the command; ``reply`` is the full ``-ERR ...\\r\\n`` line."""

    reply: bytes
    rule: str | None = None


Decision = Allow | Deny
Policy = Callable[[Facts, Command, float], Decision]
ALLOW = Allow()


def allow_all(facts: Facts, command: Command, now: float) -> Decision:
    """The policy when none is configured."""
    return ALLOW
