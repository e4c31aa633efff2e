"""What the proxy reads out of multi-line bodies as they stream past.

A message (RETR/TOP): its octets, SHA-256 and header section; a listing
(LIST/UIDL): the ``n token`` lines; CAPA: rewritten to tell the truth
about the proxy.  The header section is parsed here and nowhere else.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Final

__all__ = [
    "HEADER_OCTETS",
    "Listing",
    "MessageFacts",
    "header_values",
    "listing_line",
    "rewrite_capa",
]

#: How much of a message's start is kept to read its header section.
HEADER_OCTETS: Final = 65536
#: Longest header value reported (the rest is cut, with "...").
VALUE_LIMIT: Final = 1024
_UNFOLD = re.compile(rb"\r?\n[ \t]+")


class MessageFacts:
    """The sink of a RETR/TOP body: hashes and counts every unstuffed piece
    and keeps the header section (at most ``HEADER_OCTETS``)."""

    __slots__ = ("_done", "head", "octets", "sha")

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.octets = 0
        self.head = bytearray()
        self._done = False

    def add(self, piece: memoryview) -> None:
        self.sha.update(piece)
        self.octets += len(piece)
        if not self._done:
            head = self.head
            seen = len(head)
            head += piece[: HEADER_OCTETS - seen]
            if head.startswith(b"\r\n"):
                del head[2:]  # no header section at all
                self._done = True
            else:
                end = head.find(b"\r\n\r\n", max(0, seen - 3))
                if end >= 0:
                    del head[end + 4:]
                    self._done = True
                elif len(head) >= HEADER_OCTETS:
                    self._done = True

    @property
    def headers(self) -> bytes:
        """The header section as delivered, blank line included when seen."""
        return bytes(self.head)


def _section(block: bytes) -> bytes:
    """The header section of a message's start: up to its blank line."""
    if block.startswith(b"\r\n"):
        return b""
    end = block.find(b"\r\n\r\n")
    return block[: end + 2] if end >= 0 else block


@lru_cache(maxsize=256)
def _field(name: str) -> re.Pattern[bytes]:
    # A field at a line start (RFC 5322 §2.2; the obsolete syntax allows
    # white space before the colon), its value and any folded lines.
    return re.compile(rb"(?im)^" + re.escape(name.encode("ascii"))
                      + rb"[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)")


def header_values(block: bytes, names: Iterable[str]) -> dict[str, str | None]:
    """The first value of each named header field in a message's header section.

    ``block`` is the start of a message (``MessageFacts.headers``); only its
    header section counts, not a "Date:" line in the body.  ``names`` keep
    their spelling in the result; matching ignores case.  Folded values are
    unfolded (RFC 5322 §2.2.3); undecodable octets become U+FFFD; a value
    longer than ``VALUE_LIMIT`` is cut with "...".
    """
    section = _section(block)
    found: dict[str, str | None] = {}
    for name in names:
        m = _field(name).search(section) if section else None
        if m is None:
            found[name] = None
            continue
        text = _UNFOLD.sub(b" ", m.group(1)).strip().decode("utf-8", "replace")
        found[name] = text if len(text) <= VALUE_LIMIT else text[:VALUE_LIMIT] + "..."
    return found


def message_id(block: bytes) -> str | None:
    """The Message-ID of a message's header section, or None (absent or empty)."""
    value = header_values(block, ("Message-ID",))["Message-ID"]
    return value or None


# "n token": a message number and a UIDL (RFC 1939 §7: 1-70 octets in
# 0x21-0x7E) or a size; anything after the token is ignored.
_LISTING_LINE = re.compile(rb"(\d+) ([\x21-\x7e]{1,70})(?: |$)")


def listing_line(line: bytes) -> tuple[int, str] | None:
    """``b"3 XYZ"`` -> (3, "XYZ") for UIDL and LIST lines; None otherwise."""
    m = _LISTING_LINE.match(line)
    if m is None:
        return None
    return int(m.group(1)), m.group(2).decode("ascii")


class Listing:
    """Collects ``n token`` lines of a UIDL or LIST listing as the body streams.

    For UIDL it keeps the unique ids; given ``sizes``, it records LIST sizes
    there instead.
    """

    __slots__ = ("_partial", "sizes", "uids")

    # A mailbox with more messages than this is listed only in part.
    MAX_ENTRIES = 1_000_000

    def __init__(self, sizes: dict[int, int] | None = None) -> None:
        self._partial = b""
        self.sizes = sizes
        self.uids: list[tuple[int, str]] = []

    def add(self, content: memoryview) -> None:
        if not content:
            return
        lines = (self._partial + bytes(content)).split(b"\r\n")
        self._partial = lines.pop()[:80]  # a listing line is short; cap the carry
        for line in lines:
            entry = listing_line(line)
            if entry is None:
                continue
            if self.sizes is not None:
                if entry[1].isdigit() and len(self.sizes) < self.MAX_ENTRIES:
                    self.sizes[entry[0]] = int(entry[1])
            elif len(self.uids) < self.MAX_ENTRIES:
                self.uids.append(entry)


def rewrite_capa(raw: bytes, *, offer_stls: bool, hide_logins: bool) -> bytes:
    """Make a CAPA reply tell the truth about what works through the proxy.

    STLS is the proxy's to offer, not the upstream's: it is removed, then
    added when this listener can upgrade the connection.  USER and SASL
    are hidden while logins are refused until STLS (``hide_logins``: a
    client must not be told it may log in where it may not; Dovecot's
    pre-TLS CAPA has neither).  Everything else (PIPELINING, UIDL, TOP,
    RESP-CODES, ...) passes as advertised.
    """
    status, _, body = raw.partition(b"\n")
    lines = body.split(b"\r\n")  # the last two are "." and ""
    drop = {b"STLS", b"USER", b"SASL"} if hide_logins else {b"STLS"}
    kept = [ln for ln in lines[:-2] if ln.split(b" ", 1)[0].upper() not in drop]
    if offer_stls:
        kept.append(b"STLS")
    return status + b"\n" + b"".join(ln + b"\r\n" for ln in kept) + b".\r\n"
