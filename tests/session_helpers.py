"""Helpers shared by the sans-IO session tests (no sockets, no trio).

A greeted or logged-in ``Session``, event filters, and stand-in policies.
"""

from __future__ import annotations

from typing import TypeVar

from popproxy.events import AuthResult, Event, State
from popproxy.policy import ALLOW, AllowAll, Decision, Deny, Facts, Note
from popproxy.pop3 import Command
from popproxy.session import Session

__all__ = ["GREETING", "DenyVerb", "fresh", "logged_in", "of", "stuffed"]

GREETING = b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"
E = TypeVar("E", bound=Event)


def fresh(**kwargs: object) -> Session:
    """A session that has seen the greeting (AUTHORIZATION state)."""
    s = Session(**kwargs)  # type: ignore[arg-type]
    out = s.receive_upstream(GREETING, 0)
    assert out.to_client == GREETING
    assert s.state is State.AUTHORIZATION
    return s


def logged_in(**kwargs: object) -> Session:
    """A session logged in as bob with USER/PASS (TRANSACTION state)."""
    s = fresh(**kwargs)
    out = s.receive_client(b"USER bob\r\nPASS secret pw\r\n", 0)
    assert out.to_upstream == b"USER bob\r\nPASS secret pw\r\n"
    s.receive_upstream(b"+OK\r\n", 0)
    out = s.receive_upstream(b"+OK maildrop ready\r\n", 0)
    assert s.state is State.TRANSACTION
    assert AuthResult("USER", "bob", True, None) in out.events
    return s


def of(events: list[Event], kind: type[E]) -> list[E]:
    """The events of one type, in order."""
    return [e for e in events if isinstance(e, kind)]


def stuffed(message: bytes) -> bytes:
    """A CRLF message dot-stuffed and terminated, as a server sends it."""
    return b"".join(b"." + ln if ln.startswith(b".") else ln
                    for ln in message.splitlines(keepends=True)) + b".\r\n"


class DenyVerb(AllowAll):
    """A policy that refuses one verb with ``reply``, as a deny rule would.

    With ``note``, the refusal carries its ``PolicyDecision`` note.
    """

    def __init__(self, verb: str, reply: bytes, rule: str = "ro", *, note: bool = False) -> None:
        self.verb = verb
        self.reply = reply
        self.rule = rule
        self.notes = (Note(rule, "deny", True),) if note else ()

    def decide(self, facts: Facts, command: Command, now: float) -> Decision:
        if command.verb == self.verb:
            return Deny(self.reply, rule=self.rule, notes=self.notes)
        return ALLOW
