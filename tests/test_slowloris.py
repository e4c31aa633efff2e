"""Slowloris against the proxy in front of real Dovecot (issue 17, item 4).

300 connections on loopback each dribble a byte a second and never finish a
line; meanwhile a real client (Python's poplib) logs in through the proxy
and retrieves a message.  The dribblers hold their session slots (they are
within ``limits.max_unauthenticated``); the real login must not wait behind
them, and the accounting of sessions not logged in must hold at that scale.
``benchmarks/slowloris_bench.py`` times the same thing with the proxy in its
own process, for the README's figures.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from benchmarks._procs import dovecot_extra_config, raise_fd_limit
from benchmarks.slowloris_bench import Dribblers, real_login
from popproxy.config import HostPort, LimitsConfig
from popproxy.events import EndReason, SessionClosed
from popproxy.policy.config import PolicyConfig, Protections
from tests.dovecot import SAMPLE_MESSAGES, Dovecot
from tests.dovecot_fixtures import running_dovecot
from tests.proxy_fixtures import start_proxy

DRIBBLERS = 300


@pytest.fixture(scope="module")
def roomy_dovecot(dovecot_available: None) -> Iterator[Dovecot]:
    """A Dovecot whose login processes take a few hundred connections (every
    dribbler is a pop3-login connection upstream, in transparent mode)."""
    raise_fd_limit(4 * DRIBBLERS + 1024)
    with running_dovecot(lambda: Dovecot(extra_config=dovecot_extra_config(DRIBBLERS + 64)),
                         " for the slowloris test") as server:
        yield server


async def test_a_real_login_gets_through_300_dribbling_connections(
    nursery: trio.Nursery, roomy_dovecot: Dovecot
) -> None:
    expected = roomy_dovecot.reset_mailbox("alice", SAMPLE_MESSAGES)[0]
    running = await start_proxy(
        nursery, HostPort("127.0.0.1", roomy_dovecot.port), LimitsConfig(max_sessions=1000),
        policy=PolicyConfig(protections=Protections(max_sessions_per_ip=2000)))
    proxy = running.proxy
    crowd = Dribblers(running.host, running.port, DRIBBLERS)
    with trio.fail_after(120):
        async with trio.open_nursery() as dribbling:
            await crowd.open(dribbling)
            assert (crowd.greeted, crowd.refused, crowd.first_refusal) == (DRIBBLERS, 0, b"")
            assert proxy.unauthenticated == DRIBBLERS
            login = await trio.to_thread.run_sync(
                real_login, running.host, running.port, "alice", roomy_dovecot.users["alice"])
            # The real session came and went; every dribbler is still held,
            # still counted as not logged in.
            await running.wait_for(SessionClosed)
            (closed,) = running.of_type(SessionClosed)
            assert crowd.closed == 0
            assert (proxy.active, proxy.unauthenticated) == (DRIBBLERS, DRIBBLERS)
            dribbling.cancel_scope.cancel()
    assert login.message == expected
    # Generous: on an idle machine it is a few ms; this only catches a login
    # that waited behind the dribblers (seconds).
    assert login.login < 5.0, login
    assert closed.reason is EndReason.QUIT
