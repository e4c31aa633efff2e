"""Upstream framing: status lines and multi-line bodies, told what to expect.

In the manner of h11's readers: the session says what kind of reply it
expects next (``Expect``, from the command at the head of its FIFO), feeds
the bytes it received, and pulls events until ``NEED_DATA``:

    reader.receive_data(data)
    while (event := reader.next_event(expect)) is not NEED_DATA:
        ...  # a Reply (one status line) or a BodyChunk

A ``+OK`` to a command whose reply is multi-line opens a body; its chunks
come out verbatim (the proxy never alters message bytes) while the body's
unstuffed content goes to ``sink``, set by the session when it sees the
``Reply``.  Whatever is not POP3 raises ``UpstreamProtocolError``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from ._errors import UpstreamProtocolError
from ._response import BodyReader, Sink, Status, parse_status

__all__ = ["NEED_DATA", "BodyChunk", "Expect", "NeedData", "Reply", "ResponseReader"]


class Expect(enum.Enum):
    """What the next upstream line may be."""

    GREETING = "greeting"  # the server's first line
    NOTHING = "nothing"  # no reply is owed: a line now is unsolicited
    SINGLE = "single"  # one status line
    MULTI = "multi"  # a status line, and a body after +OK
    SASL = "sasl"  # an AUTH exchange: "+ " continuations too


class NeedData(enum.Enum):
    NEED_DATA = "need data"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Reply:
    """One status line: ``raw`` is the line as received, terminator included;
    ``body`` says a multi-line body follows."""

    status: Status
    raw: bytes
    body: bool = False


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """Raw octets of a multi-line body, passed on verbatim; ``end``: the
    terminator is the chunk's last five octets."""

    data: bytes
    end: bool


class ResponseReader:
    """Frames the upstream's byte stream into replies.

    ``status_limit`` bounds a status line (and so what is buffered while
    waiting for one); a body streams in constant memory, whatever its lines.
    """

    __slots__ = ("_body", "_buf", "_pos", "in_body", "sink", "status_limit")

    def __init__(self, status_limit: int = 8192) -> None:
        self.status_limit = status_limit
        self._buf = b""
        self._pos = 0
        self._body: BodyReader | None = None
        self.in_body = False  # a body is being read: ``expect`` does not matter
        self.sink: Sink | None = None

    def receive_data(self, data: bytes) -> None:
        buf, pos = self._buf, self._pos
        self._buf = buf[pos:] + data if pos < len(buf) else data
        self._pos = 0

    def next_event(self, expect: Expect) -> Reply | BodyChunk | NeedData:
        buf, pos = self._buf, self._pos
        n = len(buf)
        if pos >= n:
            return NEED_DATA
        body = self._body
        if body is not None:
            data = buf if pos == 0 else buf[pos:]
            end = body.feed(data, self.sink)
            if end < 0:
                self._buf, self._pos = b"", 0
                return BodyChunk(data, False)
            self._pos = pos + end
            self._body = None
            self.in_body = False
            self.sink = None
            return BodyChunk(data if end == len(data) else data[:end], True)
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if n - pos > self.status_limit:
                raise UpstreamProtocolError("upstream status line too long")
            return NEED_DATA
        raw = buf[pos : nl + 1]
        self._pos = nl + 1
        if len(raw) > self.status_limit:
            raise UpstreamProtocolError("upstream status line too long")
        status = parse_status(raw[:-2] if raw.endswith(b"\r\n") else raw[:-1])
        if status is None:
            raise UpstreamProtocolError(_NOT_POP3[expect])
        if status.continuation and expect is not Expect.SASL:
            if expect is Expect.GREETING:
                raise UpstreamProtocolError(_NOT_POP3[expect])
            raise UpstreamProtocolError("SASL continuation outside an AUTH exchange")
        if expect is Expect.MULTI and status.ok:
            self._body = BodyReader()
            self.in_body = True
            return Reply(status, raw, True)
        return Reply(status, raw)


_NOT_POP3: Final = {
    Expect.GREETING: "upstream greeting is not POP3",
    Expect.NOTHING: "upstream sent a line nobody asked for",
    Expect.SINGLE: "upstream reply is not +OK/-ERR",
    Expect.MULTI: "upstream reply is not +OK/-ERR",
    Expect.SASL: "upstream reply is not +OK/-ERR",
}
