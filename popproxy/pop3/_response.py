"""Upstream responses: status lines, multi-line framing and dot-unstuffing.

Framing never buffers whole lines of a body: the terminator ``CRLF.CRLF`` is
found with a five-state matcher carried across chunks, so a message with a
100 MiB line streams in constant memory, and a terminator split across reads
in any way is found exactly once, never early, never late.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BodyReader",
    "Sink",
    "Status",
    "announced_size",
    "has_apop_timestamp",
    "parse_status",
    "stuff",
]

_CODE = re.compile(rb"\[([A-Za-z0-9/-]{1,64})\]")
_APOP_STAMP = re.compile(rb"<[^<>@\s]+@[^<>\s]+>")


@dataclass(frozen=True, slots=True)
class Status:
    """A parsed status line (``+OK``, ``-ERR`` or a SASL continuation ``+ ``)."""

    ok: bool
    text: bytes
    code: str | None = None  # RFC 2449/3206 response code, e.g. "SYS/TEMP"
    continuation: bool = False


def has_apop_timestamp(greeting: bytes) -> bool:
    """Whether a greeting carries an APOP timestamp (RFC 1939 §7)."""
    return _APOP_STAMP.search(greeting) is not None


def announced_size(text: bytes) -> int | None:
    """The size a RETR reply announces (``+OK 1234 octets``: its first word,
    when that is a number of at most 18 digits), else None."""
    first = text.split(b" ", 1)[0]
    return int(first) if first.isdigit() and len(first) < 19 else None


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


Sink = Callable[[memoryview], object]

# A line starting with a dot.  The regex engine looks for the literal with
# a scan that outruns bytes.find for a three-octet needle by a quarter to
# a third on mail text (benchmarks/stream_cost.py): this search is most of
# the framing's CPU per GB.
_LINE_DOT: Final = re.compile(rb"\r\n\.")


class BodyReader:
    """Frames a multi-line body and unstuffs its content in one scan.

    ``feed(data, sink)`` returns the index just past the terminator in
    ``data`` (-1 while the body goes on) and hands the unstuffed message
    octets to ``sink`` as memoryview slices of the input: no copies on the
    streaming path.  Both jobs hinge on the same three octets: ``CRLF .``
    followed by ``CRLF`` ends the body; followed by anything else it is a
    stuffed dot, dropped from the content.  Octets that might begin such a
    sequence (at most four) are held back until the next feed decides.
    """

    __slots__ = ("_skip", "_tail")

    def __init__(self) -> None:
        # A virtual CRLF in front: the first line of a body is at line start.
        # It is scanned but never handed to the sink.
        self._tail = b"\r\n"
        self._skip = 2

    def feed(self, data: bytes, sink: Sink | None = None) -> int:
        tail = self._tail
        buf = tail + data if tail else data
        off = len(tail)
        mv = memoryview(buf)
        emit = self._skip  # content before this index was emitted or is virtual
        pos = 0
        search = _LINE_DOT.search
        while True:
            m = search(buf, pos)
            if m is None:
                n = len(buf)
                hold = 2 if buf.endswith(b"\r\n") else 1 if buf.endswith(b"\r") else 0
                held = n - hold
                break
            i = m.start()
            if len(buf) < i + 5:
                held = i  # undecided: terminator or stuffed dot, next time
                break
            if buf[i + 3] == 0x0D and buf[i + 4] == 0x0A:
                if sink is not None and emit < i + 2:
                    sink(mv[emit : i + 2])
                self._tail = b""
                self._skip = 0
                return i + 5 - off
            if sink is not None and emit < i + 2:
                sink(mv[emit : i + 2])
            emit = i + 3  # drop the stuffing dot
            pos = i + 3
        if sink is not None and emit < held:
            sink(mv[emit:held])
        self._skip = max(0, emit - held)
        self._tail = buf[held:]
        return -1


def stuff(body: bytes) -> bytes:
    """Byte-stuff a CRLF message and append the terminator (for tests/demo)."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"
