"""Session events in, audit records out: the record builder (no I/O).

``RecordBuilder.observe(info, event)`` returns the records (plain dicts, in
their final key order) that an event produces.  The facts come from the
events (a command's ``outcome``, how a session ended, which deletions were
committed, a message's header section); the builder keeps per session only
what it needs to name things in its records: the authenticated user, the
UIDLs and Message-IDs learned, the TLS facts, and the marks still open (for
``close_all``).  Time comes from the injected clock.

What a record may contain is decided here, so this is where credentials are
kept out: commands appear only as ``Command.redacted_args()``, and nothing
reads SASL lines, PASS or APOP arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from ..addr import host_of
from ..events import (
    AuthResult,
    Deletions,
    Event,
    MessageComplete,
    MessageStarted,
    Outcome,
    PolicyDecision,
    Response,
    SessionClosed,
    SessionOpened,
    TlsEstablished,
    TlsFailed,
    UidsLearned,
    UpstreamConnected,
)
from ..pop3 import MESSAGE_VERBS, Command, arg_octets, header_values, message_number, recorded
from ..timefmt import rfc3339 as rfc3339
from ..timefmt import utcnow_rfc3339 as utcnow_rfc3339
from .config import AuditConfig

__all__ = ["Record", "RecordBuilder", "SessionRef", "rfc3339"]

Record = dict[str, Any]


class SessionRef(Protocol):
    """What the builder needs to know about a session (``observe.SessionInfo``)."""

    @property
    def id(self) -> str: ...

    @property
    def client(self) -> str: ...


def utcnow() -> datetime:
    """The real clock (the default; tests inject their own)."""
    return datetime.now(UTC)


def _clean(text: str) -> str:
    """``text`` as valid UTF-8 (a client's undecodable bytes become U+FFFD)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def _seconds(value: float) -> float:
    """``value`` to the microsecond (``round(value, 6)``, a good deal cheaper)."""
    return round(value * 1e6) / 1e6


def _command_fields(rec: Record, cmd: Command, refused: bool) -> None:
    """``verb`` and ``args`` as ``pop3.recorded`` allows; ``arg_octets`` for
    arguments not shown."""
    verb, args = recorded(cmd, refused=refused)
    rec["verb"] = verb
    if args is None:
        rec["args"] = None
        rec["arg_octets"] = arg_octets(cmd)
    else:
        rec["args"] = [_clean(a) for a in args]


class _PerClient:
    """``command`` records before login, per client address, in one-minute
    windows: a client reconnecting to flood still costs a bounded number."""

    __slots__ = ("counts", "limit", "max_addresses", "start")

    WINDOW = 60.0

    def __init__(self, limit: int, max_addresses: int = 65536) -> None:
        self.limit = limit
        # Addresses tracked in a window; past it, new ones share one count
        # (memory stays bounded whatever the number of addresses).
        self.max_addresses = max_addresses
        self.start = float("-inf")
        self.counts: dict[str, int] = {}

    def take(self, host: str, now: float) -> bool:
        """One record for ``host`` at ``now``: whether it may be written."""
        if now - self.start >= self.WINDOW or now < self.start:
            self.start = now
            self.counts.clear()
        counts = self.counts
        if host not in counts and len(counts) >= self.max_addresses:
            host = ""
        n = counts.get(host, 0)
        if n >= self.limit:
            return False
        counts[host] = n + 1
        return True


class _Session:
    __slots__ = ("client", "host", "marks", "message_ids", "prelogin", "suppressed", "tls",
                 "tls_error", "uids", "upstream", "user")

    def __init__(self, client: str) -> None:
        self.client = client
        self.host = host_of(client) or client
        self.prelogin = 0  # command records before login, written or not
        self.suppressed = 0  # of those, not written (the bounds)
        self.user: str | None = None
        self.uids: dict[int, str] = {}
        self.marks: dict[int, None] = {}  # open marks, for close_all
        self.message_ids: dict[int, str] = {}
        self.upstream: str | None = None
        self.tls: dict[str, dict[str, str | None]] = {}  # side -> version, cipher, sni
        self.tls_error: str | None = None


class RecordBuilder:
    """Turns one proxy's session events into audit records."""

    def __init__(
        self, config: AuditConfig, now: Callable[[], datetime] = utcnow
    ) -> None:
        self.config = config
        self.now = now
        self._stamp: Callable[[], str] = (
            utcnow_rfc3339 if now is utcnow else lambda: rfc3339(now()))
        self._sessions: dict[str, _Session] = {}
        self._all_commands = config.commands == "all"
        self._headers = config.headers
        self._per_client = _PerClient(config.prelogin_commands_per_client)
        self._handlers: dict[type[Event], Callable[[SessionRef, _Session, Any], list[Record]]] = {
            SessionOpened: self._opened,
            SessionClosed: self._closed,
            AuthResult: self._auth,
            Response: self._response,
            MessageComplete: self._message,
            MessageStarted: self._message_started,
            Deletions: self._deletions,
            UidsLearned: self._uids,
            UpstreamConnected: self._connected,
            TlsEstablished: self._tls,
            TlsFailed: self._tls_failed,
            PolicyDecision: self._policy,
        }

    @property
    def event_types(self) -> frozenset[type[Event]]:
        """The event types that can make a record or change a session's state."""
        return frozenset(self._handlers)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def observe(self, info: SessionRef, event: Event) -> list[Record]:
        """The records ``event`` makes, possibly none."""
        handler = self._handlers.get(type(event))
        if handler is None:
            return []
        st = self._sessions.get(info.id)
        if st is None:
            st = self._sessions[info.id] = _Session(info.client)
        return handler(info, st, event)

    def close_all(self, reason: str = "shutdown") -> list[Record]:
        """Records for sessions still open when the trail closes."""
        records: list[Record] = []
        for sid in list(self._sessions):
            st = self._sessions.pop(sid)
            ref = _Ref(sid, st.client)
            records += [self._message_record("message.delete.uncommitted", ref, st, msg)
                        for msg in st.marks]
            rec = self._base("session.close", ref, st)
            rec.update(reason=reason, outcome="shutdown",
                       detail="audit trail closed before the session ended")
            if st.suppressed:
                rec["suppressed_commands"] = st.suppressed
            records.append(rec)
        return records

    # ------------------------------------------------------------------

    def _base(self, name: str, info: SessionRef, st: _Session | None,
              user: str | None = None) -> Record:
        rec: Record = {"ts": self._stamp(), "event": name, "session": info.id}
        who = user if user is not None else (st.user if st is not None else None)
        if who is not None:
            rec["user"] = who
        rec["client"] = info.client
        return rec

    def _opened(self, info: SessionRef, st: _Session, event: SessionOpened) -> list[Record]:
        rec = self._base("session.open", info, st)
        if event.via is not None:
            rec["via"] = event.via  # the trusted proxy that reported ``client``
        if event.tls is not None:  # implicit TLS: the handshake came first
            rec["tls"] = {"version": event.tls, "cipher": event.cipher, "sni": event.sni}
        return [rec]

    def _tls(self, info: SessionRef, st: _Session, event: TlsEstablished) -> list[Record]:
        st.tls[event.side] = {"version": event.version, "cipher": event.cipher,
                              "sni": event.sni}
        return []

    def _tls_failed(self, info: SessionRef, st: _Session, event: TlsFailed) -> list[Record]:
        st.tls_error = f"{event.side}: {event.error}"
        return []

    def _connected(self, info: SessionRef, st: _Session, event: UpstreamConnected) -> list[Record]:
        st.upstream = event.address
        return []

    def _auth(self, info: SessionRef, st: _Session, event: AuthResult) -> list[Record]:
        user = _clean(event.user) if event.user is not None else None
        if event.ok:
            st.user = user
        rec = self._base("auth", info, st, user)
        rec["mechanism"] = event.mechanism
        rec["outcome"] = "ok" if event.ok else "fail"
        client_tls = st.tls.get("client")
        rec["tls"] = client_tls["version"] if client_tls is not None else None
        if event.code is not None:
            rec["code"] = event.code
        if event.upstream is not None:  # routed mode: where the login went
            rec["upstream"] = event.upstream
            rec["route"] = event.route
        return [rec]

    def _response(self, info: SessionRef, st: _Session, event: Response) -> list[Record]:
        cmd = event.command
        if not self._all_commands and cmd.verb not in MESSAGE_VERBS:
            return []
        if st.user is None and not self._prelogin(st):
            return []
        rec = self._base("command", info, st)
        _command_fields(rec, cmd, st.user is None and event.outcome is Outcome.DENIED)
        rec["outcome"] = event.outcome.value
        if event.code is not None:
            rec["code"] = event.code
        latency = event.latency
        rec["latency"] = _seconds(latency) if latency is not None else None
        return [rec]

    def _prelogin(self, st: _Session) -> bool:
        """A ``command`` record before login: whether the bounds let it be written."""
        st.prelogin += 1
        if st.prelogin <= self.config.prelogin_commands and self._per_client.take(
                st.host, self.now().timestamp()):
            return True
        st.suppressed += 1
        return False

    def _deletions(self, info: SessionRef, st: _Session, event: Deletions) -> list[Record]:
        phase = event.phase
        if phase == "reset":
            st.marks.clear()
            rec = self._base("message.delete.reset", info, st)
            rec["msgs"] = list(event.msgs)
            return [rec]
        if phase == "marked":
            st.marks.update(dict.fromkeys(event.msgs))
        else:
            st.marks.clear()
        name = "message.delete." + phase
        records = [self._message_record(name, info, st, msg) for msg in event.msgs]
        if event.possibly_partial:
            # QUIT reached the server but no +OK came back: it may have
            # removed some or all of them (RFC 1939 §6).
            for rec in records:
                rec["possibly_partial"] = True
        return records

    def _message_record(self, name: str, info: SessionRef, st: _Session, msg: int) -> Record:
        rec = self._base(name, info, st)
        rec["msg"] = msg
        rec["uidl"] = st.uids.get(msg)
        message_id = st.message_ids.get(msg)
        if message_id is not None:
            rec["message_id"] = message_id
        return rec

    def _message(self, info: SessionRef, st: _Session, event: MessageComplete) -> list[Record]:
        rec = self._retrieval("message.retrieve", info, st, event.command, event.msg)
        rec["octets"] = event.octets
        rec["sha256"] = event.sha256
        rec["message_id"] = event.message_id
        rec["complete"] = event.complete
        if self._headers:
            rec["headers"] = header_values(event.headers, self._headers)
        if event.msg is not None and event.message_id is not None:
            st.message_ids[event.msg] = event.message_id
        return [rec]

    def _message_started(self, info: SessionRef, st: _Session,
                         event: MessageStarted) -> list[Record]:
        # Only for the crash trace (``_recovery``): the trail drops this
        # record unwritten when the message.retrieve joins it in time.
        rec = self._retrieval("message.retrieving", info, st, event.command, event.msg)
        rec["announced"] = event.announced
        return [rec]

    def _retrieval(self, name: str, info: SessionRef, st: _Session, command: Command,
                   msg: int | None) -> Record:
        """What a RETR's or TOP's records say of the message asked for."""
        rec = self._base(name, info, st)
        verb = command.verb
        rec["command"] = verb
        rec["msg"] = msg
        lines = message_number(command.args[1]) if len(command.args) > 1 else None
        if verb == "TOP" and lines is not None:
            rec["lines"] = lines
        rec["uidl"] = st.uids.get(msg) if msg is not None else None
        return rec

    def _uids(self, info: SessionRef, st: _Session, event: UidsLearned) -> list[Record]:
        st.uids.update(event.uids)
        return []

    def _closed(self, info: SessionRef, st: _Session, event: SessionClosed) -> list[Record]:
        rec = self._base("session.close", info, st)
        reason = event.reason
        rec["reason"] = reason.audit
        rec["outcome"] = reason.outcome  # the popproxy_sessions_total label
        rec["detail"] = event.detail or reason.value
        rec["duration"] = _seconds(event.duration)
        rec["bytes_in"] = event.bytes_in
        rec["bytes_out"] = event.bytes_out
        rec["commands"] = event.commands
        rec["upstream_in"] = event.upstream_in
        rec["upstream_out"] = event.upstream_out
        if st.suppressed:  # command records the pre-login bounds kept out
            rec["suppressed_commands"] = st.suppressed
        if st.upstream is not None:
            rec["upstream"] = st.upstream
        if st.tls:
            rec["tls"] = st.tls
        if st.tls_error is not None:
            rec["tls_error"] = st.tls_error
        self._sessions.pop(info.id, None)
        # Sessions still open: 0 marks a point of the trail before which no
        # session can be open, where a crash trace's look back may stop.
        rec["sessions_open"] = len(self._sessions)
        return [rec]

    def _policy(self, info: SessionRef, st: _Session, event: PolicyDecision) -> list[Record]:
        rec = self._base("policy.decision", info, st)
        rec["rule"] = event.rule
        rec["action"] = event.action
        # As for ``command`` records: a refusal before login keeps no arguments.
        verb, args = recorded(event.command,
                              refused=st.user is None and event.action == "deny")
        rec["command"] = verb
        rec["args"] = [_clean(a) for a in args] if args is not None else None
        rec["enforced"] = event.enforced
        return [rec]


class _Ref:
    __slots__ = ("client", "id")

    def __init__(self, id: str, client: str) -> None:
        self.id = id
        self.client = client
