"""The sans-IO proxy session: one client, one upstream, no I/O.

``Session.receive_client(data, now)`` and ``Session.receive_upstream(data,
now)`` take the bytes one side sent and return an ``Output``: what to write
to each side, the events for observers, and whether to close.  The relay in
``server.py`` does the I/O; everything protocol-shaped happens here.

Pipelining (RFC 2449 §6.6).  Client lines are parsed into a queue of
commands; commands are dispatched from the queue in order, each either
forwarded upstream or answered locally (state checks, policy), and every one
takes a slot in the ``_pending`` FIFO.  Upstream replies are matched to the
oldest forwarded slot; a local reply leaves only when it reaches the head, so
the client receives answers in the order it asked.  Commands that change how
later lines must be read or judged are barriers: nothing after them is
dispatched until their reply is complete (PASS, APOP, AUTH, QUIT, STLS), and
nothing after AUTH or STLS is even parsed (what follows AUTH is SASL data;
what follows STLS must be discarded, the STARTTLS-injection rule).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import deque
from dataclasses import dataclass, field

from .events import (
    AuthResult,
    CommandSent,
    Event,
    Greeting,
    MessageComplete,
    MessageData,
    PolicyDecision,
    ProtocolAnomaly,
    Response,
    State,
    StateChanged,
    UidsLearned,
    Unsolicited,
    UpstreamFailed,
)
from .policy import ALLOW, Decision, Delay, Deny, Facts, Note, Policy, allow_all
from .pop3 import (
    BodyReader,
    ClientProtocolError,
    Command,
    LineReader,
    MalformedLine,
    PipelineOverflow,
    UpstreamProtocolError,
    is_multiline,
    message_number,
    parse_command,
    parse_status,
)

__all__ = ["Output", "Session", "SessionLimits"]


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Per-session protocol limits (see ``[limits]`` in the configuration)."""

    command_line: int = 1024
    sasl_line: int = 16384
    # Commands parsed and not yet answered; one more is a PipelineOverflow.
    max_pipeline: int = 4096
    # Commands in flight upstream at once.  Small, so that the relay's writes
    # upstream never fill the socket buffer while the upstream is itself
    # blocked writing a large reply to us (the RFC 2449 §6.6 deadlock).
    window: int = 128
    window_octets: int = 16384
    status_line: int = 8192
    capa_octets: int = 65536
    header_octets: int = 65536
    # Malformed lines answered with -ERR before the session is closed.
    max_bad_lines: int = 10


@dataclass(slots=True)
class Output:
    """What the relay must do after feeding bytes to the session."""

    to_client: bytes = b""
    to_upstream: bytes = b""
    events: list[Event] = field(default_factory=list)
    close: str | None = None  # a reason, when both connections must close
    # After writing ``to_client``: start TLS on the client connection, then
    # call ``Session.tls_started``.  Nothing the client sent after STLS is kept.
    start_tls: bool = False


class _Out:
    """Accumulates an ``Output`` without quadratic concatenation."""

    __slots__ = ("client", "close", "events", "start_tls", "upstream")

    def __init__(self) -> None:
        self.client: list[bytes] = []
        self.upstream: list[bytes] = []
        self.events: list[Event] = []
        self.close: str | None = None
        self.start_tls = False

    def done(self) -> Output:
        c = self.client
        u = self.upstream
        return Output(
            c[0] if len(c) == 1 else b"".join(c),
            u[0] if len(u) == 1 else b"".join(u),
            self.events,
            self.close,
            self.start_tls,
        )


@dataclass(slots=True)
class _Pending:
    command: Command
    started: float
    local_reply: bytes | None = None  # answered by the proxy, not upstream
    not_before: float | None = None  # a delayed local reply
    wire: int = 0  # octets sent upstream
    internal: bool = False  # the proxy's own command (UIDL n for the audit)


class _Message:
    """Running facts of a RETR/TOP body: octets, SHA-256, Message-ID."""

    __slots__ = ("command", "fresh", "header_limit", "headers", "headers_done", "octets", "sha")

    def __init__(self, command: Command, header_limit: int) -> None:
        self.command = command
        self.sha = hashlib.sha256()
        self.octets = 0
        self.header_limit = header_limit
        self.headers = bytearray()
        self.headers_done = False
        self.fresh = bytearray()  # content of this feed, while in the header window

    def add(self, piece: memoryview) -> None:
        """The sink for ``BodyReader``: hash and count every piece, keep the head."""
        self.sha.update(piece)
        self.octets += len(piece)
        if not self.headers_done:
            self.fresh += piece
            seen = len(self.headers)
            self.headers += piece[: self.header_limit - seen]
            if (self.headers.find(b"\r\n\r\n", max(0, seen - 3)) >= 0
                    or len(self.headers) >= self.header_limit):
                self.headers_done = True

    def complete(self, whole: bool) -> MessageComplete:
        number = message_number(self.command.args[0]) if self.command.args else None
        return MessageComplete(
            self.command, number, self.octets, self.sha.hexdigest(), self.message_id(), whole
        )

    def message_id(self) -> str | None:
        head = bytes(self.headers).split(b"\r\n\r\n", 1)[0]
        m = _MESSAGE_ID.search(head)
        if not m:
            return None
        value = re.sub(rb"\r\n[ \t]+", b" ", m.group(1)).strip()
        return value.decode("utf-8", "replace") or None


