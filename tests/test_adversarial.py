"""Adversarial tests: protocol edge cases a hostile or quirky peer can produce.

Most run against the sans-IO ``Session`` (bytes in, bytes out); a few go
end to end through ``start_proxy`` against the demo server, a scripted
upstream or a real Dovecot.  The expectations are what RFC
1939/2449/2595/5034/6856 and DESIGN.md ask for; each test that names a
"BUG" in its docstring or comments guards a fix.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from popproxy.config import HostPort
from popproxy.events import (
    AuthResult,
    CommandSent,
    EndReason,
    Event,
    Greeting,
    MessageComplete,
    ProtocolAnomaly,
    Response,
    SessionClosed,
    State,
    Unsolicited,
    UpstreamFailed,
)
from popproxy.policy import ALLOW, AllowAll, Decision, Deny, Facts
from popproxy.policy.config import PolicyConfig, Protections
from popproxy.policy.engine import PolicyEngine
from popproxy.pop3 import Command, stuff
from popproxy.relay import RECEIVE_SIZE
from popproxy.session import Output, Session, SessionLimits
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox
from tests.proxy_fixtures import RunningProxy, start_proxy
from tests.session_helpers import GREETING, DenyVerb, fresh, logged_in, of

PLAIN_BOB = base64.b64encode(b"\0bob\0secret pw")


# ----------------------------------------------------------------------
# Helpers


def responses(events: list[Event]) -> list[Response]:
    return [e for e in events if isinstance(e, Response)]


def completes(events: list[Event]) -> list[MessageComplete]:
    return [e for e in events if isinstance(e, MessageComplete)]


def auth_results(events: list[Event]) -> list[AuthResult]:
    return [e for e in events if isinstance(e, AuthResult)]


def feed_pieces(
    s: Session, pieces: list[bytes], now: float = 1, *, client: bool = False
) -> Output:
    """Feed bytes from one side in the given pieces; merge the outputs."""
    receive = s.receive_client if client else s.receive_upstream
    to_client = b""
    to_upstream = b""
    events: list[Event] = []
    close: EndReason | None = None
    for piece in pieces:
        out = receive(piece, now)
        to_client += out.to_client
        to_upstream += out.to_upstream
        events += out.events
        close = close or out.close
    return Output(to_client, to_upstream, events, close)


def feed_upstream_pieces(s: Session, pieces: list[bytes], now: float = 1) -> Output:
    return feed_pieces(s, pieces, now)


def feed_client_pieces(s: Session, pieces: list[bytes], now: float = 1) -> Output:
    return feed_pieces(s, pieces, now, client=True)


def split_at(data: bytes, *cuts: int) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# A policy that refuses DELE, as a read-only rule would.
deny_dele = DenyVerb("DELE", b"-ERR [SYS/PERM] DELE disabled\r\n")


class TarpitUser(AllowAll):
    """Like the built-in login throttle: refuse USER, but only after 2 s."""

    def decide(self, facts: Facts, command: Command, now: float) -> Decision:
        if command.verb == "USER":
            return Deny(b"-ERR [AUTH] too many failed logins\r\n", "throttle", delay=2.0)
        return ALLOW


# ----------------------------------------------------------------------
# Pipelining


class TestPipelining:
    def test_mixed_local_refusals_and_multiline_replies_keep_order(self) -> None:
        s = logged_in(policy=deny_dele)
        out = s.receive_client(
            b"LIST\r\nDELE 1\r\nRETR 1\r\nXCLIENT ADDR=1.2.3.4\r\n\r\nUIDL\r\nTOP 1 0\r\n", 1
        )
        assert out.to_upstream == b"LIST\r\nRETR 1\r\nUIDL\r\nTOP 1 0\r\n"
        assert out.to_client == b""  # everything waits behind LIST
        upstream = (
            b"+OK 1 messages\r\n1 12\r\n.\r\n"
            + b"+OK 12 octets\r\n" + stuff(b"Subject: a\r\n\r\n.\r\n")
            + b"+OK\r\n1 uid-1\r\n.\r\n"
            + b"+OK\r\nSubject: a\r\n\r\n.\r\n"
        )
        out = s.receive_upstream(upstream, 2)
        assert out.to_client == (
            b"+OK 1 messages\r\n1 12\r\n.\r\n"
            b"-ERR [SYS/PERM] DELE disabled\r\n"
            b"+OK 12 octets\r\n" + stuff(b"Subject: a\r\n\r\n.\r\n")
            + b"-ERR command not allowed\r\n"
            b"-ERR empty command\r\n"
            b"+OK\r\n1 uid-1\r\n.\r\n"
            b"+OK\r\nSubject: a\r\n\r\n.\r\n"
        )
        verbs = [r.command.verb for r in responses(out.events)]
        assert verbs == ["LIST", "DELE", "RETR", "XCLIENT", "INVALID", "UIDL", "TOP"]
        top = completes(out.events)[-1]
        assert top.command == Command("TOP", ("1", "0"))
        assert top.octets == len(b"Subject: a\r\n\r\n")

    def test_refusals_alone_are_answered_at_once(self) -> None:
        s = logged_in(policy=deny_dele)
        out = s.receive_client(b"DELE 1\r\nDELE 2\r\nAPOP x y\r\n", 1)
        assert out.to_upstream == b""
        assert out.to_client == (
            b"-ERR [SYS/PERM] DELE disabled\r\n" * 2 + b"-ERR APOP is not valid after login\r\n"
        )

    def test_quit_mid_pipeline_commands_after_it_never_reach_upstream(self) -> None:
        s = logged_in()
        out = s.receive_client(b"DELE 1\r\nQUIT\r\nDELE 2\r\nRETR 1\r\n", 1)
        assert out.to_upstream == b"DELE 1\r\nQUIT\r\n"
        out = s.receive_upstream(b"+OK marked\r\n", 2)
        assert out.to_upstream == b""
        out = s.receive_upstream(b"+OK bye\r\n", 3)
        assert out.to_client == b"+OK bye\r\n"
        assert out.to_upstream == b""
        assert out.close == "quit"
        assert s.state is State.CLOSED
        # Whatever else arrives is ignored.
        assert s.receive_client(b"DELE 3\r\n", 4).to_upstream == b""

    def test_quit_refused_still_ends_and_drops_the_rest(self) -> None:
        s = logged_in()
        out = s.receive_client(b"QUIT\r\nNOOP\r\n", 1)
        assert out.to_upstream == b"QUIT\r\n"
        out = s.receive_upstream(b"-ERR some deleted messages not removed\r\n", 2)
        assert out.to_client == b"-ERR some deleted messages not removed\r\n"
        assert out.to_upstream == b""
        assert out.close is not None

    def test_quit_pre_auth_in_pipeline(self) -> None:
        s = fresh()
        out = s.receive_client(b"CAPA\r\nQUIT\r\nUSER bob\r\n", 1)
        assert out.to_upstream == b"CAPA\r\nQUIT\r\n"
        out = s.receive_upstream(b"+OK\r\nUSER\r\n.\r\n+OK bye\r\n", 2)
        assert out.to_client == b"+OK\r\nUSER\r\n.\r\n+OK bye\r\n"
        assert out.to_upstream == b""
        assert out.close == "quit"

    def test_auth_barrier_mid_pipeline(self) -> None:
        s = fresh()
        out = s.receive_client(b"CAPA\r\nAUTH PLAIN\r\n" + PLAIN_BOB + b"\r\nSTAT\r\n", 1)
        # The SASL response is not a command, and nothing after AUTH goes yet.
        assert out.to_upstream == b"CAPA\r\nAUTH PLAIN\r\n"
        out = s.receive_upstream(b"+OK\r\nSASL PLAIN\r\n.\r\n", 2)
        assert out.to_client == b"+OK\r\nSASL PLAIN\r\n.\r\n"
        assert out.to_upstream == b""
        out = s.receive_upstream(b"+ \r\n", 3)
        assert out.to_client == b"+ \r\n"
        assert out.to_upstream == PLAIN_BOB + b"\r\n"
        out = s.receive_upstream(b"+OK logged in\r\n", 4)
        assert out.to_client == b"+OK logged in\r\n"
        assert out.to_upstream == b"STAT\r\n"
        assert auth_results(out.events) == [AuthResult("PLAIN", "bob", True, None)]
        assert s.state is State.TRANSACTION

    def test_auth_with_initial_response_mid_pipeline(self) -> None:
        s = fresh()
        out = s.receive_client(b"AUTH PLAIN " + PLAIN_BOB + b"\r\nSTAT\r\nLIST\r\n", 1)
        assert out.to_upstream == b"AUTH PLAIN " + PLAIN_BOB + b"\r\n"
        out = s.receive_upstream(b"+OK\r\n", 2)
        assert out.to_upstream == b"STAT\r\nLIST\r\n"
        out = s.receive_upstream(b"+OK 0 0\r\n+OK\r\n.\r\n", 3)
        assert out.to_client == b"+OK 0 0\r\n+OK\r\n.\r\n"

    def test_failed_auth_releases_pipeline_into_authorization(self) -> None:
        s = fresh()
        out = s.receive_client(b"AUTH PLAIN " + PLAIN_BOB + b"\r\nSTAT\r\n", 1)
        out = s.receive_upstream(b"-ERR [AUTH] no\r\n", 2)
        assert out.to_upstream == b""
        assert out.to_client == b"-ERR [AUTH] no\r\n-ERR STAT is not valid before login\r\n"

    def test_stls_mid_pipeline_discards_what_follows(self) -> None:
        s = fresh(starttls=True)
        out = s.receive_client(b"CAPA\r\nSTLS\r\nUSER evil\r\nPASS x\r\n", 1)
        assert out.to_upstream == b"CAPA\r\n"
        # More plaintext before the +OK: held, never parsed, then discarded.
        out = s.receive_client(b"DELE 1\r\n", 1)
        assert out.to_upstream == b""
        out = s.receive_upstream(b"+OK\r\nUSER\r\n.\r\n", 2)
        assert out.to_client == b"+OK\r\nUSER\r\nSTLS\r\n.\r\n+OK Begin TLS negotiation\r\n"
        assert out.to_upstream == b""
        assert out.start_tls
        [anomaly] = of(out.events, ProtocolAnomaly)
        assert anomaly.detail == "27 octets"  # USER evil, PASS x, DELE 1
        out = s.tls_started(3)
        assert out.to_upstream == b""
        assert out.to_client == b""
        out = s.receive_client(b"CAPA\r\n", 4)
        assert out.to_upstream == b"CAPA\r\n"

    def test_refused_stls_answers_the_pipelined_rest(self) -> None:
        """Refused STLS (no STLS on this port): the connection stays plain
        text, and what was pipelined behind it is read as usual (dropping
        it would leave the client waiting for replies that never come)."""
        s = fresh()
        out = s.receive_client(b"STLS\r\nUSER evil\r\n", 1)
        assert out.to_client == b"-ERR STLS is not available on this port\r\n"
        assert out.to_upstream == b"USER evil\r\n"
        assert not of(out.events, ProtocolAnomaly)
        assert s.receive_upstream(b"+OK\r\n", 2).to_client == b"+OK\r\n"
        # Later input is read again.
        assert s.receive_client(b"CAPA\r\n", 2).to_upstream == b"CAPA\r\n"

    def test_pass_barrier_holds_local_refusals_behind_it(self) -> None:
        s = fresh()
        out = s.receive_client(b"USER bob\r\nPASS pw\r\nNOOP\r\nSTLS\r\n", 1)
        assert out.to_upstream == b"USER bob\r\nPASS pw\r\n"
        out = s.receive_upstream(b"+OK\r\n", 2)
        assert out.to_client == b"+OK\r\n"
        out = s.receive_upstream(b"+OK\r\n", 3)
        # NOOP now valid (TRANSACTION); STLS not.
        assert out.to_upstream == b"NOOP\r\n"
        out = s.receive_upstream(b"+OK\r\n", 4)
        assert out.to_client == b"+OK\r\n-ERR STLS is only valid before login\r\n"

    def test_malformed_lines_in_the_pipeline_take_their_turn(self) -> None:
        s = logged_in()
        out = s.receive_client(b"NOOP\r\nNO\0OP\r\nNOOP\rNOOP\r\n12 x\r\nNOOP\r\n", 1)
        assert out.to_upstream == b"NOOP\r\nNOOP\r\n"
        out = s.receive_upstream(b"+OK a\r\n+OK b\r\n", 2)
        assert out.to_client == (
            b"+OK a\r\n"
            b"-ERR malformed command line\r\n"
            b"-ERR malformed command line\r\n"
            b"-ERR malformed command\r\n"
            b"+OK b\r\n"
        )

    def test_too_many_bad_lines_close(self) -> None:
        s = logged_in()
        out = s.receive_client(b"\r\n" * 11, 1)
        assert out.close == "client protocol error"
        assert out.to_client.endswith(b"-ERR too many bad commands\r\n")
        assert out.to_upstream == b""

    def test_delayed_refusal_does_not_steal_the_next_reply(self) -> None:
        """A refusal held back (tarpit) is a barrier: CAPA goes upstream only
        after it, so the upstream's reply can never be matched to it."""
        s = fresh(policy=TarpitUser())
        out = s.receive_client(b"USER bob\r\nCAPA\r\n", 0)
        assert out.to_upstream == b""
        assert out.to_client == b""
        out = s.tick(2.0)
        assert out.to_client == b"-ERR [AUTH] too many failed logins\r\n"
        assert out.to_upstream == b"CAPA\r\n"
        out = s.receive_upstream(b"+OK\r\nTOP\r\nUSER\r\n.\r\n", 2.5)
        assert out.close is None
        assert not of(out.events, Unsolicited)
        assert out.to_client == b"+OK\r\nTOP\r\nUSER\r\n.\r\n"

    def test_delayed_refusal_alone_goes_out_when_due(self) -> None:
        s = fresh(policy=TarpitUser())
        out = s.receive_client(b"USER bob\r\n", 0)
        assert out.to_client == b""
        assert s.wake_at == 2.0
        assert s.tick(1.0).to_client == b""
        assert s.tick(2.0).to_client == b"-ERR [AUTH] too many failed logins\r\n"

    def test_window_refills_in_order_after_multiline_replies(self) -> None:
        s = logged_in(limits=SessionLimits(window=2))
        out = s.receive_client(b"RETR 1\r\nRETR 2\r\nRETR 3\r\nNOOP\r\n", 1)
        assert out.to_upstream == b"RETR 1\r\nRETR 2\r\n"
        out = s.receive_upstream(b"+OK\r\na\r\n.\r\n", 2)
        assert out.to_upstream == b"RETR 3\r\n"
        out = s.receive_upstream(b"+OK\r\nb\r\n.\r\n+OK\r\nc\r\n.\r\n", 3)
        assert out.to_upstream == b"NOOP\r\n"
        assert out.to_client == b"+OK\r\nb\r\n.\r\n+OK\r\nc\r\n.\r\n"

    def test_commands_and_greeting_race(self) -> None:
        s = Session()
        out = s.receive_client(b"CAPA\r\nUSER bob\r\nPASS pw\r\nSTAT\r\n", 0)
        assert out.to_upstream == b""
        out = s.receive_upstream(GREETING, 1)
        assert out.to_client == GREETING
        assert out.to_upstream == b"CAPA\r\nUSER bob\r\nPASS pw\r\n"


