"""Metrics through real sessions: popproxy in front of a real Dovecot, read over HTTP.

Every sample in the exposition is compared before and after a fixed
workload; the ones that changed must be exactly the ones the workload
explains, by exactly the amounts it explains (``WORKLOAD_DELTAS`` and the
octets the client itself counted).
"""

from __future__ import annotations

import pytest
import trio

from popproxy.config import HostPort
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox
from tests.proxy_fixtures import start_proxy
from tests.test_metrics_support import (
    WORKLOAD_DELTAS,
    WORKLOAD_POLICY,
    delta,
    dovecot_workload,
    http_get,
    is_timing,
    key,
    scrape,
    start_metrics,
)

pytestmark = pytest.mark.dovecot


async def test_counters_move_by_exactly_what_happened(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    running = await start_proxy(
        nursery, HostPort(dovecot.host, dovecot.port), policy=WORKLOAD_POLICY
    )
    endpoint = await start_metrics(nursery, running)
    before = await scrape(endpoint.address)

    traffic = await dovecot_workload(running, mailbox.user, dovecot.users[mailbox.user])
    after = await scrape(endpoint.address)

    changed = {k: v for k, v in delta(before, after).items() if not is_timing(k)}
    # Upstream octets: what the proxy forwarded each way.  The workload's
    # denied commands never go up, and the proxy answers some replies itself.
    up_tx = changed.pop(key("popproxy_bytes_total", direction="upstream_tx"))
    up_rx = changed.pop(key("popproxy_bytes_total", direction="upstream_rx"))
    assert 0 < up_tx < traffic.sent
    assert 0 < up_rx < traffic.received
    expected = {
        **WORKLOAD_DELTAS,
        key("popproxy_bytes_total", direction="client_rx"): traffic.sent,
        key("popproxy_bytes_total", direction="client_tx"): traffic.received,
    }
    assert changed == expected
    assert after[key("popproxy_sessions_active")] == 0
    # What the mailbox says agrees: of 4 messages, QUIT committed one deletion
    # and the session without QUIT committed none.
    assert dovecot.message_count(mailbox.user) == 3


async def test_sessions_active_while_a_session_is_open(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    running = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port))
    endpoint = await start_metrics(nursery, running)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(running.host, running.port)
        assert (await stream.receive_some(4096)).startswith(b"+OK")
        samples = await scrape(endpoint.address)
        assert samples[key("popproxy_sessions_active")] == 1
        assert samples[key("popproxy_upstream_connect_duration_seconds_count")] == 1
        # Ready: listening, and Dovecot accepts connections.
        ready = await http_get(endpoint.address, "/readyz")
        assert (ready.status, ready.body) == (200, "ready\n")
        assert samples[key("popproxy_upstream_up", upstream="default",
                           address=f"{dovecot.host}:{dovecot.port}")] == 1
        await stream.aclose()