_STLS_OK = b"+OK Begin TLS negotiation\r\n"
_NAMES_A_MESSAGE = frozenset({"RETR", "TOP", "DELE"})
# Stands for a line that could not be parsed, in events and the FIFO.
INVALID = Command("INVALID")
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")
_APOP_STAMP = re.compile(rb"<[^<>@\s]+@[^<>\s]+>")

# Verbs a client may send before login (RFC 1939, 2449, 2595, 5034, 6856).
_PRE_AUTH = frozenset({"USER", "PASS", "APOP", "AUTH", "CAPA", "QUIT", "STLS", "UTF8", "LANG"})
# Standard verbs that only make sense before login.
_AUTH_ONLY = frozenset({"USER", "PASS", "APOP", "AUTH", "STLS", "UTF8"})
# Only the proxy may tell the upstream who the client is (field notes 1.10).
_NEVER_FORWARDED = frozenset({"XCLIENT", "XOIP", "PROXY"})
# Dispatch barriers: the reply decides the state later commands run in.
_BARRIERS = frozenset({"PASS", "APOP", "QUIT", "STLS"})
# Forwarded commands that name who is logging in.
_LOGIN_NAMING = frozenset({"USER", "AUTH"})
_SASL_LINE = re.compile(rb"[A-Za-z0-9+/=]*|\*")


def _decode(text: bytes) -> str:
    return text.decode("utf-8", "replace")


