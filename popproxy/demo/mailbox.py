"""Sans-IO core of the built-in demo POP3 mailbox server.

This module contains no networking code, no trio and no clock:
:class:`DemoSession`, an honest RFC 1939 server state machine that turns one
command line into reply bytes, serving the mail of :mod:`popproxy.demo.store`.
The trio shell lives in :mod:`popproxy.demo.server`.

Protocol references: RFC 1939 (POP3), RFC 1225 (LAST), RFC 2449 (CAPA,
RESP-CODES, PIPELINING), RFC 3206 (response codes), RFC 5034 (AUTH),
RFC 4616 (SASL PLAIN).
"""

from __future__ import annotations

import base64
import binascii
import enum
import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from ..pop3 import stuff
from .store import MailStore, Message

__all__ = [
    "CAPABILITIES",
    "IMPLEMENTATION",
    "LINE_LIMIT",
    "SASL_LINE_LIMIT",
    "DemoSession",
    "DemoState",
]

#: Name used in the greeting, the APOP timestamp and CAPA IMPLEMENTATION.
IMPLEMENTATION: Final = "popproxy-demo"

#: Longest accepted command line, in octets *including* the CRLF (RFC 2449
#: section 4 counts the CRLF too; DESIGN.md sets the default to 1 KiB).
LINE_LIMIT: Final = 1024

#: Longest accepted SASL response line during an AUTH exchange.
SASL_LINE_LIMIT: Final = 16 * 1024

#: The CAPA list, identical before and after login.
CAPABILITIES: Final[tuple[str, ...]] = (
    "TOP",
    "USER",
    "UIDL",
    "PIPELINING",
    "RESP-CODES",
    "AUTH-RESP-CODE",
    "SASL PLAIN",
    f"IMPLEMENTATION {IMPLEMENTATION}",
)

_SASL_MECHANISMS: Final[tuple[str, ...]] = ("PLAIN",)
_CRLF: Final = b"\r\n"
# Per-process counter for APOP timestamps: <pid.counter@popproxy-demo>.
_timestamp_counter = itertools.count(1)


