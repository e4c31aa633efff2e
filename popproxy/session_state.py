"""The parts of a session's state, each kept by one small object.

``CommandInput``: client bytes into a queue of commands.  ``Pipeline``: the
FIFO of dispatched commands and the window of those in flight upstream;
``Pending``: one slot of it.  ``ReplyInProgress``: the multi-line reply
being streamed (what happens to its chunks, and what is read out of them).
``Login``: who is logging in and how.  ``Marks``: the messages marked for
deletion, and the ``Deletions`` events that report their fate.  ``Output``:
what the relay must do next.  No I/O, no clock: the session
(``session.py``) drives them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .events import (
    AuthResult,
    Deletions,
    EndReason,
    Event,
    MessageComplete,
    ProtocolAnomaly,
    UidsLearned,
)
from .front import Credentials
from .policy import Ask, Effect
from .pop3 import (
    RETRIEVE,
    STOPS_PARSING,
    Command,
    Expect,
    LineReader,
    Listing,
    MalformedLine,
    MessageFacts,
    PipelineOverflow,
    ReplyTooLong,
    Sink,
    Status,
    UpstreamProtocolError,
    is_sasl_line,
    listing_line,
    message_id,
    message_number,
    parse_command,
    parse_status,
    rewrite_capa,
    sasl_user,
    starts_sasl,
)

__all__ = [
    "TOO_MANY_REFUSED",
    "CommandInput",
    "Listed",
    "Login",
    "Marks",
    "Output",
    "OutputBuilder",
    "Pending",
    "Pipeline",
    "ReplyInProgress",
    "SessionLimits",
    "local_status",
    "quit_owed",
]


#: The last word to a client past ``SessionLimits.max_refused_before_login``.
TOO_MANY_REFUSED = b"-ERR too many refused commands before login\r\n"


def local_status(reply: bytes) -> tuple[bool, str | None, str]:
    """A local reply's outcome, code and text (a CAPA reply has more lines)."""
    first = reply[: reply.find(b"\r\n")]
    status = parse_status(first)
    if status is None:
        return False, None, first.decode("utf-8", "replace")
    return status.ok, status.code, status.text.decode("utf-8", "replace")


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
    # Malformed lines answered with -ERR before the session is closed.
    max_bad_lines: int = 10
    # Commands the proxy itself refuses before login (unknown verbs, verbs
    # out of state, policy, malformed lines); one more closes the session.
    max_refused_before_login: int = 10
    # Longest multi-line reply other than RETR/TOP: a hostile upstream's
    # endless LIST or UIDL must not stream without bound.
    max_listing: int = 64 << 20


@dataclass(slots=True)
class Output:
    """What the relay must do after feeding bytes to the session."""

    to_client: bytes = b""
    to_upstream: bytes = b""
    events: list[Event] = field(default_factory=list)
    close: EndReason | None = None  # set when both connections must close
    # After writing ``to_client``: start TLS on the client connection, then
    # call ``Session.tls_started``.  Nothing the client sent after STLS is kept.
    start_tls: bool = False
    # Routed mode: look the route up and log in upstream with these, then
    # call ``Session.routed_login``.  Never logged, never in an event.
    login: Credentials | None = None
    # Shared state: put this question, then call ``Session.answered`` with
    # what its ``then`` makes of the answer; and these updates to make.
    ask: Ask | None = None
    effects: list[Effect] = field(default_factory=list)


class OutputBuilder:
    """Accumulates an ``Output`` without quadratic concatenation."""

    __slots__ = ("ask", "client", "close", "effects", "events", "login", "start_tls",
                 "upstream")

    def __init__(self) -> None:
        self.client: list[bytes] = []
        self.upstream: list[bytes] = []
        self.events: list[Event] = []
        self.close: EndReason | None = None
        self.start_tls = False
        self.login: Credentials | None = None
        self.ask: Ask | None = None
        self.effects: list[Effect] = []

    def done(self) -> Output:
        c = self.client
        u = self.upstream
        return Output(
            c[0] if len(c) == 1 else b"".join(c),
            u[0] if len(u) == 1 else b"".join(u),
            self.events,
            self.close,
            self.start_tls,
            self.login,
            self.ask,
            self.effects,
        )


