"""The demo server's mail: messages, mailboxes, and a store that locks them.

Sans-IO (no networking, no trio, no clock); the sample mail ships in
``popproxy/demo/mail/``.  :mod:`popproxy.demo.mailbox` serves it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from types import MappingProxyType
from typing import Final

__all__ = ["DEMO_USERS", "MailStore", "Mailbox", "Message", "normalize_crlf"]

#: The demo users and their passwords (printed by ``popproxy demo``).
DEMO_USERS: Final[Mapping[str, str]] = MappingProxyType(
    {"alice": "wonderland", "bob": "builder", "archive": "archive"}
)

_CRLF: Final = b"\r\n"
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
