"""Sans-IO core of the built-in demo POP3 mailbox server.

This module contains no networking code, no trio and no clock: messages,
mailboxes, a store that locks them, and :class:`DemoSession`, an honest
RFC 1939 server state machine that turns one command line into reply bytes.
The trio shell lives in :mod:`popproxy.demo.server`.

Protocol references: RFC 1939 (POP3), RFC 1225 (LAST), RFC 2449 (CAPA,
RESP-CODES, PIPELINING), RFC 3206 (response codes), RFC 5034 (AUTH),
RFC 4616 (SASL PLAIN).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import itertools
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from types import MappingProxyType
from typing import Final

from ..pop3 import stuff

__all__ = [
    "CAPABILITIES",
    "DEMO_USERS",
    "IMPLEMENTATION",
    "LINE_LIMIT",
    "SASL_LINE_LIMIT",
    "DemoSession",
    "DemoState",
    "MailStore",
    "Mailbox",
    "Message",
    "normalize_crlf",
]

#: The demo users and their passwords (printed by ``popproxy demo``).
DEMO_USERS: Final[Mapping[str, str]] = MappingProxyType(
    {"alice": "wonderland", "bob": "builder", "archive": "archive"}
)

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
# The package holding the sample mail (``popproxy.demo``).
_PACKAGE: Final = __name__.rpartition(".")[0]


def normalize_crlf(data: bytes) -> bytes:
    """Return *data* with every line ending (CRLF, LF or CR) turned into CRLF.

    A non-empty result always ends with CRLF.
    """
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", _CRLF)
    if data and not data.endswith(_CRLF):
        data += _CRLF
    return data


def _is_crlf_text(data: bytes) -> bool:
    """True if *data* has no bare CR or LF and is empty or ends with CRLF."""
    rest = data.replace(_CRLF, b"")
    return b"\r" not in rest and b"\n" not in rest and (not data or data.endswith(_CRLF))


def _is_valid_uid(uid: str) -> bool:
    """RFC 1939 section 7: 1 to 70 characters in the range 0x21 to 0x7E."""
    return 1 <= len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid)


@dataclass(frozen=True)
class Message:
    """One message as stored: *data* uses CRLF line endings and is not stuffed.

    Raises:
        ValueError: *data* contains a bare CR or LF or does not end with CRLF,
            or *uid* is not a valid RFC 1939 unique-id.
    """

    data: bytes
    uid: str

    def __post_init__(self) -> None:
        if not _is_crlf_text(self.data):
            raise ValueError("message data must use CRLF line endings and end with CRLF")
        if not _is_valid_uid(self.uid):
            raise ValueError(f"invalid unique-id {self.uid!r}: need 1-70 chars in 0x21-0x7E")

    @classmethod
    def from_raw(cls, raw: bytes, uid: str) -> Message:
        """Build a message from bytes with any line endings (normalised to CRLF)."""
        return cls(normalize_crlf(raw), uid)

    @property
    def size(self) -> int:
        """Size in octets, as LIST and STAT report it (CRLF line endings)."""
        return len(self.data)


@dataclass
class Mailbox:
    """A user's maildrop. The password is kept in clear: this is a demo."""

    user: str
    password: str = field(repr=False)
    messages: list[Message] = field(default_factory=list)

    @property
    def octets(self) -> int:
        """Total size of all messages in octets."""
        return sum(m.size for m in self.messages)


class MailStore:
    """All demo mailboxes, plus the per-mailbox lock held during TRANSACTION.

    Not thread-safe; the trio shell uses it from one thread only.
    """

    def __init__(self, mailboxes: Iterable[Mailbox] = ()) -> None:
        self._mailboxes: dict[str, Mailbox] = {}
        self._locked: set[str] = set()
        for mailbox in mailboxes:
            self.add(mailbox)

    @classmethod
    def from_tree(cls, root: Traversable, passwords: Mapping[str, str]) -> MailStore:
        """Load ``root/<user>/*.eml`` (sorted by name; the file stem is the UIDL).

        Every user in *passwords* gets a mailbox, empty if it has no directory.

        Raises:
            ValueError: a directory has no entry in *passwords*, or a file
                name is not a valid unique-id.
        """
        found: dict[str, list[Message]] = {user: [] for user in passwords}
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            if entry.name not in passwords:
                raise ValueError(f"mailbox directory {entry.name!r} has no password")
            files = sorted(
                (f for f in entry.iterdir() if f.is_file() and f.name.endswith(".eml")),
                key=lambda f: f.name,
            )
            found[entry.name] = [
                Message.from_raw(f.read_bytes(), f.name.removesuffix(".eml")) for f in files
            ]
        return cls(Mailbox(user, passwords[user], msgs) for user, msgs in found.items())

    @classmethod
    def load_samples(cls) -> MailStore:
        """A fresh store with the sample mailboxes shipped in ``popproxy/demo/mail``."""
        return cls.from_tree(resources.files(_PACKAGE).joinpath("mail"), DEMO_USERS)

    def add(self, mailbox: Mailbox) -> None:
        """Add a mailbox.

        Raises:
            ValueError: the user exists already, or two messages share a UIDL.
        """
        if mailbox.user in self._mailboxes:
            raise ValueError(f"duplicate mailbox {mailbox.user!r}")
        uids = [m.uid for m in mailbox.messages]
        if len(set(uids)) != len(uids):
            raise ValueError(f"duplicate unique-id in mailbox {mailbox.user!r}")
        self._mailboxes[mailbox.user] = mailbox

    @property
    def users(self) -> tuple[str, ...]:
        """The user names, in insertion order."""
        return tuple(self._mailboxes)

    def __contains__(self, user: object) -> bool:
        return user in self._mailboxes

    def __getitem__(self, user: str) -> Mailbox:
        return self._mailboxes[user]

    def get(self, user: str) -> Mailbox | None:
        """The mailbox of *user*, or None."""
        return self._mailboxes.get(user)

    def check_password(self, user: str, password: str) -> bool:
        """True if *user* exists and *password* is right (constant-time compare)."""
        mailbox = self._mailboxes.get(user)
        if mailbox is None:
            return False
        return hmac.compare_digest(mailbox.password.encode(), password.encode())

    def check_apop(self, user: str, timestamp: str, digest: str) -> bool:
        """True if *digest* is the hex MD5 of *timestamp* + the user's password."""
        mailbox = self._mailboxes.get(user)
        if mailbox is None:
            return False
        expected = hashlib.md5((timestamp + mailbox.password).encode()).hexdigest()
        return hmac.compare_digest(expected.encode(), digest.lower().encode())

    def is_locked(self, user: str) -> bool:
        """True while a session of *user* is in TRANSACTION."""
        return user in self._locked

    def lock(self, user: str) -> bool:
        """Take the maildrop lock; False if the mailbox is missing or locked."""
        if user not in self._mailboxes or user in self._locked:
            return False
        self._locked.add(user)
        return True

    def unlock(self, user: str) -> None:
        """Release the maildrop lock (no-op if not held)."""
        self._locked.discard(user)

    def expunge(self, user: str, uids: Collection[str]) -> int:
        """Remove the messages with these UIDLs; return how many were removed."""
        mailbox = self._mailboxes[user]
        kept = [m for m in mailbox.messages if m.uid not in uids]
        removed = len(mailbox.messages) - len(kept)
        mailbox.messages = kept
        return removed


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