class Session:
    """One proxied POP3 session, as a pure state machine.

    ``policy`` is consulted for every command the core itself would forward.
    Any exception other than ``ProtocolError`` subclasses escaping from this
    class is a bug.
    """

    def __init__(
        self,
        limits: SessionLimits | None = None,
        policy: Policy = allow_all,
        *,
        client: str | None = None,
        tls: bool = False,
        starttls: bool = False,
        require_tls_for_auth: bool = False,
        resolve_uidl: bool = False,
    ) -> None:
        self.limits = limits or SessionLimits()
        self.policy = policy
        self.client = client
        self.tls = tls
        # The listener can upgrade this connection with STLS (RFC 2595).
        self.starttls = starttls
        self.require_tls_for_auth = require_tls_for_auth
        # Ask the upstream for a message's UIDL before RETR/TOP/DELE when the
        # client never listed it, so the audit can name the message.
        self.resolve_uidl = resolve_uidl
        self._uids: set[int] = set()
        self.state = State.GREETING
        self.user: str | None = None  # authenticated user, once known
        self.commands_sent = 0  # client commands forwarded upstream
        self.apop_timestamp = False
        self._asserted_user: str | None = None  # from USER, before PASS succeeds
        self._client_ip = client.rsplit(":", 1)[0].strip("[]") if client else None
        self._sizes: dict[int, int] = {}  # message sizes from LIST replies
        self._facts: Facts | None = None
        self._facts_key: tuple[object, ...] = ()
        self._wake_at: float | None = None
        self._held_until: float | None = None  # a delayed command waits
        self._swallow = False  # a refused RETR body is read and dropped
        self._lines = LineReader(
            self.limits.command_line, long_prefix=b"AUTH ", long_limit=self.limits.sasl_line
        )
        self._queue: deque[Command | MalformedLine] = deque()
        self._bad_lines = 0
        self._pending: deque[_Pending] = deque()
        self._inflight = 0
        self._inflight_octets = 0
        self._barrier: _Pending | None = None
        self._parse_stopped = False  # an AUTH or STLS in the queue/pending
        self._discard_client = False  # after STLS, until its reply is out
        self._ubuf = b""
        self._body: BodyReader | None = None
        self._body_octets = 0
        self._capa: bytearray | None = None
        self._message: _Message | None = None
        self._listing: _Listing | None = None
        self._status_head: tuple[bool, str | None, bytes] = (True, None, b"")
        self._sasl_expected = False
        self._sasl_mech: str | None = None
        self._sasl_user: str | None = None
        self._sasl_responses = 0
        self._client_eof = False  # half-closed: answer what was sent, then end
        self._closed = False

    # ------------------------------------------------------------------
    # Public API

    def receive_client(self, data: bytes, now: float) -> Output:
        """Feed bytes from the client. ``ClientProtocolError`` on bad input."""
        out = _Out()
        if self._closed:
            return out.done()
        if self._discard_client:
            out.events.append(ProtocolAnomaly("client", "data-after-stls", f"{len(data)} octets"))
            return out.done()
        self._lines.feed(data)
        try:
            self._progress(out, now)
            # All complete lines are parsed unless an AUTH exchange holds
            # parsing back; then a client that keeps talking is stopped here.
            if self._lines.buffered > self.limits.sasl_line + self.limits.command_line:
                raise PipelineOverflow("client sent too much without waiting for a reply")
        except ClientProtocolError as exc:
            # Fatal: what was already produced still goes out, then the
            # error line, then the connection closes.
            out.events.append(ProtocolAnomaly("client", type(exc).__name__, str(exc)))
            if not self.mid_reply:  # never an -ERR inside a message body
                out.client.append(exc.reply)
            self._end_with(out, "client protocol error", now)
        return out.done()

    def receive_upstream(self, data: bytes, now: float) -> Output:
        """Feed bytes from upstream. ``UpstreamProtocolError`` on non-POP3."""
        out = _Out()
        if self._closed:
            return out.done()
        try:
            self._receive_upstream(data, out, now)
            self._end_if_drained(out, now)
        except UpstreamProtocolError as exc:
            out.events.append(ProtocolAnomaly("upstream", type(exc).__name__, str(exc)))
            out.events.append(UpstreamFailed("protocol"))
            failed = self.fail("upstream protocol error", now)
            out.client.append(failed.to_client)
            out.events.extend(failed.events)
            out.close = failed.close
        return out.done()

    def _receive_upstream(self, data: bytes, out: _Out, now: float) -> None:
        buf = self._ubuf + data if self._ubuf else data
        self._ubuf = b""
        pos = 0
        n = len(buf)
        while pos < n and not self._closed:
            if self._body is not None:
                pos += self._feed_body(buf if pos == 0 else buf[pos:], out, now)
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if n - pos > self.limits.status_line:
                    raise UpstreamProtocolError("upstream status line too long")
                self._ubuf = buf[pos:]
                break
            raw = buf[pos : nl + 1]
            pos = nl + 1
            if len(raw) > self.limits.status_line:
                raise UpstreamProtocolError("upstream status line too long")
            line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            self._on_status_line(line, raw, out, now)
        self._progress(out, now)

    def client_closed(self, now: float) -> Output:
        """The client sent EOF.

        A client may half-close right after its last command (``printf ... |
        nc``): what it sent is carried out and answered, then the session
        ends.  With nothing owed it ends at once; so it does when the client
        stopped in the middle of a message (it is not reading: the message is
        recorded as cut short) or of an AUTH exchange (nothing can go on).
        """
        out = _Out()
        if self._closed:
            return out.done()
        auth = self._barrier is not None and self._barrier.command.verb == "AUTH"
        if self.mid_reply or self._sasl_expected or auth:
            return self.close("client closed", now)
        self._client_eof = True
        self._progress(out, now)
        self._end_if_drained(out, now)
        return out.done()

    def expire(self, why: str, now: float) -> Output:
        """A limit of the relay's passed (idle, session age): say so and end.

        The notice is ``-ERR [SYS/TEMP] <why>``, unless a message body is
        being written, where any line from the proxy would corrupt it.
        """
        mid_reply = self.mid_reply
        out = self.close(why, now)
        if not mid_reply:
            text = "disconnected for inactivity" if why == "idle timeout" else why
            out.to_client = b"-ERR [SYS/TEMP] " + text.encode() + b"\r\n"
        return out

    def refuse(self, why: str, now: float) -> Output:
        """Turn the client away before anything else: the line to send instead
        of a greeting (session caps, admission gates)."""
        out = self.close(why, now)
        out.to_client = b"-ERR [SYS/TEMP] " + why.encode() + b"\r\n"
        return out

    def client_gone(self, now: float) -> Output:
        """The client connection broke: abandon everything."""
        return self.close("client closed", now)

    def _end_if_drained(self, out: _Out, now: float) -> None:
        if (self._client_eof and not self._closed and not self._pending
                and not self._queue and self._body is None):
            self._end_with(out, "client closed", now)

    def close(self, reason: str, now: float) -> Output:
        """End the session without another word to either side.

        Idempotent.  A RETR/TOP cut short is reported as incomplete.
        """
        return self._end(reason, now)

    def upstream_closed(self, now: float) -> Output:
        """The upstream closed; owed replies become ``-ERR [SYS/TEMP]``."""
        owed = self.owes_upstream_reply and not self._closed
        out = self.fail("upstream closed the connection", now)
        if owed:
            out.events.insert(0, UpstreamFailed("closed"))
        return out

    def fail(self, reason: str, now: float) -> Output:
        """Give up on the upstream (closed, timed out, unreachable, broken).

        Every reply still owed to the client becomes ``-ERR [SYS/TEMP]
        <reason>``, except inside a multi-line body, where the only honest
        thing left is to close.
        """
        out = _Out()
        if not self._closed:
            if not self.mid_reply:
                err = b"-ERR [SYS/TEMP] " + reason.encode() + b"\r\n"
                if self.state is State.GREETING:
                    out.client.append(err)
                for p in self._pending:
                    if p.internal:
                        continue
                    out.client.append(p.local_reply or err)
                    if p.local_reply is None:
                        self._emit_response(p, False, "SYS/TEMP", reason, len(err), True, out, now)
                self._pending.clear()
            end = self._end(reason, now)
            out.events.extend(end.events)
        out.close = reason
        return out.done()

    @property
    def mid_reply(self) -> bool:
        """Part of a multi-line reply has gone to the client: a line from the
        proxy now would land inside it.  (CAPA is held back for rewriting,
        and a refused RETR's body is dropped: neither counts.)"""
        return self._body is not None and self._capa is None and not self._swallow

    @property
    def owes_upstream_reply(self) -> bool:
        """A forwarded command (or the greeting) awaits the upstream."""
        return self.state is State.GREETING or self._inflight > 0 or self._body is not None

    # ------------------------------------------------------------------
    # Client side

    def _progress(self, out: _Out, now: float) -> None:
        """Parse, dispatch and flush until nothing more can move."""
        while not self._closed:
            self._parse(out)
            moved = self._dispatch(out, now)
            moved |= self._flush(out, now)
            # Another round can only move something if a command waits in
            # the queue or a whole line waits in the buffer.
            if not moved or (not self._queue and not self._lines.has_line()):
                return

    def _parse(self, out: _Out) -> None:
        if self._sasl_expected:
            line = self._lines.next_line(self.limits.sasl_line)
            if line is None:
                return
            self._sasl_expected = False
            if not _SASL_LINE.fullmatch(line):
                raise MalformedLine(
                    "SASL response is not base64", reply=b"-ERR malformed SASL response\r\n"
                )
            # Only the first client response can name the user (PLAIN without
            # an initial response, LOGIN's user-name prompt); a later one may
            # be the password itself.
            if self._sasl_responses == 0 and self._sasl_user is None and line != b"*":
                self._sasl_user = _sasl_user(self._sasl_mech, line)
            self._sasl_responses += 1
            out.upstream.append(line + b"\r\n")
            return
        limit = self.limits.max_pipeline
        while not self._parse_stopped:
            try:
                line = self._lines.next_line()
                if line is None:
                    return
                item: Command | MalformedLine = parse_command(line)
            except MalformedLine as exc:
                # The line was consumed, so framing is intact: answer it with
                # -ERR in its turn, and close only a client that keeps at it.
                self._bad_lines += 1
                if self._bad_lines > self.limits.max_bad_lines:
                    raise MalformedLine(
                        "too many malformed commands", reply=b"-ERR too many bad commands\r\n"
                    ) from None
                out.events.append(ProtocolAnomaly("client", "malformed-line", str(exc)))
                item = exc
            if len(self._queue) + len(self._pending) >= limit:
                raise PipelineOverflow(f"more than {limit} commands pipelined")
            self._queue.append(item)
            if not isinstance(item, Command):
                continue
            cmd = item
            if cmd.verb == "STLS" or (cmd.verb == "AUTH" and cmd.args):
                self._parse_stopped = True
                if cmd.verb == "STLS":
                    # RFC 2595 §4 and the STARTTLS-injection class of bugs:
                    # whatever was pipelined after STLS is never executed.
                    dropped = self._lines.discard()
                    self._discard_client = True
                    if dropped:
                        out.events.append(
                            ProtocolAnomaly("client", "data-after-stls", f"{dropped} octets")
                        )

    def _dispatch(self, out: _Out, now: float) -> bool:
        moved = False
        lim = self.limits
        while (
            self._queue
            and self._barrier is None
            and self.state is not State.GREETING
            and self._inflight < lim.window
            and self._inflight_octets < lim.window_octets
            and (self._held_until is None or now >= self._held_until)
        ):
            item = self._queue.popleft()
            if not isinstance(item, Command):
                self._pending.append(_Pending(INVALID, now, item.reply))
                moved = True
                continue
            cmd = item
            verb = cmd.verb
            reply, decision = self._judge(cmd, now)
            if isinstance(decision, Delay):
                # Held back: it keeps its place at the head of the queue, and
                # is judged again when the time comes.
                self._queue.appendleft(cmd)
                self._held_until = decision.until
                self._wake_at = (decision.until if self._wake_at is None
                                 else min(self._wake_at, decision.until))
                self._note(decision.notes, cmd, out)
                return moved
            self._held_until = None
            moved = True
            if decision.notes:
                self._note(decision.notes, cmd, out)
            p = _Pending(cmd, now, reply)
            if isinstance(decision, Deny) and decision.delay > 0:
                p.not_before = now + decision.delay
            self._pending.append(p)
            # A refusal held back (a tarpit) is a barrier too: nothing behind
            # it is sent upstream, whose reply would have to wait behind it.
            if (verb in _BARRIERS or (verb == "AUTH" and cmd.args)
                    or p.not_before is not None):
                self._barrier = p
            if reply is not None:
                continue
            if self.resolve_uidl and verb in _NAMES_A_MESSAGE:
                self._inject_uidl(p, out, now)
            wire = bytes(cmd)
            out.upstream.append(wire)
            out.events.append(CommandSent(cmd, now))
            self.commands_sent += 1
            p.wire = size = len(wire)
            self._inflight += 1
            self._inflight_octets += size
            if verb in _LOGIN_NAMING and cmd.args:
                self._learn_login(cmd)
        return moved

    def _learn_login(self, cmd: Command) -> None:
        """Who a USER or AUTH command says is logging in (for policy and audit)."""
        if cmd.verb == "USER":
            self._asserted_user = cmd.args[0]
            return
        self._sasl_mech = cmd.args[0].upper()
        self._sasl_responses = 1 if len(cmd.args) > 1 else 0
        self._sasl_user = (
            _sasl_user(self._sasl_mech, cmd.args[1].encode("ascii", "replace"))
            if len(cmd.args) > 1
            else None
        )

    def _inject_uidl(self, p: _Pending, out: _Out, now: float) -> None:
        """Send ``UIDL n`` ahead of ``p`` when message n's UIDL is unknown.

        Its reply is the proxy's: consumed here, never forwarded.  It goes in
        front of ``p`` in the FIFO, so every client reply keeps its order.
        """
        number = message_number(p.command.args[0]) if p.command.args else None
        if number is None or number in self._uids:
            return
        probe = _Pending(Command("UIDL", (str(number),)), now, internal=True)
        wire = bytes(probe.command)
        probe.wire = len(wire)
        self._pending.pop()  # p, appended just before
        self._pending.append(probe)
        self._pending.append(p)
        out.upstream.append(wire)
        self._inflight += 1
        self._inflight_octets += probe.wire
        self._uids.add(number)  # asked once per message, whatever the answer

    def _judge(self, cmd: Command, now: float) -> tuple[bytes | None, Decision]:
        """The core's own checks, then policy; a None reply means forward."""
        verb = cmd.verb
        if verb == "STLS":
            # The proxy answers STLS itself and never forwards it: an
            # end-to-end TLS tunnel would blind policy and audit.
            if self.tls:
                return b"-ERR already using TLS\r\n", ALLOW
            if self.state is not State.AUTHORIZATION:
                return b"-ERR STLS is only valid before login\r\n", ALLOW
            if not self.starttls:
                return b"-ERR STLS is not available on this port\r\n", ALLOW
            return _STLS_OK, ALLOW
        if (
            self.require_tls_for_auth
            and not self.tls
            and (verb in ("USER", "PASS", "APOP") or (verb == "AUTH" and cmd.args))
        ):
            # RFC 2595 §2.1: no credentials in cleartext; they never go upstream.
            return b"-ERR [AUTH] TLS is required to log in: use STLS\r\n", ALLOW
        if verb in _NEVER_FORWARDED:
            return b"-ERR command not allowed\r\n", ALLOW
        if self.state is State.AUTHORIZATION:
            if verb not in _PRE_AUTH:
                return f"-ERR {verb} is not valid before login\r\n".encode(), ALLOW
        elif self.state is State.TRANSACTION and verb in _AUTH_ONLY:
            return f"-ERR {verb} is not valid after login\r\n".encode(), ALLOW
        elif self.state is not State.TRANSACTION:
            return b"-ERR session is ending\r\n", ALLOW
        decision = self.policy.decide(self.facts(), cmd, now)
        if isinstance(decision, Deny):
            return decision.reply, decision
        return None, decision

    def facts(self) -> Facts:
        """What policy knows of this session now (rebuilt only when it changes)."""
        key = (self.state, self.user, self.tls, self._asserted_user)
        if self._facts is None or self._facts_key != key:
            self._facts_key = key
            self._facts = Facts(
                self.state, self.user, self.client, self.tls,
                client_ip=self._client_ip, login_user=self._asserted_user, sizes=self._sizes,
            )
        return self._facts

    def _note(self, notes: tuple[Note, ...], cmd: Command, out: _Out) -> None:
        for n in notes:
            out.events.append(PolicyDecision(n.rule, n.action, cmd, n.enforced))

    def tick(self, now: float) -> Output:
        """Time passed: release delayed commands and replies that are due."""
        out = _Out()
        if not self._closed:
            self._wake_at = None
            self._progress(out, now)
        return out.done()

    @property
    def wake_at(self) -> float | None:
        """When ``tick`` must be called next, if something waits on the clock."""
        return self._wake_at

    def _flush(self, out: _Out, now: float) -> bool:
        """Send local replies that have reached the head of the FIFO."""
        moved = False
        while self._pending and self._pending[0].local_reply is not None:
            due = self._pending[0].not_before
            if due is not None and due > now:
                # A tarpit: the refusal goes out later, and nothing behind it.
                self._wake_at = due if self._wake_at is None else min(self._wake_at, due)
                break
            p = self._pending.popleft()
            reply = p.local_reply or b""
            out.client.append(reply)
            status = parse_status(reply.rstrip(b"\r\n"))
            self._emit_response(
                p, status is not None and status.ok, status.code if status else None,
                _decode(status.text if status else reply.rstrip()), len(reply), True, out, now,
            )
            self._release(p, out)
            moved = True
        return moved

    def _release(self, p: _Pending, out: _Out) -> None:
        if self._barrier is p:
            self._barrier = None
            if p.local_reply is _STLS_OK:
                # Parsing resumes only after the handshake (``tls_started``);
                # until then every client octet is discarded.
                out.start_tls = True
                return
            if p.command.verb in ("STLS", "AUTH"):
                self._parse_stopped = False
                self._discard_client = False

    def tls_started(self, now: float) -> Output:
        """The relay finished the TLS handshake after STLS."""
        self.tls = True
        self._parse_stopped = False
        self._discard_client = False
        out = _Out()
        self._progress(out, now)
        return out.done()

    # ------------------------------------------------------------------
    # Upstream side

    def _on_status_line(self, line: bytes, raw: bytes, out: _Out, now: float) -> None:
        status = parse_status(line)
        if self.state is State.GREETING:
            if status is None or status.continuation:
                raise UpstreamProtocolError("upstream greeting is not POP3")
            out.client.append(raw)  # verbatim, so APOP digests stay valid
            self.apop_timestamp = bool(_APOP_STAMP.search(line))
            out.events.append(Greeting(status.ok, _decode(status.text), self.apop_timestamp))
            if status.ok:
                self._set_state(State.AUTHORIZATION, out)
            else:
                out.events.append(UpstreamFailed("refused"))
                self._end_with(out, "upstream refused the session", now)
            return
        head = self._head_forwarded()
        if head is None:
            if status is None:
                raise UpstreamProtocolError("upstream sent a line nobody asked for")
            out.events.append(Unsolicited(status.ok, status.code, _decode(status.text)))
            return
        if status is None:
            raise UpstreamProtocolError("upstream reply is not +OK/-ERR")
        cmd = head.command
        if head.internal:
            # Our own UIDL n: single-line either way, and only ours to read.
            self._pending.popleft()
            self._inflight -= 1
            self._inflight_octets -= head.wire
            entry = _listing_line(status.text) if status.ok else None
            if entry is not None:
                out.events.append(UidsLearned((entry,)))
            self._flush(out, now)
            return
        if status.continuation:
            if cmd.verb == "AUTH" and cmd.args:
                out.client.append(raw)
                self._sasl_expected = True
                return
            raise UpstreamProtocolError("SASL continuation outside an AUTH exchange")
        if status.ok and is_multiline(cmd):
            self._body = BodyReader()
            self._body_octets = len(raw)
            self._status_head = (status.ok, status.code, status.text)
            if cmd.verb == "RETR" and self._refuse_size(cmd, status.text, out, now):
                return
            if cmd.verb == "CAPA":
                self._capa = bytearray(raw)
            else:
                out.client.append(raw)
                if cmd.verb in ("RETR", "TOP"):
                    self._message = _Message(cmd, self.limits.header_octets)
                elif cmd.verb == "UIDL":
                    self._listing = _Listing()
                elif cmd.verb == "LIST":
                    self._listing = _Listing(self._sizes)
            return
        if status.ok and self._refuse_login(cmd, out, now):
            return
        out.client.append(raw)
        if status.ok and cmd.verb in ("UIDL", "LIST") and cmd.args:
            entry = _listing_line(status.text)
            if entry is not None and cmd.verb == "UIDL":
                self._uids.add(entry[0])
                out.events.append(UidsLearned((entry,)))
            elif entry is not None and entry[1].isdigit():
                self._sizes[entry[0]] = int(entry[1])
        self._complete(head, status.ok, status.code, status.text, len(raw), out, now)

    def _refuse_size(self, cmd: Command, text: bytes, out: _Out, now: float) -> bool:
        """Refuse a RETR whose announced size policy forbids; swallow its body."""
        first = text.split(b" ", 1)[0]
        if not first.isdigit():
            return False
        refusal = self.policy.admit_size(self.facts(), cmd, int(first))
        if refusal is None:
            return False
        self._swallow = True
        out.client.append(refusal.reply)
        self._note((Note(refusal.rule or "builtin", "deny", True),), cmd, out)
        head = self._pending[0]
        self._emit_response(head, False, None, _decode(refusal.reply[5:].rstrip()),
                            len(refusal.reply), True, out, now)
        return True

    def _refuse_login(self, cmd: Command, out: _Out, now: float) -> bool:
        """The upstream accepted a login that policy does not admit: refuse and close."""
        if not (cmd.verb in ("PASS", "APOP") or (cmd.verb == "AUTH" and cmd.args)):
            return False
        user = self._login_user(cmd)
        if user is None:
            return False
        refusal = self.policy.admit_login(self.facts(), user, now)
        if refusal is None:
            return False
        out.client.append(refusal.reply)
        self._note((Note(refusal.rule or "builtin", "deny", True),), cmd, out)
        status = parse_status(refusal.reply.rstrip(b"\r\n"))
        code = status.code if status else None
        self._complete(self._pending[0], False, code, refusal.reply[5:].rstrip(),
                       len(refusal.reply), out, now)
        # The upstream session is logged in; leaving without QUIT changes nothing.
        self._end_with(out, "policy refused the login", now)
        return True

    def _login_user(self, cmd: Command) -> str | None:
        if cmd.verb == "PASS":
            return self._asserted_user
        if cmd.verb == "APOP":
            return cmd.args[0] if cmd.args else None
        return self._sasl_user

    def _feed_body(self, data: bytes, out: _Out, now: float) -> int:
        """Stream part of a multi-line body; return how much of ``data`` it took."""
        assert self._body is not None
        msg = self._message
        listing = self._listing
        end = self._body.feed(
            data, msg.add if msg is not None else listing.feed if listing is not None else None
        )
        part = data if end < 0 else data[:end]
        self._body_octets += len(part)
        if self._capa is not None:
            self._capa += part
            if len(self._capa) > self.limits.capa_octets:
                raise UpstreamProtocolError("CAPA reply too long")
        elif not self._swallow:
            out.client.append(part)
        if msg is not None and msg.fresh:
            # Observers see the head of the message (its headers), not every
            # chunk: the body streams without per-chunk events.
            out.events.append(MessageData(msg.command, bytes(msg.fresh), msg.octets))
            msg.fresh.clear()
        if end < 0:
            return len(data)
        self._body = None
        head = self._head_forwarded()
        assert head is not None
        if self._swallow:
            # The refusal already went out in place of the status line.
            self._swallow = False
            self._pending.popleft()
            self._inflight -= 1
            self._inflight_octets -= head.wire
            self._flush(out, now)
            return end
        if self._capa is not None:
            capa = _rewrite_capa(
                bytes(self._capa),
                offer_stls=self.starttls and not self.tls
                and self.state is State.AUTHORIZATION,
                hide_user=self.require_tls_for_auth and not self.tls,
            )
            self._capa = None
            out.client.append(capa)
            self._body_octets = len(capa)
        if msg is not None:
            self._message = None
            out.events.append(msg.complete(True))
        if self._listing is not None:
            if self._listing.uids:
                self._uids.update(n for n, _ in self._listing.uids)
                out.events.append(UidsLearned(tuple(self._listing.uids)))
            self._listing = None
        ok, code, text = self._status_head
        self._complete(head, ok, code, text, self._body_octets, out, now)
        return end

    def _head_forwarded(self) -> _Pending | None:
        # Local replies never sit at the head while a reply is awaited: they
        # are flushed as soon as they get there.  So the head is the one.
        if self._pending and self._pending[0].local_reply is None:
            return self._pending[0]
        return None

    def _complete(
        self, p: _Pending, ok: bool, code: str | None, text: bytes, octets: int,
        out: _Out, now: float,
    ) -> None:
        self._pending.popleft()
        self._inflight -= 1
        self._inflight_octets -= p.wire
        self._emit_response(p, ok, code, _decode(text), octets, False, out, now)
        verb = p.command.verb
        if verb in ("PASS", "APOP") or (verb == "AUTH" and p.command.args):
            self._auth_done(p.command, ok, code, out, now)
        elif verb == "QUIT":
            if ok and self.state is State.TRANSACTION:
                self._set_state(State.UPDATE, out)
            self._end_with(out, "quit", now)
        self._release(p, out)
        # Local replies queued behind this one go out now, before the next
        # upstream line is matched to the FIFO head.
        self._flush(out, now)

    def _auth_done(
        self, cmd: Command, ok: bool, code: str | None, out: _Out, now: float
    ) -> None:
        user = self._login_user(cmd)
        if cmd.verb in ("PASS", "APOP"):
            mech = "USER" if cmd.verb == "PASS" else "APOP"
        else:
            mech = self._sasl_mech or "?"
            self._sasl_expected = False
            self._sasl_mech = self._sasl_user = None
        result = AuthResult(mech, user, ok, code)
        out.events.append(result)
        self.policy.observe(self.facts(), result, now)
        if ok:
            self.user = user
            self._set_state(State.TRANSACTION, out)

    # ------------------------------------------------------------------
    # Endings and helpers

    def _emit_response(
        self, p: _Pending, ok: bool, code: str | None, text: str, octets: int,
        local: bool, out: _Out, now: float,
    ) -> None:
        event = Response(p.command, ok, code, text, octets, local, p.started, now)
        out.events.append(event)
        if not local:
            self.policy.observe(self.facts(), event, now)

    def _set_state(self, new: State, out: _Out) -> None:
        if new is not self.state:
            out.events.append(StateChanged(self.state, new))
            self.state = new

    def _end_with(self, out: _Out, reason: str, now: float) -> None:
        end = self._end(reason, now)
        out.events.extend(end.events)
        out.close = reason

    def _end(self, reason: str, now: float) -> Output:
        out = _Out()
        if self._closed:
            return out.done()
        msg = self._message
        if msg is not None:
            self._message = None
            out.events.append(msg.complete(False))
        self._set_state(State.CLOSED, out)
        self._closed = True
        self._body = None
        out.close = reason
        return out.done()


