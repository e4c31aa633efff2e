"""Routed mode, sans-IO: the proxy greets, holds the login, then relays.

``RoutedSession`` with byte strings alone: what the client sees before
login, the ``Credentials`` the shell is asked to route, and how the
upstream's answer to the login is passed on (``routed_login``).
"""

from __future__ import annotations

import base64

import pytest

from popproxy.events import AuthResult, EndReason, Response, State
from popproxy.front import GREETING, Credentials
from popproxy.policy import AllowAll, Deny, Facts
from popproxy.routed import RoutedSession
from popproxy.session import Output
from tests.session_helpers import of

SECRET = "Tr0ub4dor&3-very-distinctive"


def started(**kwargs: object) -> RoutedSession:
    s = RoutedSession(**kwargs)  # type: ignore[arg-type]
    out = s.start(0)
    assert out.to_client == GREETING
    assert s.state is State.AUTHORIZATION
    return s


def state_of(s: RoutedSession) -> State:
    return s.state  # (a function, so that mypy does not keep an earlier narrowing)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def login(s: RoutedSession, data: bytes) -> Credentials:
    out = s.receive_client(data, 1)
    assert out.to_upstream == b""
    assert out.login is not None, out
    return out.login


class TestFront:
    def test_the_greeting_has_no_apop_timestamp(self) -> None:
        assert b"<" not in GREETING

    def test_capa_before_login_is_the_proxys(self) -> None:
        s = started(starttls=True)
        out = s.receive_client(b"CAPA\r\n", 1)
        assert out.to_client.startswith(b"+OK")
        lines = out.to_client.split(b"\r\n")
        for tag in (b"USER", b"SASL PLAIN LOGIN", b"STLS", b"PIPELINING", b"RESP-CODES",
                    b"AUTH-RESP-CODE", b"TOP", b"UIDL"):
            assert tag in lines
        assert out.to_client.endswith(b"\r\n.\r\n")
        (response,) = of(out.events, Response)
        assert (response.ok, response.local) == (True, True)

    def test_capa_hides_user_until_tls_when_required(self) -> None:
        s = started(starttls=True, require_tls_for_auth=True)
        lines = s.receive_client(b"CAPA\r\n", 1).to_client.split(b"\r\n")
        assert b"USER" not in lines
        assert b"STLS" in lines

    def test_user_pass(self) -> None:
        s = started()
        assert s.receive_client(b"USER alice\r\n", 1).to_client == b"+OK\r\n"
        creds = login(s, f"PASS {SECRET}\r\n".encode())
        assert (creds.user, creds.password, creds.mechanism) == ("alice", SECRET, "USER")
        assert SECRET not in repr(creds)

    def test_pass_without_user(self) -> None:
        s = started()
        assert s.receive_client(b"PASS x\r\n", 1).to_client == b"-ERR No username given.\r\n"

    def test_auth_plain_with_an_initial_response(self) -> None:
        s = started()
        creds = login(s, b"AUTH PLAIN " + b64(f"\0bob\0{SECRET}".encode()) + b"\r\n")
        assert (creds.user, creds.password, creds.mechanism) == ("bob", SECRET, "PLAIN")

    def test_auth_plain_in_two_steps_and_the_authzid(self) -> None:
        s = started()
        assert s.receive_client(b"AUTH PLAIN\r\n", 1).to_client == b"+ \r\n"
        creds = login(s, b64(f"bob\0bob\0{SECRET}".encode()) + b"\r\n")
        assert creds.user == "bob"
        s = started()
        s.receive_client(b"AUTH PLAIN\r\n", 1)
        out = s.receive_client(b64(b"admin\0bob\0pw") + b"\r\n", 1)
        assert out.to_client == b"-ERR [AUTH] acting for another user is not supported\r\n"
        assert out.login is None

    def test_auth_login(self) -> None:
        s = started()
        assert s.receive_client(b"AUTH LOGIN\r\n", 1).to_client == b"+ VXNlcm5hbWU6\r\n"
        assert s.receive_client(b64(b"carol") + b"\r\n", 1).to_client == b"+ UGFzc3dvcmQ6\r\n"
        creds = login(s, b64(SECRET.encode()) + b"\r\n")
        assert (creds.user, creds.password, creds.mechanism) == ("carol", SECRET, "LOGIN")

    def test_cancel_and_garbage(self) -> None:
        s = started()
        s.receive_client(b"AUTH LOGIN\r\n", 1)
        assert s.receive_client(b"*\r\n", 1).to_client == b"-ERR authentication cancelled\r\n"
        assert s.state is State.AUTHORIZATION
        s.receive_client(b"AUTH PLAIN\r\n", 1)
        assert s.receive_client(b"%%%\r\n", 1).close is not None  # not base64: refused
        s = started()
        assert s.receive_client(b"AUTH CRAM-MD5\r\n", 1).to_client.startswith(
            b"-ERR [AUTH] unsupported mechanism")
        assert s.receive_client(b"AUTH\r\n", 1).to_client == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"

    @pytest.mark.parametrize("bad", [b"\0bob\0pa\r\nss", b"\0bo\nb\0pass", b"\0bob\0pa\0ss"])
    def test_cr_lf_nul_in_decoded_credentials_are_refused(self, bad: bytes) -> None:
        s = started()
        out = s.receive_client(b"AUTH PLAIN " + b64(bad) + b"\r\n", 1)
        assert out.login is None
        assert out.to_client.startswith(b"-ERR")

    def test_apop_is_not_offered(self) -> None:
        s = started()
        out = s.receive_client(b"APOP alice 0123456789abcdef0123456789abcdef\r\n", 1)
        assert out.to_client.startswith(b"-ERR [AUTH] APOP is not available")
        assert out.login is None

    def test_quit_before_login(self) -> None:
        s = started()
        out = s.receive_client(b"QUIT\r\n", 1)
        assert out.to_client == b"+OK bye\r\n"
        assert out.close == EndReason.QUIT

    def test_transaction_commands_wait_for_login(self) -> None:
        s = started()
        out = s.receive_client(b"STAT\r\n", 1)
        assert out.to_client == b"-ERR STAT is not valid before login\r\n"