# ----------------------------------------------------------------------
# SASL (RFC 5034)


class TestSasl:
    def test_exchange_style_plus_ok_is_final(self) -> None:
        """Exchange 2003 answers ``AUTH NTLM`` with ``+OK``: a final reply."""
        s = fresh()
        out = s.receive_client(b"AUTH NTLM\r\nSTAT\r\n", 1)
        assert out.to_upstream == b"AUTH NTLM\r\n"
        out = s.receive_upstream(b"+OK\r\n", 2)
        assert out.to_client == b"+OK\r\n"
        assert out.to_upstream == b"STAT\r\n"
        assert [r.ok for r in auth_results(out.events)] == [True]
        assert s.state is State.TRANSACTION

    def test_star_cancels(self) -> None:
        s = fresh()
        out = s.receive_client(b"AUTH LOGIN\r\n", 1)
        out = s.receive_upstream(b"+ VXNlcm5hbWU6\r\n", 2)
        assert out.to_client == b"+ VXNlcm5hbWU6\r\n"
        out = s.receive_client(b"*\r\nCAPA\r\n", 3)
        assert out.to_upstream == b"*\r\n"
        out = s.receive_upstream(b"-ERR authentication cancelled\r\n", 4)
        assert out.to_client == b"-ERR authentication cancelled\r\n"
        assert out.to_upstream == b"CAPA\r\n"
        (result,) = auth_results(out.events)
        assert not result.ok
        assert result.user is None
        assert s.state is State.AUTHORIZATION

    def test_login_two_steps_names_the_user_not_the_password(self) -> None:
        s = fresh()
        s.receive_client(b"AUTH LOGIN\r\n", 1)
        s.receive_upstream(b"+ VXNlcm5hbWU6\r\n", 2)
        assert s.receive_client(base64.b64encode(b"bob") + b"\r\n", 3).to_upstream == (
            base64.b64encode(b"bob") + b"\r\n"
        )
        s.receive_upstream(b"+ UGFzc3dvcmQ6\r\n", 4)
        out = s.receive_client(base64.b64encode(b"hunter2") + b"\r\n", 5)
        assert out.to_upstream == base64.b64encode(b"hunter2") + b"\r\n"
        out = s.receive_upstream(b"+OK\r\n", 6)
        assert auth_results(out.events) == [AuthResult("LOGIN", "bob", True, None)]

    def test_commands_pipelined_after_the_sasl_response_wait_for_the_outcome(self) -> None:
        s = fresh()
        s.receive_client(b"AUTH PLAIN\r\n", 1)
        s.receive_upstream(b"+ \r\n", 2)
        out = s.receive_client(PLAIN_BOB + b"\r\nSTAT\r\nUIDL\r\n", 3)
        assert out.to_upstream == PLAIN_BOB + b"\r\n"
        out = s.receive_upstream(b"+OK\r\n", 4)
        assert out.to_upstream == b"STAT\r\nUIDL\r\n"
        assert s.user == "bob"

    def test_empty_sasl_response_and_bare_plus_continuation(self) -> None:
        s = fresh()
        s.receive_client(b"AUTH PLAIN\r\n", 1)
        out = s.receive_upstream(b"+\r\n", 2)
        assert out.to_client == b"+\r\n"
        out = s.receive_client(b"\r\n", 3)
        assert out.to_upstream == b"\r\n"
        assert out.close is None

    def test_base64_with_whitespace_is_refused_not_forwarded(self) -> None:
        s = fresh()
        s.receive_client(b"AUTH PLAIN\r\n", 1)
        s.receive_upstream(b"+ \r\n", 2)
        out = s.receive_client(PLAIN_BOB[:8] + b" " + PLAIN_BOB[8:] + b"\r\n", 3)
        assert out.to_upstream == b""
        assert out.to_client.startswith(b"-ERR")
        assert out.close is not None

    def test_crlf_in_plain_credentials_never_becomes_a_user(self) -> None:
        s = fresh()
        evil = base64.b64encode(b"\0bob\r\nDELE 1\0pw")
        out = s.receive_client(b"AUTH PLAIN " + evil + b"\r\n", 1)
        # Relayed as base64 (one line), never decoded into lines.
        assert out.to_upstream == b"AUTH PLAIN " + evil + b"\r\n"
        out = s.receive_upstream(b"-ERR [AUTH] no\r\n", 2)
        (result,) = auth_results(out.events)
        assert result.user is None

    def test_sasl_continuation_outside_auth_is_a_protocol_error(self) -> None:
        s = logged_in()
        s.receive_client(b"NOOP\r\n", 1)
        out = s.receive_upstream(b"+ hello\r\n", 2)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream protocol error\r\n"
        assert out.close is not None

    def test_sasl_line_at_the_limit_passes(self) -> None:
        s = fresh()
        s.receive_client(b"AUTH XOAUTH2\r\n", 1)
        s.receive_upstream(b"+ \r\n", 2)
        token = b"A" * 16384
        out = feed_client_pieces(s, split_at(token + b"\r\n", 1000, 9000, 16384))
        assert out.to_upstream == token + b"\r\n"
        assert out.close is None

    def test_sasl_line_over_the_limit_is_refused(self) -> None:
        s = fresh()
        s.receive_client(b"AUTH XOAUTH2\r\n", 1)
        s.receive_upstream(b"+ \r\n", 2)
        out = s.receive_client(b"A" * 16385 + b"\r\n", 3)
        assert out.to_upstream == b""
        assert out.to_client == b"-ERR line too long\r\n"
        assert out.close == "client protocol error"

    @pytest.mark.parametrize("size", [16384, 16385])
    def test_auth_line_with_initial_response_limit(self, size: int) -> None:
        s = fresh()
        line = b"AUTH XOAUTH2 " + b"A" * (size - len(b"AUTH XOAUTH2 "))
        assert len(line) == size
        out = feed_client_pieces(s, [line[:500], line[500:1100], line[1100:] + b"\r\n"])
        if size == 16384:
            assert out.to_upstream == line + b"\r\n"
            assert out.close is None
        else:
            assert out.to_upstream == b""
            assert out.to_client == b"-ERR line too long\r\n"

    def test_long_line_that_merely_starts_like_auth_gets_the_short_limit(self) -> None:
        s = fresh()
        out = s.receive_client(b"AUTHX " + b"A" * 2000 + b"\r\n", 1)
        assert out.to_client == b"-ERR line too long\r\n"

    def test_lowercase_auth_gets_the_long_limit(self) -> None:
        s = fresh()
        line = b"auth plain " + b"A" * 3000
        out = s.receive_client(line + b"\r\n", 1)
        assert out.to_upstream == b"AUTH plain " + b"A" * 3000 + b"\r\n"

    def test_client_talking_ahead_of_the_continuation_is_bounded(self) -> None:
        s = fresh()
        s.receive_client(b"AUTH PLAIN\r\n", 1)
        out = s.receive_client(b"A" * 20000, 2)
        assert out.close == "client protocol error"
        assert out.to_upstream == b""

    def test_bare_auth_is_a_multiline_mechanism_list_not_a_barrier(self) -> None:
        s = fresh()
        out = s.receive_client(b"AUTH\r\nCAPA\r\n", 1)
        assert out.to_upstream == b"AUTH\r\nCAPA\r\n"
        out = s.receive_upstream(b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n+OK\r\nUSER\r\n.\r\n", 2)
        assert out.to_client == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n+OK\r\nUSER\r\n.\r\n"

    def test_upstream_dies_during_sasl_exchange(self) -> None:
        s = fresh()
        s.receive_client(b"AUTH PLAIN\r\nSTAT\r\n", 1)
        s.receive_upstream(b"+ \r\n", 2)
        out = s.upstream_closed(3)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream closed the connection\r\n"
        assert out.close is not None


# ----------------------------------------------------------------------
# Line limits (DESIGN: command lines 1 KiB, SASL lines 16 KiB)


class TestLimits:
    def test_command_line_of_exactly_1024_octets_passes(self) -> None:
        s = logged_in()
        line = b"NOOP " + b"x" * 1019
        out = s.receive_client(line + b"\r\n", 1)
        assert out.to_upstream == line + b"\r\n"

    def test_command_line_of_exactly_1024_octets_with_bare_lf(self) -> None:
        s = logged_in()
        line = b"NOOP " + b"x" * 1019
        out = s.receive_client(line + b"\n", 1)
        assert out.to_upstream == line + b"\r\n"

    def test_command_line_of_1025_octets_is_refused(self) -> None:
        s = logged_in()
        out = s.receive_client(b"NOOP " + b"x" * 1020 + b"\r\n", 1)
        assert out.to_upstream == b""
        assert out.to_client == b"-ERR line too long\r\n"
        assert out.close == "client protocol error"

    def test_1025_octets_without_newline_yet_is_refused_early(self) -> None:
        s = logged_in()
        out = s.receive_client(b"N" * 1025, 1)
        assert out.close == "client protocol error"

    def test_1024_octet_line_split_between_cr_and_lf(self) -> None:
        s = logged_in()
        line = b"NOOP " + b"x" * 1019
        out = feed_client_pieces(s, [line + b"\r", b"\n"])
        assert out.close is None
        assert out.to_upstream == line + b"\r\n"

    def test_16384_octet_sasl_line_split_between_cr_and_lf(self) -> None:
        s = fresh()
        s.receive_client(b"AUTH XOAUTH2\r\n", 1)
        s.receive_upstream(b"+ \r\n", 2)
        token = b"A" * 16384
        out = feed_client_pieces(s, [token + b"\r", b"\n"])
        assert out.close is None
        assert out.to_upstream == token + b"\r\n"

    def test_1024_octet_line_split_elsewhere(self) -> None:
        s = logged_in()
        line = b"NOOP " + b"x" * 1019
        out = feed_client_pieces(s, [line[:700], line[700:], b"\r\n"])
        assert out.close is None
        assert out.to_upstream == line + b"\r\n"

    def test_custom_limits(self) -> None:
        s = logged_in(limits=SessionLimits(command_line=255, sasl_line=1000))
        assert s.receive_client(b"NOOP " + b"x" * 250 + b"\r\n", 1).close is None
        out = s.receive_client(b"NOOP " + b"x" * 251 + b"\r\n", 1)
        assert out.to_client.endswith(b"-ERR line too long\r\n")

    def test_upstream_status_line_too_long(self) -> None:
        s = logged_in()
        s.receive_client(b"NOOP\r\n", 1)
        out = s.receive_upstream(b"+OK " + b"x" * 9000, 2)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream protocol error\r\n"
        assert out.close is not None


# ----------------------------------------------------------------------
# Multi-line framing


RETR_BODY = b"Subject: t\r\nMessage-ID: <m@x>\r\n\r\n.\r\n..\r\n.x\r\n\r\nend\r\n"


class TestFraming:
    def test_terminator_split_at_every_position(self) -> None:
        wire = b"+OK 55 octets\r\n" + stuff(RETR_BODY) + b"+OK noop\r\n"
        expect_sha = hashlib.sha256(RETR_BODY).hexdigest()
        for cut in range(1, len(wire)):
            for cut2 in (cut, min(cut + 1, len(wire) - 1), min(cut + 3, len(wire) - 1)):
                s = logged_in()
                s.receive_client(b"RETR 1\r\nNOOP\r\n", 1)
                out = feed_upstream_pieces(s, split_at(wire, cut, cut2))
                assert out.to_client == wire, (cut, cut2)
                (done,) = completes(out.events)
                assert done.sha256 == expect_sha, (cut, cut2)
                assert done.octets == len(RETR_BODY)
                assert done.message_id == "<m@x>"
                assert [r.command.verb for r in responses(out.events)] == ["RETR", "NOOP"]

    def test_every_byte_separately(self) -> None:
        wire = b"+OK\r\n" + stuff(RETR_BODY) + b"+OK\r\n"
        s = logged_in()
        s.receive_client(b"RETR 1\r\nNOOP\r\n", 1)
        out = feed_upstream_pieces(s, [wire[i : i + 1] for i in range(len(wire))])
        assert out.to_client == wire
        (done,) = completes(out.events)
        assert done.sha256 == hashlib.sha256(RETR_BODY).hexdigest()

    @pytest.mark.parametrize(
        "body",
        [
            b".\r\n",  # a line that is exactly "."
            b"..\r\n",  # exactly ".."
            b"...\r\n",
            b".\r\n.\r\n.\r\n",
            b"\r\n",  # a single empty line
            b"x\r\n.\r\n",
            b".end\r\n",
            b"a\rb\nc\r\n",  # bare CR and LF inside a line are content
            b"\r\n.\r\nx\r\n",
        ],
    )
    def test_dot_lines_are_unstuffed_for_the_hash(self, body: bytes) -> None:
        s = logged_in()
        s.receive_client(b"RETR 1\r\n", 1)
        wire = b"+OK\r\n" + stuff(body)
        out = s.receive_upstream(wire, 2)
        assert out.to_client == wire
        (done,) = completes(out.events)
        assert done.complete
        assert done.octets == len(body)
        assert done.sha256 == hashlib.sha256(body).hexdigest()

    def test_empty_body(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 1\r\nNOOP\r\n", 1)
        out = s.receive_upstream(b"+OK 0 octets\r\n.\r\n+OK\r\n", 2)
        assert out.to_client == b"+OK 0 octets\r\n.\r\n+OK\r\n"
        (done,) = completes(out.events)
        assert done.octets == 0
        assert done.sha256 == hashlib.sha256(b"").hexdigest()
        assert done.complete

    def test_empty_body_status_and_dot_in_separate_reads(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 1\r\n", 1)
        out = feed_upstream_pieces(s, [b"+OK\r\n", b".", b"\r", b"\n"])
        assert out.to_client == b"+OK\r\n.\r\n"
        assert completes(out.events)[0].octets == 0

    def test_body_lines_that_look_like_status_lines_are_body(self) -> None:
        body = b"+OK not a reply\r\n-ERR neither\r\n+ nor this\r\n"
        s = logged_in()
        s.receive_client(b"RETR 1\r\n", 1)
        out = s.receive_upstream(b"+OK\r\n" + stuff(body), 2)
        assert completes(out.events)[0].octets == len(body)
        assert out.close is None

    def test_err_to_a_multiline_command_is_one_line(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 9\r\nLIST\r\n", 1)
        out = s.receive_upstream(b"-ERR no such message\r\n+OK\r\n1 10\r\n.\r\n", 2)
        assert out.to_client == b"-ERR no such message\r\n+OK\r\n1 10\r\n.\r\n"
        assert not completes(out.events)

    @pytest.mark.parametrize("shift", range(-6, 7))
    def test_terminator_at_a_256_kib_chunk_boundary(self, shift: int) -> None:
        status = b"+OK big\r\n"
        filler = RECEIVE_SIZE - len(status) - 2 + shift
        body = b"x" * filler + b"\r\n"
        wire = status + stuff(body) + b"+OK after\r\n"
        s = logged_in()
        s.receive_client(b"RETR 1\r\nNOOP\r\n", 1)
        out = feed_upstream_pieces(s, [wire[:RECEIVE_SIZE], wire[RECEIVE_SIZE:]])
        assert out.to_client == wire
        (done,) = completes(out.events)
        assert done.octets == len(body)
        assert done.sha256 == hashlib.sha256(body).hexdigest()
        assert [r.command.verb for r in responses(out.events)] == ["RETR", "NOOP"]

    def test_top_with_zero_lines(self) -> None:
        s = logged_in()
        out = s.receive_client(b"TOP 1 0\r\nNOOP\r\n", 1)
        assert out.to_upstream == b"TOP 1 0\r\nNOOP\r\n"
        out = s.receive_upstream(b"+OK\r\nSubject: s\r\n\r\n.\r\n+OK\r\n", 2)
        assert out.to_client == b"+OK\r\nSubject: s\r\n\r\n.\r\n+OK\r\n"
        (done,) = completes(out.events)
        assert done.command.verb == "TOP"
        assert done.msg == 1

    @pytest.mark.parametrize(
        ("line", "wire", "multi"),
        [
            (b"LIST\r\n", b"LIST\r\n", True),
            (b"LIST 1\r\n", b"LIST 1\r\n", False),
            (b"LIST  1\r\n", b"LIST 1\r\n", False),
            (b"LIST 1 \r\n", b"LIST 1\r\n", False),
            (b"LIST \r\n", b"LIST\r\n", True),
            (b"list\r\n", b"LIST\r\n", True),
            (b"UIDL\n", b"UIDL\r\n", True),
            (b"uidl 2\r\n", b"UIDL 2\r\n", False),
            (b"TOP 1 0\r\n", b"TOP 1 0\r\n", True),
            (b"RETR 1\r\n", b"RETR 1\r\n", True),
            (b"STAT\r\n", b"STAT\r\n", False),
            (b"LAST\r\n", b"LAST\r\n", False),
            (b"LANG\r\n", b"LANG\r\n", True),
            (b"LANG fr\r\n", b"LANG fr\r\n", False),
            (b"XFOO\r\n", b"XFOO\r\n", False),
        ],
    )
    def test_shape_follows_command_as_forwarded(
        self, line: bytes, wire: bytes, multi: bool
    ) -> None:
        s = logged_in()
        out = s.receive_client(line + b"NOOP\r\n", 1)
        assert out.to_upstream == wire + b"NOOP\r\n"
        reply = b"+OK\r\n1 a\r\n.\r\n" if multi else b"+OK 1 a\r\n"
        out = s.receive_upstream(reply + b"+OK noop\r\n", 2)
        assert out.to_client == reply + b"+OK noop\r\n"
        assert len(responses(out.events)) == 2

    def test_listing_with_odd_spacing_passes_verbatim(self) -> None:
        s = logged_in()
        s.receive_client(b"UIDL\r\nLIST\r\n", 1)
        listing = b"+OK\r\n1  aaa\r\n2 bbb  \r\n3\tccc\r\n 4 ddd\r\n.\r\n"
        sizes = b"+OK 2 messages (300 octets)\r\n1 100 extra\r\n2  200\r\n.\r\n"
        out = s.receive_upstream(listing + sizes, 2)
        assert out.to_client == listing + sizes
        assert out.close is None

    def test_status_line_with_bare_lf(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 1\r\nNOOP\r\n", 1)
        out = s.receive_upstream(b"+OK\n" + stuff(b"a\r\n") + b"+OK\n", 2)
        assert out.to_client == b"+OK\n" + stuff(b"a\r\n") + b"+OK\n"
        assert completes(out.events)[0].octets == 3

    def test_upstream_dies_mid_body(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 1\r\nNOOP\r\n", 1)
        out = s.receive_upstream(b"+OK\r\nSubject: x\r\n\r\npart", 2)
        assert out.to_client == b"+OK\r\nSubject: x\r\n\r\npart"
        out = s.upstream_closed(3)
        # Inside a body the only honest thing is to close; no -ERR in the body.
        assert out.to_client == b""
        assert out.close is not None
        (done,) = completes(out.events)
        assert not done.complete
        assert done.octets == len(b"Subject: x\r\n\r\npart")

    def test_upstream_dies_with_held_back_terminator_prefix(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 1\r\n", 1)
        out = s.receive_upstream(b"+OK\r\nabc\r\n.", 2)
        out = s.upstream_closed(3)
        (done,) = completes(out.events)
        assert not done.complete

    def test_fatal_client_error_mid_body_does_not_write_into_the_body(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 1\r\n", 1)
        out = s.receive_upstream(b"+OK\r\nline one\r\n", 2)
        assert out.to_client == b"+OK\r\nline one\r\n"
        out = s.receive_client(b"N" * 1100 + b"\r\n", 3)
        assert out.close == "client protocol error"
        assert out.to_client == b""

    def test_client_gone_mid_body(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 1\r\n", 1)
        s.receive_upstream(b"+OK\r\nabc\r\n", 2)
        out = s.client_closed(3)
        (done,) = completes(out.events)
        assert not done.complete
        assert out.close == "client closed"


# ----------------------------------------------------------------------
# The greeting


class TestGreeting:
    def test_greeting_split_byte_by_byte(self) -> None:
        s = Session()
        s.receive_client(b"CAPA\r\n", 0)
        out = feed_upstream_pieces(s, [GREETING[i : i + 1] for i in range(len(GREETING))])
        assert out.to_client == GREETING
        assert out.to_upstream == b"CAPA\r\n"
        (g,) = of(out.events, Greeting)
        assert isinstance(g, Greeting)
        assert g.apop

    @pytest.mark.parametrize(
        "greeting",
        [b"220 smtp.example ESMTP\r\n", b"* OK IMAP4rev1\r\n", b"+ hello\r\n", b"\r\n",
         b"+OKAY\r\n", b"\x16\x03\x01\x02\x00\r\n"],
    )
    def test_garbage_greeting(self, greeting: bytes) -> None:
        s = Session()
        s.receive_client(b"USER bob\r\n", 0)
        out = s.receive_upstream(greeting, 1)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream protocol error\r\n"
        assert out.to_upstream == b""
        assert out.close is not None

    def test_err_greeting_is_relayed_and_ends(self) -> None:
        s = Session()
        s.receive_client(b"USER bob\r\n", 0)
        out = s.receive_upstream(b"-ERR [SYS/TEMP] too many connections\r\n", 1)
        assert out.to_client == b"-ERR [SYS/TEMP] too many connections\r\n"
        assert out.to_upstream == b""
        assert out.close is not None

    def test_second_greeting_line_is_not_taken_as_a_reply(self) -> None:
        """A "multi-line greeting": the extra line is not owed to anyone."""
        s = Session()
        s.receive_client(b"NOOP\r\n", 0)  # queued, dispatched after the greeting
        out = s.receive_upstream(b"+OK hello\r\n+OK more hello\r\n", 1)
        # Either it is matched as unsolicited (never as NOOP's reply),
        # or it is treated as a protocol error: both are acceptable.
        assert b"+OK more hello" not in out.to_client

    def test_no_greeting_then_close(self) -> None:
        s = Session()
        s.receive_client(b"CAPA\r\n", 0)
        out = s.upstream_closed(1)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream closed the connection\r\n"
        assert out.close is not None

    def test_partial_greeting_then_close(self) -> None:
        s = Session()
        s.receive_upstream(b"+OK hel", 0)
        out = s.upstream_closed(1)
        assert out.to_client.startswith(b"-ERR [SYS/TEMP]")
        assert out.close is not None

    def test_endless_greeting_is_bounded(self) -> None:
        s = Session()
        out = s.receive_upstream(b"+OK " + b"x" * 10000, 0)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream protocol error\r\n"

    def test_greeting_with_bare_lf(self) -> None:
        s = Session()
        out = s.receive_upstream(b"+OK ready\n", 0)
        assert out.to_client == b"+OK ready\n"
        assert s.state is State.AUTHORIZATION


# ----------------------------------------------------------------------
# Unsolicited upstream lines


class TestUnsolicited:
    def test_unsolicited_err_while_idle_is_recorded_not_forwarded(self) -> None:
        s = logged_in()
        out = s.receive_upstream(b"-ERR Disconnected for inactivity.\r\n", 5)
        assert out.to_client == b""
        (u,) = of(out.events, Unsolicited)
        assert isinstance(u, Unsolicited)
        assert not u.ok
        # Not matched to a later command: NOOP goes upstream and waits.
        out = s.receive_client(b"NOOP\r\n", 6)
        assert out.to_upstream == b"NOOP\r\n"
        assert out.to_client == b""
        out = s.upstream_closed(7)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream closed the connection\r\n"

    def test_unsolicited_with_code_then_close_while_idle(self) -> None:
        s = logged_in()
        out = s.receive_upstream(b"-ERR [SYS/TEMP] Server shutting down.\r\n", 5)
        (u,) = of(out.events, Unsolicited)
        assert isinstance(u, Unsolicited)
        assert u.code == "SYS/TEMP"
        out = s.upstream_closed(6)
        assert out.to_client == b""  # nothing was owed
        assert out.close is not None

    def test_unsolicited_garbage_while_idle_is_a_protocol_error(self) -> None:
        s = logged_in()
        out = s.receive_upstream(b"garbage\r\n", 5)
        assert out.close is not None

    def test_unsolicited_after_a_complete_reply_in_the_same_read(self) -> None:
        s = logged_in()
        s.receive_client(b"NOOP\r\n", 1)
        out = s.receive_upstream(b"+OK\r\n-ERR Disconnected for inactivity.\r\n", 2)
        assert out.to_client == b"+OK\r\n"
        assert len(of(out.events, Unsolicited)) == 1

    def test_line_while_pending_is_the_reply(self) -> None:
        """While a command waits, the next line is its reply (cannot be told apart)."""
        s = logged_in()
        s.receive_client(b"STAT\r\n", 1)
        out = s.receive_upstream(b"-ERR Disconnected for inactivity.\r\n", 2)
        assert out.to_client == b"-ERR Disconnected for inactivity.\r\n"
        assert not of(out.events, Unsolicited)

    def test_pipelined_pending_all_get_sys_temp_with_local_ones_in_place(self) -> None:
        s = logged_in(policy=deny_dele)
        s.receive_client(b"STAT\r\nDELE 1\r\nRETR 1\r\nDELE 2\r\n", 1)
        out = s.upstream_closed(2)
        err = b"-ERR [SYS/TEMP] upstream closed the connection\r\n"
        deny = b"-ERR [SYS/PERM] DELE disabled\r\n"
        assert out.to_client == err + deny + err + deny
        assert of(out.events, UpstreamFailed)


# ----------------------------------------------------------------------
# CAPA rewriting


def capa_through(s: Session, body: bytes) -> bytes:
    s.receive_client(b"CAPA\r\n", 1)
    return s.receive_upstream(b"+OK Capability list follows\r\n" + body, 2).to_client


class TestCapa:
    def test_lowercase_stls_is_removed(self) -> None:
        out = capa_through(fresh(), b"TOP\r\nstls\r\nStLs\r\nUSER\r\n.\r\n")
        assert out == b"+OK Capability list follows\r\nTOP\r\nUSER\r\n.\r\n"

    def test_stls_is_offered_only_when_the_listener_can(self) -> None:
        out = capa_through(fresh(starttls=True), b"TOP\r\n.\r\n")
        assert out == b"+OK Capability list follows\r\nTOP\r\nSTLS\r\n.\r\n"

    def test_stls_with_trailing_junk_removed_but_lookalikes_kept(self) -> None:
        out = capa_through(fresh(), b"STLS \r\nX-STLS\r\nSTLSX\r\n.\r\n")
        assert out == b"+OK Capability list follows\r\nX-STLS\r\nSTLSX\r\n.\r\n"

    def test_sasl_with_many_mechanisms_passes(self) -> None:
        mechs = b" ".join(b"MECH-%d" % i for i in range(300))
        out = capa_through(fresh(), b"SASL " + mechs + b"\r\n.\r\n")
        assert out == b"+OK Capability list follows\r\nSASL " + mechs + b"\r\n.\r\n"

    def test_capability_line_starting_with_a_dot_stays_stuffed(self) -> None:
        out = capa_through(fresh(), b"..HIDDEN\r\n..\r\nTOP\r\n.\r\n")
        assert out == b"+OK Capability list follows\r\n..HIDDEN\r\n..\r\nTOP\r\n.\r\n"

    def test_empty_capa(self) -> None:
        assert capa_through(fresh(), b".\r\n") == b"+OK Capability list follows\r\n.\r\n"
        out = capa_through(fresh(starttls=True), b".\r\n")
        assert out == b"+OK Capability list follows\r\nSTLS\r\n.\r\n"

    def test_user_and_sasl_hidden_when_tls_required(self) -> None:
        out = capa_through(
            fresh(starttls=True, require_tls_for_auth=True),
            b"USER\r\nuser\r\nUSERX\r\nSASL PLAIN\r\nsasl LOGIN\r\n.\r\n",
        )
        assert out == b"+OK Capability list follows\r\nUSERX\r\nSTLS\r\n.\r\n"

    def test_capa_err_is_one_line(self) -> None:
        s = fresh()
        s.receive_client(b"CAPA\r\nQUIT\r\n", 1)
        out = s.receive_upstream(b"-ERR unknown command\r\n+OK bye\r\n", 2)
        assert out.to_client == b"-ERR unknown command\r\n+OK bye\r\n"

    def test_capa_split_at_every_position(self) -> None:
        wire = b"+OK\r\nTOP\r\nSTLS\r\n..DOT\r\nUIDL\r\n.\r\n+OK n\r\n"
        want = b"+OK\r\nTOP\r\n..DOT\r\nUIDL\r\n.\r\n+OK n\r\n"
        for cut in range(1, len(wire)):
            s = logged_in()
            s.receive_client(b"CAPA\r\nNOOP\r\n", 1)
            out = feed_upstream_pieces(s, split_at(wire, cut))
            assert out.to_client == want, cut

    def test_capa_between_user_and_pass(self) -> None:
        s = fresh()
        out = s.receive_client(b"USER bob\r\nCAPA\r\nPASS pw\r\n", 1)
        assert out.to_upstream == b"USER bob\r\nCAPA\r\nPASS pw\r\n"
        out = s.receive_upstream(b"+OK\r\n+OK\r\nUSER\r\n.\r\n+OK\r\n", 2)
        assert out.to_client == b"+OK\r\n+OK\r\nUSER\r\n.\r\n+OK\r\n"
        assert s.state is State.TRANSACTION
        assert auth_results(out.events) == [AuthResult("USER", "bob", True, None)]

    def test_capa_too_long_is_an_upstream_error(self) -> None:
        s = fresh()
        s.receive_client(b"CAPA\r\n", 1)
        out = s.receive_upstream(b"+OK\r\n" + b"X-CAP\r\n" * 10000, 2)
        assert out.close is not None

    def test_no_stls_advertised_after_login(self) -> None:
        s = logged_in(starttls=True)
        out = capa_through(s, b"TOP\r\nUIDL\r\n.\r\n")
        assert b"STLS" not in out
        assert s.receive_client(b"STLS\r\n", 3).to_client.startswith(b"-ERR")


# ----------------------------------------------------------------------
# UTF-8 (RFC 6856) and bytes that are not ASCII


class TestUtf8:
    def test_utf8_command_pre_auth_and_refused_after(self) -> None:
        s = fresh()
        out = s.receive_client(b"UTF8\r\n", 1)
        assert out.to_upstream == b"UTF8\r\n"
        s.receive_upstream(b"+OK UTF8 enabled\r\n", 2)
        s.receive_client("USER jörg\r\nPASS pässwörd\r\n".encode(), 3)
        s.receive_upstream(b"+OK\r\n+OK\r\n", 4)
        assert s.user == "jörg"
        out = s.receive_client(b"UTF8\r\n", 5)
        assert out.to_upstream == b""
        assert out.to_client == b"-ERR UTF8 is not valid after login\r\n"

    @pytest.mark.parametrize(
        "user", ["jörg", "用户", "emoji😀", "ñandú@example.com"],
    )
    def test_utf8_user_forwarded_byte_exact(self, user: str) -> None:
        s = fresh()
        line = f"USER {user}\r\n".encode()
        assert s.receive_client(line, 1).to_upstream == line

    @pytest.mark.parametrize("sep", ["\u00a0", "\u3000", "\x0b", "\x1c", "\u2028"])
    def test_exotic_whitespace_in_argument_is_not_rewritten(self, sep: str) -> None:
        s = fresh()
        line = f"USER a{sep}b\r\n".encode()
        assert s.receive_client(line, 1).to_upstream == line

    def test_non_utf8_argument_refused_locally(self) -> None:
        s = fresh()
        out = s.receive_client(b"USER j\xf6rg\r\nCAPA\r\n", 1)
        assert out.to_upstream == b"CAPA\r\n"
        assert out.to_client == b"-ERR command arguments are not valid UTF-8\r\n"
        out = s.receive_upstream(b"+OK\r\n.\r\n", 2)
        assert out.to_client == b"+OK\r\n.\r\n"

    def test_latin1_password_forwarded_exactly(self) -> None:
        s = fresh()
        s.receive_client(b"USER bob\r\n", 1)
        s.receive_upstream(b"+OK\r\n", 1)
        out = s.receive_client(b"PASS  p\xe4ss w\xf6rd \r\n", 2)
        assert out.to_upstream == b"PASS  p\xe4ss w\xf6rd \r\n"

    def test_lang_listing_is_multiline_pre_auth(self) -> None:
        s = fresh()
        s.receive_client(b"LANG\r\nLANG de\r\n", 1)
        out = s.receive_upstream(
            b"+OK Language listing follows\r\nen English\r\nde Deutsch\r\n.\r\n"
            b"+OK de Sprache ge\xc3\xa4ndert\r\n",
            2,
        )
        assert out.to_client.endswith(b"+OK de Sprache ge\xc3\xa4ndert\r\n")
        assert len(responses(out.events)) == 2

    def test_utf8_in_reply_text_and_body(self) -> None:
        s = logged_in()
        s.receive_client(b"RETR 1\r\n", 1)
        body = "Subject: Grüße\r\n\r\n日本語\r\n".encode()
        out = s.receive_upstream(b"+OK\r\n" + stuff(body), 2)
        assert completes(out.events)[0].sha256 == hashlib.sha256(body).hexdigest()


# ----------------------------------------------------------------------
# Disconnects at every phase (sans-IO)


class TestDisconnects:
    def test_client_closes_before_greeting(self) -> None:
        s = Session()
        out = s.client_closed(0)
        assert out.close == "client closed"
        assert s.receive_upstream(GREETING, 1).to_client == b""

    def test_client_closes_during_auth_exchange(self) -> None:
        s = fresh()
        s.receive_client(b"AUTH PLAIN\r\n", 1)
        s.receive_upstream(b"+ \r\n", 2)
        out = s.client_closed(3)
        assert out.close == "client closed"
        assert out.to_upstream == b""

    def test_upstream_closes_after_failed_pass(self) -> None:
        s = fresh()
        s.receive_client(b"USER bob\r\nPASS no\r\nUSER bob\r\n", 1)
        out = s.receive_upstream(b"+OK\r\n-ERR [AUTH] bad\r\n", 2)
        assert out.to_client == b"+OK\r\n-ERR [AUTH] bad\r\n"
        assert out.to_upstream == b"USER bob\r\n"
        out = s.upstream_closed(3)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream closed the connection\r\n"

    def test_upstream_closes_during_capa_body(self) -> None:
        s = fresh()
        s.receive_client(b"CAPA\r\n", 1)
        out = s.receive_upstream(b"+OK\r\nTOP\r\n", 2)
        assert out.to_client == b""  # CAPA is buffered for rewriting
        out = s.upstream_closed(3)
        assert out.close is not None
        assert out.to_client == b"-ERR [SYS/TEMP] upstream closed the connection\r\n"

    def test_upstream_closes_while_quit_pending(self) -> None:
        s = logged_in()
        s.receive_client(b"DELE 1\r\nQUIT\r\n", 1)
        s.receive_upstream(b"+OK\r\n", 2)
        out = s.upstream_closed(3)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream closed the connection\r\n"
        assert s.state is State.CLOSED

    def test_upstream_failure_is_idempotent(self) -> None:
        s = logged_in()
        s.receive_client(b"NOOP\r\n", 1)
        first = s.upstream_closed(2)
        second = s.upstream_closed(3)
        assert first.to_client
        assert second.to_client == b""


# ----------------------------------------------------------------------
# End to end


async def serve_script(
    nursery: trio.Nursery, script: Callable[[trio.SocketStream], Awaitable[None]]
) -> HostPort:
    """A scripted upstream on loopback: ``script`` runs for each connection."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await script(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return HostPort("127.0.0.1", listeners[0].socket.getsockname()[1])


async def read_line(stream: trio.SocketStream, buf: bytearray) -> bytes:
    while b"\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError
        buf += data
    i = buf.index(b"\n")
    line = bytes(buf[: i + 1])
    del buf[: i + 1]
    return line


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not chunk:
            break
        data += chunk
    return data


async def connect(proxy: RunningProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream(proxy.host, proxy.port)


class TestEndToEnd:
    async def test_pipelined_mix_against_demo(self, demo_proxy: RunningProxy) -> None:
        with trio.fail_after(10):
            s = await connect(demo_proxy)
            await s.send_all(
                b"USER alice\r\nPASS wonderland\r\nXCLIENT ADDR=1.1.1.1\r\nTOP 1 0\r\n"
                b"\r\nUIDL\r\nLIST 99\r\nQUIT\r\nDELE 1\r\n"
            )
            data = await read_all(s)
        assert data.startswith(b"+OK")
        assert b"-ERR command not allowed\r\n" in data
        assert b"-ERR empty command\r\n" in data
        assert data.endswith(b"\r\n")
        # The last reply is QUIT's, and nothing answered DELE.
        last = data.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
        assert last.startswith(b"+OK")
        sent = [e.command.verb for e in demo_proxy.of_type(CommandSent)]
        assert "DELE" not in sent
        assert "XCLIENT" not in sent

    async def test_half_close_after_quit_still_gets_the_reply(
        self, demo_proxy: RunningProxy
    ) -> None:
        with trio.fail_after(10):
            s = await connect(demo_proxy)
            await s.send_all(b"USER alice\r\nPASS wonderland\r\nDELE 1\r\nQUIT\r\n")
            await s.send_eof()
            data = await read_all(s)
            await demo_proxy.wait_for(SessionClosed)
        replies = data.split(b"\r\n")
        assert len(replies) >= 5, data
        assert replies[4].startswith(b"+OK"), data
        closed = demo_proxy.of_type(SessionClosed)[0]
        assert closed.reason == "quit"

    async def test_no_greeting_and_upstream_close(self, nursery: trio.Nursery) -> None:
        async def script(stream: trio.SocketStream) -> None:
            await trio.sleep(0.05)

        upstream = await serve_script(nursery, script)
        proxy = await start_proxy(nursery, upstream)
        with trio.fail_after(10):
            s = await connect(proxy)
            await s.send_all(b"CAPA\r\n")
            data = await read_all(s)
        assert data.startswith(b"-ERR [SYS/TEMP]")
        assert data.count(b"\r\n") == 1

    async def test_unsolicited_err_and_close_while_idle(self, nursery: trio.Nursery) -> None:
        async def script(stream: trio.SocketStream) -> None:
            await stream.send_all(b"+OK hi\r\n")
            await trio.sleep(0.1)
            await stream.send_all(b"-ERR Disconnected for inactivity.\r\n")

        upstream = await serve_script(nursery, script)
        proxy = await start_proxy(nursery, upstream)
        with trio.fail_after(10):
            s = await connect(proxy)
            data = await read_all(s)
            await proxy.wait_for(SessionClosed)
        assert data == b"+OK hi\r\n"
        assert proxy.of_type(Unsolicited)

    async def test_terminator_at_receive_size_boundary(self, nursery: trio.Nursery) -> None:
        status = b"+OK big\r\n"
        body = b"y" * (RECEIVE_SIZE - len(status) - 2) + b"\r\n"
        wire = status + stuff(body)
        before = b"+OK hi\r\n+OK\r\n+OK\r\n"
        # The first part ends with the body's last CRLF, the terminator's
        # first two octets.  Once the client has all of it, the proxy has
        # read all of it: the rest of the terminator comes in another read.
        first_part_relayed = trio.Event()

        async def script(stream: trio.SocketStream) -> None:
            buf = bytearray()
            await stream.send_all(b"+OK hi\r\n")
            while True:
                line = await read_line(stream, buf)
                if line.startswith(b"RETR"):
                    await stream.send_all(wire[:RECEIVE_SIZE])
                    await first_part_relayed.wait()
                    await stream.send_all(wire[RECEIVE_SIZE:])
                elif line.startswith(b"QUIT"):
                    await stream.send_all(b"+OK bye\r\n")
                    return
                else:
                    await stream.send_all(b"+OK\r\n")

        upstream = await serve_script(nursery, script)
        proxy = await start_proxy(nursery, upstream)
        with trio.fail_after(10):
            s = await connect(proxy)
            await s.send_all(b"USER u\r\nPASS p\r\nRETR 1\r\nQUIT\r\n")
            data = b""
            while len(data) < len(before) + RECEIVE_SIZE:
                chunk = await s.receive_some(65536)
                assert chunk, data
                data += chunk
            assert data == before + wire[:RECEIVE_SIZE]  # the message is not over yet
            first_part_relayed.set()
            data += await read_all(s)
        assert data == before + wire + b"+OK bye\r\n"
        (done,) = proxy.of_type(MessageComplete)
        assert done.complete
        assert done.sha256 == hashlib.sha256(body).hexdigest()

    async def test_upstream_dies_mid_retr(self, nursery: trio.Nursery) -> None:
        async def script(stream: trio.SocketStream) -> None:
            buf = bytearray()
            await stream.send_all(b"+OK hi\r\n")
            while True:
                line = await read_line(stream, buf)
                if line.startswith(b"RETR"):
                    await stream.send_all(b"+OK\r\nSubject: x\r\n\r\nhalf")
                    return
                await stream.send_all(b"+OK\r\n")

        upstream = await serve_script(nursery, script)
        proxy = await start_proxy(nursery, upstream)
        with trio.fail_after(10):
            s = await connect(proxy)
            await s.send_all(b"USER u\r\nPASS p\r\nRETR 1\r\nNOOP\r\n")
            data = await read_all(s)
            await proxy.wait_for(SessionClosed)
        assert data == b"+OK hi\r\n+OK\r\n+OK\r\n+OK\r\nSubject: x\r\n\r\nhalf"
        (done,) = proxy.of_type(MessageComplete)
        assert not done.complete

    async def test_session_time_limit_mid_body_does_not_write_into_the_body(
        self, nursery: trio.Nursery
    ) -> None:
        async def script(stream: trio.SocketStream) -> None:
            buf = bytearray()
            await stream.send_all(b"+OK hi\r\n")
            while True:
                line = await read_line(stream, buf)
                if line.startswith(b"RETR"):
                    await stream.send_all(b"+OK\r\nSubject: x\r\n\r\npartial\r\n")
                    await trio.sleep(5)
                    return
                await stream.send_all(b"+OK\r\n")

        upstream = await serve_script(nursery, script)
        policy = PolicyConfig(protections=Protections(max_session_duration=0.5))
        proxy = await start_proxy(nursery, upstream, policy=policy)
        with trio.fail_after(10):
            s = await connect(proxy)
            await s.send_all(b"USER u\r\nPASS p\r\nRETR 1\r\n")
            data = await read_all(s)
        assert data == b"+OK hi\r\n+OK\r\n+OK\r\n+OK\r\nSubject: x\r\n\r\npartial\r\n"

    async def test_exact_limit_lines_end_to_end(self, demo_proxy: RunningProxy) -> None:
        with trio.fail_after(10):
            s = await connect(demo_proxy)
            buf = bytearray()
            assert (await read_line(s, buf)).startswith(b"+OK")
            await s.send_all(b"USER " + b"a" * 1019 + b"\r\n")
            reply = await read_line(s, buf)
            assert reply != b"-ERR line too long\r\n"  # the upstream answered it
            await s.send_all(b"NOOP " + b"b" * 1020 + b"\r\n")
            data = bytes(buf) + await read_all(s)
        assert data == b"-ERR line too long\r\n"


@pytest.mark.dovecot
class TestDovecot:
    async def test_auth_plain_pipeline_and_top_zero(
        self, nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox
    ) -> None:
        proxy = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port))
        pw = dovecot.users[mailbox.user]
        ir = base64.b64encode(b"\0" + mailbox.user.encode() + b"\0" + pw.encode())
        with trio.fail_after(30):
            s = await connect(proxy)
            await s.send_all(
                b"CAPA\r\nAUTH PLAIN " + ir + b"\r\nSTAT\r\nTOP 1 0\r\nLIST 1\r\nQUIT\r\n"
            )
            data = await read_all(s)
        assert data.startswith(b"+OK")
        assert data.endswith(b"\r\n")
        results = proxy.of_type(AuthResult)
        assert [r.ok for r in results] == [True]
        responses_ = [r for r in proxy.of_type(Response) if not r.local]
        assert [r.command.verb for r in responses_] == [
            "CAPA", "AUTH", "STAT", "TOP", "LIST", "QUIT"]
        assert all(r.ok for r in responses_)
        (top,) = proxy.of_type(MessageComplete)
        assert top.complete
        assert top.command == Command("TOP", ("1", "0"))

    async def test_sasl_cancel_against_dovecot(
        self, nursery: trio.Nursery, dovecot: Dovecot
    ) -> None:
        proxy = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port))
        with trio.fail_after(30):
            s = await connect(proxy)
            buf = bytearray()
            assert (await read_line(s, buf)).startswith(b"+OK")
            await s.send_all(b"AUTH PLAIN\r\n")
            assert (await read_line(s, buf)).startswith(b"+")
            await s.send_all(b"*\r\nCAPA\r\n")
            assert (await read_line(s, buf)).startswith(b"-ERR")
            capa = await read_line(s, buf)
            assert capa.startswith(b"+OK")
            await s.send_all(b"QUIT\r\n")
            rest = bytes(buf) + await read_all(s)
        assert rest.endswith(b".\r\n+OK Logging out\r\n")
        assert b"STLS" not in rest  # Dovecot's own STLS is never advertised
        assert [r.ok for r in proxy.of_type(AuthResult)] == [False]


class TestCrashes:
    """Input that makes an exception escape the core (a bug by its own contract)."""

    @pytest.mark.parametrize("arg", ["²", "①", "⁵"])
    def test_non_ascii_digit_message_number_with_default_policy(self, arg: str) -> None:
        s = logged_in(policy=PolicyEngine(PolicyConfig()))
        out = s.receive_client(f"RETR {arg}\r\nNOOP\r\n".encode(), 1)
        assert out.close is None
        assert out.to_upstream or out.to_client

    @pytest.mark.parametrize("verb", ["RETR", "TOP", "DELE"])
    def test_non_ascii_digit_message_number_with_resolve_uidl(self, verb: str) -> None:
        s = logged_in(resolve_uidl=True)
        out = s.receive_client(f"{verb} ²\r\n".encode(), 1)
        assert out.close is None

    def test_ascii_and_unicode_decimal_digits_do_not_crash(self) -> None:
        s = logged_in(policy=PolicyEngine(PolicyConfig()), resolve_uidl=True)
        out = s.receive_client("RETR ١\r\nDELE 1x\r\nTOP -1 0\r\n".encode(), 1)
        assert out.close is None

    async def test_one_client_cannot_take_the_proxy_down(
        self, demo_proxy: RunningProxy
    ) -> None:
        with trio.fail_after(10):
            s = await connect(demo_proxy)
            await s.send_all("USER alice\r\nPASS wonderland\r\nRETR ²\r\nQUIT\r\n".encode())
            await read_all(s)
            s2 = await connect(demo_proxy)
            buf = bytearray()
            assert (await read_line(s2, buf)).startswith(b"+OK")