# "n token": a message number and a UIDL (RFC 1939 §7: 1-70 octets in
# 0x21-0x7E) or a size; anything after the token is ignored.
_LISTING_LINE = re.compile(rb"(\d+) ([\x21-\x7e]{1,70})(?: |$)")


def _listing_line(line: bytes) -> tuple[int, str] | None:
    """``b"3 XYZ"`` -> (3, "XYZ") for UIDL and LIST lines; None otherwise."""
    m = _LISTING_LINE.match(line)
    if m is None:
        return None
    return int(m.group(1)), m.group(2).decode("ascii")


class _Listing:
    """Collects ``n token`` lines of a UIDL or LIST listing as the body streams.

    For UIDL it keeps the unique ids; given ``sizes``, it records LIST sizes
    there instead.
    """

    __slots__ = ("_partial", "sizes", "uids")

    # A mailbox with more messages than this is listed only in part.
    MAX_ENTRIES = 1_000_000

    def __init__(self, sizes: dict[int, int] | None = None) -> None:
        self._partial = b""
        self.sizes = sizes
        self.uids: list[tuple[int, str]] = []

    def feed(self, content: memoryview) -> None:
        if not content:
            return
        lines = (self._partial + bytes(content)).split(b"\r\n")
        self._partial = lines.pop()[:80]  # a listing line is short; cap the carry
        for line in lines:
            entry = _listing_line(line)
            if entry is None:
                continue
            if self.sizes is not None:
                if entry[1].isdigit() and len(self.sizes) < self.MAX_ENTRIES:
                    self.sizes[entry[0]] = int(entry[1])
            elif len(self.uids) < self.MAX_ENTRIES:
                self.uids.append(entry)


