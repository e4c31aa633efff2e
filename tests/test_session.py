"""The sans-IO session: pipelining, state, AUTH, STLS, failures; no sockets."""

from __future__ import annotations

import base64
import hashlib
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.events import (
    AuthResult,
    CommandSent,
    EndReason,
    Event,
    MessageComplete,
    MessageStarted,
    ProtocolAnomaly,
    Response,
    State,
    Unsolicited,
)
from popproxy.policy import ALLOW, AllowAll, Decision, Deny, Facts
from popproxy.pop3 import Command, stuff
from popproxy.session import Session, SessionLimits
from tests.session_helpers import GREETING, DenyVerb, logged_in, of

deny_dele = DenyVerb("DELE", b"-ERR [SYS/PERM] DELE disabled by policy\r\n")
kinds = of


class TestPipelining:
    def test_refusal_in_the_middle_is_answered_in_order(self) -> None:
        s = logged_in(policy=deny_dele)
        out = s.receive_client(b"RETR 1\r\nDELE 1\r\nNOOP\r\n", 1)
        assert out.to_upstream == b"RETR 1\r\nNOOP\r\n"
        assert out.to_client == b""  # DELE waits behind RETR 1
        out = s.receive_upstream(b"+OK\r\nhi\r\n.\r\n+OK\r\n", 2)
        assert out.to_client == (
            b"+OK\r\nhi\r\n.\r\n-ERR [SYS/PERM] DELE disabled by policy\r\n+OK\r\n"
        )
        responses = kinds(out.events, Response)
        assert [r.command.verb for r in responses] == ["RETR", "DELE", "NOOP"]
        assert [r.local for r in responses] == [False, True, False]

    def test_commands_before_greeting_wait_for_it(self) -> None:
        s = Session()
        assert s.receive_client(b"CAPA\r\n", 0).to_upstream == b""
        out = s.receive_upstream(GREETING, 0)
        assert out.to_client == GREETING
        assert out.to_upstream == b"CAPA\r\n"

    def test_pass_is_a_barrier(self) -> None:
        """Nothing after PASS is judged before the server says who we are."""
        s = Session()
        s.receive_upstream(GREETING, 0)
        out = s.receive_client(b"USER bob\r\nPASS x\r\nSTAT\r\n", 0)
        assert out.to_upstream == b"USER bob\r\nPASS x\r\n"
        s.receive_upstream(b"+OK\r\n", 0)
        out = s.receive_upstream(b"+OK\r\n", 0)
        assert out.to_upstream == b"STAT\r\n"

    def test_failed_pass_keeps_later_commands_pre_auth(self) -> None:
        s = Session()
        s.receive_upstream(GREETING, 0)
        s.receive_client(b"USER bob\r\nPASS x\r\nSTAT\r\n", 0)
        s.receive_upstream(b"+OK\r\n", 0)
        out = s.receive_upstream(b"-ERR [AUTH] invalid login\r\n", 0)
        assert out.to_upstream == b""
        assert out.to_client == (
            b"-ERR [AUTH] invalid login\r\n-ERR STAT is not valid before login\r\n"
        )
        assert AuthResult("USER", "bob", False, "AUTH") in out.events

    def test_window_bounds_commands_in_flight(self) -> None:
        s = logged_in(limits=SessionLimits(window=4))
        out = s.receive_client(b"".join(b"LIST %d\r\n" % i for i in range(1, 11)), 0)
        assert out.to_upstream.count(b"\r\n") == 4
        out = s.receive_upstream(b"+OK 1 10\r\n", 0)
        assert out.to_upstream == b"LIST 5\r\n"

    def test_pipeline_overflow_closes_with_a_reason(self) -> None:
        s = logged_in(limits=SessionLimits(max_pipeline=5, window=2))
        out = s.receive_client(b"NOOP\r\n" * 10, 0)
        assert out.close == "client protocol error"
        assert out.to_client.endswith(b"-ERR too many pipelined commands\r\n")

    @settings(max_examples=60)
    @given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10))
    def test_any_split_of_the_upstream_stream_gives_the_same_result(
        self, cuts: list[int]
    ) -> None:
        body = b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\n.\r\n..x\r\nend\r\n"
        upstream = (
            b"+OK 2 100\r\n+OK\r\n1 50\r\n2 50\r\n.\r\n+OK 50 octets\r\n"
            + stuff(body)
            + b"-ERR [IN-USE] no\r\n+OK\r\n"
        )
        client = b"STAT\r\nLIST\r\nRETR 1\r\nUIDL 9\r\nNOOP\r\n"

        def run(parts: list[bytes]) -> tuple[bytes, list[Event]]:
            s = logged_in()
            s.receive_client(client, 1)
            got, events = b"", []
            for part in parts:
                out = s.receive_upstream(part, 2)
                got += out.to_client
                events += out.events
            return got, [e for e in events if not isinstance(e, type(events[0])) or True]

        whole = run([upstream])
        points = sorted({c % (len(upstream) + 1) for c in cuts})
        bounds = [0, *points, len(upstream)]
        parts = [upstream[a:b] for a, b in itertools.pairwise(bounds)]
        split = run(parts)
        assert split[0] == whole[0] == upstream
        done = [e for e in split[1] if isinstance(e, MessageComplete)]
        assert done == [e for e in whole[1] if isinstance(e, MessageComplete)]
        assert done[0].sha256 == hashlib.sha256(body).hexdigest()
        assert [type(e) for e in split[1] if isinstance(e, Response)] == [Response] * 5