class CommandInput:
    """Client bytes into a queue of commands (or malformed lines).

    Parsing stops after AUTH (what follows is SASL data) and after STLS
    until its reply: after ``+OK`` everything the client pipelined is
    discarded (RFC 2595 §4, the STARTTLS-injection class of bugs) until
    ``resume``; after ``-ERR`` parsing simply goes on.
    """

    __slots__ = ("bad_lines", "discarding", "limits", "lines", "queue", "refusals", "stopped")

    def __init__(self, limits: SessionLimits) -> None:
        self.limits = limits
        self.lines = LineReader(limits.command_line, long_prefix=b"AUTH ",
                                long_limit=limits.sasl_line)
        self.queue: deque[Command | MalformedLine] = deque()
        self.bad_lines = 0
        self.refusals = 0  # commands refused before login
        self.stopped = False  # an AUTH or STLS in the queue or the FIFO
        self.discarding = False  # after STLS's +OK, until the handshake

    def refused(self, events: list[Event]) -> bool:
        """A command was refused before login: whether that was one too many.

        Then nothing more the client sent is read: the session ends after
        ``TOO_MANY_REFUSED``, so a client flooding unknown verbs costs a
        bounded number of replies, events and audit records.
        """
        self.refusals += 1
        limit = self.limits.max_refused_before_login
        if self.refusals <= limit:
            return False
        events.append(ProtocolAnomaly("client", "too-many-refused",
                                      f"more than {limit} commands refused before login"))
        self.stopped = True
        self.queue.clear()
        self.lines.discard()
        return True

    def resume(self) -> None:
        self.stopped = False
        self.discarding = False

    def sasl_line(self, login: Login) -> bytes | None:
        """The client's next SASL response, as it goes upstream, if complete."""
        line = self.lines.next_line(self.limits.sasl_line)
        if line is None:
            return None
        login.sasl_expected = False
        if not is_sasl_line(line):
            raise MalformedLine(
                "SASL response is not base64", reply=b"-ERR malformed SASL response\r\n")
        login.sasl_response(line)
        return line + b"\r\n"

    def parse(self, pending: int, events: list[Event]) -> None:
        """Queue every complete command line (``pending``: commands in the FIFO)."""
        limit = self.limits.max_pipeline
        while not self.stopped:
            try:
                line = self.lines.next_line()
                if line is None:
                    return
                item: Command | MalformedLine = parse_command(line)
            except MalformedLine as exc:
                # The line was consumed, so framing is intact: answer it with
                # -ERR in its turn, and close only a client that keeps at it.
                self.bad_lines += 1
                if self.bad_lines > self.limits.max_bad_lines:
                    fatal = MalformedLine(
                        "too many malformed commands", reply=b"-ERR too many bad commands\r\n")
                    fatal.kind = "too-many-bad-lines"
                    raise fatal from None
                events.append(ProtocolAnomaly("client", "malformed-line", str(exc)))
                item = exc
            if len(self.queue) + pending >= limit:
                raise PipelineOverflow(f"more than {limit} commands pipelined")
            self.queue.append(item)
            if not isinstance(item, Command) or item.verb not in STOPS_PARSING:
                continue
            # Parsing waits for the reply to STLS: after +OK what was
            # pipelined behind it is dropped (``start_discarding``), after
            # -ERR it is read on as any other command.
            if item.verb == "STLS" or starts_sasl(item):
                self.stopped = True

    def start_discarding(self, events: list[Event]) -> None:
        """STLS was accepted: drop what the client sent after it, and all
        that comes until the handshake (RFC 2595 §4, STARTTLS injection)."""
        self.discarding = True
        dropped = self.lines.discard()
        if dropped:
            events.append(ProtocolAnomaly("client", "data-after-stls", f"{dropped} octets"))


@dataclass(slots=True)
class Pending:
    """A command that has been dispatched and awaits (or is) its reply."""

    command: Command
    started: float
    local_reply: bytes | None = None  # answered by the proxy, not upstream
    not_before: float | None = None  # a delayed local reply
    wire: int = 0  # octets sent upstream
    internal: bool = False  # the proxy's own command (UIDL n for the audit)
    expect: Expect = Expect.SINGLE  # what its upstream reply looks like
    login: bool = False  # its reply says whether the client is logged in
    closes: bool = False  # the session ends once its (local) reply is out


class Pipeline:
    """The FIFO of dispatched commands, oldest first, and the window of
    those in flight upstream.

    Upstream replies are matched to the oldest forwarded entry; local
    replies leave when they reach the head.  ``barrier`` is the entry whose
    reply must be in before anything behind it is dispatched.
    """

    __slots__ = ("barrier", "entries", "inflight", "inflight_octets")

    def __init__(self) -> None:
        self.entries: deque[Pending] = deque()
        self.inflight = 0
        self.inflight_octets = 0
        self.barrier: Pending | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def sent(self, p: Pending, wire: int, *, before: Pending | None = None) -> None:
        """``p`` went upstream (``wire`` octets); ``before``: it goes in front of that entry."""
        if before is not None:
            last = self.entries.pop()  # ``before`` was appended just now
            assert last is before
            self.entries.append(p)
            self.entries.append(before)
        p.wire = wire
        self.inflight += 1
        self.inflight_octets += wire

    def done(self, p: Pending) -> None:
        """The head entry ``p``, forwarded, has its reply."""
        self.entries.popleft()
        self.inflight -= 1
        self.inflight_octets -= p.wire

    def head_forwarded(self) -> Pending | None:
        """The entry the next upstream reply belongs to, if any."""
        # Local replies never sit at the head while a reply is awaited: they
        # are flushed as soon as they get there.  So the head is the one.
        entries = self.entries
        if entries and entries[0].local_reply is None:
            return entries[0]
        return None


