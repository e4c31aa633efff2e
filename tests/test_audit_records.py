"""The record builder: session events in, audit records out; fake clock, no I/O.

Events come from the real sans-IO ``Session`` fed with byte strings, so
these tests also pin down how the builder reads the core's event order.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from popproxy.audit import AuditConfig, RecordBuilder
from popproxy.events import (
    AuthResult,
    EndReason,
    Event,
    PolicyDecision,
    SessionClosed,
    SessionOpened,
    TlsEstablished,
    TlsFailed,
)
from popproxy.pop3 import Command
from popproxy.session import Session
from tests.session_helpers import GREETING, DenyVerb, stuffed

T0 = datetime(2026, 11, 27, 14, 24, 3, tzinfo=UTC)
MESSAGE = (
    b"From: Bob <bob@example.org>\r\n"
    b"Subject: quarterly\r\n  numbers\r\n"
    b"Message-ID: <q3@example.org>\r\n"
    b"\r\n"
    b".hidden\r\nbody\r\n"
)


class FakeClock:
    """Advances one millisecond per reading, from T0."""

    def __init__(self, start: datetime = T0) -> None:
        self.t = start

    def __call__(self) -> datetime:
        self.t += timedelta(milliseconds=1)
        return self.t


class Info:
    def __init__(self, id: str = "s1", client: str = "192.0.2.7:40000") -> None:
        self.id = id
        self.client = client


# A policy that refuses DELE, as a read-only rule would.
deny_dele = DenyVerb("DELE", b"-ERR [SYS/PERM] read-only mailbox\r\n", note=True)


@dataclass
class Run:
    """A ``Session`` and a ``RecordBuilder`` wired together."""

    builder: RecordBuilder
    session: Session
    info: Info
    records: list[dict[str, Any]]

    @classmethod
    def start(cls, config: AuditConfig | None = None, clock: Any = None,
              session: Session | None = None) -> Run:
        builder = RecordBuilder(config or AuditConfig(enabled=True), clock or FakeClock())
        run = cls(builder, session or Session(), Info(), [])
        run.event(SessionOpened(run.info.client, 0.0))
        run.feed(run.session.receive_upstream(GREETING, 0.0))
        return run

    def event(self, event: Event) -> None:
        self.records += self.builder.observe(self.info, event)

    def feed(self, out: Any) -> None:
        for event in out.events:
            self.event(event)

    def client(self, data: bytes, now: float = 1.0) -> None:
        self.feed(self.session.receive_client(data, now))

    def upstream(self, data: bytes, now: float = 1.5) -> None:
        self.feed(self.session.receive_upstream(data, now))

    def login(self, user: str = "alice") -> None:
        self.client(f"USER {user}\r\nPASS pa ss\r\n".encode())
        self.upstream(b"+OK\r\n+OK logged in\r\n")

    def close(self, reason: str = "quit") -> None:
        self.feed(self.session.close(EndReason(reason)))
        self.event(SessionClosed(EndReason(reason), 9.0, 100, 2000, 5))

    def events(self) -> list[str]:
        return [r["event"] for r in self.records]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == name]


class TestBaseFields:
    def test_ts_is_utc_rfc3339_with_microseconds(self) -> None:
        """``ts`` comes from the injected clock, in UTC, with microseconds and Z."""
        cest = timezone(timedelta(hours=2))
        clock = iter([datetime(2026, 6, 1, 12, 0, 0, 5, tzinfo=cest)])
        builder = RecordBuilder(AuditConfig(enabled=True), lambda: next(clock))
        (rec,) = builder.observe(Info(), SessionOpened("192.0.2.7:40000", 0.0))
        assert rec == {"ts": "2026-06-01T10:00:00.000005Z", "event": "session.open",
                       "session": "s1", "client": "192.0.2.7:40000"}

    def test_naive_clock_is_taken_as_utc(self) -> None:
        """A clock without a zone is read as UTC, not as local time."""
        builder = RecordBuilder(AuditConfig(enabled=True), lambda: datetime(2026, 1, 2, 3, 4, 5))
        (rec,) = builder.observe(Info(), SessionOpened("192.0.2.7:40000", 0.0))
        assert rec["ts"] == "2026-01-02T03:04:05.000000Z"

    def test_user_appears_once_known(self) -> None:
        """Records before a successful login carry no user; later ones do."""
        run = Run.start()
        run.login("alice")
        run.client(b"STAT\r\n")
        run.upstream(b"+OK 2 320\r\n")
        assert [(r["event"], r.get("user")) for r in run.records] == [
            ("session.open", None), ("command", None), ("command", None),
            ("auth", "alice"), ("command", "alice"),
        ]


class TestAuthAndCommands:
    def test_auth_record(self) -> None:
        """``auth`` has the mechanism and outcome, and the user it was for."""
        run = Run.start()
        run.client(b"USER alice\r\nPASS wrong\r\n")
        run.upstream(b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n")
        (auth,) = run.of("auth")
        assert auth["user"] == "alice"
        assert (auth["mechanism"], auth["outcome"], auth["code"]) == ("USER", "fail", "AUTH")
        assert "user" not in run.of("command")[1]  # not logged in

    @pytest.mark.parametrize(
        ("line", "verb", "args"),
        [
            (b"PASS pa ss word\r\n", "PASS", ["<redacted>"]),
            (b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n", "APOP", ["alice", "<redacted>"]),
            (b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", "AUTH", ["PLAIN", "<redacted>"]),
        ],
    )
    def test_secrets_are_redacted(self, line: bytes, verb: str, args: list[str]) -> None:
        """PASS, APOP digests and SASL initial responses never reach a record."""
        run = Run.start()
        if verb == "PASS":
            run.client(b"USER alice\r\n")
            run.upstream(b"+OK\r\n")
        run.client(line)
        run.upstream(b"+OK\r\n")
        rec = run.of("command")[-1]
        assert (rec["verb"], rec["args"]) == (verb, args)
        secret = line.split(b" ", 1)[1].strip().split(b" ")[-1].decode()
        assert secret not in repr(run.records)

    def test_outcomes_ok_err_denied(self) -> None:
        """ok and err from upstream; denied when the proxy refused it (policy)."""
        run = Run.start(session=Session(policy=deny_dele))
        run.login()
        run.client(b"LIST 1\r\nRETR 9\r\nDELE 1\r\n", now=2.0)
        run.upstream(b"+OK 1 120\r\n-ERR no such message\r\n", now=2.25)
        outcomes = [(r["verb"], r["outcome"], r["latency"], r.get("code"))
                    for r in run.of("command")[2:]]
        assert outcomes == [("LIST", "ok", 0.25, None), ("RETR", "err", 0.25, None),
                            ("DELE", "denied", None, "SYS/PERM")]
        assert run.of("message.delete.marked") == []
        (decision,) = run.of("policy.decision")
        assert (decision["rule"], decision["action"], decision["command"],
                decision["enforced"]) == ("ro", "deny", "DELE", True)

    def test_local_refusal_is_denied(self) -> None:
        """A command the core refuses itself (wrong state) is denied, not err."""
        run = Run.start()
        run.client(b"STAT\r\n")
        assert [(r["verb"], r["outcome"]) for r in run.of("command")] == [("STAT", "denied")]

    def test_upstream_failure_is_err(self) -> None:
        """Replies owed when the upstream dies are local [SYS/TEMP]: err, not denied."""
        run = Run.start()
        run.login()
        run.client(b"STAT\r\n")
        run.feed(run.session.upstream_closed(3.0))
        rec = run.of("command")[-1]
        assert (rec["verb"], rec["outcome"], rec["code"]) == ("STAT", "err", "SYS/TEMP")

    def test_commands_messages_keeps_only_message_commands(self) -> None:
        """``commands = "messages"`` drops USER, PASS, NOOP, CAPA, QUIT records."""
        run = Run.start(AuditConfig(enabled=True, commands="messages"))
        run.login()
        run.client(b"NOOP\r\nSTAT\r\nLIST\r\nUIDL 1\r\nQUIT\r\n")
        run.upstream(b"+OK\r\n+OK 1 5\r\n+OK\r\n1 5\r\n.\r\n+OK 1 u1\r\n+OK bye\r\n")
        assert [r["verb"] for r in run.of("command")] == ["STAT", "LIST", "UIDL"]
        assert len(run.of("auth")) == 1


class TestRetrieve:
    def test_retr_record(self) -> None:
        """RETR: msg, uidl learned from UIDL, octets and sha256 of the unstuffed bytes."""
        run = Run.start()
        run.login()
        run.client(b"UIDL\r\nRETR 2\r\n")
        run.upstream(b"+OK\r\n1 u-one\r\n2 u-two\r\n.\r\n")
        run.upstream(b"+OK %d octets\r\n" % len(MESSAGE) + stuffed(MESSAGE))
        (rec,) = run.of("message.retrieve")
        assert {k: v for k, v in rec.items() if k not in ("ts", "session", "client")} == {
            "event": "message.retrieve", "user": "alice", "command": "RETR", "msg": 2,
            "uidl": "u-two", "octets": len(MESSAGE),
            "sha256": hashlib.sha256(MESSAGE).hexdigest(),
            "message_id": "<q3@example.org>", "complete": True,
        }
        assert run.events()[-2:] == ["message.retrieve", "command"]

    def test_uidl_of_one_message(self) -> None:
        """``UIDL n`` answers teach the builder that message's UIDL too."""
        run = Run.start()
        run.login()
        run.client(b"UIDL 1\r\nRETR 1\r\n")
        run.upstream(b"+OK 1 only-one\r\n+OK\r\n" + stuffed(MESSAGE))
        assert run.of("message.retrieve")[0]["uidl"] == "only-one"

    def test_uidl_unknown_is_null(self) -> None:
        """Without a UIDL reply (and no resolve_uidl), ``uidl`` is null."""
        run = Run.start()
        run.login()
        run.client(b"RETR 1\r\n")
        run.upstream(b"+OK\r\n" + stuffed(MESSAGE))
        assert run.of("message.retrieve")[0]["uidl"] is None

    def test_top_record_has_lines(self) -> None:
        """TOP: the partial read is marked by ``command`` and ``lines``."""
        run = Run.start()
        run.login()
        run.client(b"TOP 1 0\r\n")
        head = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        run.upstream(b"+OK\r\n" + stuffed(head))
        (rec,) = run.of("message.retrieve")
        assert (rec["command"], rec["msg"], rec["lines"], rec["octets"]) == (
            "TOP", 1, 0, len(head))
        assert rec["sha256"] == hashlib.sha256(head).hexdigest()

    def test_no_headers_by_default(self) -> None:
        """Data minimisation: no header values unless configured."""
        run = Run.start()
        run.login()
        run.client(b"RETR 1\r\n")
        run.upstream(b"+OK\r\n" + stuffed(MESSAGE))
        assert "headers" not in run.of("message.retrieve")[0]

    def test_configured_headers_unfolded_across_chunks(self) -> None:
        """Configured headers are recorded (unfolded) even when split between reads."""
        run = Run.start(AuditConfig(enabled=True, headers=("Subject", "From", "Date")))
        run.login()
        run.client(b"RETR 1\r\n")
        wire = b"+OK\r\n" + stuffed(MESSAGE)
        for i in range(0, len(wire), 7):
            run.upstream(wire[i : i + 7])
        assert run.of("message.retrieve")[0]["headers"] == {
            "Subject": "quarterly numbers", "From": "Bob <bob@example.org>", "Date": None,
        }

    def test_header_lines_in_the_body_are_not_headers(self) -> None:
        """Only the header section counts: a "Date:" body line is not a Date header."""
        run = Run.start(AuditConfig(enabled=True, headers=("Date",)))
        run.login()
        run.client(b"RETR 1\r\n")
        run.upstream(b"+OK\r\n" + stuffed(b"Subject: a\r\n\r\nDate: not a header\r\n"))
        assert run.of("message.retrieve")[0]["headers"] == {"Date": None}

    def test_broken_transfer_is_recorded_incomplete(self) -> None:
        """A body cut short is recorded with complete=false and the octets delivered."""
        run = Run.start()
        run.login()
        run.client(b"RETR 1\r\n")
        run.upstream(b"+OK\r\n" + MESSAGE[:40])
        run.close("client closed")
        (rec,) = run.of("message.retrieve")
        assert rec["complete"] is False
        assert 0 < rec["octets"] <= 40  # what reached the client, whole lines
        assert rec["sha256"] == hashlib.sha256(MESSAGE[: rec["octets"]]).hexdigest()


