"""What a session tells its observers (audit, metrics, logs).

Plain frozen values, emitted by the sans-IO session (and, for the
connection's own milestones, by the trio shell) in the order things
happened.  Observers read them after the bytes they describe were written;
they never steer the data path.  Each fact is stated once, here, as a type:
how a session ended (``EndReason``, with the metric outcome and the audit's
reason word in one table), how a command's reply came out (``Outcome``),
a message's header section (``MessageComplete.headers``), the fate of
deletion marks (``Deletions``).  Observers read these facts and keep no
shadow state to re-derive them.

No event carries a password, an APOP digest or SASL data: commands are
represented by ``Command``, whose ``repr`` and ``redacted_args`` hide
secret arguments.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .pop3 import Command, State

__all__ = [
    "DELETE_PHASES",
    "SESSION_OUTCOMES",
    "AuthResult",
    "CommandSent",
    "Deletions",
    "EndReason",
    "Event",
    "Greeting",
    "MessageComplete",
    "MessageStarted",
    "Outcome",
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


class Outcome(enum.StrEnum):
    """How a command's reply came out: the ``outcome`` of the audit's
    ``command`` records and of ``popproxy_commands_total``."""

    OK = "ok"  # +OK, from the upstream or the proxy (STLS)
    ERR = "err"  # -ERR from the upstream, or [SYS/TEMP] for an upstream that failed
    DENIED = "denied"  # refused by the proxy: its own checks or policy


#: ``popproxy_sessions_total{outcome}``, and the audit's ``session.close``
#: ``outcome``: the same values, from ``EndReason.outcome``.
SESSION_OUTCOMES: Final = (
    "ok",              # the client said QUIT and got its reply
    "client_closed",   # the client hung up (or stopped reading) without QUIT
    "timeout",         # the idle or login timeout or the session time limit closed it
    "upstream_error",  # the upstream was unreachable, refused, broke or timed out
    "protocol_error",  # the client broke the protocol or a limit
    "tls_error",       # the client's TLS handshake failed
    "refused",         # not admitted (session caps, audit fail-closed) or the
                       # login refused by policy
    "shutdown",        # the proxy stopped (drain timeout or SIGINT)
    "error",           # an internal error in the proxy
    "other",           # kept for dashboards: no reason of this version maps here
)


class EndReason(enum.StrEnum):
    """Why a session ended.  The value is the proxy's own wording.

    ``outcome`` is the metric label (``SESSION_OUTCOMES``), ``audit`` the
    stable word of the audit's ``session.close`` ``reason``, and ``notice``
    the text after ``-ERR [SYS/TEMP]`` when the client is told.  One table,
    ``_ENDINGS``, holds them all: audit and metrics cannot disagree.
    """

    QUIT = "quit"
    CLIENT_CLOSED = "client closed"
    PEER_GONE = "peer gone or too slow"  # a write failed or stalled past send_timeout
    IDLE_TIMEOUT = "idle timeout"
    LOGIN_TIMEOUT = "login timeout"  # limits.login_timeout passed before a login
    TIME_LIMIT = "session time limit"
    PROTOCOL_ERROR = "client protocol error"
    TLS_FAILED = "client TLS handshake failed"
    UPSTREAM_UNAVAILABLE = "upstream unavailable"
    UPSTREAM_CONNECT_TIMEOUT = "upstream connect timeout"
    UPSTREAM_TLS_FAILED = "upstream TLS failure"
    UPSTREAM_REFUSED = "upstream refused the session"
    UPSTREAM_CLOSED = "upstream closed the connection"
    UPSTREAM_TIMEOUT = "upstream response timeout"
    UPSTREAM_PROTOCOL_ERROR = "upstream protocol error"
    REFUSED = "refused"  # an admission gate said no (per-IP cap, audit fail-closed)
    SESSION_LIMIT = "session limit reached"  # limits.max_sessions
    LOGIN_REFUSED = "policy refused the login"  # per-user cap, after the upstream said yes
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal error"
    # Written by the next start, from the trail, for a session the previous
    # process left open (killed, crashed, power lost): never a live ending.
    PROXY_CRASHED = "proxy crashed"

    @property
    def outcome(self) -> str:
        return _ENDINGS[self][0]

    @property
    def audit(self) -> str:
        return _ENDINGS[self][1]

    @property
    def notice(self) -> str:
        return _ENDINGS[self][2] or self.value


_ENDINGS: Final[dict[EndReason, tuple[str, str, str]]] = {
    # reason: (metric outcome, audit reason, client notice if not the value)
    EndReason.QUIT: ("ok", "quit", ""),
    EndReason.CLIENT_CLOSED: ("client_closed", "client gone", ""),
    EndReason.PEER_GONE: ("client_closed", "client gone", ""),
    EndReason.IDLE_TIMEOUT: ("timeout", "idle timeout", "disconnected for inactivity"),
    EndReason.TIME_LIMIT: ("timeout", "time limit", ""),
    EndReason.LOGIN_TIMEOUT: ("timeout", "login timeout", ""),
    EndReason.PROTOCOL_ERROR: ("protocol_error", "client error", ""),
    EndReason.TLS_FAILED: ("tls_error", "client error", ""),
    EndReason.UPSTREAM_UNAVAILABLE: ("upstream_error", "upstream error", ""),
    EndReason.UPSTREAM_CONNECT_TIMEOUT: ("upstream_error", "upstream error", ""),
    EndReason.UPSTREAM_TLS_FAILED: ("upstream_error", "upstream error", ""),
    EndReason.UPSTREAM_REFUSED: ("upstream_error", "upstream error", ""),
    EndReason.UPSTREAM_CLOSED: ("upstream_error", "upstream error", ""),
    EndReason.UPSTREAM_TIMEOUT: ("upstream_error", "upstream error", ""),
    EndReason.UPSTREAM_PROTOCOL_ERROR: ("upstream_error", "upstream error", ""),
    EndReason.REFUSED: ("refused", "refused", ""),
    EndReason.SESSION_LIMIT: ("refused", "refused", "too many sessions, try again later"),
    EndReason.LOGIN_REFUSED: ("refused", "refused", ""),
    EndReason.SHUTDOWN: ("shutdown", "shutdown", "proxy shutting down"),
    EndReason.INTERNAL_ERROR: ("error", "other", ""),
    # The proxy failed the session, whatever killed it: "error", like an
    # internal error; the audit's reason tells the two apart.
    EndReason.PROXY_CRASHED: ("error", "proxy crashed", ""),
}

#: ``Deletions.phase``: ``marked`` (DELE got +OK), ``reset`` (RSET got +OK
#: and unmarked them), ``committed`` (QUIT got +OK in TRANSACTION: the server
#: removed them), ``uncommitted`` (the session ended otherwise: the server
#: discarded the marks).  The metric's ``phase`` label and the audit's
#: ``message.delete.*`` records use the same words.
DELETE_PHASES: Final = ("marked", "committed", "uncommitted", "reset")


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

    ``local`` replies were made by the proxy (state checks, policy, limits,
    or ``[SYS/TEMP]`` for an upstream that failed); ``latency`` is the
    upstream round trip, None for local replies.  ``octets`` counts the raw
    reply as sent to the client.  ``outcome`` says how it came out.
    """

    command: Command
    ok: bool
    code: str | None
    text: str
    octets: int
    local: bool
    started: float
    finished: float
    outcome: Outcome

    @property
    def latency(self) -> float | None:
        return None if self.local else self.finished - self.started