def quit_owed(pipeline: Pipeline, queue: deque[Command | MalformedLine]) -> bool:
    """A QUIT waits for its reply, dispatched or queued: a client that
    half-closed after it still reads what it asked for."""
    return any(p.command.verb == "QUIT" for p in pipeline.entries) or any(
        isinstance(c, Command) and c.verb == "QUIT" for c in queue)


class ReplyInProgress:
    """A multi-line reply between its status line and its terminator.

    Its chunks go to the client as they come (``visible``), unless the
    reply is CAPA, held back to be rewritten (``hold``), or a RETR that
    policy refused on its announced size, read and dropped (``swallow``).
    A RETR/TOP body's facts (``message``) and a listing's entries
    (``listing``) are collected on the way.
    """

    __slots__ = ("bounded", "capa", "listing", "message", "octets", "pending", "status",
                 "swallowed", "visible")

    def __init__(self, pending: Pending, status: Status, raw: bytes) -> None:
        self.pending = pending
        # A message may be any size; every other reply has max_listing.
        self.bounded = pending.command.verb not in RETRIEVE
        self.status = status
        self.octets = len(raw)  # the reply as the client gets it
        self.visible = True
        self.swallowed = False
        self.capa: bytearray | None = None
        self.message: MessageFacts | None = None
        self.listing: Listing | None = None
        if pending.command.verb == "CAPA":
            self.capa = bytearray(raw)

    def hold(self) -> None:
        self.visible = False

    def swallow(self) -> None:
        self.visible = False
        self.swallowed = True
        self.capa = None

    def collect(self, command: Command, sizes: dict[int, int]) -> Sink | None:
        """Start reading the body's content; the sink for its unstuffed octets."""
        if command.verb in RETRIEVE:
            self.message = MessageFacts()
            return self.message.add
        if command.verb == "UIDL":
            self.listing = Listing()
            return self.listing.add
        if command.verb == "LIST":
            self.listing = Listing(sizes)
            return self.listing.add
        return None

    def take(self, data: bytes, limits: SessionLimits) -> bytes:
        """A raw chunk of the body: what of it goes to the client now."""
        self.octets += len(data)
        # One comparison per chunk: the octets are counted anyway.
        if self.bounded and self.octets > limits.max_listing:
            raise ReplyTooLong(f"{self.pending.command.verb} reply longer than "
                               f"{limits.max_listing} octets")
        if self.capa is not None:
            self.capa += data
            if len(self.capa) > limits.capa_octets:
                raise UpstreamProtocolError("CAPA reply too long")
            return b""
        return b"" if self.swallowed else data

    def rewritten_capa(self, *, offer_stls: bool, hide_logins: bool) -> bytes:
        assert self.capa is not None
        capa = rewrite_capa(bytes(self.capa), offer_stls=offer_stls, hide_logins=hide_logins)
        self.octets = len(capa)
        return capa

    def finished(self, uids: set[int]) -> list[Event]:
        """The body ended whole: what it taught (``uids`` learns the listed UIDLs)."""
        events: list[Event] = []
        if self.message is not None:
            events.append(self.complete(True))
        listing = self.listing
        if listing is not None and listing.uids:
            uids.update(n for n, _ in listing.uids)
            events.append(UidsLearned(tuple(listing.uids)))
        return events

    def complete(self, whole: bool) -> MessageComplete:
        """The RETR/TOP body's ``MessageComplete`` (``whole``: the terminator came)."""
        facts = self.message
        assert facts is not None
        command = self.pending.command
        head = facts.headers
        return MessageComplete(
            command, message_number(command.args[0]) if command.args else None,
            facts.octets, facts.sha.hexdigest(), message_id(head), whole, head,
        )


