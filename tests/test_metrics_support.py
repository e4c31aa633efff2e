"""Helpers for the metrics tests (no tests in here).

* ``MetricsEndpoint`` / ``start_metrics``: a fresh registry, ``Metrics``
  observing a ``RunningProxy``, and ``serve_metrics`` on 127.0.0.1 port 0.
* ``http_get`` / ``scrape``: read the endpoint over real HTTP, from a worker
  thread (the proxy runs in the test's own trio loop), never via a proxy
  from the environment.
* ``CountingClient``: a raw POP3 client that counts every octet it sends and
  receives, so byte counters can be checked exactly.
* ``dovecot_workload``: a fixed set of sessions against a real Dovecot, and
  ``WORKLOAD_DELTAS``, exactly how much each sample must move because of it.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from popproxy.config import HostPort, MetricsConfig
from popproxy.endpoint import serve_metrics
from popproxy.events import SessionClosed
from popproxy.metrics import Metrics
from popproxy.policy.config import parse_policy
from tests.proxy_fixtures import RunningProxy

__all__ = [
    "CountingClient",
    "MetricsEndpoint",
    "Samples",
    "delta",
    "dovecot_workload",
    "http_get",
    "scrape",
    "start_metrics",
]

#: (sample name, sorted label pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class HttpReply:
    status: int
    content_type: str
    body: str


async def http_get(address: HostPort, path: str, seconds: float = 10.0) -> HttpReply:
    """GET ``path`` from ``address`` in a worker thread, with a socket timeout."""
    url = f"http://{address}{path}"

    def get() -> HttpReply:
        try:
            with _NO_PROXY.open(url, timeout=seconds) as r:
                return HttpReply(r.status, r.headers.get("Content-Type", ""), r.read().decode())
        except urllib.error.HTTPError as e:
            return HttpReply(e.code, e.headers.get("Content-Type", ""), e.read().decode())

    return await trio.to_thread.run_sync(get)


def parse_exposition(text: str) -> Samples:
    """Parse with prometheus-client's own parser (raises on malformed text)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples


async def scrape(address: HostPort) -> Samples:
    reply = await http_get(address, "/metrics")
    assert reply.status == 200, reply
    assert reply.content_type.startswith("text/plain"), reply.content_type
    return parse_exposition(reply.body)


def delta(before: Samples, after: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples whose value changed (new samples count from 0)."""
    changed = {}
    for key, value in after.items():
        old = before.get(key, 0.0)
        if value != old:
            changed[key] = value - old
    return changed


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


@dataclass
class MetricsEndpoint:
    metrics: Metrics
    registry: CollectorRegistry
    address: HostPort


async def start_metrics(nursery: trio.Nursery, running: RunningProxy) -> MetricsEndpoint:
    """Serve the proxy's own metrics (``app.build`` put them on a fresh
    registry and attached ``Metrics.observe``) on 127.0.0.1, port 0."""
    metrics = running.app.metrics
    assert metrics.observe in running.proxy.observers
    registry = metrics.registry
    assert isinstance(registry, CollectorRegistry)
    config = MetricsConfig(HostPort("127.0.0.1", 0))
    address: HostPort = await nursery.start(serve_metrics, config, metrics, running.proxy)
    return MetricsEndpoint(metrics, registry, address)


class CountingClient:
    """A raw POP3 connection that counts octets both ways."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.sent = 0
        self.received = 0

    @classmethod
    async def open(cls, running: RunningProxy) -> CountingClient:
        return cls(await trio.open_tcp_stream(running.host, running.port))

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.received += len(data)
        self.buf += data
        return bool(data)

    async def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not await self._fill():
                raise AssertionError(f"EOF while waiting for a line; have {bytes(self.buf)!r}")
        i = self.buf.index(b"\r\n") + 2
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)
        self.sent += len(data)

    async def cmd(self, text: str | bytes) -> bytes:
        await self.send((text.encode() if isinstance(text, str) else text) + b"\r\n")
        return await self.line()

    async def multi(self, text: str) -> bytes:
        first = await self.cmd(text)
        assert first.startswith(b"+OK"), first
        while b"\r\n.\r\n" not in b"\r\n" + self.buf:
            if not await self._fill():
                raise AssertionError("EOF inside a multi-line reply")
        i = (b"\r\n" + self.buf).index(b"\r\n.\r\n") + 3
        body = bytes(self.buf[:i])
        del self.buf[:i]
        return first + body

    async def read_to_eof(self) -> bytes:
        while await self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0

    def add(self, c: CountingClient) -> None:
        self.sent += c.sent
        self.received += c.received