@dataclass(frozen=True, slots=True)
class MessageStarted(Event):
    """A RETR/TOP got ``+OK``: its body starts to flow to the client.

    ``announced`` is the size the status line gives (``+OK 1234 octets``),
    None when it gives none.  The audit notes the transfer, so that one cut
    short by a crash of the proxy is still on record (``MessageComplete``
    follows whenever the proxy lives to see the end).
    """

    command: Command
    msg: int | None
    announced: int | None


@dataclass(frozen=True, slots=True)
class MessageComplete(Event):
    """A RETR/TOP body ended: delivered whole, or cut off (``complete=False``).

    ``sha256`` is over the unstuffed octets that were delivered; ``headers``
    is the message's header section as delivered (up to the blank line, at
    most ``pop3.HEADER_OCTETS``), for observers that pick header fields.
    """

    command: Command
    msg: int | None
    octets: int
    sha256: str
    message_id: str | None
    complete: bool
    headers: bytes = b""


@dataclass(frozen=True, slots=True)
class Deletions(Event):
    """Deletion marks changed: ``phase`` is one of ``DELETE_PHASES``.

    ``msgs`` are the message numbers, in the order they were marked.
    ``possibly_partial`` (``uncommitted`` only): QUIT reached the server but
    no ``+OK`` came back, so it may have removed some or all of them
    (RFC 1939 §6).
    """

    phase: str
    msgs: tuple[int, ...]
    possibly_partial: bool = False


@dataclass(frozen=True, slots=True)
class AuthResult(Event):
    """The outcome of USER/PASS, APOP or AUTH as the upstream answered it.

    In routed mode, ``upstream`` names the upstream that answered (a
    configured name, or "http" for a server the auth hook named) and
    ``route`` what chose it ("rule", "map", "http", "default"); both are
    None in transparent mode and when no upstream was reached.
    """

    mechanism: str  # "USER", "APOP" or the SASL mechanism name
    user: str | None
    ok: bool
    code: str | None
    upstream: str | None = None
    route: str | None = None


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
    """Emitted by the trio shell when a client connection is accepted.

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
    """Emitted by the trio shell last, after both connections are closed.

    ``reason`` says why it ended; ``detail`` has the proxy's own words where
    they say more (which admission gate refused, say), else it is empty.
    ``bytes_in``/``bytes_out`` count client octets received and sent;
    ``upstream_in``/``upstream_out`` the same towards the upstream.
    """

    reason: EndReason
    duration: float
    bytes_in: int
    bytes_out: int
    commands: int
    upstream_in: int = 0
    upstream_out: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamConnected(Event):
    """Emitted by the trio shell: the connection to upstream is up.

    ``name`` is the upstream's (``default`` for ``[upstream]``).
    """

    address: str
    duration: float
    name: str = "default"


@dataclass(frozen=True, slots=True)
class UpstreamFailed(Event):
    """The upstream failed a session.

    ``reason`` is one of: "connect" (refused/unreachable), "connect_timeout",
    "tls", "response_timeout", "closed" (EOF while a reply was owed),
    "protocol" (not POP3), "refused" (-ERR greeting).
    """

    reason: str


@dataclass(frozen=True, slots=True)
class UidsLearned(Event):
    """Message numbers and unique ids seen in UIDL replies."""

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
