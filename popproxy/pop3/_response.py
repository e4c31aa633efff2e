"""Upstream responses: status lines, multi-line framing and dot-unstuffing.

Framing never buffers whole lines of a body: the terminator ``CRLF.CRLF`` is
found with a five-state matcher carried across chunks, so a message with a
100 MiB line streams in constant memory, and a terminator split across reads
in any way is found exactly once, never early, never late.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._command import Command

__all__ = [
    "BodyFramer",
    "BodyReader",
    "Status",
    "Unstuffer",
    "is_multiline",
    "parse_status",
    "stuff",
]

_CODE = re.compile(rb"\[([A-Za-z0-9/-]{1,64})\]")


@dataclass(frozen=True, slots=True)
class Status:
    """A parsed status line (``+OK``, ``-ERR`` or a SASL continuation ``+ ``)."""

    ok: bool
    text: bytes
    code: str | None = None  # RFC 2449/3206 response code, e.g. "SYS/TEMP"
    continuation: bool = False


def parse_status(line: bytes) -> Status | None:
    """Parse a status line without its terminator; None if it is not one."""
    if line.startswith(b"+OK") and (len(line) == 3 or line[3:4] == b" "):
        ok = True
        text = line[4:]
    elif line.startswith(b"-ERR") and (len(line) == 4 or line[4:5] == b" "):
        ok = False
        text = line[5:]
    elif line == b"+" or line.startswith(b"+ "):
        return Status(True, line[2:], None, continuation=True)
    else:
        return None
    m = _CODE.match(text)
    code = m.group(1).decode("ascii").upper() if m else None
    return Status(ok, text, code)


def is_multiline(cmd: Command) -> bool:
    """Whether a ``+OK`` reply to ``cmd`` is followed by a multi-line body.

    RETR, TOP and CAPA always; LIST, UIDL, LANG (RFC 6856) and AUTH (the
    non-standard mechanism list Outlook and Thunderbird ask for) only without
    an argument.  ``-ERR`` is always a single line; unknown commands are
    single-line.
    """
    if cmd.verb in ("RETR", "TOP", "CAPA"):
        return True
    return cmd.verb in ("LIST", "UIDL", "LANG", "AUTH") and not cmd.args


_TERM = b"\r\n.\r\n"
# KMP failure links for _TERM: after matching k octets and failing, the
# longest proper suffix of _TERM[:k] that is also a prefix of it.
_FALLBACK = (0, 0, 0, 0, 1)


def _advance(k: int, octet: int) -> int:
    while True:
        if _TERM[k] == octet:
            return k + 1
        if k == 0:
            return 0
        k = _FALLBACK[k]


class BodyFramer:
    """Finds where a multi-line body ends, chunk by chunk.

    ``feed(data)`` returns the index just past the terminator in ``data``, or
    -1 when the body goes on.  The matcher starts "at line start" (the status
    line's CRLF counts as the first two octets of ``CRLF.CRLF``), so an empty
    body ``.\\r\\n`` ends at once.
    """

    __slots__ = ("_k",)

    def __init__(self) -> None:
        self._k = 2

    def feed(self, data: bytes) -> int:
        k = self._k
        i = 0
        n = len(data)
        # Continue a partial match octet by octet; it resolves within a few.
        while k and i < n:
            k = _advance(k, data[i])
            i += 1
            if k == 5:
                self._k = 0
                return i
        if i == n:
            self._k = k
            return -1
        j = data.find(_TERM, i)
        if j >= 0:
            self._k = 0
            return j + 5
        # No terminator: remember how much of it the tail might start.
        for k in (4, 3, 2, 1):
            if n - i >= k and data.endswith(_TERM[:k]):
                break
        else:
            k = 0
        self._k = k
        return -1


class Unstuffer:
    """Removes the byte-stuffing dot from lines of a multi-line body.

    Feed the body's octets (terminator excluded); returns the unstuffed
    octets.  A trailing CR or CRLF is held back until the next feed, since the
    octet after it decides whether a dot must go.
    """

    __slots__ = ("_hold", "_strip")

    def __init__(self) -> None:
        # A virtual CRLF in front: the first line of a body is at line start.
        self._hold = b"\r\n"
        self._strip = 2

    def feed(self, data: bytes) -> bytes:
        s = self._hold + data if self._hold else data
        if s.endswith(b"\r\n"):
            keep = 2
        elif s.endswith(b"\r"):
            keep = 1
        else:
            keep = 0
        head = s[: len(s) - keep] if keep else s
        self._hold = s[len(s) - keep :] if keep else b""
        out = head.replace(b"\r\n.", b"\r\n") if b"\r\n." in head else head
        if self._strip:
            cut = min(self._strip, len(out))
            out = out[cut:]
            self._strip -= cut
        return out

    def finish(self) -> bytes:
        """Flush what was held back (the body's last CRLF)."""
        out, self._hold = self._hold, b""
        if self._strip:
            cut = min(self._strip, len(out))
            out = out[cut:]
            self._strip -= cut
        return out


class BodyReader:
    """Frames a multi-line body and unstuffs its content in one pass.

    ``feed(data)`` returns ``(end, content)``: ``end`` is the index just past
    the terminator in ``data`` (-1 while the body goes on) and ``content`` the
    unstuffed message octets that are now certain.  The last three raw octets
    are held back from unstuffing until more arrive, because they might be
    the terminator's ``.CRLF``.
    """

    __slots__ = ("_framer", "_hold", "_unstuffer")

    def __init__(self) -> None:
        self._framer = BodyFramer()
        self._unstuffer = Unstuffer()
        self._hold = b""

    def feed(self, data: bytes) -> tuple[int, bytes]:
        end = self._framer.feed(data)
        part = data if end < 0 else data[:end]
        s = self._hold + part if self._hold else part
        if len(s) <= 3:
            self._hold = s
            content = b""
        else:
            self._hold = s[-3:]
            content = self._unstuffer.feed(s[:-3])
        if end >= 0:
            # self._hold is now exactly the terminator's ".\r\n".
            content += self._unstuffer.finish()
            self._hold = b""
        return end, content


def stuff(body: bytes) -> bytes:
    """Byte-stuff a CRLF message and append the terminator (for tests/demo)."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"