async def dovecot_workload(
    running: RunningProxy, user: str, password: str, closed_before: int = 0
) -> Traffic:
    """Three sessions through ``running`` to a Dovecot with 4 messages for ``user``.

    The proxy must run with ``WORKLOAD_POLICY``.
    Returns the client octets; afterwards the proxy has reported
    ``closed_before + 3`` closed sessions.  ``WORKLOAD_DELTAS`` says what
    each counter must show for it.
    """
    traffic = Traffic()
    with trio.fail_after(30):
        # 1. A command before login, a wrong password, QUIT.
        c = await CountingClient.open(running)
        assert (await c.line()).startswith(b"+OK")
        assert (await c.cmd("STAT")).startswith(b"-ERR")  # denied by the proxy
        assert (await c.cmd(f"USER {user}")).startswith(b"+OK")
        assert (await c.cmd("PASS not-the-password")).startswith(b"-ERR")
        assert (await c.cmd("QUIT")).startswith(b"+OK")
        await c.read_to_eof()
        traffic.add(c)

        # 2. Everything a mail client does, and some things it should not.
        c = await CountingClient.open(running)
        assert (await c.line()).startswith(b"+OK")
        assert (await c.cmd(f"USER {user}")).startswith(b"+OK")
        assert (await c.cmd(f"PASS {password}")).startswith(b"+OK")
        assert (await c.cmd("STAT")).startswith(b"+OK 4 ")
        await c.multi("LIST")
        await c.multi("UIDL")
        await c.multi("RETR 1")
        await c.multi("TOP 2 0")
        assert (await c.cmd("RETR 99")).startswith(b"-ERR")
        assert (await c.cmd("DELE 1")).startswith(b"+OK")
        assert (await c.cmd("DELE 2")).startswith(b"+OK")
        assert (await c.cmd("RSET")).startswith(b"+OK")
        assert (await c.cmd("DELE 3")).startswith(b"+OK")
        assert (await c.cmd("NOOP")).startswith(b"+OK")
        assert (await c.cmd("NOOP")).startswith(b"-ERR [SYS/TEMP]")  # rate limited
        assert (await c.cmd("LAST")).startswith(b"-ERR")  # denied by a rule
        assert (await c.cmd("XYZZY")).startswith(b"-ERR")  # policy: unknown command
        assert (await c.cmd("USER bob")).startswith(b"-ERR")  # denied: not after login
        assert (await c.cmd("XCLIENT ADDR=10.0.0.1")).startswith(b"-ERR")  # never forwarded
        assert (await c.cmd(b"!!")).startswith(b"-ERR")  # malformed: not a POP3 keyword
        assert (await c.cmd("QUIT")).startswith(b"+OK")
        await c.read_to_eof()
        traffic.add(c)

        # 3. SASL PLAIN, a DELE, and hanging up without QUIT.
        c = await CountingClient.open(running)
        assert (await c.line()).startswith(b"+OK")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        assert (await c.cmd(f"AUTH PLAIN {token}")).startswith(b"+OK")
        assert (await c.cmd("DELE 1")).startswith(b"+OK")
        await c.aclose()
        traffic.add(c)

        await running.wait_for(SessionClosed, closed_before + 3)
    return traffic


#: The policy ``dovecot_workload`` expects: LAST is refused, NOOP once a minute.
WORKLOAD_POLICY = parse_policy({
    "rules": [
        {"name": "no-last", "match": {"commands": ["LAST"]}, "action": "deny"},
        {"name": "noop-limit", "match": {"commands": ["NOOP"]}, "action": "rate_limit",
         "limit": "1/minute", "per": "user"},
    ],
})


Key = tuple[str, tuple[tuple[str, str], ...]]


def _commands(**counts: tuple[int, int, int]) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for verb, (ok, err, denied) in counts.items():
        for outcome, n in (("ok", ok), ("err", err), ("denied", denied)):
            if n:
                out[key("popproxy_commands_total", command=verb, outcome=outcome)] = float(n)
        forwarded = ok + err
        if forwarded:
            out[key("popproxy_command_duration_seconds_count", command=verb)] = float(forwarded)
    return out


#: Exactly what ``dovecot_workload`` moves, apart from the byte counters,
#: histogram buckets and sums (timings) and the session-duration histogram.
WORKLOAD_DELTAS: Mapping[tuple[str, tuple[tuple[str, str], ...]], float] = {
    **_commands(
        STAT=(1, 0, 1),
        USER=(2, 0, 1),
        PASS=(1, 1, 0),
        QUIT=(2, 0, 0),
        LIST=(1, 0, 0),
        UIDL=(1, 0, 0),
        RETR=(1, 1, 0),
        TOP=(1, 0, 0),
        DELE=(4, 0, 0),
        RSET=(1, 0, 0),
        NOOP=(1, 0, 1),
        LAST=(0, 0, 1),
        AUTH=(1, 0, 0),
        XCLIENT=(0, 0, 1),
        OTHER=(0, 0, 2),  # XYZZY (the built-in allow-list), "!!" (malformed)
    ),
    key("popproxy_policy_decisions_total", rule="builtin:command-allowlist", action="deny",
        enforced="true"): 1,
    key("popproxy_policy_decisions_total", rule="no-last", action="deny", enforced="true"): 1,
    key("popproxy_policy_decisions_total", rule="noop-limit", action="rate_limit",
        enforced="true"): 1,
    key("popproxy_auth_total", mechanism="USER", outcome="ok"): 1,
    key("popproxy_auth_total", mechanism="USER", outcome="fail"): 1,
    key("popproxy_auth_total", mechanism="PLAIN", outcome="ok"): 1,
    key("popproxy_sessions_total", outcome="ok"): 2,
    key("popproxy_sessions_total", outcome="client_closed"): 1,
    key("popproxy_messages_retrieved_total", kind="retr"): 1,
    key("popproxy_messages_retrieved_total", kind="top"): 1,
    key("popproxy_messages_deleted_total", phase="marked"): 4,
    key("popproxy_messages_deleted_total", phase="reset"): 2,
    key("popproxy_messages_deleted_total", phase="committed"): 1,
    key("popproxy_messages_deleted_total", phase="uncommitted"): 1,
    key("popproxy_protocol_anomalies_total", side="client", kind="malformed-line"): 1,
    key("popproxy_upstream_connect_duration_seconds_count"): 3,
    key("popproxy_session_duration_seconds_count"): 3,
}

def is_timing(k: tuple[str, tuple[tuple[str, str], ...]]) -> bool:
    """Samples whose change is timing or probing, not counting."""
    name = k[0]
    return name.endswith(("_bucket", "_sum")) or name in (
        "popproxy_config_last_reload_success_timestamp_seconds",
        "popproxy_upstream_up",
    )
