"""What the audit and the logs keep of a client before login (issue 17), no I/O.

Unknown verbs are written as ``OTHER`` without their arguments (only their
length), refused commands before login without arguments; ``command``
records before login are bounded per session and per client address; and
every JSON line stays one line for ``str.splitlines``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.audit import AuditConfig, ChainHead, RecordBuilder, verify_files
from popproxy.audit._chain import canonical, line
from popproxy.events import (
    AuthResult,
    EndReason,
    Outcome,
    PolicyDecision,
    Response,
    SessionClosed,
    SessionOpened,
)
from popproxy.jsonl import one_line
from popproxy.logs import log_observer
from popproxy.observe import SessionInfo
from popproxy.pop3 import KNOWN_VERBS, UNKNOWN_VERB, Command, recorded
from popproxy.session import Session
from tests.log_capture import captured_log
from tests.session_helpers import GREETING

SECRET = "Tr0ub4dor&3-zebra"


class Clock:
    """A settable clock for the builder."""

    def __init__(self) -> None:
        self.t = datetime(2026, 12, 6, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t


class Info:
    def __init__(self, id: str, client: str = "192.0.2.7:40000") -> None:
        self.id = id
        self.client = client


def refused(verb: str, *args: str) -> Response:
    return Response(Command(verb, args), False, None, "no", 10, True, 0.0, 0.0, Outcome.DENIED)


class TestRecorded:
    @given(st.from_regex(r"[A-Z][A-Z0-9-]{0,31}", fullmatch=True), st.text(min_size=1))
    def test_an_unknown_verb_never_shows_its_arguments(self, verb: str, arg: str) -> None:
        shown_verb, args = recorded(Command(verb, (arg,)))
        if verb in KNOWN_VERBS:
            assert shown_verb == verb
        else:
            assert (shown_verb, args) == (UNKNOWN_VERB, None)

    def test_refused_commands_show_no_arguments(self) -> None:
        assert recorded(Command("USER", ("bob",)), refused=True) == ("USER", None)
        assert recorded(Command("USER", ("bob",))) == ("USER", ("bob",))


def records_of(builder: RecordBuilder, info: Info, *events: Any) -> list[dict[str, Any]]:
    return [r for e in events for r in builder.observe(info, e)]


class TestAuditRecords:
    @pytest.mark.parametrize("verb", ["PASSS", "PAS", "XPASS", "PASSWORD", "P4SS"])
    def test_mistyped_verbs_keep_the_password_out(self, verb: str) -> None:
        """Through the real session: before login and after."""
        builder = RecordBuilder(AuditConfig(enabled=True), Clock())
        s = Session()
        info = Info("s1")
        recs = records_of(builder, info, SessionOpened(info.client, 0.0))
        recs += records_of(builder, info, *s.receive_upstream(GREETING, 0).events)
        recs += records_of(builder, info, *s.receive_client(f"{verb} {SECRET}\r\n".encode(),
                                                            1).events)
        s.receive_client(b"USER bob\r\nPASS right\r\n", 2)
        recs += records_of(builder, info, *s.receive_upstream(b"+OK\r\n+OK in\r\n", 3).events)
        s.receive_client(f"{verb} {SECRET}\r\n".encode(), 4)  # forwarded after login
        recs += records_of(builder, info, *s.receive_upstream(b"-ERR unknown\r\n", 5).events)
        text = json.dumps(recs)
        assert SECRET not in text
        assert f'"{verb}"' not in text
        unknown = [r for r in recs if r.get("verb") == UNKNOWN_VERB]
        assert [(r["args"], r["arg_octets"], r["outcome"]) for r in unknown] == [
            (None, len(SECRET), "denied"), (None, len(SECRET), "err")]
        assert "user" in unknown[1]

    def test_refused_before_login_arguments_are_not_kept(self) -> None:
        builder = RecordBuilder(AuditConfig(enabled=True), Clock())
        (rec,) = records_of(builder, Info("s1"), refused("USER", SECRET))
        assert rec["verb"] == "USER"
        assert rec["args"] is None
        assert rec["arg_octets"] == len(SECRET)

    def test_policy_refusals_before_login_keep_no_arguments(self) -> None:
        builder = RecordBuilder(AuditConfig(enabled=True), Clock())
        info = Info("s1")
        (before,) = records_of(builder, info,
                               PolicyDecision("ip-limit", "deny", Command("USER", (SECRET,)), True))
        assert (before["command"], before["args"]) == ("USER", None)
        records_of(builder, info, AuthResult("USER", "bob", True, None))
        (after,) = records_of(builder, info,
                              PolicyDecision("ro", "deny", Command("DELE", ("1",)), True))
        assert (after["command"], after["args"]) == ("DELE", ["1"])

    def test_per_session_bound_and_the_count_at_close(self) -> None:
        builder = RecordBuilder(AuditConfig(enabled=True, prelogin_commands=3), Clock())
        info = Info("s1")
        recs = records_of(builder, info, *[refused("XJUNK", "A" * 1000)] * 7)
        assert len(recs) == 3
        # After login, commands are not bounded.
        recs = records_of(builder, info, AuthResult("USER", "bob", True, None),
                          *[Response(Command("NOOP"), True, None, "", 5, False, 0, 0,
                                     Outcome.OK)] * 5)
        assert [r["event"] for r in recs] == ["auth"] + ["command"] * 5
        (close,) = records_of(builder, info, SessionClosed(EndReason.QUIT, 1.0, 1, 1, 1))
        assert close["suppressed_commands"] == 4

    def test_no_count_when_nothing_was_held_back(self) -> None:
        builder = RecordBuilder(AuditConfig(enabled=True), Clock())
        info = Info("s1")
        records_of(builder, info, refused("XJUNK"))
        (close,) = records_of(builder, info, SessionClosed(EndReason.QUIT, 1.0, 1, 1, 1))
        assert "suppressed_commands" not in close

    def test_per_client_bound_over_a_minute(self) -> None:
        """Sessions from one address share a budget a minute; another address has its own."""
        clock = Clock()
        builder = RecordBuilder(
            AuditConfig(enabled=True, prelogin_commands=4, prelogin_commands_per_client=10),
            clock)
        written = 0
        for n in range(6):  # 6 sessions x 4 commands from one address
            written += len(records_of(builder, Info(f"a{n}", f"192.0.2.7:{4000 + n}"),
                                      *[refused("XJUNK")] * 4))
        assert written == 10
        other = records_of(builder, Info("b", "[2001:db8::1]:4000"), *[refused("XJUNK")] * 4)
        assert len(other) == 4
        clock.t += timedelta(seconds=59)
        assert records_of(builder, Info("a6", "192.0.2.7:4100"), refused("XJUNK")) == []
        clock.t += timedelta(seconds=1)
        assert len(records_of(builder, Info("a7", "192.0.2.7:4101"), refused("XJUNK"))) == 1
        closes = records_of(builder, Info("a5", "192.0.2.7:4005"),
                            SessionClosed(EndReason.PROTOCOL_ERROR, 1.0, 1, 1, 1))
        assert closes[0]["suppressed_commands"] == 4

    def test_the_address_table_is_bounded(self) -> None:
        builder = RecordBuilder(
            AuditConfig(enabled=True, prelogin_commands_per_client=2), Clock())
        builder._per_client.max_addresses = 3
        written = sum(len(records_of(builder, Info(f"s{n}", f"192.0.2.{n}:1"), refused("X")))
                      for n in range(10))
        assert written == 3 + 2  # three addresses, then the shared count for the rest
        assert len(builder._per_client.counts) == 4


# --------------------------------------------------------------------------
# One record, one line

LINE_BREAKERS = "\u2028\u2029\x85\x7f\x9b\x0b\x0c\x1c\x1d\x1e\r\n"
names = st.text(st.sampled_from(LINE_BREAKERS) | st.characters(exclude_categories=["Cs"]),
                min_size=1, max_size=40)


@given(names)
def test_any_user_name_gives_one_audit_line(name: str) -> None:
    rec = {"event": "auth", "session": "s1", "user": name}
    head = ChainHead()
    data = head.link(rec)
    text = data.decode("utf-8")
    assert len(text.splitlines()) == 1
    assert json.loads(text)["user"] == name
    # The hash is over json.dumps's own form: the published recipe holds.
    assert json.loads(text)["hash"] == rec["hash"]
    assert verify_files([("audit.jsonl", data + b"\n")]).ok
    unchained = line({"event": "auth", "user": name}).decode("utf-8")
    assert len(unchained.splitlines()) == 1
    assert json.loads(unchained)["user"] == name


def test_escapes_are_written_and_lines_from_before_them_still_verify() -> None:
    rec: dict[str, Any] = {"user": "a\u2028b\x85c\x7fd\x9be"}
    data = ChainHead().link(rec)
    assert data.startswith(b'{"prev":"' + b"0" * 64 + b'","seq":1,"user":"a\\u2028b\\u0085c'
                           b'\\u007fd\\u009be"')
    # Written before this version: the same record with the characters raw.
    raw = canonical({k: v for k, v in rec.items() if k != "hash"})[:-1] + (
        b',"hash":"' + rec["hash"].encode() + b'"}')
    assert b"\xe2\x80\xa8" in raw
    assert verify_files([("audit.jsonl", raw + b"\n")]).ok
    # But an escape anywhere else is still an edit.
    edited = data.replace(b'"seq":1', b'"seq":\\u0031')
    assert not verify_files([("audit.jsonl", edited + b"\n")]).ok


def test_the_fast_path_returns_the_same_object() -> None:
    body = b'{"event":"command","verb":"STAT"}'
    assert one_line(body) is body
    umlaut = '{"user":"jürgen"}'.encode()
    assert one_line(umlaut) is not None
    assert one_line(umlaut) == umlaut


@pytest.fixture
def debug_log() -> Iterator[io.BytesIO]:
    with captured_log("debug") as buf:
        yield buf


@given(names)
def test_any_user_name_gives_one_log_line(name: str) -> None:
    with captured_log("info") as buf:
        log_observer(SessionInfo("s1", "192.0.2.7:1"), AuthResult("USER", name, False, None))
    text = buf.getvalue().decode("utf-8")
    assert len(text.splitlines()) == 1
    assert json.loads(text)["user"] == name


def test_the_debug_log_keeps_mistyped_verbs_arguments_out(debug_log: io.BytesIO) -> None:
    info = SessionInfo("s1", "192.0.2.7:1")
    for verb in ("PASSS", "PAS", "XPASS"):
        log_observer(info, refused(verb, SECRET))
        log_observer(info, Response(Command(verb, (SECRET,)), False, None, "", 5, False, 0, 0,
                                    Outcome.ERR))
    log_observer(info, refused("USER", SECRET))
    text = debug_log.getvalue().decode()
    assert SECRET not in text
    lines = [json.loads(ln) for ln in text.splitlines()]
    assert [(ln["verb"], ln["args"], ln["arg_octets"]) for ln in lines] == [
        (UNKNOWN_VERB, None, len(SECRET))] * 6 + [("USER", None, len(SECRET))]