class TestLogin:
    def test_success_relays_the_upstreams_reply_and_then_everything(self) -> None:
        s = started()
        creds = login(s, f"USER alice\r\nPASS {SECRET}\r\nSTAT\r\nLIST\r\n".encode())
        assert creds.user == "alice"
        out = s.routed_login(b"+OK Logged in.\r\n", 2, upstream="new", route="rule")
        assert out.to_client == b"+OK Logged in.\r\n"
        assert out.to_upstream == b"STAT\r\nLIST\r\n"  # pipelined behind the login
        (auth,) = of(out.events, AuthResult)
        assert auth == AuthResult("USER", "alice", True, None, "new", "rule")
        assert s.state is State.TRANSACTION
        assert s.user == "alice"
        out = s.receive_upstream(b"+OK 2 320\r\n+OK\r\n1 120\r\n2 200\r\n.\r\n", 3)
        assert out.to_client == b"+OK 2 320\r\n+OK\r\n1 120\r\n2 200\r\n.\r\n"
        assert SECRET not in repr(out.events)

    def test_a_failed_login_passes_the_code_on_and_allows_another_try(self) -> None:
        s = started()
        login(s, f"USER alice\r\nPASS {SECRET}\r\n".encode())
        out = s.routed_login(b"-ERR [AUTH] Authentication failed.\r\n", 2, upstream="new",
                             route="map")
        assert out.to_client == b"-ERR [AUTH] Authentication failed.\r\n"
        (auth,) = of(out.events, AuthResult)
        assert (auth.ok, auth.code, auth.upstream, auth.route) == (False, "AUTH", "new", "map")
        assert s.state is State.AUTHORIZATION
        assert out.close is None
        creds = login(s, b"USER alice\r\nPASS right\r\n")
        assert creds.password == "right"
        out = s.routed_login(b"+OK\r\n", 3, upstream="new", route="map")
        assert state_of(s) is State.TRANSACTION

    @pytest.mark.parametrize("code", [b"IN-USE", b"LOGIN-DELAY", b"SYS/TEMP"])
    def test_response_codes_reach_the_client_unchanged(self, code: bytes) -> None:
        s = started()
        login(s, b"USER alice\r\nPASS x\r\n")
        reply = b"-ERR [" + code + b"] not now\r\n"
        assert s.routed_login(reply, 2).to_client == reply

    def test_a_reply_that_is_not_pop3_becomes_sys_temp(self) -> None:
        s = started()
        login(s, b"USER alice\r\nPASS x\r\n")
        out = s.routed_login(b"garbage\r\n", 2)
        assert out.to_client == b"-ERR [SYS/TEMP] upstream login failed\r\n"

    def test_the_per_user_cap_still_applies(self) -> None:
        class OneSession(AllowAll):
            def admit_login(self, facts: Facts, user: str, now: float) -> Deny | None:
                return Deny(b"-ERR [IN-USE] too many sessions for this user\r\n", "cap")

        s = started(policy=OneSession())
        login(s, b"USER alice\r\nPASS x\r\n")
        out: Output = s.routed_login(b"+OK\r\n", 2, upstream="new", route="rule")
        assert out.to_client == b"-ERR [IN-USE] too many sessions for this user\r\n"
        assert out.close == EndReason.LOGIN_REFUSED


def test_failed_routed_logins_count_for_the_login_throttle() -> None:
    """As in transparent mode: after N failures the next PASS never reaches a route."""
    from popproxy.policy.config import parse_policy
    from popproxy.policy.engine import PolicyEngine

    engine = PolicyEngine(parse_policy({"protections": {
        "login_failures_per_user": 2, "login_failure_delay": "1s"}}))
    s = started(policy=engine, client="192.0.2.5:4000")
    for attempt in range(2):
        login(s, b"USER alice\r\nPASS wrong\r\n")
        s.routed_login(b"-ERR [AUTH] Authentication failed.\r\n", 2 + attempt)
    out = s.receive_client(b"USER alice\r\nPASS right\r\n", 5)
    assert out.login is None  # not routed: refused by the throttle (after its delay)
    out = s.tick(7)
    assert out.to_client == b"-ERR [AUTH] too many failed logins, try again later\r\n"
