"""Before login (issue 17): what an unauthenticated client can cost, sans-IO.

Commands the proxy refuses before login are counted and the session closes
after ``max_refused_before_login``; PASS needs a USER; CAPA offers no login
that would be refused; anomaly kinds have one spelling.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from popproxy.config import ConfigError, parse_config
from popproxy.events import EndReason, Outcome, ProtocolAnomaly, Response
from popproxy.metrics import ANOMALY_KINDS
from popproxy.pop3 import ProtocolError, UpstreamProtocolError
from popproxy.routed import RoutedSession
from popproxy.server import session_limits
from popproxy.session import SessionLimits
from popproxy.session_state import TOO_MANY_REFUSED
from tests.session_helpers import DenyVerb, fresh, logged_in, of

ROOT = Path(__file__).resolve().parent.parent / "popproxy"
LIMIT3 = SessionLimits(max_refused_before_login=3)


def lines(data: bytes) -> list[bytes]:
    return data.splitlines()


class TestRefusedBeforeLogin:
    def test_unknown_verbs_close_the_session_after_the_limit(self) -> None:
        s = fresh(limits=LIMIT3)
        out = s.receive_client(b"XJUNK " + b"A" * 1000 + b"\r\n" + b"XJUNK b\r\n" * 9, 1)
        assert lines(out.to_client) == [b"-ERR XJUNK is not valid before login"] * 3 + [
            TOO_MANY_REFUSED.rstrip()]
        assert out.to_upstream == b""
        assert out.close is EndReason.PROTOCOL_ERROR
        assert [a.kind for a in of(out.events, ProtocolAnomaly)] == ["too-many-refused"]
        # One reply event per command answered, none for what was dropped.
        assert len(of(out.events, Response)) == 4
        # Nothing more is read once it is closed.
        assert s.receive_client(b"XJUNK c\r\n", 2).to_client == b""

    def test_a_flood_in_one_read_costs_a_bounded_answer(self) -> None:
        s = fresh()  # the default limit: 10
        out = s.receive_client((b"XJUNK " + b"A" * 1000 + b"\r\n") * 1000, 1)
        assert len(lines(out.to_client)) == 11
        assert len(out.events) < 20
        assert out.close is EndReason.PROTOCOL_ERROR

    def test_every_kind_of_local_refusal_counts(self) -> None:
        """Wrong state, policy, malformed line, TLS rule: four refusals."""
        s = fresh(limits=LIMIT3, policy=DenyVerb("APOP", b"-ERR [AUTH] no APOP\r\n"))
        out = s.receive_client(b"RETR 1\r\nAPOP bob abc\r\n1234\r\n", 1)
        assert out.close is None
        assert len(lines(out.to_client)) == 3
        out = s.receive_client(b"XCLIENT ADDR=1.2.3.4\r\n", 2)
        assert out.to_client == TOO_MANY_REFUSED
        assert out.close is EndReason.PROTOCOL_ERROR

    def test_forwarded_commands_do_not_count(self) -> None:
        s = fresh(limits=LIMIT3)
        out = s.receive_client(b"CAPA\r\nXJUNK\r\nXJUNK\r\nXJUNK\r\nCAPA\r\n", 1)
        assert out.to_upstream == b"CAPA\r\nCAPA\r\n"
        assert out.close is None

    def test_after_login_nothing_is_counted(self) -> None:
        """Unknown verbs after login go to the upstream, whose -ERR is its own."""
        s = logged_in(limits=LIMIT3)
        out = s.receive_client(b"XJUNK\r\n" * 6, 1)
        assert out.to_upstream == b"XJUNK\r\n" * 6
        out = s.receive_upstream(b"-ERR Unknown command\r\n" * 6, 2)
        assert out.close is None
        assert all(e.outcome is Outcome.ERR for e in of(out.events, Response))

    def test_routed_mode_counts_the_fronts_refusals(self) -> None:
        s = RoutedSession(limits=LIMIT3)
        s.start(0)
        out = s.receive_client(b"USER\r\nXJUNK\r\nAUTH CRAM-MD5\r\nUSER a b\r\n", 1)
        assert lines(out.to_client)[-1] == TOO_MANY_REFUSED.rstrip()
        assert out.close is EndReason.PROTOCOL_ERROR


class TestPassWithoutUser:
    def test_answered_locally_never_forwarded(self) -> None:
        s = fresh()
        out = s.receive_client(b"PASS s3cret\r\n", 1)
        assert out.to_client == b"-ERR No username given.\r\n"
        assert out.to_upstream == b""
        (response,) = of(out.events, Response)
        assert response.local
        assert response.outcome is Outcome.DENIED
        # USER then PASS, pipelined, go upstream together.
        out = s.receive_client(b"USER bob\r\nPASS s3cret\r\n", 2)
        assert out.to_upstream == b"USER bob\r\nPASS s3cret\r\n"

    def test_a_refused_user_does_not_name_anyone(self) -> None:
        s = fresh(policy=DenyVerb("USER", b"-ERR [AUTH] not here\r\n"))
        out = s.receive_client(b"USER bob\r\nPASS s3cret\r\n", 1)
        assert lines(out.to_client) == [b"-ERR [AUTH] not here", b"-ERR No username given."]
        assert out.to_upstream == b""

    def test_routed_mode_says_the_same(self) -> None:
        s = RoutedSession()
        s.start(0)
        assert s.receive_client(b"PASS x\r\n", 1).to_client == b"-ERR No username given.\r\n"


UPSTREAM_CAPA = b"+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\nTOP\r\nUIDL\r\n.\r\n"


def capa_tags(reply: bytes) -> set[bytes]:
    return {ln.split(b" ", 1)[0] for ln in lines(reply)[1:-1]}


class TestCapaBeforeTls:
    def test_transparent_hides_logins_until_stls_then_shows_them(self) -> None:
        s = fresh(starttls=True, require_tls_for_auth=True)
        s.receive_client(b"CAPA\r\n", 1)
        before = s.receive_upstream(UPSTREAM_CAPA, 2).to_client
        assert capa_tags(before) == {b"TOP", b"UIDL", b"STLS"}
        out = s.receive_client(b"STLS\r\n", 3)
        assert out.start_tls
        s.tls_started(4)
        s.receive_client(b"CAPA\r\n", 5)
        after = s.receive_upstream(UPSTREAM_CAPA, 6).to_client
        assert capa_tags(after) == {b"USER", b"SASL", b"TOP", b"UIDL"}

    def test_routed_hides_logins_until_stls_then_shows_them(self) -> None:
        s = RoutedSession(starttls=True, require_tls_for_auth=True)
        s.start(0)
        before = s.receive_client(b"CAPA\r\n", 1).to_client
        assert b"USER" not in capa_tags(before)
        assert b"SASL" not in capa_tags(before)
        assert b"STLS" in capa_tags(before)
        assert s.receive_client(b"STLS\r\n", 2).start_tls
        s.tls_started(3)
        after = s.receive_client(b"CAPA\r\n", 4).to_client
        assert b"SASL PLAIN LOGIN" in lines(after)
        assert {b"USER", b"SASL"} <= capa_tags(after)
        assert b"STLS" not in capa_tags(after)

    def test_without_the_tls_rule_everything_is_offered(self) -> None:
        s = RoutedSession(starttls=True)
        s.start(0)
        assert {b"USER", b"SASL", b"STLS"} <= capa_tags(s.receive_client(b"CAPA\r\n", 1).to_client)


# --------------------------------------------------------------------------
# Anomaly kinds: one vocabulary

KIND = re.compile(r"[a-z]+(?:-[a-z]+)*")


def emitted_kinds() -> set[tuple[str, str]]:
    """(side, kind) of every ``ProtocolAnomaly("side", "kind", ...)`` in the
    source with literal arguments, and every kind a ``ProtocolError`` carries."""
    found: set[tuple[str, str]] = set()
    dynamic = 0
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "ProtocolAnomaly"):
                side, kind = node.args[0], node.args[1]
                assert isinstance(side, ast.Constant), f"{path}:{node.lineno}"
                if isinstance(kind, ast.Constant):
                    found.add((str(side.value), str(kind.value)))
                else:  # exc.kind: the errors' own, below
                    dynamic += 1
            elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and any(isinstance(t, ast.Attribute) and t.attr == "kind"
                            for t in node.targets)):
                found.add(("client", str(node.value.value)))  # fatal.kind = "..."
    assert dynamic == 2  # the session's client- and upstream-side handlers

    def subclasses(cls: type[ProtocolError]) -> list[type[ProtocolError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in subclasses(sub))]

    for cls in subclasses(ProtocolError):
        where = "upstream" if issubclass(cls, UpstreamProtocolError) else "client"
        if cls.__name__ not in ("ProtocolError", "ClientProtocolError"):
            found.add((where, cls.kind))
    return found


def test_every_anomaly_kind_is_one_spelling_and_has_its_label() -> None:
    kinds = emitted_kinds()
    assert ("client", "malformed-line") in kinds
    assert ("client", "line-too-long") in kinds
    for side, kind in kinds:
        assert KIND.fullmatch(kind), kind
        assert kind in ANOMALY_KINDS[side], (side, kind)
    for side, labels in ANOMALY_KINDS.items():
        assert all(KIND.fullmatch(k) for k in labels), side


def test_the_limit_and_the_audit_bounds_are_configured() -> None:
    base = {"listen": {"address": "127.0.0.1:0"}, "upstream": {"address": "127.0.0.1:110"}}
    cfg = parse_config({**base, "limits": {"max_refused_before_login": 3},
                        "audit": {"prelogin_commands": 5, "prelogin_commands_per_client": 7}})
    assert session_limits(cfg.limits).max_refused_before_login == 3
    assert (cfg.audit.prelogin_commands, cfg.audit.prelogin_commands_per_client) == (5, 7)
    defaults = parse_config({**base, "audit": {}})
    assert session_limits(defaults.limits).max_refused_before_login == 10
    assert (defaults.audit.prelogin_commands,
            defaults.audit.prelogin_commands_per_client) == (16, 256)
    with pytest.raises(ConfigError, match=r"limits\.max_refused_before_login"):
        parse_config({**base, "limits": {"max_refused_before_login": 0}})
    with pytest.raises(ConfigError, match=r"audit\.prelogin_commands_per_client"):
        parse_config({**base, "audit": {"prelogin_commands_per_client": "many"}})