class DemoState(enum.Enum):
    """RFC 1939 session states."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


_AUTH: Final = frozenset({DemoState.AUTHORIZATION})
_TRANS: Final = frozenset({DemoState.TRANSACTION})
_BOTH: Final = _AUTH | _TRANS

Reply = tuple[bytes, bool]


def _ok(text: str = "") -> bytes:
    return b"+OK" + (b" " + text.encode() if text else b"") + _CRLF


def _err(text: str) -> bytes:
    return b"-ERR " + text.encode() + _CRLF


def _multiline(text: str, body: bytes) -> bytes:
    """``+OK text``, the stuffed *body* (CRLF-terminated lines) and ``.CRLF``."""
    return _ok(text) + stuff(body)


def _parse_number(arg: str) -> int | None:
    """A non-negative decimal number, or None (no signs, no non-ASCII digits)."""
    if not (arg.isascii() and arg.isdigit()):
        return None
    return int(arg)


def _top(data: bytes, lines: int) -> bytes:
    """Headers, the blank line, and the first *lines* body lines of *data*."""
    if data.startswith(_CRLF):  # empty header section
        split = 2
    else:
        end = data.find(b"\r\n\r\n")
        if end < 0:  # no blank line: everything is header
            return data
        split = end + 4
    head, body = data[:split], data[split:]
    if lines == 0 or not body:
        return head
    body_lines = body.split(_CRLF)[:-1]  # body ends with CRLF: last item is b""
    return head + b"".join(line + _CRLF for line in body_lines[:lines])


@dataclass(frozen=True)
class _Spec:
    """How a command is dispatched: legal states, arity and handler."""

    states: frozenset[DemoState]
    min_args: int
    max_args: int
    handler: Callable[[DemoSession, tuple[str, ...]], Reply]
    raw_argument: bool = False  # PASS: the whole rest of the line is one argument


class DemoSession:
    """One POP3 server session, sans-IO: command lines in, reply bytes out.

    Usage: send :meth:`greeting`, then for each line the client sends call
    :meth:`handle_line` and write the reply; close the connection when its
    flag is true. Call :meth:`close` when the connection ends, however it
    ends: it releases the maildrop lock and discards deletion marks unless
    QUIT already committed them.

    Args:
        store: the mailboxes.
        timestamp: the APOP timestamp (for tests); by default
            ``<pid.counter@popproxy-demo>``.
    """

    def __init__(self, store: MailStore, *, timestamp: str | None = None) -> None:
        self._store = store
        self._timestamp = (
            timestamp
            if timestamp is not None
            else f"<{os.getpid()}.{next(_timestamp_counter)}@{IMPLEMENTATION}>"
        )
        self._state = DemoState.AUTHORIZATION
        self._finished = False
        self._pending_user: str | None = None
        self._user: str | None = None
        self._messages: tuple[Message, ...] = ()
        self._deleted: set[int] = set()
        self._last = 0
        self._in_sasl = False  # an AUTH PLAIN exchange awaits the client's response

    # -- public surface -----------------------------------------------------

    @property
    def state(self) -> DemoState:
        """The RFC 1939 state."""
        return self._state

    @property
    def user(self) -> str | None:
        """The logged-in user, once authenticated."""
        return self._user

    @property
    def timestamp(self) -> str:
        """The APOP timestamp announced in the greeting, angle brackets included."""
        return self._timestamp

    @property
    def finished(self) -> bool:
        """True after QUIT or :meth:`close`; further lines are refused."""
        return self._finished

    @property
    def deleted(self) -> frozenset[int]:
        """Message numbers currently marked deleted."""
        return frozenset(self._deleted)

    @property
    def max_line_length(self) -> int:
        """The line limit for the next line, in octets including CRLF."""
        return SASL_LINE_LIMIT if self._in_sasl else LINE_LIMIT

    def greeting(self) -> bytes:
        """The server greeting, with the APOP timestamp."""
        return _ok(f"{IMPLEMENTATION} POP3 server ready {self._timestamp}")

    def handle_line(self, line: bytes) -> Reply:
        """Process one client line (with or without its CRLF or LF).

        Returns:
            The reply bytes, and True if the connection should be closed
            after sending them.
        """
        if self._finished:
            return _err("session is over"), True
        if line.endswith(_CRLF):
            line = line[:-2]
        elif line.endswith(b"\n"):
            line = line[:-1]
        limit = self.max_line_length
        in_sasl, self._in_sasl = self._in_sasl, False
        if len(line) + 2 > limit:
            what = "[AUTH] SASL response" if in_sasl else "line"
            return _err(f"{what} too long (limit {limit} octets)"), False
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return _err("[AUTH] invalid UTF-8" if in_sasl else "invalid UTF-8 in command"), False
        if "\0" in text or "\r" in text or "\n" in text:
            return _err("NUL, CR or LF inside a line"), False
        if in_sasl:
            return self._sasl_response(text)
        verb, _, rest = text.partition(" ")
        verb = verb.upper()
        spec = _COMMANDS.get(verb)
        if spec is None:
            return _err("unknown command"), False
        if self._state not in spec.states:
            when = "before login" if self._state is DemoState.AUTHORIZATION else "after login"
            return _err(f"{verb} is not allowed {when}"), False
        if spec.raw_argument:
            args: tuple[str, ...] = (rest,) if rest else ()
        else:
            args = tuple(a for a in rest.split(" ") if a)
        if not spec.min_args <= len(args) <= spec.max_args:
            return _err(f"wrong number of arguments for {verb}"), False
        return spec.handler(self, args)

    def close(self) -> None:
        """End the session without UPDATE: drop deletion marks, release the lock.

        Idempotent. After a QUIT in TRANSACTION the deletions were already
        applied and the lock released; this changes nothing then.
        """
        if self._state is DemoState.TRANSACTION and self._user is not None:
            self._deleted.clear()
            self._store.unlock(self._user)
        self._in_sasl = False
        self._finished = True

    # -- helpers ------------------------------------------------------------

    def _visible(self) -> list[tuple[int, Message]]:
        return [(n, m) for n, m in enumerate(self._messages, 1) if n not in self._deleted]

    def _maildrop_text(self) -> str:
        visible = self._visible()
        octets = sum(m.size for _, m in visible)
        return f"maildrop has {len(visible)} messages ({octets} octets)"

    def _lookup(self, arg: str) -> tuple[int, Message] | bytes:
        """The message numbered *arg*, or the -ERR reply to send."""
        number = _parse_number(arg)
        if number is None:
            return _err(f"invalid message number {arg!r}")
        if not 1 <= number <= len(self._messages):
            return _err(f"no such message, only {len(self._messages)} in maildrop")
        if number in self._deleted:
            return _err(f"message {number} already deleted")
        return number, self._messages[number - 1]

    def _login(self, user: str) -> bytes:
        """Enter TRANSACTION as *user* (already authenticated) if the lock is free."""
        if not self._store.lock(user):
            return _err("[IN-USE] mailbox is locked by another POP3 session")
        self._user = user
        self._messages = tuple(self._store[user].messages)
        self._deleted = set()
        self._last = 0
        self._state = DemoState.TRANSACTION
        return _ok(f"{user}'s {self._maildrop_text()}")

    # -- AUTHORIZATION ------------------------------------------------------

    def _cmd_user(self, args: tuple[str, ...]) -> Reply:
        # Same answer for every name: no user enumeration.
        self._pending_user = args[0]
        return _ok("send PASS"), False

    def _cmd_pass(self, args: tuple[str, ...]) -> Reply:
        user, self._pending_user = self._pending_user, None
        if user is None:
            return _err("USER first"), False
        if not self._store.check_password(user, args[0]):
            return _err("[AUTH] invalid user name or password"), False
        return self._login(user), False

    def _cmd_apop(self, args: tuple[str, ...]) -> Reply:
        self._pending_user = None
        user, digest = args
        if not self._store.check_apop(user, self._timestamp, digest):
            return _err("[AUTH] invalid user name or digest"), False
        return self._login(user), False

    def _cmd_auth(self, args: tuple[str, ...]) -> Reply:
        self._pending_user = None
        if not args:  # Old-style mechanism discovery (not in RFC 5034, but universal).
            body = b"".join(m.encode() + _CRLF for m in _SASL_MECHANISMS)
            return _multiline("supported SASL mechanisms", body), False
        mechanism = args[0].upper()
        if mechanism not in _SASL_MECHANISMS:
            return _err(f"unsupported SASL mechanism {mechanism}"), False
        if len(args) == 1:
            self._in_sasl = True
            return b"+ " + _CRLF, False  # PLAIN has an empty initial challenge
        return self._sasl_response(args[1])

    def _sasl_response(self, response: str) -> Reply:
        """Check a SASL PLAIN response (RFC 4616): authzid NUL authcid NUL passwd."""
        if response == "*":
            return _err("AUTH cancelled"), False
        if response == "=":  # RFC 5034: "=" is an empty initial response
            response = ""
        try:
            decoded = base64.b64decode(response.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return _err("[AUTH] invalid base64"), False
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return _err("[AUTH] malformed PLAIN response"), False
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            return _err("[AUTH] malformed PLAIN response"), False
        if authzid not in ("", authcid) or not self._store.check_password(authcid, password):
            return _err("[AUTH] authentication failed"), False
        return self._login(authcid), False

    # -- both states --------------------------------------------------------

    def _cmd_capa(self, args: tuple[str, ...]) -> Reply:
        body = b"".join(c.encode() + _CRLF for c in CAPABILITIES)
        return _multiline("capability list follows", body), False

    def _cmd_quit(self, args: tuple[str, ...]) -> Reply:
        if self._state is DemoState.AUTHORIZATION:
            self._finished = True
            return _ok(f"{IMPLEMENTATION} signing off"), True
        # RFC 1939 section 6: the UPDATE state is entered only from QUIT in
        # TRANSACTION, and only then are marked messages removed.
        if self._user is None:  # pragma: no cover - invariant of TRANSACTION
            raise RuntimeError("TRANSACTION state without a user")
        self._state = DemoState.UPDATE
        uids = {self._messages[n - 1].uid for n in self._deleted}
        removed = self._store.expunge(self._user, uids)
        self._store.unlock(self._user)
        self._finished = True
        return _ok(f"{IMPLEMENTATION} signing off ({removed} messages deleted)"), True

    # -- TRANSACTION --------------------------------------------------------

    def _cmd_stat(self, args: tuple[str, ...]) -> Reply:
        visible = self._visible()
        return _ok(f"{len(visible)} {sum(m.size for _, m in visible)}"), False

    def _cmd_list(self, args: tuple[str, ...]) -> Reply:
        if args:
            found = self._lookup(args[0])
            if isinstance(found, bytes):
                return found, False
            return _ok(f"{found[0]} {found[1].size}"), False
        body = b"".join(f"{n} {m.size}".encode() + _CRLF for n, m in self._visible())
        return _multiline(self._maildrop_text(), body), False

    def _cmd_uidl(self, args: tuple[str, ...]) -> Reply:
        if args:
            found = self._lookup(args[0])
            if isinstance(found, bytes):
                return found, False
            return _ok(f"{found[0]} {found[1].uid}"), False
        body = b"".join(f"{n} {m.uid}".encode() + _CRLF for n, m in self._visible())
        return _multiline("unique-id listing follows", body), False

    def _cmd_retr(self, args: tuple[str, ...]) -> Reply:
        found = self._lookup(args[0])
        if isinstance(found, bytes):
            return found, False
        number, message = found
        # RFC 1225: RETR raises the "highest number accessed".
        self._last = max(self._last, number)
        return _multiline(f"{message.size} octets", message.data), False

    def _cmd_top(self, args: tuple[str, ...]) -> Reply:
        found = self._lookup(args[0])
        if isinstance(found, bytes):
            return found, False
        lines = _parse_number(args[1])
        if lines is None:
            return _err(f"invalid line count {args[1]!r}"), False
        # RFC 1225 does not count TOP as an access for LAST.
        return _multiline("top of message follows", _top(found[1].data, lines)), False

    def _cmd_dele(self, args: tuple[str, ...]) -> Reply:
        found = self._lookup(args[0])
        if isinstance(found, bytes):
            return found, False
        number = found[0]
        self._deleted.add(number)
        # RFC 1225: DELE raises the "highest number accessed" too.
        self._last = max(self._last, number)
        return _ok(f"message {number} deleted"), False

    def _cmd_noop(self, args: tuple[str, ...]) -> Reply:
        return _ok(), False

    def _cmd_rset(self, args: tuple[str, ...]) -> Reply:
        # RFC 1225: RSET also resets the highest number accessed to its value
        # at the start of the session (always 0 here: no state is persisted).
        self._deleted.clear()
        self._last = 0
        return _ok(self._maildrop_text()), False

    def _cmd_last(self, args: tuple[str, ...]) -> Reply:
        return _ok(str(self._last)), False


_COMMANDS: Final[Mapping[str, _Spec]] = MappingProxyType(
    {
        "USER": _Spec(_AUTH, 1, 1, DemoSession._cmd_user),
        "PASS": _Spec(_AUTH, 1, 1, DemoSession._cmd_pass, raw_argument=True),
        "APOP": _Spec(_AUTH, 2, 2, DemoSession._cmd_apop),
        "AUTH": _Spec(_AUTH, 0, 2, DemoSession._cmd_auth),
        "CAPA": _Spec(_BOTH, 0, 0, DemoSession._cmd_capa),
        "QUIT": _Spec(_BOTH, 0, 0, DemoSession._cmd_quit),
        "STAT": _Spec(_TRANS, 0, 0, DemoSession._cmd_stat),
        "LIST": _Spec(_TRANS, 0, 1, DemoSession._cmd_list),
        "UIDL": _Spec(_TRANS, 0, 1, DemoSession._cmd_uidl),
        "RETR": _Spec(_TRANS, 1, 1, DemoSession._cmd_retr),
        "TOP": _Spec(_TRANS, 2, 2, DemoSession._cmd_top),
        "DELE": _Spec(_TRANS, 1, 1, DemoSession._cmd_dele),
        "NOOP": _Spec(_TRANS, 0, 0, DemoSession._cmd_noop),
        "RSET": _Spec(_TRANS, 0, 0, DemoSession._cmd_rset),
        "LAST": _Spec(_TRANS, 0, 0, DemoSession._cmd_last),
    }
)
