"""Session events in, audit records out: the record builder (no I/O).

``RecordBuilder.observe(info, event)`` returns the records (plain dicts, in
their final key order) that an event produces, keeping a little state per
session: the authenticated user, the UIDLs learned, the messages marked for
deletion, whether QUIT was sent.  Time comes from the injected clock.

What a record may contain is decided here, so this is where credentials are
kept out: commands appear only as ``Command.redacted_args()``, and nothing
reads SASL lines, PASS or APOP arguments.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from ..events import (
    AuthResult,
    CommandSent,
    Event,
    MessageComplete,
    MessageData,
    PolicyDecision,
    Response,
    SessionClosed,
    SessionOpened,
    State,
    StateChanged,
    TlsEstablished,
    TlsFailed,
    UidsLearned,
    UpstreamConnected,
    UpstreamFailed,
)
from ..pop3 import Command, message_number
from .config import MESSAGE_VERBS, AuditConfig

__all__ = ["Record", "RecordBuilder", "SessionRef", "close_reason", "rfc3339"]

Record = dict[str, Any]

# How much of a message's start is kept to find the configured headers.
HEADER_LIMIT = 65536
# Longest header value recorded (the rest is cut, with "...").
VALUE_LIMIT = 1024
_UNFOLD = re.compile(rb"\r?\n[ \t]+")


class SessionRef(Protocol):
    """What the builder needs to know about a session (``server.SessionInfo``)."""

    @property
    def id(self) -> str: ...

    @property
    def client(self) -> str: ...


def utcnow() -> datetime:
    """The real clock (the default; tests inject their own)."""
    return datetime.now(UTC)


_second_prefix: list[Any] = [-1, ""]  # the last whole second seen, formatted


def utcnow_rfc3339() -> str:
    """``rfc3339(utcnow())`` without a datetime: every record needs one, and
    the date and time of day change only once a second."""
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    cache = _second_prefix
    if second != cache[0]:
        cache[0] = second
        cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
    # str() of a seven-digit number, less its leading 1: the six digits,
    # zero-padded, without a format specification to interpret.
    return f"{cache[1]}{str(1_000_000 + micro)[1:]}Z"


def rfc3339(t: datetime) -> str:
    """``2026-11-27T14:24:03.000123Z``: UTC, always with microseconds.

    A naive ``t`` is taken to be UTC already.
    """
    if t.tzinfo is None:
        return t.isoformat(timespec="microseconds") + "Z"
    if t.tzinfo is not UTC:
        t = t.astimezone(UTC)
    return t.isoformat(timespec="microseconds")[:-6] + "Z"  # drop "+00:00"


def close_reason(raw: str, upstream_failed: bool = False) -> str:
    """The core's reason for ending a session, as one of a few stable words.

    quit, client gone, client error, idle timeout, upstream error, shutdown,
    refused, other.  The core's own wording goes into ``detail``.
    """
    text = raw.lower()
    if text == "quit":
        return "quit"
    if text in ("shutdown", "proxy shutting down"):
        return "shutdown"
    if text == "idle timeout":
        return "idle timeout"
    if text.startswith("upstream") or upstream_failed:
        return "upstream error"
    if text in ("client closed", "peer gone or too slow", "closed"):
        return "client gone"
    if text.startswith("client"):
        return "client error"
    if "limit" in text or "audit" in text or "refus" in text:
        return "refused"
    return "other"


def _clean(text: str) -> str:
    """``text`` as valid UTF-8 (a client's undecodable bytes become U+FFFD)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def _number(cmd: Command) -> int | None:
    arg = cmd.args[0] if cmd.args else ""
    return message_number(arg)


def _seconds(value: float) -> float:
    """``value`` to the microsecond (``round(value, 6)``, a good deal cheaper)."""
    return round(value * 1e6) / 1e6


class _Session:
    __slots__ = (
        "client",
        "denied",
        "head",
        "head_done",
        "marks",
        "message_ids",
        "quit_sent",
        "state",
        "tls",
        "tls_error",
        "uids",
        "upstream",
        "upstream_failed",
        "user",
    )

    def __init__(self, client: str) -> None:
        self.client = client
        self.user: str | None = None
        self.state = State.GREETING
        self.uids: dict[int, str] = {}
        self.marks: dict[int, None] = {}  # insertion-ordered set of message numbers
        self.message_ids: dict[int, str] = {}
        self.head: bytearray | None = None  # start of the RETR/TOP body in flight
        self.head_done = False
        self.quit_sent = False  # QUIT went upstream in TRANSACTION
        self.denied: list[Command] = []  # by policy, reply not yet seen
        self.upstream: str | None = None
        self.upstream_failed = False
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
        self._headers = tuple((name, name.lower().encode("ascii")) for name in config.headers)
        self._handlers: dict[type[Event], Callable[[SessionRef, _Session, Any], list[Record]]] = {
            SessionOpened: self._opened,
            SessionClosed: self._closed,
            AuthResult: self._auth,
            CommandSent: self._sent,
            Response: self._response,
            MessageData: self._data,
            MessageComplete: self._message,
            UidsLearned: self._uids,
            StateChanged: self._state,
            UpstreamConnected: self._connected,
            UpstreamFailed: self._upstream_failed,
            TlsEstablished: self._tls,
            TlsFailed: self._tls_failed,
            PolicyDecision: self._policy,
        }

    @property
    def event_types(self) -> frozenset[type[Event]]:
        """The event types that can make a record or change a session's state."""
        kinds = set(self._handlers)
        if not self._headers:
            kinds.discard(MessageData)  # read only for the configured headers
        return frozenset(kinds)

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
            records += self._uncommitted(ref, st)
            rec = self._base("session.close", ref, st)
            rec.update(reason=reason, detail="audit trail closed before the session ended")
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

    def _upstream_failed(
        self, info: SessionRef, st: _Session, event: UpstreamFailed
    ) -> list[Record]:
        st.upstream_failed = True
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
        return [rec]

    def _sent(self, info: SessionRef, st: _Session, event: CommandSent) -> list[Record]:
        if event.command.verb == "QUIT" and st.state is State.TRANSACTION:
            st.quit_sent = True
        return []

    def _response(self, info: SessionRef, st: _Session, event: Response) -> list[Record]:
        cmd = event.command
        records: list[Record] = []
        outcome = self._outcome(st, event)
        if self._all_commands or cmd.verb in MESSAGE_VERBS:
            rec = self._base("command", info, st)
            rec["verb"] = cmd.verb
            rec["args"] = [_clean(a) for a in cmd.redacted_args()]
            rec["outcome"] = outcome
            if event.code is not None:
                rec["code"] = event.code
            latency = event.latency
            rec["latency"] = _seconds(latency) if latency is not None else None
            records.append(rec)
        if not event.ok:
            return records
        if cmd.verb == "DELE":
            msg = _number(cmd)
            if msg is not None:
                st.marks[msg] = None
                records.append(self._message_record("message.delete.marked", info, st, msg))
        elif cmd.verb == "RSET":
            rec = self._base("message.delete.reset", info, st)
            rec["msgs"] = sorted(st.marks)
            st.marks.clear()
            records.append(rec)
        return records

    def _outcome(self, st: _Session, event: Response) -> str:
        by_policy = False
        for i, cmd in enumerate(st.denied):  # usually empty
            if cmd == event.command:
                del st.denied[i]
                by_policy = True
                break
        if event.ok:
            return "ok"
        if not event.local:
            return "err"
        # A local -ERR is the proxy refusing the command (its own checks or
        # policy); a local [SYS/TEMP] stands in for an upstream that failed,
        # unless policy said no (a rate limit answers [SYS/TEMP] too).
        return "denied" if by_policy or event.code != "SYS/TEMP" else "err"

    def _message_record(self, name: str, info: SessionRef, st: _Session, msg: int) -> Record:
        rec = self._base(name, info, st)
        rec["msg"] = msg
        rec["uidl"] = st.uids.get(msg)
        message_id = st.message_ids.get(msg)
        if message_id is not None:
            rec["message_id"] = message_id
        return rec

    def _data(self, info: SessionRef, st: _Session, event: MessageData) -> list[Record]:
        if not self._headers or st.head_done:
            return []
        if st.head is None:
            st.head = bytearray()
        head = st.head
        start = max(0, len(head) - 3)
        head += event.data[: HEADER_LIMIT - len(head)]
        if len(head) >= HEADER_LIMIT or head.find(b"\r\n\r\n", start) >= 0:
            st.head_done = True
        return []

    def _message(self, info: SessionRef, st: _Session, event: MessageComplete) -> list[Record]:
        head, st.head, st.head_done = st.head, None, False
        rec = self._base("message.retrieve", info, st)
        verb = event.command.verb
        rec["command"] = verb
        rec["msg"] = event.msg
        lines = message_number(event.command.args[1]) if len(event.command.args) > 1 else None
        if verb == "TOP" and lines is not None:
            rec["lines"] = lines
        rec["uidl"] = st.uids.get(event.msg) if event.msg is not None else None
        rec["octets"] = event.octets
        rec["sha256"] = event.sha256
        rec["message_id"] = event.message_id
        rec["complete"] = event.complete
        if self._headers:
            rec["headers"] = self._pick_headers(bytes(head or b""))
        if event.msg is not None and event.message_id is not None:
            st.message_ids[event.msg] = event.message_id
        return [rec]

    def _pick_headers(self, data: bytes) -> dict[str, str | None]:
        end = data.find(b"\r\n\r\n")
        block = b"" if data.startswith(b"\r\n") else data[: end + 2] if end >= 0 else data
        found: dict[str, str | None] = {name: None for name, _ in self._headers}
        wanted = dict((low, name) for name, low in self._headers)
        for line in _UNFOLD.sub(b" ", block).split(b"\r\n"):
            field, colon, value = line.partition(b":")
            if not colon:
                continue
            name = wanted.get(field.strip().lower())
            if name is not None and found[name] is None:
                text = value.strip().decode("utf-8", "replace")
                found[name] = text if len(text) <= VALUE_LIMIT else text[:VALUE_LIMIT] + "..."
        return found

    def _uids(self, info: SessionRef, st: _Session, event: UidsLearned) -> list[Record]:
        st.uids.update(event.uids)
        return []

    def _state(self, info: SessionRef, st: _Session, event: StateChanged) -> list[Record]:
        st.state = event.new
        records: list[Record] = []
        if event.old is State.TRANSACTION and event.new is State.UPDATE:
            # QUIT got +OK in TRANSACTION: the server removed what was marked.
            for msg in st.marks:
                records.append(self._message_record("message.delete.committed", info, st, msg))
            st.marks.clear()
        elif event.new is State.CLOSED:
            records += self._uncommitted(info, st)
        return records

    def _uncommitted(self, info: SessionRef, st: _Session) -> list[Record]:
        records = []
        for msg in st.marks:
            rec = self._message_record("message.delete.uncommitted", info, st, msg)
            if st.quit_sent:
                # QUIT reached the server but no +OK came back: it may have
                # removed some or all of them (RFC 1939 §6).
                rec["possibly_partial"] = True
            records.append(rec)
        st.marks.clear()
        return records

    def _closed(self, info: SessionRef, st: _Session, event: SessionClosed) -> list[Record]:
        records = self._uncommitted(info, st)
        rec = self._base("session.close", info, st)
        rec["reason"] = close_reason(event.reason, st.upstream_failed)
        rec["detail"] = event.reason
        rec["duration"] = _seconds(event.duration)
        rec["bytes_in"] = event.bytes_in
        rec["bytes_out"] = event.bytes_out
        rec["commands"] = event.commands
        rec["upstream_in"] = event.upstream_in
        rec["upstream_out"] = event.upstream_out
        if st.upstream is not None:
            rec["upstream"] = st.upstream
        if st.tls:
            rec["tls"] = st.tls
        if st.tls_error is not None:
            rec["tls_error"] = st.tls_error
        records.append(rec)
        self._sessions.pop(info.id, None)
        return records

    def _policy(self, info: SessionRef, st: _Session, event: Event) -> list[Record]:
        """``PolicyDecision`` (from the policy engine), read by attribute name:
        ``command`` (a ``Command``), ``rule``, ``action``, ``enforced`` (False
        in monitor mode)."""
        cmd = getattr(event, "command", None)
        rule = getattr(event, "rule", None)
        action = getattr(event, "action", None)
        action = str(action) if action is not None else None
        enforced = bool(getattr(event, "enforced", True))
        rec = self._base("policy.decision", info, st)
        rec["rule"] = str(rule) if rule is not None else None
        rec["action"] = action
        if isinstance(cmd, Command):
            rec["command"] = cmd.verb
            rec["args"] = [_clean(a) for a in cmd.redacted_args()]
            if enforced and action not in ("allow", "delay", "log") and len(st.denied) < 64:
                st.denied.append(cmd)
        else:
            rec["command"] = str(cmd) if cmd is not None else None
        rec["enforced"] = enforced
        return [rec]


class _Ref:
    __slots__ = ("client", "id")

    def __init__(self, id: str, client: str) -> None:
        self.id = id
        self.client = client
