"""The RFC 1939 session states and every transition between them.

As in h11's ``_state.py``: everything that moves the state machine is in
this file, as a table, and an illegal move is a bug, not a guess.  The
session asks ``transition(state, trigger)`` and ``local_reply(state,
command, ...)``; it never compares states itself to decide what is allowed.
"""

from __future__ import annotations

import enum
from typing import Final

from ._command import Command
from ._verbs import AUTH_ONLY, NEVER_FORWARDED, PRE_AUTH, starts_sasl

__all__ = ["LOGGED_IN", "STLS_OK", "State", "Trigger", "local_reply", "transition"]

#: The proxy's own answer to an STLS it accepts (RFC 2595 §4).
STLS_OK: Final = b"+OK Begin TLS negotiation\r\n"


class State(enum.Enum):
    """RFC 1939 session states, plus the wait for the greeting and the end."""

    GREETING = "greeting"
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


#: The states of a session whose client has logged in.
LOGGED_IN: Final = frozenset({State.TRANSACTION, State.UPDATE})


class Trigger(enum.Enum):
    """What moves a session from one state to the next."""

    GREETED = "greeted"  # the upstream's greeting was +OK
    LOGGED_IN = "logged in"  # USER/PASS, APOP or AUTH got +OK
    QUIT_OK = "quit ok"  # QUIT got +OK in TRANSACTION: the server removes the marks
    END = "end"  # the session ends, whatever the state


_TRANSITIONS: Final[dict[tuple[State, Trigger], State]] = {
    (State.GREETING, Trigger.GREETED): State.AUTHORIZATION,
    (State.AUTHORIZATION, Trigger.LOGGED_IN): State.TRANSACTION,
    (State.TRANSACTION, Trigger.QUIT_OK): State.UPDATE,
    **{(s, Trigger.END): State.CLOSED for s in State},
}


def transition(state: State, trigger: Trigger) -> State:
    """The state after ``trigger``; ``ValueError`` for a move the table lacks."""
    try:
        return _TRANSITIONS[state, trigger]
    except KeyError:
        raise ValueError(f"no transition from {state.value} on {trigger.value}") from None


#: PASS with no USER before it: Dovecot's words, and never forwarded (the
#: login would name nobody).
NO_USER: Final = b"-ERR No username given.\r\n"


def local_reply(
    state: State, cmd: Command, *, tls: bool, starttls: bool, require_tls_for_auth: bool,
    user_given: bool = True,
) -> bytes | None:
    """The reply the proxy gives ``cmd`` itself, before policy; None: forward it.

    STLS is always the proxy's to answer (an end-to-end TLS tunnel would
    blind policy and audit); credentials wait for TLS where the listener
    requires it (RFC 2595 §2.1); only the proxy may tell the upstream who
    the client is (XCLIENT, XOIP, PROXY); the verb must be valid in the
    state; and PASS needs a USER before it (``user_given``).
    """
    verb = cmd.verb
    if verb == "STLS":
        if tls:
            return b"-ERR already using TLS\r\n"
        if state is not State.AUTHORIZATION:
            return b"-ERR STLS is only valid before login\r\n"
        if not starttls:
            return b"-ERR STLS is not available on this port\r\n"
        return STLS_OK
    if require_tls_for_auth and not tls and (
            verb in ("USER", "PASS", "APOP") or starts_sasl(cmd)):
        return b"-ERR [AUTH] TLS is required to log in: use STLS\r\n"
    if verb in NEVER_FORWARDED:
        return b"-ERR command not allowed\r\n"
    # The verb must be valid in the state (RFC 1939 §3-§6, RFC 2449 §4), so
    # that the upstream never sees a command out of order.  In GREETING the
    # session holds dispatch back, so that state is never asked about.
    if state is State.TRANSACTION:
        if verb in AUTH_ONLY:
            return f"-ERR {verb} is not valid after login\r\n".encode()
        return None
    if state is State.AUTHORIZATION:
        if verb not in PRE_AUTH:
            return f"-ERR {verb} is not valid before login\r\n".encode()
        if verb == "PASS" and not user_given:
            return NO_USER
        return None
    return b"-ERR session is ending\r\n"
