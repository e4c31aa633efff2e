"""JSON lines that stay one line for every reader.

orjson and ``json.dumps(ensure_ascii=False)`` write every character from
U+007F up as itself, and a few of those end a line for readers that do not
split on LF alone: Python's ``str.splitlines`` splits on U+0085 (NEL),
U+2028 and U+2029, and DEL and the C1 controls (U+0080 to U+009F) are
instructions to a terminal.  A user name or any other client-supplied text
holding one would break a record in two, or play tricks on whoever reads
the log.  ``one_line`` writes those as ``\\uXXXX`` escapes: the JSON value
is the same, and C0 controls were already escaped by the serialisers.
"""

from __future__ import annotations

import re

__all__ = ["one_line"]

# In UTF-8: DEL; U+0080..U+009F (0xC2 then 0x80..0x9F); U+2028, U+2029.
# In valid UTF-8 these byte sequences start a character, so no match falls
# inside another one; and outside strings JSON is ASCII without DEL.
_UNSAFE = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")


def _escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode("utf-8"))


def one_line(body: bytes) -> bytes:
    """``body``, UTF-8 JSON, with DEL, C1 controls, U+2028 and U+2029 escaped.

    The common case (ASCII without DEL: nearly every record) is two scans
    in C (``127 in body`` is a ``memchr``; ``b"\x7f" in body`` costs several
    times more) and returns ``body`` itself: about 70 ns for a 300-octet
    record, where chaining it costs 6 µs.  Non-ASCII text without the lead
    bytes 0xC2 and 0xE2 (``ü`` is C3 BC) is three more ``memchr``: about
    100 ns.  Only what may hold one of them pays for the regular expression.
    """
    if body.isascii():
        if 127 not in body:
            return body
    elif 127 not in body and 0xC2 not in body and 0xE2 not in body:
        return body
    return _UNSAFE.sub(_escape, body)
