"""What a session tells its observers (audit, metrics, logs).

Plain frozen values, emitted by the sans-IO session in the order things
happened.  Observers read them after the bytes they describe were written;
they never steer the data path.  No event carries a password, an APOP digest
or SASL data: commands are represented by ``Command``, whose ``repr`` and
``redacted_args`` hide secret arguments.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .pop3 import Command

__all__ = [
    "AuthResult",
    "CommandSent",
    "Event",
    "Greeting",
    "MessageComplete",
    "MessageData",
    "PolicyDecision",
    "ProtocolAnomaly",
    "Response",
    "SessionClosed",
    "SessionOpened",
    "State",
    "StateChanged",
    "TlsEstablished",
    "TlsFailed",
    "UidsLearned",
    "Unsolicited",
    "UpstreamConnected",
    "UpstreamFailed",
]


class State(enum.Enum):
    """RFC 1939 session states, plus the wait for the greeting and the end."""

    GREETING = "greeting"
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of session events."""


@dataclass(frozen=True, slots=True)
class Greeting(Event):
    ok: bool
    text: str
    apop: bool  # the greeting carries an APOP timestamp (RFC 1939 §7)


@dataclass(frozen=True, slots=True)
class CommandSent(Event):
    """A command was forwarded upstream."""

    command: Command
    at: float


@dataclass(frozen=True, slots=True)
class Response(Event):
    """A command's reply is complete: forwarded from upstream or made locally.

    ``local`` replies were made by the proxy (state checks, policy, limits);
    ``latency`` is the upstream round trip, None for local replies.
    ``octets`` counts the raw reply as sent to the client.
    """

    command: Command
    ok: bool
    code: str | None
    text: str
    octets: int
    local: bool
    started: float
    finished: float

    @property
    def latency(self) -> float | None:
        return None if self.local else self.finished - self.started


@dataclass(frozen=True, slots=True)
class MessageData(Event):
    """The head of a RETR/TOP body, unstuffed, as it passed to the client.

    Emitted while the first ``limits`` header window (64 KiB) streams by,
    so observers can read headers; the rest of the body streams without
    per-chunk events.  ``octets`` is the running count of unstuffed octets.
    """

    command: Command
    data: bytes
    octets: int


@dataclass(frozen=True, slots=True)
class MessageComplete(Event):
    """A RETR/TOP body ended: delivered whole, or cut off (``complete=False``).

    ``sha256`` is over the unstuffed octets that were delivered.
    """

    command: Command
    msg: int | None
    octets: int
    sha256: str
    message_id: str | None
    complete: bool


@dataclass(frozen=True, slots=True)
class AuthResult(Event):
    """The outcome of USER/PASS, APOP or AUTH as the upstream answered it."""

    mechanism: str  # "USER", "APOP" or the SASL mechanism name
    user: str | None
    ok: bool
    code: str | None


@dataclass(frozen=True, slots=True)
class StateChanged(Event):
    old: State
    new: State


@dataclass(frozen=True, slots=True)
class Unsolicited(Event):
    """An upstream line no command asked for (e.g. an inactivity ``-ERR``).

    It is recorded, never matched to a later command, never forwarded.
    """

    ok: bool
    code: str | None
    text: str


@dataclass(frozen=True, slots=True)
class ProtocolAnomaly(Event):
    """Something tolerated or refused: ``side`` is "client" or "upstream"."""

    side: str
    kind: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SessionOpened(Event):
    """Emitted by the relay when a client connection is accepted.

    ``client`` is the real client: with the PROXY protocol, the address the
    trusted load balancer reported, and ``via`` the load balancer's own.
    With implicit TLS the handshake comes first and its facts are here.
    """

    client: str
    at: float
    via: str | None = None
    # On an implicit-TLS listener: the client connection's TLS (else None;
    # an STLS upgrade later is a ``TlsEstablished`` event).
    tls: str | None = None
    cipher: str | None = None
    sni: str | None = None


@dataclass(frozen=True, slots=True)
class SessionClosed(Event):
    """Emitted by the relay last, after both connections are closed.

    ``bytes_in``/``bytes_out`` count client octets received and sent;
    ``upstream_in``/``upstream_out`` the same towards the upstream.
    """

    reason: str
    duration: float
    bytes_in: int
    bytes_out: int
    commands: int
    upstream_in: int = 0
    upstream_out: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamConnected(Event):
    """Emitted by the relay: the TCP connection to upstream is up."""

    address: str
    duration: float


@dataclass(frozen=True, slots=True)
class UpstreamFailed(Event):
    """Emitted by the relay when the upstream fails a session.

    ``reason`` is one of: "connect" (refused/unreachable), "connect_timeout",
    "response_timeout", "closed" (EOF while a reply was owed), "protocol"
    (not POP3), "refused" (-ERR greeting).
    """

    reason: str


@dataclass(frozen=True, slots=True)
class UidsLearned(Event):
    """Message numbers and unique ids seen in UIDL replies the client asked for."""

    uids: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class PolicyDecision(Event):
    """A policy rule matched a command (``enforced`` is false in monitor mode).

    ``action`` is "deny", "allow" or "rate_limit"; built-in protections have
    rule names starting with "builtin:".
    """

    rule: str
    action: str
    command: Command
    enforced: bool


@dataclass(frozen=True, slots=True)
class TlsEstablished(Event):
    """A TLS handshake completed; ``side`` is "client" or "upstream".

    ``sni`` is the name the client asked for (client side) or the name we
    verified the upstream against (upstream side).
    """

    side: str
    version: str | None
    cipher: str | None
    sni: str | None


@dataclass(frozen=True, slots=True)
class TlsFailed(Event):
    """A TLS handshake failed; ``error`` is safe to log (no secrets)."""

    side: str
    error: str
