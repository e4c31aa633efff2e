"""The metrics observer and its HTTP endpoint (no Dovecot needed here).

Unit tests feed session events to ``Metrics.observe`` on a fresh registry
and read samples the way a scrape would; the endpoint tests run the proxy
in front of the built-in demo server and read ``/metrics``, ``/healthz``
and ``/readyz`` over real HTTP.  The proof against real Dovecot is in
``test_metrics_dovecot.py``.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest
import trio
from prometheus_client import CollectorRegistry

from popproxy.config import Config, HostPort, LimitsConfig, MetricsConfig, UpstreamConfig
from popproxy.endpoint import serve_metrics
from popproxy.events import (
    AuthResult,
    EndReason,
    Event,
    MessageComplete,
    PolicyDecision,
    ProtocolAnomaly,
    SessionClosed,
    SessionOpened,
    TlsEstablished,
    TlsFailed,
    Unsolicited,
    UpstreamConnected,
    UpstreamFailed,
)
from popproxy.health import Health
from popproxy.metrics import (
    AUTH_MECHANISMS,
    COMMAND_LABELS,
    KNOWN_COMMANDS,
    LATENCY_BUCKETS,
    MAX_POLICY_SERIES,
    SESSION_OUTCOMES,
    Metrics,
)
from popproxy.observe import SessionInfo
from popproxy.policy import ALLOW, AllowAll, Decision, Deny, Facts
from popproxy.pop3 import Command, is_multiline
from popproxy.server import Proxy
from popproxy.session import Output, Session
from tests.proxy_fixtures import RunningProxy, start_proxy
from tests.session_helpers import GREETING
from tests.test_metrics_support import http_get, key, parse_exposition, scrape, start_metrics

# The contract (DESIGN.md "Metrics") and the additions the issue asks for.
DESIGN_METRICS = {
    "popproxy_sessions_active": "gauge",
    "popproxy_sessions_total": "counter",
    "popproxy_commands_total": "counter",
    "popproxy_command_duration_seconds": "histogram",
    "popproxy_bytes_total": "counter",
    "popproxy_auth_total": "counter",
    "popproxy_policy_decisions_total": "counter",
    "popproxy_messages_retrieved_total": "counter",
    "popproxy_messages_deleted_total": "counter",
    "popproxy_upstream_connect_duration_seconds": "histogram",
    "popproxy_upstream_errors_total": "counter",
    "popproxy_audit_records_total": "counter",
    "popproxy_audit_errors_total": "counter",
    "popproxy_build_info": "gauge",
    "popproxy_config_reload_total": "counter",
}
FORBIDDEN_LABELS = {"user", "client", "ip", "client_ip", "address", "uidl", "message_id", "msg"}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def value(m: Metrics, name: str, **labels: str) -> float:
    assert m.registry is not None
    v = m.registry.get_sample_value(name, labels)
    assert v is not None, f"no sample {name}{labels}"
    return v


class Refuser(AllowAll):
    """A policy that refuses the verbs it is told to, with the reply given."""

    def __init__(self) -> None:
        self.replies: dict[str, bytes] = {}

    def decide(self, facts: Facts, command: Command, now: float) -> Decision:
        reply = self.replies.get(command.verb)
        return Deny(reply, rule="test") if reply is not None else ALLOW


class Feeder:
    """Feeds the events of one session to ``Metrics.observe``.

    Command events come from a real sans-IO ``Session``, fed the client's
    and the upstream's bytes, so what the metrics count is what the core
    says happened (a reply's outcome, deletions, how the session ended).
    """

    def __init__(self, metrics: Metrics, sid: str = "s1", **session: object) -> None:
        self.metrics = metrics
        self.info = SessionInfo(sid, "192.0.2.1:40000")
        self.policy = Refuser()
        self.session = Session(policy=self.policy, client=self.info.client, **session)  # type: ignore[arg-type]
        self.now = 100.0

    def __call__(self, *events: Event) -> None:
        for e in events:
            self.metrics.observe(self.info, e)

    def feed(self, out: Output) -> None:
        self(*out.events)

    def open(self, login: bool = True) -> None:
        self(SessionOpened("192.0.2.1:40000", self.now), UpstreamConnected("127.0.0.1:110", 0.001))
        self.feed(self.session.receive_upstream(GREETING, self.now))
        if login:
            self.forwarded(Command("USER", ("alice",)))
            self.forwarded(Command("PASS", ("secret",)))

    def send(self, cmd: Command) -> None:
        """The client sends ``cmd``."""
        self.feed(self.session.receive_client(bytes(cmd), self.now))

    def forwarded(self, cmd: Command, ok: bool = True, latency: float = 0.002,
                  code: str | None = None) -> None:
        """``cmd`` goes upstream, which answers ``latency`` seconds later."""
        self.send(cmd)
        if ok:
            reply = b"+OK\r\n.\r\n" if is_multiline(cmd) else b"+OK\r\n"
        else:
            reply = b"-ERR " + (f"[{code}] " if code else "").encode() + b"no\r\n"
        self.feed(self.session.receive_upstream(reply, self.now + latency))

    def local(self, cmd: Command, code: str | None = None) -> None:
        """``cmd`` is refused by the proxy (policy); "INVALID" is a malformed line."""
        if cmd.verb == "INVALID":
            self.feed(self.session.receive_client(b"BAD\0LINE\r\n", self.now))
            return
        self.policy.replies[cmd.verb] = b"-ERR " + (f"[{code}] " if code else "").encode() + (
            b"no\r\n")
        self.send(cmd)

    def close(self, reason: EndReason = EndReason.QUIT, rx: int = 10, tx: int = 20,
              detail: str = "") -> None:
        self.feed(self.session.close(reason))
        self(SessionClosed(reason, 1.5, rx, tx, 3, detail=detail))


# --------------------------------------------------------------------------
# Definitions
# --------------------------------------------------------------------------


def test_design_metrics_have_types_help_and_base_units(metrics: Metrics) -> None:
    assert metrics.registry is not None
    families = {f.name: f for f in metrics.registry.collect()}
    exposed = {
        (f.name + "_total" if f.type == "counter" else
         f.name + "_info" if f.type == "info" else f.name): f
        for f in families.values()
    }
    for name, kind in DESIGN_METRICS.items():
        assert name in exposed, name
        fam = exposed[name]
        assert fam.type == ("gauge" if kind == "gauge" and name.endswith("_info") else kind) or (
            fam.type == "info" and name.endswith("_info")), (name, fam.type)
    for fam in families.values():
        assert fam.name.startswith("popproxy_")
        assert len(fam.documentation) > 15, fam.name
        for s in fam.samples:
            assert not FORBIDDEN_LABELS & set(s.labels), (s.name, s.labels)
            assert "milli" not in s.name
            assert "_ms" not in s.name
    build = value(metrics, "popproxy_build_info", version=__import__("popproxy").__version__)
    assert build == 1


def test_latency_buckets_span_sub_millisecond_to_tens_of_seconds() -> None:
    assert LATENCY_BUCKETS[0] < 0.001
    assert LATENCY_BUCKETS[-1] >= 30
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def test_every_label_set_exists_at_zero(metrics: Metrics) -> None:
    for verb in COMMAND_LABELS:
        for outcome in ("ok", "err", "denied"):
            assert value(metrics, "popproxy_commands_total", command=verb, outcome=outcome) == 0
        assert value(metrics, "popproxy_command_duration_seconds_count", command=verb) == 0
    for mech in AUTH_MECHANISMS:
        for outcome in ("ok", "fail"):
            assert value(metrics, "popproxy_auth_total", mechanism=mech, outcome=outcome) == 0
    for outcome in SESSION_OUTCOMES:
        assert value(metrics, "popproxy_sessions_total", outcome=outcome) == 0
    for direction in ("client_rx", "client_tx"):
        assert value(metrics, "popproxy_bytes_total", direction=direction) == 0
    for phase in ("marked", "committed", "uncommitted", "reset"):
        assert value(metrics, "popproxy_messages_deleted_total", phase=phase) == 0
    for kind in ("retr", "top"):
        assert value(metrics, "popproxy_messages_retrieved_total", kind=kind) == 0
    for reason in ("connect", "connect_timeout", "response_timeout", "closed", "protocol",
                   "refused", "other"):
        assert value(metrics, "popproxy_upstream_errors_total", reason=reason) == 0
    for outcome in ("ok", "fail"):
        assert value(metrics, "popproxy_config_reload_total", outcome=outcome) == 0
    assert value(metrics, "popproxy_audit_records_total") == 0
    assert value(metrics, "popproxy_audit_errors_total") == 0
    assert value(metrics, "popproxy_sessions_active") == 0
    assert value(metrics, "popproxy_config_last_reload_successful") == 1


def test_known_verbs_are_the_documented_ones() -> None:
    assert set(KNOWN_COMMANDS) == {
        "USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT", "STAT", "LIST", "RETR", "DELE",
        "NOOP", "RSET", "TOP", "UIDL", "LAST", "UTF8", "LANG", "XCLIENT",
    }


# --------------------------------------------------------------------------
# The observer
# --------------------------------------------------------------------------


def series_count(m: Metrics) -> int:
    assert m.registry is not None
    return sum(len(f.samples) for f in m.registry.collect())


def test_unknown_verbs_cannot_create_series(metrics: Metrics) -> None:
    f = Feeder(metrics)
    f.open()
    before = series_count(metrics)
    for i in range(200):
        f.forwarded(Command(f"X-HOSTILE-{i}"), ok=False)
        f.local(Command(f"Y{i}"))
    f.local(Command("INVALID"))  # how the core reports an unparseable line
    assert series_count(metrics) == before
    assert value(metrics, "popproxy_commands_total", command="OTHER", outcome="err") == 200
    assert value(metrics, "popproxy_commands_total", command="OTHER", outcome="denied") == 201
    assert value(metrics, "popproxy_command_duration_seconds_count", command="OTHER") == 200


def test_commands_outcomes_and_latency(metrics: Metrics) -> None:
    f = Feeder(metrics)
    f.open()
    f.forwarded(Command("RETR", ("1",)), latency=0.0004)
    f.forwarded(Command("RETR", ("9",)), ok=False, latency=0.02)
    f.local(Command("DELE", ("1",)))  # a policy refusal: never sent
    assert value(metrics, "popproxy_commands_total", command="RETR", outcome="ok") == 1
    assert value(metrics, "popproxy_commands_total", command="RETR", outcome="err") == 1
    assert value(metrics, "popproxy_commands_total", command="DELE", outcome="denied") == 1
    assert value(metrics, "popproxy_command_duration_seconds_count", command="RETR") == 2
    assert value(metrics, "popproxy_command_duration_seconds_bucket", command="RETR",
                 le="0.0005") == 1
    assert value(metrics, "popproxy_command_duration_seconds_sum", command="RETR") == (
        pytest.approx(0.0204))
    # Local replies have no upstream latency.
    assert value(metrics, "popproxy_command_duration_seconds_count", command="DELE") == 0


def test_sys_temp_for_a_forwarded_command_is_an_error_not_a_denial(metrics: Metrics) -> None:
    f = Feeder(metrics)
    f.open()
    stat, noop = Command("STAT"), Command("NOOP")
    # The upstream died while STAT was in flight: the proxy answers for it.
    f.send(stat)
    f.local(noop, code="SYS/TEMP")  # a rate limit: never sent, so a denial
    f.feed(f.session.upstream_closed(f.now))
    assert value(metrics, "popproxy_commands_total", command="STAT", outcome="err") == 1
    assert value(metrics, "popproxy_commands_total", command="STAT", outcome="denied") == 0
    assert value(metrics, "popproxy_commands_total", command="NOOP", outcome="denied") == 1


def test_a_local_ok_is_ok(metrics: Metrics) -> None:
    f = Feeder(metrics, starttls=True)
    f.open(login=False)
    stls = Command("STLS")
    f.send(stls)  # the proxy answers STLS itself
    assert value(metrics, "popproxy_commands_total", command="STLS", outcome="ok") == 1
    assert value(metrics, "popproxy_command_duration_seconds_count", command="STLS") == 0


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [
        (EndReason.QUIT, "ok"),
        (EndReason.CLIENT_CLOSED, "client_closed"),
        (EndReason.PEER_GONE, "client_closed"),
        (EndReason.IDLE_TIMEOUT, "timeout"),
        (EndReason.TIME_LIMIT, "timeout"),
        (EndReason.UPSTREAM_UNAVAILABLE, "upstream_error"),
        (EndReason.UPSTREAM_CONNECT_TIMEOUT, "upstream_error"),
        (EndReason.UPSTREAM_CLOSED, "upstream_error"),
        (EndReason.UPSTREAM_TIMEOUT, "upstream_error"),
        (EndReason.UPSTREAM_REFUSED, "upstream_error"),
        (EndReason.UPSTREAM_PROTOCOL_ERROR, "upstream_error"),
        (EndReason.PROTOCOL_ERROR, "protocol_error"),
        (EndReason.TLS_FAILED, "tls_error"),
        (EndReason.UPSTREAM_TLS_FAILED, "upstream_error"),
        (EndReason.SHUTDOWN, "shutdown"),
        (EndReason.SESSION_LIMIT, "refused"),
        (EndReason.REFUSED, "refused"),  # per-IP cap, audit fail-closed
        (EndReason.LOGIN_REFUSED, "refused"),
        (EndReason.INTERNAL_ERROR, "error"),
    ],
)
def test_session_outcomes(metrics: Metrics, reason: EndReason, outcome: str) -> None:
    assert outcome in SESSION_OUTCOMES
    assert reason.outcome == outcome
    Feeder(metrics).close(reason)
    assert value(metrics, "popproxy_sessions_total", outcome=outcome) == 1


def test_every_end_reason_has_an_outcome_label() -> None:
    assert {r.outcome for r in EndReason} <= set(SESSION_OUTCOMES)
    assert "other" in SESSION_OUTCOMES  # kept for dashboards, created at zero


def test_sessions_gauge_bytes_and_refusals(metrics: Metrics) -> None:
    a, b, c = Feeder(metrics, "a"), Feeder(metrics, "b"), Feeder(metrics, "c")
    a.open()
    b.open()
    c(SessionOpened("192.0.2.9:1", 0.0))  # refused before any upstream work
    assert value(metrics, "popproxy_sessions_active") == 3
    a.close(EndReason.QUIT, rx=100, tx=1000)
    c.close(EndReason.REFUSED, rx=0, tx=40, detail="too many sessions from your address")
    assert value(metrics, "popproxy_sessions_active") == 1
    b.close(EndReason.CLIENT_CLOSED, rx=7, tx=9)
    assert value(metrics, "popproxy_sessions_active") == 0
    assert value(metrics, "popproxy_sessions_total", outcome="ok") == 1
    assert value(metrics, "popproxy_sessions_total", outcome="refused") == 1
    assert value(metrics, "popproxy_sessions_total", outcome="client_closed") == 1
    assert value(metrics, "popproxy_bytes_total", direction="client_rx") == 107
    assert value(metrics, "popproxy_bytes_total", direction="client_tx") == 1049
    assert value(metrics, "popproxy_session_duration_seconds_count") == 3
    assert value(metrics, "popproxy_upstream_connect_duration_seconds_count") == 2


def test_a_session_older_than_the_observer_does_not_upset_the_gauge(metrics: Metrics) -> None:
    f = Feeder(metrics)
    f.close(EndReason.QUIT)  # its SessionOpened was never seen
    assert value(metrics, "popproxy_sessions_active") == 0
    assert value(metrics, "popproxy_sessions_total", outcome="ok") == 1


def test_deletion_phases(metrics: Metrics) -> None:
    committed, reset_then_quit, abandoned = Feeder(metrics, "1"), Feeder(metrics, "2"), Feeder(
        metrics, "3")
    for f in (committed, reset_then_quit, abandoned):
        f.open()
        f.forwarded(Command("DELE", ("1",)))
        f.forwarded(Command("DELE", ("2",)))
        f.forwarded(Command("DELE", ("3",)), ok=False)  # -ERR: nothing marked
    committed.forwarded(Command("QUIT"))
    committed.close(EndReason.QUIT)
    reset_then_quit.forwarded(Command("RSET"))
    reset_then_quit.forwarded(Command("QUIT"))
    reset_then_quit.close(EndReason.QUIT)
    abandoned.forwarded(Command("QUIT"), ok=False)  # QUIT -ERR: nothing committed
    abandoned.close(EndReason.QUIT)
    assert value(metrics, "popproxy_messages_deleted_total", phase="marked") == 6
    assert value(metrics, "popproxy_messages_deleted_total", phase="committed") == 2
    assert value(metrics, "popproxy_messages_deleted_total", phase="reset") == 2
    assert value(metrics, "popproxy_messages_deleted_total", phase="uncommitted") == 2


def test_auth_mechanisms_are_bounded(metrics: Metrics) -> None:
    f = Feeder(metrics)
    f(AuthResult("USER", "alice", False, "AUTH"),
      AuthResult("plain", "alice", True, None),
      AuthResult("SCRAM-SHA-256", None, False, None),
      AuthResult("X-MADE-UP", None, False, None),
      AuthResult("?", None, True, None))
    assert value(metrics, "popproxy_auth_total", mechanism="USER", outcome="fail") == 1
    assert value(metrics, "popproxy_auth_total", mechanism="PLAIN", outcome="ok") == 1
    assert value(metrics, "popproxy_auth_total", mechanism="SCRAM-SHA-256", outcome="fail") == 1
    assert value(metrics, "popproxy_auth_total", mechanism="OTHER", outcome="fail") == 1
    assert value(metrics, "popproxy_auth_total", mechanism="OTHER", outcome="ok") == 1


def test_retrievals_count_whole_messages_only(metrics: Metrics) -> None:
    f = Feeder(metrics)
    retr, top = Command("RETR", ("1",)), Command("TOP", ("1", "0"))
    f(MessageComplete(retr, 1, 10, "00", None, True),
      MessageComplete(retr, 1, 3, "00", None, False),
      MessageComplete(top, 1, 5, "00", None, True))
    assert value(metrics, "popproxy_messages_retrieved_total", kind="retr") == 1
    assert value(metrics, "popproxy_messages_retrieved_total", kind="top") == 1


def test_upstream_errors_and_anomalies(metrics: Metrics) -> None:
    f = Feeder(metrics)
    f(UpstreamFailed("connect"), UpstreamFailed("response_timeout"), UpstreamFailed("weird"),
      ProtocolAnomaly("client", "malformed-line", "x"),
      ProtocolAnomaly("client", "SomethingNew", "x"),
      ProtocolAnomaly("upstream", "upstream-protocol-error", "x"),
      Unsolicited(False, None, "bye"))
    assert value(metrics, "popproxy_upstream_errors_total", reason="connect") == 1
    assert value(metrics, "popproxy_upstream_errors_total", reason="response_timeout") == 1
    assert value(metrics, "popproxy_upstream_errors_total", reason="other") == 1
    assert value(metrics, "popproxy_protocol_anomalies_total", side="client",
                 kind="malformed-line") == 1
    assert value(metrics, "popproxy_protocol_anomalies_total", side="client", kind="other") == 1
    assert value(metrics, "popproxy_protocol_anomalies_total", side="upstream",
                 kind="upstream-protocol-error") == 1
    assert value(metrics, "popproxy_protocol_anomalies_total", side="upstream",
                 kind="unsolicited") == 1


def test_tls_handshakes(metrics: Metrics) -> None:
    f = Feeder(metrics)
    f(TlsEstablished("client", "TLSv1.3", "TLS_AES_256_GCM_SHA384", "mail.example.org"),
      TlsEstablished("upstream", "TLSv1.2", None, None),
      TlsFailed("client", "no shared cipher"),
      TlsFailed("sideways", "?"))  # not a side: not counted, no new series
    assert value(metrics, "popproxy_tls_handshakes_total", side="client", outcome="ok") == 1
    assert value(metrics, "popproxy_tls_handshakes_total", side="client", outcome="fail") == 1
    assert value(metrics, "popproxy_tls_handshakes_total", side="upstream", outcome="ok") == 1
    assert value(metrics, "popproxy_tls_handshakes_total", side="upstream", outcome="fail") == 0


def test_policy_audit_and_reload_hooks(metrics: Metrics) -> None:
    f = Feeder(metrics)
    f(PolicyDecision("archive-is-read-only", "deny", Command("DELE", ("1",)), True),
      PolicyDecision("archive-is-read-only", "deny", Command("DELE", ("2",)), False))
    metrics.policy_decision("retr-per-user", "rate_limit")
    metrics.policy_rules([("quiet-hours", "deny")])
    assert value(metrics, "popproxy_policy_decisions_total", rule="archive-is-read-only",
                 action="deny", enforced="true") == 1
    assert value(metrics, "popproxy_policy_decisions_total", rule="archive-is-read-only",
                 action="deny", enforced="false") == 1
    assert value(metrics, "popproxy_policy_decisions_total", rule="retr-per-user",
                 action="rate_limit", enforced="true") == 1
    assert value(metrics, "popproxy_policy_decisions_total", rule="quiet-hours",
                 action="deny", enforced="true") == 0

    metrics.audit_record()
    metrics.audit_record()
    metrics.audit_error()
    assert value(metrics, "popproxy_audit_records_total") == 2
    assert value(metrics, "popproxy_audit_errors_total") == 1

    first = value(metrics, "popproxy_config_last_reload_success_timestamp_seconds")
    metrics.config_reload(False)
    assert value(metrics, "popproxy_config_last_reload_successful") == 0
    assert value(metrics, "popproxy_config_last_reload_success_timestamp_seconds") == first
    metrics.config_reload(True)
    assert value(metrics, "popproxy_config_reload_total", outcome="ok") == 1
    assert value(metrics, "popproxy_config_reload_total", outcome="fail") == 1
    assert value(metrics, "popproxy_config_last_reload_successful") == 1
    assert value(metrics, "popproxy_config_last_reload_success_timestamp_seconds") >= first


def test_policy_series_are_capped(metrics: Metrics) -> None:
    for i in range(MAX_POLICY_SERIES + 50):
        metrics.policy_decision(f"rule-{i}", "deny")
    assert metrics.registry is not None
    fam = next(f for f in metrics.registry.collect() if f.name == "popproxy_policy_decisions")
    assert len(fam.samples) == MAX_POLICY_SERIES + 1
    assert value(metrics, "popproxy_policy_decisions_total", rule="OTHER", action="OTHER",
                 enforced="true") == 50


def test_observe_ignores_events_it_does_not_count(metrics: Metrics) -> None:
    before = series_count(metrics)
    f = Feeder(metrics)
    f(Event())
    assert series_count(metrics) == before


# --------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health_for(listening: bool, probe_result: str | None) -> tuple[Health, FakeClock, list[int]]:
    proxy = Proxy(Config(upstream=UpstreamConfig(address=HostPort("192.0.2.7", 110))))
    proxy.listening = listening
    clock = FakeClock()
    calls: list[int] = []

    def probe(host: str, port: int, timeout: float) -> str | None:
        assert (host, port) == ("192.0.2.7", 110)
        calls.append(port)
        return probe_result

    return Health(proxy, probe=probe, clock=clock), clock, calls


def test_readiness_needs_listening_and_a_reachable_upstream() -> None:
    health, _, _ = health_for(listening=True, probe_result=None)
    assert health.ready() == (True, "ready")
    health, _, _ = health_for(listening=False, probe_result=None)
    assert health.ready() == (False, "not listening")
    health, _, _ = health_for(listening=True, probe_result="Connection refused")
    assert health.ready() == (False, "upstream 192.0.2.7:110: Connection refused")
    assert health.upstream_up() == 0.0


def test_the_upstream_probe_is_cached() -> None:
    health, clock, calls = health_for(listening=True, probe_result=None)
    for _ in range(10):
        assert health.upstream_up() == 1.0
        health.ready()
    assert len(calls) == 1
    clock.now += 4.9
    health.ready()
    assert len(calls) == 1
    clock.now += 0.2
    health.ready()
    assert len(calls) == 2


def test_liveness_fails_when_the_event_loop_stops_beating() -> None:
    health, clock, _ = health_for(listening=True, probe_result=None)
    clock.now += 29
    assert health.alive() == (True, "ok")
    clock.now += 2
    alive, why = health.alive()
    assert not alive
    assert "event loop" in why
    assert not health.ready()[0]
    health.beat()
    assert health.alive() == (True, "ok")


# --------------------------------------------------------------------------
# The HTTP endpoint, with the proxy in front of the demo server
# --------------------------------------------------------------------------


async def test_endpoint_serves_metrics_health_and_readiness(
    nursery: trio.Nursery, demo_proxy: RunningProxy
) -> None:
    endpoint = await start_metrics(nursery, demo_proxy)
    reply = await http_get(endpoint.address, "/metrics")
    assert reply.status == 200
    assert reply.content_type.startswith("text/plain; version=0.0.4")
    samples = parse_exposition(reply.body)
    assert samples[key("popproxy_sessions_active")] == 0
    upstream = demo_proxy.proxy.config.upstream
    assert samples[key("popproxy_upstream_up", upstream="default",
                       address=str(upstream.address))] == 1
    assert (await http_get(endpoint.address, "/healthz")).status == 200
    ready = await http_get(endpoint.address, "/readyz")
    assert (ready.status, ready.body) == (200, "ready\n")
    assert (await http_get(endpoint.address, "/nope")).status == 404

    demo_proxy.proxy.listening = False  # as while draining after SIGTERM
    ready = await http_get(endpoint.address, "/readyz")
    assert (ready.status, ready.body) == (503, "not listening\n")
    assert (await http_get(endpoint.address, "/healthz")).status == 200


async def test_endpoint_speaks_openmetrics_when_asked(
    nursery: trio.Nursery, demo_proxy: RunningProxy
) -> None:
    endpoint = await start_metrics(nursery, demo_proxy)
    request = urllib.request.Request(
        f"http://{endpoint.address}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get() -> tuple[str, str]:
        with opener.open(request, timeout=10) as r:
            return r.headers["Content-Type"], r.read().decode()

    content_type, body = await trio.to_thread.run_sync(get)
    assert content_type.startswith("application/openmetrics-text")
    assert "# UNIT popproxy_command_duration_seconds seconds" in body
    assert body.endswith("# EOF\n")


async def test_endpoint_answers_while_the_event_loop_is_blocked(
    nursery: trio.Nursery, demo_proxy: RunningProxy
) -> None:
    endpoint = await start_metrics(nursery, demo_proxy)
    replies: list[int] = []
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get() -> None:
        for path in ("/metrics", "/healthz", "/readyz"):
            with opener.open(f"http://{endpoint.address}{path}", timeout=10) as r:
                replies.append(r.status)

    worker = threading.Thread(target=get)
    worker.start()
    worker.join(timeout=20)  # blocks the trio loop on purpose
    assert not worker.is_alive()
    assert replies == [200, 200, 200]


async def test_endpoint_stops_when_cancelled(demo_proxy: RunningProxy) -> None:
    metrics = demo_proxy.app.metrics
    async with trio.open_nursery() as inner:
        address: HostPort = await inner.start(
            serve_metrics, MetricsConfig(HostPort("127.0.0.1", 0)), metrics, demo_proxy.proxy
        )
        assert (await http_get(address, "/healthz")).status == 200
        inner.cancel_scope.cancel()
    assert not any(t.name == "popproxy-metrics-http" for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address.host, address.port), 2).close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_endpoint_on_ipv6(nursery: trio.Nursery, demo_proxy: RunningProxy) -> None:
    address: HostPort = await nursery.start(
        serve_metrics, MetricsConfig(HostPort("::1", 0)), demo_proxy.app.metrics,
        demo_proxy.proxy,
    )
    assert address.host == "::1"
    assert (await http_get(address, "/healthz")).status == 200


# --------------------------------------------------------------------------
# Real sessions that never reach a mailbox
# --------------------------------------------------------------------------


@pytest.fixture
def refused_port() -> Iterator[HostPort]:
    """A loopback port that refuses connections: bound, never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield HostPort("127.0.0.1", s.getsockname()[1])


async def greeting_and_eof(running: RunningProxy) -> bytes:
    stream = await trio.open_tcp_stream(running.host, running.port)
    data = b""
    while chunk := await stream.receive_some(4096):
        data += chunk
    await stream.aclose()
    return data


async def test_unreachable_upstream(nursery: trio.Nursery, refused_port: HostPort) -> None:
    running = await start_proxy(nursery, refused_port)
    endpoint = await start_metrics(nursery, running)
    with trio.fail_after(10):
        assert (await greeting_and_eof(running)).startswith(b"-ERR [SYS/TEMP]")
        await running.wait_for(SessionClosed)
    samples = await scrape(endpoint.address)
    assert samples[key("popproxy_upstream_errors_total", reason="connect")] == 1
    assert samples[key("popproxy_sessions_total", outcome="upstream_error")] == 1
    assert samples[key("popproxy_upstream_up", upstream="default",
                       address=str(refused_port))] == 0
    ready = await http_get(endpoint.address, "/readyz")
    assert ready.status == 503
    assert ready.body.startswith(f"upstream {refused_port}: ")


async def test_refused_sessions(nursery: trio.Nursery, refused_port: HostPort) -> None:
    running = await start_proxy(nursery, refused_port, limits=LimitsConfig(max_sessions=0))
    endpoint = await start_metrics(nursery, running)
    with trio.fail_after(10):
        for _ in range(2):
            assert (await greeting_and_eof(running)).startswith(b"-ERR [SYS/TEMP] too many")
        await running.wait_for(SessionClosed, 2)
    samples = await scrape(endpoint.address)
    assert samples[key("popproxy_sessions_total", outcome="refused")] == 2
    assert samples[key("popproxy_upstream_errors_total", reason="connect")] == 0
    assert samples[key("popproxy_sessions_active")] == 0
