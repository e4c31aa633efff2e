"""Typed protocol errors.

Each error says whose fault it was (the client's or the upstream's) and
carries the one-line reply the proxy should send to the client, so the relay
never has to invent wording or guess at severity.
"""

from __future__ import annotations

__all__ = [
    "ClientProtocolError",
    "LineTooLong",
    "MalformedLine",
    "PipelineOverflow",
    "ProtocolError",
    "ReplyTooLong",
    "UpstreamProtocolError",
]


class ProtocolError(Exception):
    """Base class: never raised directly.

    ``reply`` is a complete ``-ERR ...\\r\\n`` line for the client.
    Messages never contain credential material: they are built from the
    limit that was crossed, never from the offending bytes.
    """

    reply: bytes = b"-ERR protocol error\r\n"
    #: The ``ProtocolAnomaly.kind`` (and metric label) it is reported as:
    #: lower-case words joined by hyphens, as every anomaly kind is.
    kind: str = "protocol-error"

    def __init__(self, message: str, *, reply: bytes | None = None) -> None:
        if type(self) in (ProtocolError, ClientProtocolError):
            raise TypeError("instantiate a concrete subclass of ProtocolError")
        super().__init__(message)
        if reply is not None:
            self.reply = reply


class ClientProtocolError(ProtocolError):
    """The client broke the protocol or a limit."""


class LineTooLong(ClientProtocolError):
    """A command (or SASL) line exceeded its configured limit."""

    reply = b"-ERR line too long\r\n"
    kind = "line-too-long"


class MalformedLine(ClientProtocolError):
    """A line with NUL, a bare CR, or bytes that cannot be a command."""

    reply = b"-ERR malformed command line\r\n"
    kind = "malformed-line"


class PipelineOverflow(ClientProtocolError):
    """Too many commands pipelined without reading the replies."""

    reply = b"-ERR too many pipelined commands\r\n"
    kind = "pipeline-overflow"


class UpstreamProtocolError(ProtocolError):
    """The upstream server sent something that is not POP3."""

    reply = b"-ERR [SYS/TEMP] upstream server protocol error\r\n"
    kind = "upstream-protocol-error"

    #: What the client gets when the error cuts short a reply it is already
    #: reading (no -ERR line goes into a body unless a subclass says so).
    cut: bytes = b""


class ReplyTooLong(UpstreamProtocolError):
    """A multi-line reply other than RETR/TOP passed ``limits.max_listing``.

    The listing is cut where it stands: the line in progress is ended and an
    ``-ERR`` line follows, with no terminator, so the client cannot take the
    listing for a whole one.
    """

    reply = b"-ERR [SYS/TEMP] upstream reply too long\r\n"
    kind = "reply-too-long"
    cut = b"\r\n" + reply