class TestDeletions:
    def test_marked_reset_committed(self) -> None:
        """DELE +OK marks, RSET unmarks (msgs), QUIT +OK commits what is marked."""
        run = Run.start()
        run.login()
        run.client(b"UIDL\r\nDELE 1\r\nDELE 2\r\nRSET\r\nDELE 3\r\nQUIT\r\n")
        run.upstream(b"+OK\r\n1 a\r\n2 b\r\n3 c\r\n.\r\n+OK\r\n+OK\r\n+OK\r\n+OK\r\n+OK bye\r\n")
        run.close()
        deletions = [(r["event"], r.get("msg"), r.get("uidl"), r.get("msgs"))
                     for r in run.records if r["event"].startswith("message.delete")]
        assert deletions == [
            ("message.delete.marked", 1, "a", None),
            ("message.delete.marked", 2, "b", None),
            ("message.delete.reset", None, None, [1, 2]),
            ("message.delete.marked", 3, "c", None),
            ("message.delete.committed", 3, "c", None),
        ]
        assert run.events()[-3:] == ["command", "message.delete.committed", "session.close"]

    def test_failed_dele_marks_nothing(self) -> None:
        """DELE -ERR is a command record only."""
        run = Run.start()
        run.login()
        run.client(b"DELE 7\r\nQUIT\r\n")
        run.upstream(b"-ERR no such message\r\n+OK\r\n")
        assert [e for e in run.events() if e.startswith("message.")] == []

    def test_session_ended_without_quit_is_uncommitted(self) -> None:
        """Marks left when the session ends without QUIT are uncommitted, one each."""
        run = Run.start()
        run.login()
        run.client(b"RETR 2\r\nDELE 2\r\nDELE 1\r\n")
        run.upstream(b"+OK\r\n" + stuffed(MESSAGE) + b"+OK\r\n+OK\r\n")
        run.close("client closed")
        un = run.of("message.delete.uncommitted")
        assert [(r["msg"], r.get("message_id")) for r in un] == [(2, "<q3@example.org>"),
                                                                  (1, None)]
        assert all("possibly_partial" not in r for r in un)
        assert run.of("session.close")[0]["reason"] == "client gone"

    def test_quit_err_is_possibly_partial(self) -> None:
        """QUIT -ERR in TRANSACTION: the server may have removed some (RFC 1939 §6)."""
        run = Run.start()
        run.login()
        run.client(b"DELE 1\r\nQUIT\r\n")
        run.upstream(b"+OK\r\n-ERR some deleted messages not removed\r\n")
        run.close()
        (un,) = run.of("message.delete.uncommitted")
        assert un["possibly_partial"] is True
        assert run.of("message.delete.committed") == []

    def test_quit_unanswered_is_possibly_partial(self) -> None:
        """QUIT sent, upstream gone before +OK: the deletion may or may not have happened."""
        run = Run.start()
        run.login()
        run.client(b"DELE 1\r\nQUIT\r\n")
        run.upstream(b"+OK\r\n")
        run.feed(run.session.upstream_closed(3.0))
        (un,) = run.of("message.delete.uncommitted")
        assert un["possibly_partial"] is True

    def test_quit_before_login_commits_nothing(self) -> None:
        """QUIT in AUTHORIZATION has nothing to commit."""
        run = Run.start()
        run.client(b"QUIT\r\n")
        run.upstream(b"+OK bye\r\n")
        run.close()
        assert run.events() == ["session.open", "command", "session.close"]