class Listed:
    """What listings taught about the mailbox: which messages' UIDLs are
    known (the audit names messages by them) and their sizes (for policy)."""

    __slots__ = ("sizes", "uids")

    def __init__(self) -> None:
        self.uids: set[int] = set()
        self.sizes: dict[int, int] = {}

    def learn(self, verb: str, text: bytes, events: list[Event]) -> None:
        """A single-line ``UIDL n`` or ``LIST n`` reply's text (a UIDL learned
        is an event: the audit can name the message)."""
        entry = listing_line(text)
        if entry is None:
            return
        if verb == "UIDL":
            self.uids.add(entry[0])
            events.append(UidsLearned((entry,)))
        elif entry[1].isdigit():
            self.sizes[entry[0]] = int(entry[1])

    def probe(self, cmd: Command) -> Command | None:
        """``UIDL n`` to ask before ``cmd``, if it names a message whose UIDL
        is unknown; asked once per message, whatever the answer."""
        number = message_number(cmd.args[0]) if cmd.args else None
        if number is None or number in self.uids:
            return None
        self.uids.add(number)
        return Command("UIDL", (str(number),))


class Login:
    """The login in progress: who USER, APOP or AUTH says is logging in.

    Only the user name is kept from SASL data; nothing here holds a password.
    """

    __slots__ = ("asserted_user", "mech", "responses", "routed", "sasl_expected",
                 "sasl_user")

    def __init__(self) -> None:
        self.asserted_user: str | None = None  # from USER, before PASS succeeds
        self.mech: str | None = None
        self.sasl_user: str | None = None
        self.responses = 0  # SASL client responses so far
        self.sasl_expected = False  # the next client line is a SASL response
        # Routed mode: the login being routed (user, mechanism) and, once
        # known, where it went (upstream, route).
        self.routed: tuple[str, str, str | None, str | None] | None = None

    def named(self, cmd: Command) -> None:
        """A USER or AUTH command went upstream."""
        if cmd.verb == "USER":
            self.asserted_user = cmd.args[0]
            return
        self.mech = cmd.args[0].upper()
        initial = cmd.args[1] if len(cmd.args) > 1 else None
        self.responses = 0 if initial is None else 1
        self.sasl_user = (
            None if initial is None else sasl_user(self.mech, initial.encode("ascii", "replace")))

    def sasl_response(self, line: bytes) -> None:
        # Only the first client response can name the user (PLAIN without
        # an initial response, LOGIN's user-name prompt); a later one may
        # be the password itself.
        if self.responses == 0 and self.sasl_user is None and line != b"*":
            self.sasl_user = sasl_user(self.mech, line)
        self.responses += 1

    def user_for(self, cmd: Command) -> str | None:
        """Who the login that ``cmd`` completes is for."""
        if self.routed is not None:
            return self.routed[0]
        if cmd.verb == "PASS":
            return self.asserted_user
        if cmd.verb == "APOP":
            return cmd.args[0] if cmd.args else None
        return self.sasl_user

    def result(self, cmd: Command, ok: bool, code: str | None) -> AuthResult:
        """The reply to ``cmd`` (PASS, APOP, AUTH) came: the login's outcome.

        A SASL exchange is over with it.
        """
        upstream = route = None
        if self.routed is not None:
            mechanism, upstream, route = self.routed[1:]
        elif cmd.verb in ("PASS", "APOP"):
            mechanism = "USER" if cmd.verb == "PASS" else "APOP"
        else:
            mechanism = self.mech or "?"
        result = AuthResult(mechanism, self.user_for(cmd), ok, code, upstream, route)
        self.sasl_expected = False
        self.mech = self.sasl_user = None
        self.routed = None
        return result


class Marks:
    """Messages marked for deletion in this session, in marking order."""

    __slots__ = ("msgs", "quit_sent")

    def __init__(self) -> None:
        self.msgs: dict[int, None] = {}  # an insertion-ordered set
        self.quit_sent = False  # QUIT went upstream in TRANSACTION

    def dele(self, cmd: Command) -> Deletions | None:
        """DELE got +OK."""
        number = message_number(cmd.args[0]) if cmd.args else None
        if number is None:
            return None
        self.msgs[number] = None
        return Deletions("marked", (number,))

    def reset(self) -> Deletions:
        """RSET got +OK: every mark is gone."""
        msgs = tuple(sorted(self.msgs))
        self.msgs.clear()
        return Deletions("reset", msgs)

    def commit(self) -> Deletions | None:
        """QUIT got +OK in TRANSACTION: the server removed the marked messages."""
        if not self.msgs:
            return None
        event = Deletions("committed", tuple(self.msgs))
        self.msgs.clear()
        return event

    def abandon(self) -> Deletions | None:
        """The session ended otherwise: the server discards the marks.

        If QUIT reached it but no +OK came back, it may have removed some
        or all of them (RFC 1939 §6): ``possibly_partial``.
        """
        if not self.msgs:
            return None
        event = Deletions("uncommitted", tuple(self.msgs), self.quit_sent)
        self.msgs.clear()
        return event
