"""Upstream framing (``ResponseReader``) and the state table, with byte strings alone.

In h11's manner, every reader case is checked three ways: the whole buffer,
one byte at a time, and with trailing data; and hypothesis checks that any
split of a stream of replies gives the same events.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.pop3 import (
    NEED_DATA,
    STLS_OK,
    BodyChunk,
    Command,
    Expect,
    Reply,
    ResponseReader,
    State,
    Trigger,
    UpstreamProtocolError,
    local_reply,
    stuff,
    transition,
)

Event = tuple[str, bytes]


def events(reader: ResponseReader, data: bytes, expects: list[Expect],
           content: list[bytes] | None = None) -> list[Event]:
    """Feed ``data``; pull events, each reply taking the next of ``expects``.

    Body chunks are merged (like h11's normalize_data_events), so that any
    split of the input gives the same list.
    """
    reader.receive_data(data)
    got: list[Event] = []
    while expects or reader.in_body:
        event = reader.next_event(expects[0] if expects else Expect.SINGLE)
        if event is NEED_DATA:
            break
        if isinstance(event, Reply):
            expects.pop(0)
            got.append(("reply+body" if event.body else "reply", event.raw))
            if event.body and content is not None:
                reader.sink = lambda piece: content.append(bytes(piece))
        else:
            assert isinstance(event, BodyChunk)
            if got and got[-1][0] == "body":
                got[-1] = ("body", got[-1][1] + event.data)
            else:
                got.append(("body", event.data))
            if event.end:
                got.append(("end", b""))
    return got


def merge(evs: list[Event]) -> list[Event]:
    out: list[Event] = []
    for kind, data in evs:
        if kind == "body" and out and out[-1][0] == "body":
            out[-1] = ("body", out[-1][1] + data)
        else:
            out.append((kind, data))
    return out


MESSAGE = b"Subject: x\r\n\r\n.hidden\r\nbody\r\n"
STREAM = (b"+OK\r\n"  # NOOP
          + b"+OK 2 messages\r\n" + stuff(MESSAGE)  # RETR 1
          + b"-ERR no such message\r\n"  # RETR 9
          + b"+OK 1 u1\r\n")  # UIDL 1
EXPECTS = [Expect.SINGLE, Expect.MULTI, Expect.MULTI, Expect.SINGLE]
WANT = [("reply", b"+OK\r\n"), ("reply+body", b"+OK 2 messages\r\n"),
        ("body", stuff(MESSAGE)), ("end", b""), ("reply", b"-ERR no such message\r\n"),
        ("reply", b"+OK 1 u1\r\n")]


class TestResponseReader:
    def test_whole_buffer(self) -> None:
        assert events(ResponseReader(), STREAM, list(EXPECTS)) == WANT

    def test_one_byte_at_a_time(self) -> None:
        reader = ResponseReader()
        expects = list(EXPECTS)
        got: list[Event] = []
        for i in range(len(STREAM)):
            got += events(reader, STREAM[i : i + 1], expects)
        assert merge(got) == WANT

    def test_trailing_data_waits(self) -> None:
        reader = ResponseReader()
        assert events(reader, STREAM + b"+OK par", list(EXPECTS)) == WANT
        assert reader.next_event(Expect.SINGLE) is NEED_DATA
        assert events(reader, b"tial\r\n", [Expect.SINGLE]) == [("reply", b"+OK partial\r\n")]

    def test_the_sink_gets_the_unstuffed_content(self) -> None:
        content: list[bytes] = []
        events(ResponseReader(), b"+OK\r\n" + stuff(MESSAGE), [Expect.MULTI], content)
        assert b"".join(content) == MESSAGE

    def test_err_to_a_multiline_command_has_no_body(self) -> None:
        got = events(ResponseReader(), b"-ERR no\r\n+OK\r\n", [Expect.MULTI, Expect.SINGLE])
        assert got == [("reply", b"-ERR no\r\n"), ("reply", b"+OK\r\n")]

    def test_continuations_in_an_auth_exchange(self) -> None:
        reader = ResponseReader()
        reader.receive_data(b"+ \r\n+ VXNlcm5hbWU6\r\n+OK\r\n")
        kinds = []
        while (event := reader.next_event(Expect.SASL)) is not NEED_DATA:
            assert isinstance(event, Reply)
            kinds.append((event.status.continuation, event.status.ok))
        assert kinds == [(True, True), (True, True), (False, True)]

    @pytest.mark.parametrize(
        ("data", "expect", "why"),
        [
            (b"hello\r\n", Expect.GREETING, "greeting is not POP3"),
            (b"+ go on\r\n", Expect.GREETING, "greeting is not POP3"),
            (b"* BYE\r\n", Expect.NOTHING, "nobody asked"),
            (b"OK\r\n", Expect.SINGLE, "not \\+OK/-ERR"),
            (b"+ more\r\n", Expect.SINGLE, "SASL continuation outside"),
            (b"+ more\r\n", Expect.MULTI, "SASL continuation outside"),
            (b"+OK " + b"x" * 9000, Expect.SINGLE, "too long"),
            (b"+OK " + b"x" * 9000 + b"\r\n", Expect.SINGLE, "too long"),
        ],
    )
    def test_not_pop3(self, data: bytes, expect: Expect, why: str) -> None:
        reader = ResponseReader()
        reader.receive_data(data)
        with pytest.raises(UpstreamProtocolError, match=why):
            reader.next_event(expect)

    def test_a_long_body_line_streams(self) -> None:
        """A body line longer than any status-line limit is fine: it is not buffered."""
        reader = ResponseReader(status_limit=64)
        line = b"y" * 100_000 + b"\r\n"
        got = events(reader, b"+OK\r\n" + line + b".\r\n", [Expect.MULTI])
        assert got == [("reply+body", b"+OK\r\n"), ("body", line + b".\r\n"), ("end", b"")]


@given(st.lists(st.integers(0, len(STREAM)), max_size=6))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    reader = ResponseReader()
    expects = list(EXPECTS)
    got: list[Event] = []
    for a, b in itertools.pairwise(points):
        got += events(reader, STREAM[a:b], expects)
    assert merge(got) == WANT


class TestStates:
    def test_the_transitions(self) -> None:
        assert transition(State.GREETING, Trigger.GREETED) is State.AUTHORIZATION
        assert transition(State.AUTHORIZATION, Trigger.LOGGED_IN) is State.TRANSACTION
        assert transition(State.TRANSACTION, Trigger.QUIT_OK) is State.UPDATE
        for state in State:
            assert transition(state, Trigger.END) is State.CLOSED

    @pytest.mark.parametrize(("state", "trigger"), [
        (State.GREETING, Trigger.LOGGED_IN), (State.AUTHORIZATION, Trigger.QUIT_OK),
        (State.TRANSACTION, Trigger.LOGGED_IN), (State.CLOSED, Trigger.GREETED),
    ])
    def test_an_illegal_move_is_an_error(self, state: State, trigger: Trigger) -> None:
        with pytest.raises(ValueError, match="no transition"):
            transition(state, trigger)

    def test_verbs_by_state(self) -> None:
        def check(state: State, verb: str) -> bytes | None:
            return local_reply(state, Command(verb), tls=False, starttls=False,
                               require_tls_for_auth=False)

        assert check(State.AUTHORIZATION, "USER") is None
        assert check(State.AUTHORIZATION, "RETR") == b"-ERR RETR is not valid before login\r\n"
        assert check(State.TRANSACTION, "RETR") is None
        assert check(State.TRANSACTION, "PASS") == b"-ERR PASS is not valid after login\r\n"
        assert check(State.UPDATE, "NOOP") == b"-ERR session is ending\r\n"

    def test_stls_is_the_proxys(self) -> None:
        stls = Command("STLS")

        def reply(state: State, tls: bool, starttls: bool) -> bytes | None:
            return local_reply(state, stls, tls=tls, starttls=starttls,
                               require_tls_for_auth=False)

        assert reply(State.AUTHORIZATION, False, True) is STLS_OK
        assert reply(State.AUTHORIZATION, True, True) == b"-ERR already using TLS\r\n"
        assert reply(State.AUTHORIZATION, False, False) == (
            b"-ERR STLS is not available on this port\r\n")
        assert reply(State.TRANSACTION, False, True) == (
            b"-ERR STLS is only valid before login\r\n")

    def test_credentials_wait_for_tls_and_xclient_never_passes(self) -> None:
        for cmd in (Command("USER", ("a",)), Command("PASS", ("b",)),
                    Command("AUTH", ("PLAIN", "=")), Command("APOP", ("a", "d"))):
            assert local_reply(State.AUTHORIZATION, cmd, tls=False, starttls=True,
                               require_tls_for_auth=True) == (
                b"-ERR [AUTH] TLS is required to log in: use STLS\r\n")
        assert local_reply(State.AUTHORIZATION, Command("AUTH"), tls=False, starttls=True,
                           require_tls_for_auth=True) is None  # the mechanism list
        assert local_reply(State.TRANSACTION, Command("XCLIENT", ("ADDR=1.2.3.4",)), tls=True,
                           starttls=False, require_tls_for_auth=False) == (
            b"-ERR command not allowed\r\n")
