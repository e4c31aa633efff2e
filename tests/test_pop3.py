"""The sans-IO wire protocol: framing, parsing, limits, with no sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.pop3 import (
    BodyReader,
    Command,
    LineReader,
    LineTooLong,
    MalformedLine,
    ProtocolError,
    is_multiline,
    parse_command,
    parse_status,
    stuff,
)


def feed_in_parts(parts: list[bytes]) -> tuple[bytes, int | None]:
    """Feed a body in parts; return (unstuffed content, offset of the end)."""
    reader = BodyReader()
    pieces: list[bytes] = []
    seen = 0
    for part in parts:
        end = reader.feed(part, lambda piece: pieces.append(bytes(piece)))
        if end >= 0:
            return b"".join(pieces), seen + end
        seen += len(part)
    return b"".join(pieces), None


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=12,
).map(lambda ls: b"".join(line + b"\r\n" for line in ls))
dotty_lines = st.lists(
    st.sampled_from([b".", b"..", b".x", b"", b"a.", b"\r", b".\r", b"x"]), max_size=12
).map(lambda ls: b"".join(line.replace(b"\r", b"") + b"\r\n" for line in ls))
bodies = st.one_of(lines, dotty_lines)


class TestBodyFraming:
    @given(body=bodies, cuts=st.lists(st.integers(min_value=0), max_size=8))
    def test_any_split_gives_the_same_body_and_end(self, body: bytes, cuts: list[int]) -> None:
        """Unstuffing inverts stuffing, and the end is found exactly, however split."""
        wire = stuff(body) + b"+OK next reply\r\n"
        content, end = feed_in_parts(split_at(wire, cuts))
        assert content == body
        assert end == len(stuff(body))

    @given(body=bodies)
    def test_byte_at_a_time(self, body: bytes) -> None:
        """One octet per feed finds the same end (h11's incremental check)."""
        wire = stuff(body) + b"TRAILING"
        content, end = feed_in_parts([wire[i : i + 1] for i in range(len(wire))])
        assert (content, end) == (body, len(stuff(body)))

    def test_empty_body_ends_at_once(self) -> None:
        """A body of just '.CRLF' is empty: the status line's CRLF starts the match."""
        assert feed_in_parts([b".\r\n"]) == (b"", 3)

    def test_dot_not_at_line_start_is_not_a_terminator(self) -> None:
        """'a.CRLF' does not end the body; neither does '.CRLF' after a split 'a'."""
        content, end = feed_in_parts([b"a", b".\r\nX", b"Y\r\n.\r\n"])
        assert content == b"a.\r\nXY\r\n"
        assert end is not None

    def test_stuffed_dot_line_is_not_a_terminator(self) -> None:
        """'..CRLF' is a line holding one dot."""
        assert feed_in_parts([b"..\r\n.\r\n"]) == (b".\r\n", 7)

    def test_lone_lf_dot_is_not_a_terminator(self) -> None:
        """The smuggling trick: LF.LF or LF.CRLF must not end the body."""
        content, end = feed_in_parts([b"x\n.\nmore\n.\r\nyet\r\n.\r\n"])
        assert content == b"x\n.\nmore\n.\r\nyet\r\n"
        assert end == len(b"x\n.\nmore\n.\r\nyet\r\n.\r\n")

    def test_unfinished_body_holds_back_at_most_four_octets(self) -> None:
        """Content is released as it streams: memory stays bounded."""
        reader = BodyReader()
        got: list[int] = []
        reader.feed(b"x" * 99_998 + b"\r\n.\r", lambda piece: got.append(len(piece)))
        assert sum(got) >= 100_000 - 4

    def test_sink_gets_views_not_copies(self) -> None:
        """The streaming path hands out memoryviews of the input."""
        kinds: list[type] = []
        BodyReader().feed(b"abc\r\n..x\r\n", lambda piece: kinds.append(type(piece)))
        assert kinds
        assert set(kinds) == {memoryview}


class TestStatus:
    @pytest.mark.parametrize(
        ("line", "ok", "code", "continuation"),
        [
            (b"+OK", True, None, False),
            (b"+OK 2 320", True, None, False),
            (b"-ERR [SYS/TEMP] try later", False, "SYS/TEMP", False),
            (b"-ERR [IN-USE] locked", False, "IN-USE", False),
            (b"-ERR [AUTH] bad", False, "AUTH", False),
            (b"-ERR [LOGIN-DELAY] wait", False, "LOGIN-DELAY", False),
            (b"+ ", True, None, True),
            (b"+ VXNlcm5hbWU6", True, None, True),
            (b"+", True, None, True),
        ],
    )
    def test_parses(self, line: bytes, ok: bool, code: str | None, continuation: bool) -> None:
        status = parse_status(line)
        assert status is not None
        assert (status.ok, status.code, status.continuation) == (ok, code, continuation)

    @pytest.mark.parametrize("line", [b"", b"OK", b"+OKAY", b"-ERROR x", b"hello"])
    def test_rejects_non_status(self, line: bytes) -> None:
        assert parse_status(line) is None


class TestMultilineRules:
    @pytest.mark.parametrize(
        ("cmd", "multi"),
        [
            (Command("RETR", ("1",)), True),
            (Command("TOP", ("1", "0")), True),
            (Command("CAPA"), True),
            (Command("LIST"), True),
            (Command("LIST", ("1",)), False),
            (Command("UIDL"), True),
            (Command("UIDL", ("1",)), False),
            (Command("LANG"), True),
            (Command("LANG", ("en",)), False),
            (Command("AUTH"), True),
            (Command("AUTH", ("PLAIN",)), False),
            (Command("STAT"), False),
            (Command("LAST"), False),
            (Command("XFOO"), False),
        ],
    )
    def test_rules(self, cmd: Command, multi: bool) -> None:
        assert is_multiline(cmd) is multi


class TestCommands:
    def test_verb_is_case_insensitive_and_reserialised(self) -> None:
        cmd = parse_command(b"rEtR 1")
        assert cmd == Command("RETR", ("1",))
        assert bytes(cmd) == b"RETR 1\r\n"

    def test_pass_keeps_spaces(self) -> None:
        """RFC 1939 §7: the password is the rest of the line, spaces included."""
        cmd = parse_command(b"PASS  two  spaces ")
        assert cmd.args == (" two  spaces ",)
        assert bytes(cmd) == b"PASS  two  spaces \r\n"

    def test_pass_may_be_latin1(self) -> None:
        cmd = parse_command(b"PASS caf\xe9")
        assert bytes(cmd) == b"PASS caf\xe9\r\n"

    def test_secrets_never_in_repr(self) -> None:
        for line in (b"PASS hunter2", b"APOP bob c4c9334bac560ecc979e58001b3e22fb",
                     b"AUTH PLAIN AGJvYgBodW50ZXIy"):
            text = repr(parse_command(line)) + str(parse_command(line))
            assert "hunter2" not in text
            assert "c4c9334b" not in text
            assert "AGJvYgBodW50ZXIy" not in text

    @pytest.mark.parametrize("line", [b"", b" RETR 1", b"RE\xffTR", b"1RETR", b"RETR\t1"])
    def test_malformed(self, line: bytes) -> None:
        with pytest.raises(MalformedLine):
            parse_command(line)

    def test_invalid_utf8_arguments(self) -> None:
        with pytest.raises(MalformedLine, match="UTF-8"):
            parse_command(b"USER \xff\xfe")


class TestLineReader:
    def test_splits_pipelined_lines_and_tolerates_bare_lf(self) -> None:
        r = LineReader(1024)
        r.feed(b"STAT\r\nLIST\nNO")
        assert [r.next_line(), r.next_line(), r.next_line()] == [b"STAT", b"LIST", None]
        r.feed(b"OP\r\n")
        assert r.next_line() == b"NOOP"

    def test_overlong_line_without_end(self) -> None:
        r = LineReader(1024)
        r.feed(b"X" * 1025)
        with pytest.raises(LineTooLong):
            r.next_line()

    def test_overlong_complete_line(self) -> None:
        r = LineReader(10)
        r.feed(b"USER abcdefghijk\r\n")
        with pytest.raises(LineTooLong):
            r.next_line()

    def test_auth_lines_get_the_sasl_limit(self) -> None:
        """An OAuth token in AUTH's initial response exceeds 1 KiB."""
        r = LineReader(1024, long_prefix=b"AUTH ", long_limit=16384)
        line = b"AUTH XOAUTH2 " + b"A" * 4000
        r.feed(line + b"\r\n")
        assert r.next_line() == line

    @pytest.mark.parametrize("data", [b"RE\0TR 1\r\n", b"RETR 1\rDELE 1\r\n"])
    def test_nul_and_bare_cr(self, data: bytes) -> None:
        r = LineReader(1024)
        r.feed(data)
        with pytest.raises(MalformedLine):
            r.next_line()

    def test_error_base_cannot_be_instantiated(self) -> None:
        with pytest.raises(TypeError):
            ProtocolError("x")
