"""Client command lines: framing, validation and the ``Command`` value."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import LineTooLong, MalformedLine

__all__ = ["Command", "LineReader", "message_number", "parse_command"]

# RFC 1939 keywords are 3-4 letters; extensions (X-...) are longer.
_VERB = re.compile(rb"[A-Za-z][A-Za-z0-9-]{0,31}")


@dataclass(frozen=True, slots=True)
class Command:
    """One parsed client command.

    ``args`` are decoded UTF-8 with ``surrogateescape`` so that ``bytes(cmd)``
    gives back exactly the octets that were judged.  For PASS the whole rest
    of the line is one argument: spaces are part of a password (RFC 1939 §7).
    """

    verb: str
    args: tuple[str, ...] = ()

    def __bytes__(self) -> bytes:
        line = " ".join((self.verb, *self.args)) if self.args else self.verb
        return line.encode("utf-8", "surrogateescape") + b"\r\n"

    def redacted_args(self) -> tuple[str, ...]:
        """The arguments safe to log: secrets replaced by ``"<redacted>"``.

        PASS (the password, spaces included), APOP (the digest is
        offline-crackable MD5) and AUTH (a SASL initial response).
        """
        if self.verb == "PASS":
            return ("<redacted>",) if self.args else ()
        if self.verb == "APOP":
            return (self.args[0], "<redacted>") if len(self.args) > 1 else self.args
        if self.verb == "AUTH":
            return (self.args[0], "<redacted>") if len(self.args) > 1 else self.args
        return self.args

    def __repr__(self) -> str:
        return f"Command(verb={self.verb!r}, args={self.redacted_args()!r})"

    def __str__(self) -> str:
        return self.__repr__()


def message_number(arg: str) -> int | None:
    """A message number argument as an int; None unless it is ASCII digits.

    (``str.isdigit`` is true for "²" and "①", which ``int`` refuses.)
    """
    return int(arg) if arg.isascii() and arg.isdigit() else None


def parse_command(line: bytes) -> Command:
    """Parse one command line without its line terminator.

    Raises ``MalformedLine`` for an empty line, a verb that is not a POP3
    keyword, or arguments that are not UTF-8 (PASS excepted: a password is
    opaque octets, and legacy clients send Latin-1 ones).
    """
    verb_bytes, sep, rest = line.partition(b" ")
    if not _VERB.fullmatch(verb_bytes):
        raise MalformedLine(
            "command line does not start with a POP3 keyword",
            reply=b"-ERR malformed command\r\n" if line else b"-ERR empty command\r\n",
        )
    verb = verb_bytes.decode("ascii").upper()
    if verb == "PASS":
        args: tuple[str, ...] = (rest.decode("utf-8", "surrogateescape"),) if sep else ()
        return Command(verb, args)
    try:
        text = rest.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedLine(
            # Not the verb itself: it is the client's text, and the message is logged.
            "command arguments are not valid UTF-8",
            reply=b"-ERR command arguments are not valid UTF-8\r\n",
        ) from None
    # Arguments are separated by spaces (RFC 1939 §3); other whitespace
    # (tabs, NBSP, U+2028, ...) is part of an argument and passes unchanged.
    return Command(verb, tuple(arg for arg in text.split(" ") if arg))


class LineReader:
    """Splits a byte stream into lines, with a hard limit on line length.

    Lines end in CRLF; a bare LF is tolerated (some clients send it, and the
    line is re-serialised with CRLF before it goes upstream, so it cannot be
    used to smuggle anything).  A CR anywhere else, or a NUL, is refused.
    The buffer never holds more than ``limit`` octets plus one read.
    """

    __slots__ = ("_buf", "_start", "limit", "long_limit", "long_prefix")

    def __init__(self, limit: int, *, long_prefix: bytes = b"", long_limit: int = 0) -> None:
        self._buf = bytearray()
        self._start = 0
        self.limit = limit
        # AUTH lines may carry a large SASL initial response (OAuth tokens
        # exceed 1 KiB), so lines starting with ``long_prefix`` get ``long_limit``.
        self.long_prefix = long_prefix
        self.long_limit = max(long_limit, limit)

    def feed(self, data: bytes) -> None:
        if self._start:
            del self._buf[: self._start]
            self._start = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._start

    def has_line(self) -> bool:
        """Whether a whole line (up to its LF) is buffered."""
        return self._buf.find(b"\n", self._start) >= 0

    def discard(self) -> int:
        """Drop everything buffered; return how many octets were dropped."""
        dropped = self.buffered
        self._buf.clear()
        self._start = 0
        return dropped

    def _limit_for(self, start: int) -> int:
        if self.long_prefix:
            head = bytes(self._buf[start : start + len(self.long_prefix)]).upper()
            if self.long_prefix.startswith(head) or head == self.long_prefix:
                return self.long_limit
        return self.limit

    def next_line(self, limit: int | None = None) -> bytes | None:
        """Return the next complete line without its terminator, or None."""
        buf = self._buf
        start = self._start
        end = buf.find(b"\n", start)
        size = (len(buf) if end < 0 else end) - start
        # The prefix check for the longer AUTH limit only runs for long lines.
        if size > (limit if limit is not None else self.limit):
            cap = limit if limit is not None else self._limit_for(start)
            # The CR of the terminator is not part of the line, whether or
            # not its LF has arrived yet.
            last = end - 1 if end >= 0 else len(buf) - 1
            if last >= start and buf[last] == 0x0D:
                size -= 1
            if size > cap:
                raise LineTooLong(f"line longer than {cap} octets")
        if end < 0:
            return None
        line_end = end - 1 if end > start and buf[end - 1] == 0x0D else end
        line = bytes(buf[start:line_end])
        self._start = end + 1
        if b"\r" in line or b"\0" in line:
            raise MalformedLine("line contains a bare CR or a NUL")
        return line