class TestMessages:
    def test_retr_hash_octets_and_message_id(self) -> None:
        s = logged_in()
        body = b"Message-ID:\r\n <folded@example.org>\r\nSubject: s\r\n\r\n.dot\r\n"
        s.receive_client(b"RETR 3\r\n", 0)
        out = s.receive_upstream(b"+OK\r\n" + stuff(body), 1)
        (done,) = kinds(out.events, MessageComplete)
        assert done == MessageComplete(
            Command("RETR", ("3",)), 3, len(body), hashlib.sha256(body).hexdigest(),
            "<folded@example.org>", True,
            b"Message-ID:\r\n <folded@example.org>\r\nSubject: s\r\n\r\n",
        )

    def test_an_absurd_announced_size_is_passed_through_not_parsed(self) -> None:
        """int() refuses numbers of over 4,300 digits: an upstream announcing
        one must not break the session (the size is then unknown)."""
        s = logged_in()
        s.receive_client(b"RETR 1\r\n", 0)
        status = b"+OK " + b"9" * 5000 + b" octets\r\n"
        out = s.receive_upstream(status + stuff(b"x\r\n"), 1)
        assert out.to_client == status + stuff(b"x\r\n")
        (started,) = kinds(out.events, MessageStarted)
        assert started.announced is None
        assert kinds(out.events, MessageComplete)

    def test_err_to_retr_is_single_line(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 9\r\nNOOP\r\n", 0)
        out = s.receive_upstream(b"-ERR no such message\r\n+OK\r\n", 1)
        assert out.to_client == b"-ERR no such message\r\n+OK\r\n"
        assert not kinds(out.events, MessageComplete)

    def test_upstream_dying_mid_body_closes_and_marks_incomplete(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 1\r\n", 0)
        s.receive_upstream(b"+OK\r\npart of a mess", 1)
        out = s.upstream_closed(2)
        assert out.close is not None
        assert out.to_client == b""  # no -ERR in the middle of a body
        (done,) = kinds(out.events, MessageComplete)
        assert done.complete is False
        assert done.octets == len(b"part of a mess")


class TestFailures:
    def test_owed_replies_become_sys_temp(self) -> None:
        s = logged_in()
        s.receive_client(b"STAT\r\nLIST 1\r\n", 0)
        out = s.upstream_closed(1)
        assert out.to_client == (
            b"-ERR [SYS/TEMP] upstream closed the connection\r\n" * 2
        )
        assert out.close == "upstream closed the connection"

    def test_unsolicited_line_is_not_matched_to_a_later_command(self) -> None:
        s = logged_in()
        out = s.receive_upstream(b"-ERR Disconnected for inactivity.\r\n", 5)
        assert out.to_client == b""
        assert kinds(out.events, Unsolicited) == [
            Unsolicited(False, None, "Disconnected for inactivity.")
        ]
        out = s.receive_client(b"NOOP\r\n", 6)
        assert out.to_upstream == b"NOOP\r\n"

    def test_garbage_from_upstream_fails_the_session(self) -> None:
        s = logged_in()
        s.receive_client(b"STAT\r\n", 0)
        out = s.receive_upstream(b"HTTP/1.1 400 Bad Request\r\n", 1)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream protocol error\r\n"
        assert out.close is not None

    def test_greeting_err_is_passed_on_and_closes(self) -> None:
        s = Session()
        out = s.receive_upstream(b"-ERR [SYS/TEMP] too busy\r\n", 0)
        assert out.to_client == b"-ERR [SYS/TEMP] too busy\r\n"
        assert out.close is not None

    def test_unreachable_upstream_answers_instead_of_a_greeting(self) -> None:
        out = Session().fail(EndReason.UPSTREAM_UNAVAILABLE, 0)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream unavailable\r\n"


class TestStates:
    def test_transaction_commands_refused_before_login(self) -> None:
        s = Session()
        s.receive_upstream(GREETING, 0)
        out = s.receive_client(b"RETR 1\r\nNOOP\r\nCAPA\r\n", 0)
        assert out.to_upstream == b"CAPA\r\n"
        assert out.to_client == (
            b"-ERR RETR is not valid before login\r\n-ERR NOOP is not valid before login\r\n"
        )

    def test_login_commands_refused_after_login(self) -> None:
        s = logged_in()
        out = s.receive_client(b"USER eve\r\n", 0)
        assert out.to_upstream == b""
        assert out.to_client == b"-ERR USER is not valid after login\r\n"

    def test_capa_between_user_and_pass(self) -> None:
        s = Session()
        s.receive_upstream(GREETING, 0)
        out = s.receive_client(b"USER bob\r\nCAPA\r\nPASS pw\r\n", 0)
        assert out.to_upstream == b"USER bob\r\nCAPA\r\nPASS pw\r\n"
        s.receive_upstream(b"+OK\r\n+OK\r\nUSER\r\n.\r\n", 0)
        out = s.receive_upstream(b"+OK\r\n", 0)
        assert s.state is State.TRANSACTION
        assert s.user == "bob"

    def test_quit_commits_from_transaction(self) -> None:
        s = logged_in()
        s.receive_client(b"DELE 1\r\nQUIT\r\n", 0)
        out = s.receive_upstream(b"+OK\r\n+OK bye\r\n", 0)
        assert out.close == "quit"
        assert [e for e in out.events if getattr(e, "new", None) is State.UPDATE]

    def test_client_xclient_is_never_forwarded(self) -> None:
        s = Session()
        s.receive_upstream(GREETING, 0)
        out = s.receive_client(b"XCLIENT ADDR=10.0.0.1\r\n", 0)
        assert out.to_upstream == b""
        assert out.to_client == b"-ERR command not allowed\r\n"

    def test_malformed_lines_get_err_and_session_goes_on(self) -> None:
        s = logged_in()
        out = s.receive_client(b"RE\0TR 1\r\nUSER \xff\r\nNOOP\r\n", 0)
        assert out.to_upstream == b"NOOP\r\n"
        assert out.to_client == (
            b"-ERR malformed command line\r\n-ERR command arguments are not valid UTF-8\r\n"
        )
        assert len(kinds(out.events, ProtocolAnomaly)) == 2

    def test_overlong_line_closes(self) -> None:
        s = logged_in()
        out = s.receive_client(b"NOOP\r\n" + b"A" * 100 * 1024, 0)
        assert out.to_client == b"-ERR line too long\r\n"
        assert out.close == "client protocol error"


class TestStls:
    def test_stls_refused_and_pipelined_commands_answered(self) -> None:
        s = Session()
        s.receive_upstream(GREETING, 0)
        out = s.receive_client(b"STLS\r\nUSER evil\r\nPASS x\r\n", 0)
        assert out.to_client == b"-ERR STLS is not available on this port\r\n"
        assert out.to_upstream == b"USER evil\r\nPASS x\r\n"
        assert not kinds(out.events, ProtocolAnomaly)
        out = s.receive_upstream(b"+OK\r\n-ERR [AUTH] no\r\n", 0)
        assert out.to_client == b"+OK\r\n-ERR [AUTH] no\r\n"
        # Afterwards the client may go on in plaintext.
        assert s.receive_client(b"CAPA\r\n", 0).to_upstream == b"CAPA\r\n"

    def test_bytes_arriving_before_the_stls_reply_wait_for_it(self) -> None:
        s = logged_in()
        s.receive_client(b"NOOP\r\n", 0)  # STLS will wait behind this one
        s.state = State.AUTHORIZATION  # STLS is only valid pre-auth; test the framing
        s.receive_client(b"STLS\r\n", 0)
        assert s.receive_client(b"DELE 1\r\n", 0).to_upstream == b""
        out = s.receive_upstream(b"+OK\r\n", 1)
        # Refused: DELE is parsed only now, in its turn (and refused in
        # the AUTHORIZATION state this test forced).
        assert out.to_client == (b"+OK\r\n-ERR STLS is not available on this port\r\n"
                                 b"-ERR DELE is not valid before login\r\n")
        assert out.to_upstream == b""

    def test_capa_hides_stls(self) -> None:
        s = Session()
        s.receive_upstream(GREETING, 0)
        s.receive_client(b"CAPA\r\n", 0)
        out = s.receive_upstream(b"+OK\r\nTOP\r\nSTLS\r\nSASL PLAIN\r\n.\r\n", 0)
        assert out.to_client == b"+OK\r\nTOP\r\nSASL PLAIN\r\n.\r\n"


class TestAuth:
    def test_sasl_plain_with_continuation(self) -> None:
        blob = base64.b64encode(b"\0carol\0s3cret")
        s = Session()
        s.receive_upstream(GREETING, 0)
        out = s.receive_client(b"AUTH PLAIN\r\n", 0)
        assert out.to_upstream == b"AUTH PLAIN\r\n"
        out = s.receive_upstream(b"+ \r\n", 0)
        assert out.to_client == b"+ \r\n"
        out = s.receive_client(blob + b"\r\nSTAT\r\n", 0)
        assert out.to_upstream == blob + b"\r\n"  # STAT waits for the outcome
        out = s.receive_upstream(b"+OK logged in\r\n", 0)
        assert out.to_upstream == b"STAT\r\n"
        assert AuthResult("PLAIN", "carol", True, None) in out.events
        assert b"s3cret" not in repr(out.events).encode()

    def test_sasl_initial_response(self) -> None:
        blob = base64.b64encode(b"\0dave\0pw")
        s = Session()
        s.receive_upstream(GREETING, 0)
        assert s.receive_client(b"AUTH PLAIN " + blob + b"\r\n", 0).to_upstream.startswith(
            b"AUTH PLAIN "
        )
        out = s.receive_upstream(b"-ERR [AUTH] nope\r\n", 0)
        assert AuthResult("PLAIN", "dave", False, "AUTH") in out.events
        assert s.state is State.AUTHORIZATION

    def test_cancel_with_star(self) -> None:
        s = Session()
        s.receive_upstream(GREETING, 0)
        s.receive_client(b"AUTH LOGIN\r\n", 0)
        s.receive_upstream(b"+ VXNlcm5hbWU6\r\n", 0)
        assert s.receive_client(b"*\r\n", 0).to_upstream == b"*\r\n"
        out = s.receive_upstream(b"-ERR cancelled\r\n", 0)
        assert out.to_client == b"-ERR cancelled\r\n"
        assert s.receive_client(b"CAPA\r\n", 0).to_upstream == b"CAPA\r\n"

    def test_sasl_line_that_is_not_base64_closes(self) -> None:
        s = Session()
        s.receive_upstream(GREETING, 0)
        s.receive_client(b"AUTH PLAIN\r\n", 0)
        s.receive_upstream(b"+ \r\n", 0)
        out = s.receive_client(b"QUIT now\r\n", 0)
        assert out.close is not None
        assert out.to_upstream == b""

    def test_injected_crlf_in_plain_user_is_not_recorded(self) -> None:
        blob = base64.b64encode(b"\0eve\r\nDELE 1\0pw")
        s = Session()
        s.receive_upstream(GREETING, 0)
        s.receive_client(b"AUTH PLAIN " + blob + b"\r\n", 0)
        out = s.receive_upstream(b"-ERR [AUTH] no\r\n", 0)
        assert AuthResult("PLAIN", None, False, "AUTH") in out.events

    def test_apop_passes_through(self) -> None:
        s = Session()
        out = s.receive_upstream(GREETING, 0)
        assert s.apop_timestamp
        out = s.receive_client(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n", 0)
        assert out.to_upstream == b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"
        sent = kinds(out.events, CommandSent)
        assert "c4c9334b" not in repr(sent)
        out = s.receive_upstream(b"+OK mrose's maildrop has 2 messages\r\n", 0)
        assert AuthResult("APOP", "mrose", True, None) in out.events


def test_auth_login_password_is_never_taken_for_the_user() -> None:
    """An empty user-name response must not make the next line (the password) the user."""
    s = Session()
    s.receive_upstream(GREETING, 0)
    s.receive_client(b"AUTH LOGIN\r\n", 0)
    s.receive_upstream(b"+ VXNlcm5hbWU6\r\n", 0)
    s.receive_client(b"\r\n", 0)
    s.receive_upstream(b"+ UGFzc3dvcmQ6\r\n", 0)
    s.receive_client(base64.b64encode(b"hunter2-Password") + b"\r\n", 0)
    out = s.receive_upstream(b"-ERR [AUTH] Authentication failed.\r\n", 0)
    assert AuthResult("LOGIN", None, False, "AUTH") in out.events
    assert "hunter2" not in repr(out.events)


class TestPolicyTimers:
    def test_delayed_command_waits_for_tick_and_keeps_order(self) -> None:
        from popproxy.policy import Delay

        class DelayFirstRetr(AllowAll):
            delayed = False

            def decide(self, facts: Facts, command: Command, now: float) -> Decision:
                if command.verb == "RETR" and not self.delayed:
                    self.delayed = True
                    return Delay(now + 2.0, "slow")
                return ALLOW

        s = logged_in(policy=DelayFirstRetr())
        out = s.receive_client(b"RETR 1\r\nNOOP\r\n", 10.0)
        assert out.to_upstream == b""  # NOOP waits behind the held RETR
        assert s.wake_at == 12.0
        out = s.tick(12.0)
        assert out.to_upstream == b"RETR 1\r\nNOOP\r\n"
        assert s.wake_at is None

    def test_tarpitted_refusal_goes_out_when_due(self) -> None:
        class Tarpit(AllowAll):
            def decide(self, facts: Facts, command: Command, now: float) -> Decision:
                return Deny(b"-ERR [AUTH] slow down\r\n", "throttle", delay=2.0)

        s = Session(policy=Tarpit())
        s.receive_upstream(GREETING, 0)
        s.state = State.TRANSACTION  # judge a command in a policy-governed state
        out = s.receive_client(b"STAT\r\n", 5.0)
        assert out.to_client == b""
        assert s.wake_at == 7.0
        assert s.tick(6.0).to_client == b""
        assert s.tick(7.0).to_client == b"-ERR [AUTH] slow down\r\n"

    def test_retr_over_the_size_limit_is_refused_and_swallowed(self) -> None:
        class Small(AllowAll):
            def admit_size(self, facts: Facts, command: Command, octets: int) -> Deny | None:
                return Deny(b"-ERR [SYS/PERM] too big\r\n", "size") if octets > 10 else None

        s = logged_in(policy=Small())
        s.receive_client(b"RETR 1\r\nNOOP\r\n", 0)
        out = s.receive_upstream(b"+OK 500 octets\r\n" + stuff(b"x" * 500) + b"+OK\r\n", 1)
        assert out.to_client == b"-ERR [SYS/PERM] too big\r\n+OK\r\n"
        assert [type(e).__name__ for e in out.events if isinstance(e, (Response,))] == [
            "Response", "Response"]


class TestResolveUidl:
    def test_proxy_asks_uidl_before_retr_and_keeps_it_to_itself(self) -> None:
        from popproxy.events import UidsLearned

        s = logged_in(resolve_uidl=True)
        out = s.receive_client(b"RETR 2\r\nDELE 2\r\nNOOP\r\n", 0)
        assert out.to_upstream == b"UIDL 2\r\nRETR 2\r\nDELE 2\r\nNOOP\r\n"  # asked once
        out = s.receive_upstream(
            b"+OK 2 QhdPYR:00WBw1Ph7x7\r\n+OK\r\nhi\r\n.\r\n+OK marked\r\n+OK\r\n", 1)
        assert out.to_client == b"+OK\r\nhi\r\n.\r\n+OK marked\r\n+OK\r\n"
        kinds_seen = [type(e).__name__ for e in out.events
                      if isinstance(e, (UidsLearned, MessageComplete, Response))]
        assert kinds_seen[:2] == ["UidsLearned", "MessageComplete"]
        assert UidsLearned(((2, "QhdPYR:00WBw1Ph7x7"),)) in out.events
        assert [r.command.verb for r in kinds(out.events, Response)] == ["RETR", "DELE", "NOOP"]

    def test_no_probe_when_the_client_listed_uids(self) -> None:
        s = logged_in(resolve_uidl=True)
        s.receive_client(b"UIDL\r\n", 0)
        s.receive_upstream(b"+OK\r\n1 aaa\r\n2 bbb\r\n.\r\n", 0)
        assert s.receive_client(b"RETR 2\r\n", 0).to_upstream == b"RETR 2\r\n"

    def test_upstream_failure_owes_nothing_for_the_probe(self) -> None:
        s = logged_in(resolve_uidl=True)
        s.receive_client(b"DELE 3\r\n", 0)
        out = s.upstream_closed(1)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream closed the connection\r\n"
