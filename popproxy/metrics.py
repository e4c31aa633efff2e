"""Prometheus metrics: an observer of session events, on an injected registry.

Every metric popproxy exports is defined in ``Metrics`` and nowhere else.
The class takes the registry it registers on (tests pass a fresh
``CollectorRegistry``), and its values move only through ``observe`` (the
session observer) and a few methods for the parts of popproxy that are not
sessions: the audit trail (``audit_record``, ``audit_error``), config
reloads (``config_reload``) and the policy engine (``policy_decision``).
The relay never touches a metric.  The observer reads the facts the events
state (a reply's ``outcome``, a session's ``EndReason``, ``Deletions``) and
re-derives none of them.

Label values come from closed sets, so that no client can create series:
the ``command`` label is one of ``COMMAND_LABELS`` (unknown verbs and
unparseable lines are ``OTHER``), ``mechanism`` one of ``AUTH_MECHANISMS``,
and so on.  There are no user, client address, UIDL or Message-ID labels.
Every label set is created at zero up front, so dashboards and ``rate()``
see a series before its first event (policy rules come from the
configuration: ``policy_rules`` creates theirs).

The HTTP endpoint that serves them is ``endpoint.py``.  With ``[server]
workers > 1`` the supervisor serves one view of all workers and sums each
family over them, except those ``aggregate.WORKER_MERGE`` names: a gauge
that must not be summed over processes belongs there.

Usage::

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    proxy.observers.append(metrics.observe)
    registry.get_sample_value("popproxy_sessions_total", {"outcome": "ok"})
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any, Final

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from . import __version__
from .events import (
    DELETE_PHASES,
    SESSION_OUTCOMES,
    AuthResult,
    Deletions,
    Event,
    MessageComplete,
    Outcome,
    PolicyDecision,
    ProtocolAnomaly,
    Response,
    SessionClosed,
    SessionOpened,
    TlsEstablished,
    TlsFailed,
    Unsolicited,
    UpstreamConnected,
    UpstreamFailed,
)
from .observe import SessionInfo
from .pop3 import KNOWN_VERBS
from .routing import OUTCOMES as ROUTE_OUTCOMES
from .routing import SOURCES as ROUTE_SOURCES
from .state.base import OPS as STATE_OPS

__all__ = [
    "AUTH_MECHANISMS",
    "COMMAND_LABELS",
    "KNOWN_COMMANDS",
    "LATENCY_BUCKETS",
    "SESSION_OUTCOMES",
    "Metrics",
]

# --------------------------------------------------------------------------
# Label values: closed sets
# --------------------------------------------------------------------------

#: POP3 verbs with a ``command`` label of their own (``pop3.KNOWN_VERBS``);
#: everything else is ``OTHER``.
KNOWN_COMMANDS: Final = KNOWN_VERBS
COMMAND_LABELS: Final = (*KNOWN_COMMANDS, "OTHER")
COMMAND_OUTCOMES: Final = ("ok", "err", "denied")

#: ``USER`` stands for USER/PASS; the rest are SASL mechanisms (RFC 5034).
AUTH_MECHANISMS: Final = (
    "USER", "APOP", "PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER", "CRAM-MD5",
    "SCRAM-SHA-1", "SCRAM-SHA-256", "OTHER",
)
AUTH_OUTCOMES: Final = ("ok", "fail")

#: ``UpstreamFailed.reason`` values, plus ``other``.
UPSTREAM_ERROR_REASONS: Final = (
    "connect", "connect_timeout", "tls", "response_timeout", "closed", "protocol", "refused",
    "other",
)
TLS_SIDES: Final = ("client", "upstream")

#: Octets from and to the client, and from and to the upstream.
BYTE_DIRECTIONS: Final = ("client_rx", "client_tx", "upstream_rx", "upstream_tx")

RETRIEVE_KINDS: Final = ("retr", "top")

#: ``ProtocolAnomaly`` kinds the core emits, by side; others are ``other``.
#: One spelling: lower-case words joined by hyphens (``ProtocolError.kind``).
ANOMALY_KINDS: Final = {
    "client": (
        "malformed-line", "data-after-stls", "line-too-long", "pipeline-overflow",
        "too-many-bad-lines", "too-many-refused", "other",
    ),
    "upstream": ("upstream-protocol-error", "reply-too-long", "data-after-stls", "unsolicited",
                 "other"),
}

RELOAD_OUTCOMES: Final = ("ok", "fail")

#: Seconds: loopback Dovecot answers NOOP in ~100 µs, a failed login is
#: delayed by seconds, a slow legacy server's RETR can take tens of seconds.
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: Seconds: a fetchmail poll lasts well under a second, an idle
#: Thunderbird session up to the 10-minute idle timeout and beyond.
SESSION_BUCKETS: Final = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
)

#: Distinct policy label sets before further ones are folded into OTHER.
MAX_POLICY_SERIES: Final = 256

class _CommandSeries:
    """One ``command`` label value: its outcome counts and latency histogram."""

    __slots__ = ("buckets", "denied", "err", "ok", "sum")

    def __init__(self, bounds: int) -> None:
        self.ok = 0
        self.err = 0
        self.denied = 0
        self.buckets = [0] * (bounds + 1)  # per bucket, not cumulative; last: +Inf
        self.sum = 0.0


class _CommandStats:
    """``popproxy_commands_total`` and ``popproxy_command_duration_seconds``.

    Every command moves them, so they are kept as plain numbers and made
    into metric families only when scraped (prometheus_client's custom
    collector).  A library child takes a lock and walks the buckets in
    Python for each observation: about 3 µs per command in the running
    proxy, a fifth of the per-command work of a pipeline; here it is a
    bisect and three additions.  Only the event loop's thread writes; a
    scrape, in the server's thread, reads at worst one command behind.
    """

    def __init__(self, verbs: Iterable[str], bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series = {verb: _CommandSeries(len(bounds)) for verb in verbs}
        self._le = [floatToGoString(b) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]

    def observe(self, series: _CommandSeries, seconds: float) -> None:
        series.buckets[bisect_left(self.bounds, seconds)] += 1
        series.sum += seconds

    def describe(self) -> list[Metric]:
        return self._families()

    def collect(self) -> list[Metric]:
        return self._families(samples=True)

    def _families(self, samples: bool = False) -> list[Metric]:
        commands = CounterMetricFamily(
            "popproxy_commands", "POP3 commands answered, by verb and outcome "
            "(ok/err: the upstream's reply; denied: answered by the proxy).",
            labels=["command", "outcome"],
        )
        duration = HistogramMetricFamily(
            "popproxy_command_duration_seconds",
            "Upstream round trip of forwarded commands, from sending the command "
            "to the end of its reply.",
            labels=["command"], unit="seconds",
        )
        if samples:
            for verb, se in self.series.items():
                commands.add_metric([verb, "ok"], se.ok)
                commands.add_metric([verb, "err"], se.err)
                commands.add_metric([verb, "denied"], se.denied)
                total = 0
                cumulative: list[tuple[str, float]] = []
                for le, n in zip(self._le, list(se.buckets), strict=True):
                    total += n
                    cumulative.append((le, total))
                duration.add_metric([verb], cumulative, se.sum)
        return [commands, duration]


class _UpstreamUp:
    """``popproxy_upstream_up{upstream,address}``, read from ``source`` at scrape time.

    ``source`` (``health.Health.upstreams``, set by the metrics endpoint)
    gives (upstream, address, up) for every configured address; the label
    values come from the configuration, so they are bounded.
    """

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, object, bool]]] = lambda: ()

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        for upstream, address, up in self.source():
            family.add_metric([upstream, str(address)], 1.0 if up else 0.0)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "popproxy_upstream_up", "1 if the upstream address accepted a TCP connection at "
            "the last health probe (cached for a few seconds) and is not marked down after a "
            "failed connect, else 0.", labels=["upstream", "address"])


class Metrics:
    """Every popproxy metric, on one registry, moved by the session events.

    ``observe(info, event)`` is an ``observe.Observer``.  It runs on the event
    loop for every event, so it does dictionary look-ups and counter
    increments only: the labelled children are resolved once, here.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        r = registry
        # popproxy owns its process's exposition: no ``*_created`` series,
        # which would double the series count for nothing Prometheus uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]

        self.build_info = Info(
            "popproxy_build", "popproxy version information.", registry=r
        )
        self.build_info.info({"version": __version__})

        # Sessions
        self.sessions_active = Gauge(
            "popproxy_sessions_active", "Client sessions open right now.", registry=r
        )
        self.sessions = Counter(
            "popproxy_sessions", "Client sessions ended, by how they ended.",
            ["outcome"], registry=r,
        )
        self.session_duration = Histogram(
            "popproxy_session_duration_seconds",
            "Duration of client sessions, from accept to close.",
            buckets=SESSION_BUCKETS, unit="seconds", registry=r,
        )
        self.bytes = Counter(
            "popproxy_bytes", "Octets received from (client_rx) and sent to (client_tx) "
            "clients, and from (upstream_rx) and to (upstream_tx) the upstream, counted "
            "when the session ends.",
            ["direction"], unit="bytes", registry=r,
        )

        # Commands
        self.command_stats = _CommandStats(COMMAND_LABELS, LATENCY_BUCKETS)
        r.register(self.command_stats)
        self.auth = Counter(
            "popproxy_auth", "Login attempts answered by the upstream, by mechanism and outcome.",
            ["mechanism", "outcome"], registry=r,
        )
        self.policy_decisions = Counter(
            "popproxy_policy_decisions", "Policy rules that matched a command, by rule, action "
            "(deny/allow/rate_limit) and whether it was enforced (false in monitor mode).",
            ["rule", "action", "enforced"], registry=r,
        )
        self.protocol_anomalies = Counter(
            "popproxy_protocol_anomalies", "Protocol violations tolerated or refused, by side "
            "(client/upstream) and kind.",
            ["side", "kind"], registry=r,
        )

        self.tls_handshakes = Counter(
            "popproxy_tls_handshakes", "TLS handshakes with clients and with the upstream, "
            "by side and outcome.",
            ["side", "outcome"], registry=r,
        )

        # Mailbox activity
        self.messages_retrieved = Counter(
            "popproxy_messages_retrieved", "Messages delivered whole to clients, by command "
            "(retr/top).",
            ["kind"], registry=r,
        )
        self.messages_deleted = Counter(
            "popproxy_messages_deleted", "Message deletions by phase: marked (DELE +OK), "
            "committed (QUIT +OK), uncommitted (session ended without QUIT), reset (RSET).",
            ["phase"], registry=r,
        )

        # Upstream
        self.upstream_connect_duration = Histogram(
            "popproxy_upstream_connect_duration_seconds",
            "Time to set up the upstream connection: TCP, and TLS when configured.",
            buckets=LATENCY_BUCKETS, unit="seconds", registry=r,
        )
        self.upstream_errors = Counter(
            "popproxy_upstream_errors", "Upstream failures that ended or broke a session, "
            "by reason.",
            ["reason"], registry=r,
        )
        self.upstream_up = _UpstreamUp()
        r.register(self.upstream_up)
        self.route_lookups = Counter(
            "popproxy_route_lookups", "Routed mode: route look-ups, by source "
            "(rule/map/http/default) and outcome (hit/miss/refused/timeout/error).",
            ["source", "outcome"], registry=r,
        )
        self.route_lookup_duration = Histogram(
            "popproxy_route_lookup_duration_seconds",
            "Routed mode: time to consult each route source.",
            ["source"], buckets=LATENCY_BUCKETS, unit="seconds", registry=r,
        )

        self.state_errors = Counter(
            "popproxy_state_errors", "Shared state ([state] backend = \"redis\"): calls "
            "that failed or timed out, by operation; on_error said what happened instead.",
            ["op"], registry=r,
        )

        # Audit and configuration
        self.audit_records = Counter(
            "popproxy_audit_records", "Audit records written.", registry=r
        )
        self.audit_errors = Counter(
            "popproxy_audit_errors", "Audit records that could not be written.", registry=r
        )
        self.config_reloads = Counter(
            "popproxy_config_reload", "Configuration reloads (SIGHUP), by outcome.",
            ["outcome"], registry=r,
        )
        self.config_last_reload_successful = Gauge(
            "popproxy_config_last_reload_successful",
            "1 if the last configuration load or reload succeeded, else 0.",
            registry=r,
        )
        self.config_last_reload_success = Gauge(
            "popproxy_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load or reload.",
            unit="seconds", registry=r,
        )

        # Every label set exists (at zero) from the start.
        self._sessions_by_outcome = {o: self.sessions.labels(o) for o in SESSION_OUTCOMES}
        self._bytes_rx = self.bytes.labels("client_rx")
        self._bytes_tx = self.bytes.labels("client_tx")
        self._bytes_up_rx = self.bytes.labels("upstream_rx")
        self._bytes_up_tx = self.bytes.labels("upstream_tx")
        self._commands = self.command_stats.series
        self._other = self._commands["OTHER"]
        self._auth = {
            (mech, ok): self.auth.labels(mech, "ok" if ok else "fail")
            for mech in AUTH_MECHANISMS
            for ok in (True, False)
        }
        self._anomalies = {
            (side, kind): self.protocol_anomalies.labels(side, kind)
            for side, kinds in ANOMALY_KINDS.items()
            for kind in kinds
        }
        self._tls = {
            (side, ok): self.tls_handshakes.labels(side, "ok" if ok else "fail")
            for side in TLS_SIDES
            for ok in (True, False)
        }
        self._retrieved = {
            "RETR": self.messages_retrieved.labels("retr"),
            "TOP": self.messages_retrieved.labels("top"),
        }
        self._deleted = {p: self.messages_deleted.labels(p) for p in DELETE_PHASES}
        self._upstream_errors = {
            reason: self.upstream_errors.labels(reason) for reason in UPSTREAM_ERROR_REASONS
        }
        self._reloads = {True: self.config_reloads.labels("ok"),
                         False: self.config_reloads.labels("fail")}
        self._policy: dict[tuple[str, str, str], Counter] = {}
        self._lookups: dict[tuple[str, str], Counter] = {
            (source, outcome): self.route_lookups.labels(source, outcome)
            for source in ROUTE_SOURCES for outcome in ROUTE_OUTCOMES}
        self._lookup_durations: dict[str, Histogram] = {
            source: self.route_lookup_duration.labels(source) for source in ROUTE_SOURCES}
        self._state_errors = {op: self.state_errors.labels(op) for op in STATE_OPS}
        self.config_last_reload_successful.set(1)
        self.config_last_reload_success.set_to_current_time()

        # Sessions this observer saw open, so that one older than the
        # observer (attached later) does not upset the gauge when it ends.
        self._open: set[str] = set()
        self._handlers: dict[type[Event], Callable[[SessionInfo, Any], None]] = {
            SessionOpened: self._opened,
            SessionClosed: self._closed,
            Response: self._response,
            PolicyDecision: self._policy_event,
            AuthResult: self._auth_result,
            MessageComplete: self._message_complete,
            Deletions: self._deletions,
            UpstreamConnected: self._upstream_connected,
            UpstreamFailed: self._upstream_failed,
            ProtocolAnomaly: self._anomaly,
            Unsolicited: self._unsolicited,
            TlsEstablished: self._tls_established,
            TlsFailed: self._tls_failed,
        }
        # The proxy calls ``observe`` only for these (see ``observe.listens_to``).
        self.event_types = frozenset(self._handlers)

    # ------------------------------------------------------------------
    # The observer

    def observe(self, info: SessionInfo, event: Event) -> None:
        """An ``observe.Observer``: account for one session event."""
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(info, event)

    def _opened(self, info: SessionInfo, event: SessionOpened) -> None:
        self._open.add(info.id)
        self.sessions_active.inc()

    def _closed(self, info: SessionInfo, event: SessionClosed) -> None:
        if info.id in self._open:
            self._open.discard(info.id)
            self.sessions_active.dec()
        self._sessions_by_outcome[event.reason.outcome].inc()
        self.session_duration.observe(event.duration)
        self._bytes_rx.inc(event.bytes_in)
        self._bytes_tx.inc(event.bytes_out)
        self._bytes_up_rx.inc(event.upstream_in)
        self._bytes_up_tx.inc(event.upstream_out)

    def _response(self, info: SessionInfo, event: Response) -> None:
        series = self._commands.get(event.command.verb, self._other)
        outcome = event.outcome
        if outcome is Outcome.OK:
            series.ok += 1
        elif outcome is Outcome.ERR:
            series.err += 1
        else:
            series.denied += 1
        if not event.local:
            self.command_stats.observe(series, event.finished - event.started)

    def _deletions(self, info: SessionInfo, event: Deletions) -> None:
        if event.msgs:
            self._deleted[event.phase].inc(len(event.msgs))

    def _policy_event(self, info: SessionInfo, event: PolicyDecision) -> None:
        self._policy_child(event.rule, event.action, event.enforced).inc()

    def _auth_result(self, info: SessionInfo, event: AuthResult) -> None:
        mech = event.mechanism.upper()
        child = self._auth.get((mech, event.ok)) or self._auth["OTHER", event.ok]
        child.inc()

    def _message_complete(self, info: SessionInfo, event: MessageComplete) -> None:
        if event.complete:
            child = self._retrieved.get(event.command.verb)
            if child is not None:
                child.inc()

    def _upstream_connected(self, info: SessionInfo, event: UpstreamConnected) -> None:
        self.upstream_connect_duration.observe(event.duration)

    def _upstream_failed(self, info: SessionInfo, event: UpstreamFailed) -> None:
        (self._upstream_errors.get(event.reason) or self._upstream_errors["other"]).inc()

    def _anomaly(self, info: SessionInfo, event: ProtocolAnomaly) -> None:
        side = event.side if event.side in ANOMALY_KINDS else "client"
        child = self._anomalies.get((side, event.kind)) or self._anomalies[side, "other"]
        child.inc()

    def _unsolicited(self, info: SessionInfo, event: Unsolicited) -> None:
        self._anomalies["upstream", "unsolicited"].inc()

    def _tls_established(self, info: SessionInfo, event: TlsEstablished) -> None:
        child = self._tls.get((event.side, True))
        if child is not None:
            child.inc()

    def _tls_failed(self, info: SessionInfo, event: TlsFailed) -> None:
        child = self._tls.get((event.side, False))
        if child is not None:
            child.inc()

    # ------------------------------------------------------------------
    # For the rest of popproxy

    def audit_record(self, n: int = 1) -> None:
        """``n`` audit records were written (called by the audit trail)."""
        self.audit_records.inc(n)

    def audit_error(self) -> None:
        """An audit record could not be written (called by the audit trail)."""
        self.audit_errors.inc()

    def route_lookup(self, source: str, outcome: str, seconds: float) -> None:
        """A routed mode look-up consulted ``source`` (``routing.Router``'s observer)."""
        child = self._lookups.get((source, outcome))
        if child is not None:
            child.inc()
            self._lookup_durations[source].observe(seconds)

    def state_error(self, op: str) -> None:
        """A shared-state call failed (``state.StateClient``'s ``errors``)."""
        child = self._state_errors.get(op)
        (child if child is not None else self.state_errors.labels(op)).inc()

    def config_reload(self, ok: bool) -> None:
        """A configuration reload (SIGHUP) succeeded or was rejected."""
        self._reloads[ok].inc()
        self.config_last_reload_successful.set(1 if ok else 0)
        if ok:
            self.config_last_reload_success.set_to_current_time()

    def policy_rules(self, rules: Iterable[tuple[str, str]], *, enforced: bool = True) -> None:
        """Create the series of the configured ``(rule, action)`` pairs at zero."""
        for rule, action in rules:
            self._policy_child(rule, action, enforced)

    def policy_decision(self, rule: str, action: str, enforced: bool = True) -> None:
        """A policy rule matched a command.

        ``observe`` counts the session's ``PolicyDecision`` events; this is
        for decisions made outside a session.  Rule names come from the
        configuration (and ``builtin:*``), so the label set is bounded;
        past ``MAX_POLICY_SERIES`` label sets, new ones are counted as
        ``OTHER``.
        """
        self._policy_child(rule, action, enforced).inc()

    def _policy_child(self, rule: str, action: str, enforced: bool) -> Counter:
        key = (rule, action, "true" if enforced else "false")
        child = self._policy.get(key)
        if child is None:
            if len(self._policy) >= MAX_POLICY_SERIES:
                key = ("OTHER", "OTHER", key[2])
                child = self._policy.get(key)
            if child is None:
                child = self.policy_decisions.labels(*key)
                self._policy[key] = child
        return child