class TestSessionAndPolicy:
    def test_forwarded_client_and_tls(self) -> None:
        """PROXY protocol ``via``, TLS per side at login and at the end, TLS failures."""
        builder = RecordBuilder(AuditConfig(enabled=True), FakeClock())
        info = Info()
        opened = builder.observe(info, SessionOpened("198.51.100.4:5000", 0.0, "10.0.0.2:41000"))
        assert (opened[0]["client"], opened[0]["via"]) == ("192.0.2.7:40000", "10.0.0.2:41000")
        builder.observe(info, TlsEstablished("client", "TLSv1.3", "TLS_AES_256_GCM_SHA384",
                                             "pop.example.org"))
        builder.observe(info, TlsFailed("upstream", "certificate verify failed"))
        (auth,) = builder.observe(info, AuthResult("USER", "alice", True, None))
        assert auth["tls"] == "TLSv1.3"
        closed = SessionClosed(EndReason.UPSTREAM_UNAVAILABLE, 1.0, 10, 20, 0, 30, 40)
        (close,) = builder.observe(info, closed)
        assert close["tls"] == {"client": {"version": "TLSv1.3",
                                           "cipher": "TLS_AES_256_GCM_SHA384",
                                           "sni": "pop.example.org"}}
        assert close["tls_error"] == "upstream: certificate verify failed"
        assert (close["upstream_in"], close["upstream_out"]) == (30, 40)

    def test_session_close_record(self) -> None:
        """``session.close``: stable reason, the core's detail, duration, bytes, commands."""
        run = Run.start()
        run.login()
        run.close("idle timeout")
        (rec,) = run.of("session.close")
        assert {k: rec[k] for k in ("user", "reason", "detail", "duration", "bytes_in",
                                    "bytes_out", "commands")} == {
            "user": "alice", "reason": "idle timeout", "detail": "idle timeout",
            "duration": 9.0, "bytes_in": 100, "bytes_out": 2000, "commands": 5,
        }

    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            (EndReason.QUIT, "quit"),
            (EndReason.CLIENT_CLOSED, "client gone"),
            (EndReason.PEER_GONE, "client gone"),
            (EndReason.PROTOCOL_ERROR, "client error"),
            (EndReason.IDLE_TIMEOUT, "idle timeout"),
            (EndReason.UPSTREAM_CLOSED, "upstream error"),
            (EndReason.UPSTREAM_TIMEOUT, "upstream error"),
            (EndReason.UPSTREAM_CONNECT_TIMEOUT, "upstream error"),
            (EndReason.UPSTREAM_UNAVAILABLE, "upstream error"),
            (EndReason.SHUTDOWN, "shutdown"),
            (EndReason.SESSION_LIMIT, "refused"),
            (EndReason.REFUSED, "refused"),  # e.g. "audit trail unavailable"
            (EndReason.INTERNAL_ERROR, "other"),
        ],
    )
    def test_close_reasons(self, raw: EndReason, reason: str) -> None:
        """The core's reasons map onto a few stable reason words."""
        assert raw.audit == reason
        builder = RecordBuilder(AuditConfig(enabled=True), FakeClock())
        (rec,) = builder.observe(Info(), SessionClosed(raw, 1.0, 0, 0, 0))
        assert rec["reason"] == reason

    def test_policy_decision(self) -> None:
        """A ``PolicyDecision`` event becomes policy.decision; monitor mode: enforced false."""
        run = Run.start()
        run.login()
        run.event(PolicyDecision("retr-per-user", "rate_limit", Command("RETR", ("1",)), True))
        run.event(PolicyDecision("ro", "deny", Command("DELE", ("1",)), False))
        recs = [(r["rule"], r["action"], r["command"], r["args"], r["enforced"])
                for r in run.of("policy.decision")]
        assert recs == [("retr-per-user", "rate_limit", "RETR", ["1"], True),
                        ("ro", "deny", "DELE", ["1"], False)]

    def test_close_all_ends_open_sessions(self) -> None:
        """At shutdown, sessions still open get uncommitted marks and a session.close."""
        run = Run.start()
        run.login()
        run.client(b"DELE 1\r\n")
        run.upstream(b"+OK\r\n")
        closing = run.builder.close_all()
        assert [r["event"] for r in closing] == ["message.delete.uncommitted", "session.close"]
        assert closing[1]["reason"] == "shutdown"
        assert run.builder.open_sessions == 0


def test_fast_timestamp_matches_rfc3339(monkeypatch: pytest.MonkeyPatch) -> None:
    import time as _time

    from popproxy.audit._records import rfc3339, utcnow_rfc3339

    for ns in (1_795_000_000_000_001_000, 1_795_000_000_999_999_999, 1_795_000_001_000_000_000,
               1_795_000_000_000_000_000):
        monkeypatch.setattr(_time, "time_ns", lambda ns=ns: ns)
        expected = rfc3339(datetime.fromtimestamp(ns // 10**9, UTC)
                           + timedelta(microseconds=ns % 10**9 // 1000))
        assert utcnow_rfc3339() == expected
    monkeypatch.undo()
    stamp = utcnow_rfc3339()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 5