def _rewrite_capa(raw: bytes, *, offer_stls: bool, hide_user: bool) -> bytes:
    """Make a CAPA reply tell the truth about what works through the proxy.

    STLS is the proxy's to offer, not the upstream's: it is removed, then
    added when this listener can upgrade the connection.  USER is hidden
    while cleartext logins are refused (as Dovecot does).  Everything else
    (PIPELINING, UIDL, TOP, RESP-CODES, SASL, ...) passes as advertised.
    """
    status, _, body = raw.partition(b"\n")
    lines = body.split(b"\r\n")  # the last two are "." and ""
    drop = {b"STLS", b"USER"} if hide_user else {b"STLS"}
    kept = [ln for ln in lines[:-2] if ln.split(b" ", 1)[0].upper() not in drop]
    if offer_stls:
        kept.append(b"STLS")
    return status + b"\n" + b"".join(ln + b"\r\n" for ln in kept) + b".\r\n"


def _sasl_user(mech: str | None, b64: bytes) -> str | None:
    """The authentication identity in a PLAIN or LOGIN response, if any.

    Only the user name is kept; the decoded bytes holding the password are
    dropped at once.  A name with CR, LF or NUL is not a name (nginx's
    credential-injection fix) and is not recorded.
    """
    if mech not in ("PLAIN", "LOGIN") or b64 in (b"=", b"*", b""):
        return None
    try:
        decoded = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if mech == "PLAIN":
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return None
        name = parts[1]
    else:
        name = decoded
    if any(c in name for c in b"\r\n\0"):
        return None
    return name.decode("utf-8", "replace") or None
