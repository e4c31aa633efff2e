"""The sans-IO proxy session: one client, one upstream, no I/O.

``Session.receive_client(data, now)`` and ``Session.receive_upstream(data,
now)`` take the bytes one side sent and return an ``Output``: what to write
to each side, the events for observers, and whether to close.  The relay
(``relay.py``) does the I/O; everything protocol-shaped happens here or in
``pop3/`` (framing, verbs, states).

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

from .addr import host_of
from .events import (
    CommandSent,
    EndReason,
    Greeting,
    MessageStarted,
    Outcome,
    ProtocolAnomaly,
    Response,
    StateChanged,
    Unsolicited,
    UpstreamFailed,
)
from .policy import Ask, Decision, Delay, Deny, Facts, Note, Policy, allow_all
from .pop3 import (
    BARRIERS,
    NAMES_A_MESSAGE,
    NEED_DATA,
    RETRIEVE,
    STLS_OK,
    BodyChunk,
    ClientProtocolError,
    Command,
    Expect,
    PipelineOverflow,
    Reply,
    ResponseReader,
    State,
    Status,
    Trigger,
    UpstreamProtocolError,
    announced_size,
    completes_login,
    has_apop_timestamp,
    is_multiline,
    local_reply,
    message_number,
    names_login,
    parse_status,
    starts_sasl,
    transition,
)
from .session_policy import PolicyDesk, note
from .session_state import (
    TOO_MANY_REFUSED,
    CommandInput,
    Listed,
    Login,
    Marks,
    Output,
    Pending,
    Pipeline,
    ReplyInProgress,
    local_status,
    quit_owed,
)
from .session_state import OutputBuilder as _Out
from .session_state import SessionLimits as SessionLimits

__all__ = ["INVALID", "Output", "Session", "SessionLimits"]


def _started(cmd: Command, text: bytes) -> MessageStarted:
    """A RETR/TOP body begins (with the size its status line announces)."""
    return MessageStarted(cmd, message_number(cmd.args[0]) if cmd.args else None,
                          announced_size(text))

# Stands for a line that could not be parsed, in events and the FIFO.
INVALID = Command("INVALID")


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
        self.limits = lim = limits or SessionLimits()
        self.policy = policy
        self._desk = PolicyDesk(policy)  # what waits on policy: the clock, shared state
        self.client = client
        self.tls = tls
        # The listener can upgrade this connection with STLS (RFC 2595).
        self.starttls = starttls
        self.require_tls_for_auth = require_tls_for_auth
        # Ask the upstream for a message's UIDL before RETR/TOP/DELE when the
        # client never listed it, so the audit can name the message.
        self.resolve_uidl = resolve_uidl
        # ``CommandSent`` is built only if an observer hears it (the shell
        # says; none of the production observers does).
        self.announce_sent = True
        self.state = State.GREETING
        self.user: str | None = None  # authenticated user, once known
        self.commands_sent = 0  # client commands forwarded upstream
        self.apop_timestamp = False
        self._listed = Listed()  # UIDLs and sizes the upstream's replies told
        self._client_ip = host_of(client)
        self._facts: Facts | None = None  # see facts()
        self._input = CommandInput(lim)
        self._pipeline = Pipeline()
        self._reader = ResponseReader(lim.status_line)
        self._reply: ReplyInProgress | None = None  # a multi-line reply streaming
        self._login = Login()
        self._marks = Marks()
        self._client_eof = False  # half-closed: answer what was sent, then end
        self._closed = False

    # ------------------------------------------------------------------
    # Public API

    def receive_client(self, data: bytes, now: float) -> Output:
        """Feed bytes from the client. ``ClientProtocolError`` on bad input."""
        out = _Out()
        if self._closed:
            return out.done()
        if self._input.discarding:
            out.events.append(ProtocolAnomaly("client", "data-after-stls", f"{len(data)} octets"))
            return out.done()
        lines = self._input.lines
        lines.feed(data)
        try:
            self._progress(out, now)
            # All complete lines are parsed unless an AUTH exchange holds
            # parsing back; then a client that keeps talking is stopped here.
            if lines.buffered > self.limits.sasl_line + self.limits.command_line:
                raise PipelineOverflow("client sent too much without waiting for a reply")
        except ClientProtocolError as exc:
            # Fatal: what was already produced still goes out, then the
            # error line, then the connection closes.
            out.events.append(ProtocolAnomaly("client", exc.kind, str(exc)))
            if not self.mid_reply:  # never an -ERR inside a message body
                out.client.append(exc.reply)
            self._end_with(out, EndReason.PROTOCOL_ERROR)
        return out.done()

    def receive_upstream(self, data: bytes, now: float) -> Output:
        """Feed bytes from upstream; what is not POP3 fails the session."""
        out = _Out()
        if self._closed:
            return out.done()
        self._reader.receive_data(data)
        self._read_upstream(out, now)
        cmds = self._input
        if cmds.queue or cmds.lines.buffered:  # else nothing waits to be parsed or sent
            self._progress(out, now)
        self._end_if_drained(out)
        return out.done()

    def _read_upstream(self, out: _Out, now: float) -> None:
        """Handle what the upstream sent, up to a login reply policy must ask about."""
        reader = self._reader
        entries = self._pipeline.entries
        try:
            while not self._closed and self._desk.held_login is None:
                # What the next line may be: the FIFO's head says (a local
                # reply never waits at the head while a reply is awaited).
                head = entries[0] if entries and entries[0].local_reply is None else None
                if reader.in_body or head is None:
                    expect = (Expect.SINGLE if reader.in_body
                              else Expect.GREETING if self.state is State.GREETING
                              else Expect.NOTHING)
                else:
                    expect = head.expect
                event = reader.next_event(expect)
                if event is NEED_DATA:
                    break
                if type(event) is BodyChunk:
                    self._on_chunk(event, out, now)
                else:
                    assert type(event) is Reply
                    self._on_reply(event, head, out, now)
        except UpstreamProtocolError as exc:
            out.events.append(ProtocolAnomaly("upstream", exc.kind, str(exc)))
            out.events.append(UpstreamFailed("protocol"))
            failed = self.fail(EndReason.UPSTREAM_PROTOCOL_ERROR, now)
            out.client.append(failed.to_client or exc.cut)
            out.events.extend(failed.events)
            out.close = failed.close

    def client_closed(self, now: float) -> Output:
        """The client sent EOF.

        A client may half-close right after its QUIT (``printf ... | nc
        -N``): what it sent is carried out and answered, then the session
        ends.  Without a QUIT awaiting its reply the client has left, and
        the session ends at once, not when a hanging upstream times out; so
        it does in the middle of a message (the client is not reading: the
        message is recorded as cut short).
        """
        out = _Out()
        if self._closed:
            return out.done()
        if self.mid_reply or not quit_owed(self._pipeline, self._input.queue):
            return self.close(EndReason.CLIENT_CLOSED)
        self._client_eof = True
        self._progress(out, now)
        self._end_if_drained(out)
        return out.done()

    def expire(self, reason: EndReason, text: str | None = None) -> Output:
        """A limit passed (idle, session age), or the client is turned away
        before its greeting (session caps, admission gates): say so, end.

        The notice is ``-ERR [SYS/TEMP] <text or reason.notice>``, unless a
        message body is being written, where any line would corrupt it.
        """
        mid_reply = self.mid_reply
        out = self.close(reason)
        if not mid_reply:
            out.to_client = b"-ERR [SYS/TEMP] " + (text or reason.notice).encode() + b"\r\n"
        return out

    def close(self, reason: EndReason) -> Output:
        """End the session without another word to either side.

        Idempotent.  A RETR/TOP cut short is reported as incomplete, marks
        not committed as uncommitted.
        """
        out = _Out()
        self._end_with(out, reason)
        return out.done()

    def upstream_closed(self, now: float) -> Output:
        """The upstream closed; owed replies become ``-ERR [SYS/TEMP]``."""
        owed = self.owes_upstream_reply and not self._closed
        out = self.fail(EndReason.UPSTREAM_CLOSED, now)
        if owed:
            out.events.insert(0, UpstreamFailed("closed"))
        return out

    def fail(self, reason: EndReason, now: float) -> Output:
        """Give up on the upstream (closed, timed out, unreachable, broken).

        Every reply still owed to the client becomes ``-ERR [SYS/TEMP]
        <reason.notice>``, except inside a multi-line body, where the only
        honest thing left is to close.
        """
        out = _Out()
        if not self._closed and not self.mid_reply:
            err = b"-ERR [SYS/TEMP] " + reason.notice.encode() + b"\r\n"
            if self.state is State.GREETING:
                out.client.append(err)
            for p in self._pipeline.entries:
                if p.local_reply is not None:
                    self._answer_locally(p, out, now)
                elif not p.internal:
                    out.client.append(err)
                    self._respond(p, False, "SYS/TEMP", reason.notice, len(err), True,
                                  Outcome.ERR, out, now)
            self._pipeline.entries.clear()
        self._end_with(out, reason)
        return out.done()

    def tls_started(self, now: float) -> Output:
        """The relay finished the TLS handshake after STLS."""
        self.tls = True
        self._facts = None
        self._input.resume()
        out = _Out()
        self._progress(out, now)
        return out.done()

    def tick(self, now: float) -> Output:
        """Time passed: release delayed commands and replies that are due."""
        out = _Out()
        if not self._closed:
            self._desk.wake_at = None
            self._progress(out, now)
        return out.done()

    def answered(self, decision: Decision, now: float) -> Output:
        """Shared state: the last ``Output.ask`` came to ``decision``."""
        out = _Out()
        held = self._desk.answered(decision)
        if held is not None:
            head, status, raw = held
            if isinstance(decision, Deny):
                self._refuse_login(head, decision, out, now)
            else:
                out.client.append(raw)
                self._complete(head, True, status.code, status.text, len(raw), out, now)
            self._read_upstream(out, now)
        if not self._closed:
            self._progress(out, now)
        return out.done()

    @property
    def wake_at(self) -> float | None:
        """When ``tick`` must be called next, if something waits on the clock."""
        return self._desk.wake_at

    @property
    def mid_reply(self) -> bool:
        """Part of a multi-line reply has gone to the client: a line from the
        proxy now would land inside it.  (CAPA is held back for rewriting,
        and a refused RETR's body is dropped: neither counts.)"""
        return self._reply is not None and self._reply.visible

    @property
    def owes_upstream_reply(self) -> bool:
        """A forwarded command (or the greeting) awaits the upstream."""
        return (self.state is State.GREETING or self._pipeline.inflight > 0
                or self._reply is not None)

    def facts(self) -> Facts:
        """What policy knows of this session now.

        Built again only after what it holds changed: the state, the user
        (asserted or logged in), TLS; every such change drops it.
        """
        facts = self._facts
        if facts is None:
            facts = self._facts = Facts(
                self.state, self.user, self.client, self.tls, client_ip=self._client_ip,
                login_user=self._login.asserted_user, sizes=self._listed.sizes,
            )
        return facts

    # ------------------------------------------------------------------
    # Client side

    def _progress(self, out: _Out, now: float) -> None:
        """Parse, dispatch and flush until nothing more can move."""
        cmds = self._input
        while not self._closed:
            if self._login.sasl_expected:
                line = cmds.sasl_line(self._login)
                if line is not None:
                    self._sasl_response(line, out, now)
            else:
                cmds.parse(len(self._pipeline.entries), out.events)
            moved = self._dispatch(out, now)
            moved |= self._flush(out, now)
            # Another round can only move something if a command waits in
            # the queue or a whole line waits in the buffer.
            if not moved or (not cmds.queue and not cmds.lines.has_line()):
                return

    def _dispatch(self, out: _Out, now: float) -> bool:
        moved = False
        queue = self._input.queue
        pipeline = self._pipeline
        lim = self.limits
        while (
            queue
            and self.state is not State.GREETING
            and pipeline.barrier is None
            and pipeline.inflight < lim.window
            and pipeline.inflight_octets < lim.window_octets
            and self._desk.ready(now)
        ):
            item = queue.popleft()
            if not isinstance(item, Command):
                pipeline.entries.append(Pending(INVALID, now, item.reply))
                moved = True
                continue
            cmd = item
            reply, decision = self._judge(cmd, now)
            if isinstance(decision, Delay | Ask):
                # Held back: it keeps its place at the head of the queue, and
                # is judged again when the time comes, or answered when the
                # shared state has (``answered``).
                queue.appendleft(cmd)
                self._desk.hold(decision, cmd, out)
                return moved
            self._desk.passed()
            moved = True
            if decision is not None and decision.notes:
                note(decision.notes, cmd, out)
            p = Pending(cmd, now, reply)
            if isinstance(decision, Deny) and decision.delay > 0:
                p.not_before = now + decision.delay
            sasl = starts_sasl(cmd)
            # A refusal held back (a tarpit) is a barrier too: nothing behind
            # it is sent upstream, whose reply would have to wait behind it.
            pipeline.entries.append(p)
            if cmd.verb in BARRIERS or sasl or p.not_before is not None:
                pipeline.barrier = p
            if reply is None:
                self._forward(p, sasl, out, now)
        return moved

    def _sasl_response(self, line: bytes, out: _Out, now: float) -> None:
        """A client's SASL response (CRLF included) in an AUTH exchange."""
        out.upstream.append(line)

    def _judge(self, cmd: Command, now: float) -> tuple[bytes | None, Decision | Ask | None]:
        """The core's own checks, then policy; a None reply means forward."""
        reply = local_reply(self.state, cmd, tls=self.tls, starttls=self.starttls,
                            require_tls_for_auth=self.require_tls_for_auth,
                            user_given=self._login.asserted_user is not None)
        if reply is not None:
            return reply, None
        decision = self._desk.decide(self.facts(), cmd, now)
        if isinstance(decision, Deny):
            return decision.reply, decision
        return None, decision

    def _forward(self, p: Pending, sasl: bool, out: _Out, now: float) -> None:
        cmd = p.command
        # What its reply will look like and mean, worked out once.
        if sasl:
            p.expect = Expect.SASL
        elif is_multiline(cmd):
            p.expect = Expect.MULTI
        p.login = sasl or completes_login(cmd)
        if self.resolve_uidl and cmd.verb in NAMES_A_MESSAGE:
            # ``UIDL n`` goes ahead of it when message n's UIDL is unknown,
            # its reply the proxy's own (``internal``), consumed, never
            # forwarded; ahead of ``p`` in the FIFO, so replies keep order.
            probe = self._listed.probe(cmd)
            if probe is not None:
                wire = bytes(probe)
                out.upstream.append(wire)
                self._pipeline.sent(Pending(probe, now, internal=True), len(wire), before=p)
        wire = bytes(cmd)
        out.upstream.append(wire)
        if self.announce_sent:
            out.events.append(CommandSent(cmd, now))
        self.commands_sent += 1
        self._pipeline.sent(p, len(wire))
        if names_login(cmd):
            self._login.named(cmd)
            self._facts = None
        elif cmd.verb == "QUIT" and self.state is State.TRANSACTION:
            self._marks.quit_sent = True

    def _flush(self, out: _Out, now: float) -> bool:
        """Send local replies that have reached the head of the FIFO."""
        moved = False
        entries = self._pipeline.entries
        while entries and entries[0].local_reply is not None and not self._closed:
            due = entries[0].not_before
            if due is not None and due > now:
                # A tarpit: the refusal goes out later, and nothing behind it.
                self._desk.wake(due)
                break
            p = entries.popleft()
            self._answer_locally(p, out, now)
            if self._pipeline.barrier is p:
                self._release(p, out)
            moved = True
        return moved

    def _answer_locally(self, p: Pending, out: _Out, now: float) -> None:
        reply = p.local_reply or b""
        ending = EndReason.QUIT if p.closes else None
        if reply[:1] == b"-" and self.state is State.AUTHORIZATION and self._input.refused(
                out.events):
            reply, ending = TOO_MANY_REFUSED, EndReason.PROTOCOL_ERROR
        out.client.append(reply)
        ok, code, text = local_status(reply)
        self._respond(p, ok, code, text, len(reply), True,
                      Outcome.OK if ok else Outcome.DENIED, out, now)
        if ending is not None:
            self._end_with(out, ending)

    def _release(self, p: Pending, out: _Out) -> None:
        """The barrier ``p``'s reply is out: what was held back behind it may go."""
        self._pipeline.barrier = None
        if p.local_reply is STLS_OK:
            # Parsing resumes only after the handshake (``tls_started``);
            # until then every client octet is discarded.
            self._input.start_discarding(out.events)
            out.start_tls = True
        elif p.command.verb == "STLS" or starts_sasl(p.command):
            self._input.resume()

    def _end_if_drained(self, out: _Out) -> None:
        if (self._client_eof and not self._closed and not self._pipeline.entries
                and not self._input.queue and self._reply is None):
            self._end_with(out, EndReason.CLIENT_CLOSED)

    # ------------------------------------------------------------------
    # Upstream side

    def _on_reply(self, reply: Reply, head: Pending | None, out: _Out, now: float) -> None:
        """A status line: the greeting, unsolicited, or the reply to ``head``."""
        status, raw = reply.status, reply.raw
        if self.state is State.GREETING:
            out.client.append(raw)  # verbatim, so APOP digests stay valid
            self.apop_timestamp = has_apop_timestamp(raw)
            out.events.append(Greeting(status.ok, _decode(status.text), self.apop_timestamp))
            if status.ok:
                self._set_state(Trigger.GREETED, out)
            else:
                out.events.append(UpstreamFailed("refused"))
                self._end_with(out, EndReason.UPSTREAM_REFUSED)
            return
        if head is None:
            out.events.append(Unsolicited(status.ok, status.code, _decode(status.text)))
            return
        if head.internal:
            # Our own UIDL n: single-line either way, and only ours to read.
            self._pipeline.done(head)
            if status.ok:
                self._listed.learn("UIDL", status.text, out.events)
            self._flush(out, now)
            return
        if status.continuation:
            out.client.append(raw)
            self._login.sasl_expected = True
            return
        cmd = head.command
        if reply.body:
            progress = self._reply = ReplyInProgress(head, status, raw)
            if cmd.verb == "RETR" and self._refuse_size(cmd, status.text, out, now):
                progress.swallow()
            elif cmd.verb == "CAPA":
                progress.hold()
            else:
                out.client.append(raw)
                self._reader.sink = progress.collect(cmd, self._listed.sizes)
                if cmd.verb in RETRIEVE:
                    out.events.append(_started(cmd, status.text))
            return
        if status.ok and head.login and self._admit_login(head, status, raw, out, now):
            return
        out.client.append(raw)
        if status.ok and cmd.args and cmd.verb in ("UIDL", "LIST"):
            self._listed.learn(cmd.verb, status.text, out.events)
        self._complete(head, status.ok, status.code, status.text, len(raw), out, now)

    def _on_chunk(self, chunk: BodyChunk, out: _Out, now: float) -> None:
        progress = self._reply
        assert progress is not None
        data = progress.take(chunk.data, self.limits)
        if data:
            out.client.append(data)
        if not chunk.end:
            return
        self._reply = None
        head = progress.pending
        if progress.swallowed:
            # The refusal already went out in place of the status line.
            self._pipeline.done(head)
            self._flush(out, now)
            return
        if progress.capa is not None:
            out.client.append(progress.rewritten_capa(
                offer_stls=self.starttls and not self.tls
                and self.state is State.AUTHORIZATION,
                hide_logins=self.require_tls_for_auth and not self.tls,
            ))
        out.events += progress.finished(self._listed.uids)
        status = progress.status
        self._complete(head, status.ok, status.code, status.text, progress.octets, out, now)

    def _refuse_size(self, cmd: Command, text: bytes, out: _Out, now: float) -> bool:
        """Refuse a RETR whose announced size policy forbids; swallow its body."""
        size = announced_size(text)
        refusal = self.policy.admit_size(self.facts(), cmd, size) if size is not None else None
        if refusal is None:
            return False
        self._refused(refusal, cmd, out)
        self._respond(self._pipeline.entries[0], False, None,
                      _decode(refusal.reply[5:].rstrip()), len(refusal.reply), True,
                      Outcome.DENIED, out, now)
        return True

    def _admit_login(
        self, head: Pending, status: Status, raw: bytes, out: _Out, now: float
    ) -> bool:
        """The upstream accepted a login; policy may still refuse it (the
        per-user cap), or need to ask the shared state (the reply waits)."""
        verdict = self._desk.admit_login(self.facts(), self._login.user_for(head.command),
                                         (head, status, raw), out, now)
        if isinstance(verdict, Deny):
            self._refuse_login(head, verdict, out, now)
        return verdict is not None

    def _refuse_login(self, head: Pending, refusal: Deny, out: _Out, now: float) -> None:
        self._refused(refusal, head.command, out)
        status = parse_status(refusal.reply.rstrip(b"\r\n"))
        self._complete(head, False, status.code if status else None,
                       refusal.reply[5:].rstrip(), len(refusal.reply), out, now, Outcome.DENIED)
        # The upstream session is logged in; leaving without QUIT changes nothing.
        self._end_with(out, EndReason.LOGIN_REFUSED)

    def _refused(self, refusal: Deny, cmd: Command, out: _Out) -> None:
        out.client.append(refusal.reply)
        note((Note(refusal.rule or "builtin", "deny", True),), cmd, out)

    def _complete(
        self, p: Pending, ok: bool, code: str | None, text: bytes, octets: int,
        out: _Out, now: float, outcome: Outcome | None = None,
    ) -> None:
        """A forwarded command's reply is complete: account for what it did."""
        self._pipeline.done(p)
        cmd = p.command
        if outcome is None:
            outcome = Outcome.OK if ok else Outcome.ERR
        self._respond(p, ok, code, _decode(text), octets, False, outcome, out, now)
        verb = cmd.verb
        if p.login:
            self._auth_done(cmd, ok, code, out, now)
        elif ok and verb in ("DELE", "RSET"):
            event = self._marks.dele(cmd) if verb == "DELE" else self._marks.reset()
            if event is not None:
                out.events.append(event)
        elif verb == "QUIT":
            if ok and self.state is State.TRANSACTION:
                self._set_state(Trigger.QUIT_OK, out)
                committed = self._marks.commit()
                if committed is not None:
                    out.events.append(committed)
            self._end_with(out, EndReason.QUIT)
        if self._pipeline.barrier is p:
            self._release(p, out)
        # Local replies queued behind this one go out now, before the next
        # upstream line is matched to the FIFO head.
        self._flush(out, now)

    def _auth_done(
        self, cmd: Command, ok: bool, code: str | None, out: _Out, now: float
    ) -> None:
        result = self._login.result(cmd, ok, code)
        out.events.append(result)
        self._desk.observe(self.facts(), result, now, out)
        if ok:
            self.user = result.user
            self._facts = None
            self._set_state(Trigger.LOGGED_IN, out)

    # ------------------------------------------------------------------
    # Events and endings

    def _respond(
        self, p: Pending, ok: bool, code: str | None, text: str, octets: int,
        local: bool, outcome: Outcome, out: _Out, now: float,
    ) -> None:
        event = Response(p.command, ok, code, text, octets, local, p.started, now, outcome)
        out.events.append(event)
        if not local:
            self._desk.observe(self.facts(), event, now, out)

    def _set_state(self, trigger: Trigger, out: _Out) -> None:
        new = transition(self.state, trigger)
        if new is not self.state:
            out.events.append(StateChanged(self.state, new))
            self.state = new
            self._facts = None

    def _end_with(self, out: _Out, reason: EndReason) -> None:
        """End the session (once): report what was cut short, then close."""
        out.close = reason
        if self._closed:
            return
        progress = self._reply
        if progress is not None and progress.message is not None:
            out.events.append(progress.complete(False))
        self._reply = None
        abandoned = self._marks.abandon()
        if abandoned is not None:
            out.events.append(abandoned)
        self._set_state(Trigger.END, out)
        self._closed = True
