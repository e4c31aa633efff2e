"""Shared limits end to end: proxies in front of real Dovecot sharing a real
redis-server, clients on Python's poplib.

Each proxy here is a whole ``app.run`` (its own engine, its own connection
to Redis), two of them in this test's process; tests/test_workers.py and
tests/test_shared_state_processes.py do the same with worker processes and
separate ``popproxy run`` processes.
"""

from __future__ import annotations

import poplib
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from popproxy.app import App, build, run
from popproxy.config import Config, parse_config
from popproxy.events import Event, SessionClosed
from popproxy.observe import SessionInfo
from popproxy.state.redis import RedisState
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox, MailboxFactory
from tests.redis_server import RedisServer

RETR_5 = {"name": "retr-5", "match": {"commands": ["RETR"]}, "action": "rate_limit",
          "limit": "5/minute", "per": "user"}


def config(dovecot: Dovecot, redis: RedisServer, prefix: str, *, rules: tuple[Any, ...] = (),
           on_error: str = "local", metrics: bool = False, **protections: Any) -> Config:
    raw: dict[str, Any] = {
        "listen": {"address": "127.0.0.1:0"},
        "upstream": {"address": f"{dovecot.host}:{dovecot.port}"},
        "policy": {"rules": list(rules), "protections": protections},
        "state": {"backend": "redis", "url": redis.url, "key_prefix": prefix,
                  "timeout": "250ms", "on_error": on_error, "lease_time": "3s"},
    }
    if metrics:
        raw["metrics"] = {"address": "127.0.0.1:0"}
    return parse_config(raw)


@dataclass
class Running:
    app: App
    port: int
    scope: trio.CancelScope
    closed: int = 0  # sessions ended (after their leases went back)
    _closed_event: trio.Event = field(default_factory=trio.Event)

    def observe(self, info: SessionInfo, event: Event) -> None:
        if isinstance(event, SessionClosed):
            self.closed += 1
            self._closed_event.set()
            self._closed_event = trio.Event()

    async def wait_closed(self, count: int) -> None:
        while self.closed < count:
            await self._closed_event.wait()

    @property
    def metrics_url(self) -> str:
        address = self.app.metrics_address
        assert address is not None
        return f"http://{address.host}:{address.port}"


async def start(nursery: trio.Nursery, cfg: Config) -> Running:
    app = build(cfg, CollectorRegistry())
    scope = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
        with scope:
            await run(cfg, app=app, task_status=task_status)

    running = Running(app, 0, scope)
    app.proxy.observers.append(running.observe)
    listeners = await nursery.start(serve)
    running.port = listeners[0].socket.getsockname()[1]
    return running


def retr_once(port: int, user: str, password: str) -> str:
    """Log in, RETR 1, QUIT: "ok", or the server's error line."""
    p = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        p.user(user)
        p.pass_(password)
        try:
            p.retr(1)
        except poplib.error_proto as exc:
            return str(exc.args[0].decode())
        p.quit()
        return "ok"
    finally:
        p.close()


def log_in(port: int, user: str, password: str) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", port, timeout=20)
    p.user(user)
    p.pass_(password)
    return p


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def readyz(url: str) -> str:
    return str(urllib.request.urlopen(url + "/readyz", timeout=10).read().decode())


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(partial(fn, *args))


async def test_five_retr_a_minute_hold_across_two_proxies(
    nursery: trio.Nursery, dovecot: Dovecot, redis_server: RedisServer, redis_prefix: str,
    mailbox: Mailbox,
) -> None:
    cfg = config(dovecot, redis_server, redis_prefix, rules=(RETR_5,))
    proxies = [await start(nursery, cfg) for _ in range(2)]
    with trio.fail_after(120):
        results = [await in_thread(retr_once, proxies[i % 2].port, mailbox.user,
                                   dovecot.users[mailbox.user]) for i in range(12)]
    assert results.count("ok") == 5
    assert [r == "ok" for r in results[:5]] == [True] * 5
    assert all(r.startswith("-ERR [SYS/TEMP] rate limit exceeded") for r in results[5:])
    # Both proxies served; each had its own count: 6 and 6 connections.
    state = [p.app.proxy.state for p in proxies]
    assert all(s is not None and s.state.calls["take"] == 6 for s in state)


async def test_two_sessions_per_user_across_two_proxies(
    nursery: trio.Nursery, dovecot: Dovecot, redis_server: RedisServer, redis_prefix: str,
    mailbox: Mailbox,
) -> None:
    cfg = config(dovecot, redis_server, redis_prefix, max_sessions_per_user=2)
    a, b = [await start(nursery, cfg) for _ in range(2)]
    with trio.fail_after(60):
        first = await in_thread(log_in, a.port, mailbox.user, dovecot.users[mailbox.user])
        second = await in_thread(log_in, b.port, mailbox.user, dovecot.users[mailbox.user])
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\] too many sessions"):
            await in_thread(log_in, a.port, mailbox.user, dovecot.users[mailbox.user])
        await in_thread(first.quit)
        # The slot goes back as the session ends: a new login gets it.
        await a.wait_closed(2)  # the first session, and the refused one
        third = await in_thread(log_in, b.port, mailbox.user, dovecot.users[mailbox.user])
        for p in (second, third):
            await in_thread(p.quit)


async def test_redis_frozen_then_back_local(
    nursery: trio.Nursery, dovecot: Dovecot, private_redis: RedisServer, redis_prefix: str,
    fresh_mailbox: MailboxFactory,
) -> None:
    """``on_error = "local"``: with Redis frozen, sessions go on, each call
    giving up after the timeout; counted, logged, /readyz says degraded; once
    Redis is back the shared limit applies again without a restart."""
    box = fresh_mailbox("alice")
    cfg = config(dovecot, private_redis, redis_prefix, rules=(RETR_5,), metrics=True,
                 max_sessions_per_user=2)
    proxy = await start(nursery, cfg)
    password = dovecot.users[box.user]
    state = proxy.app.proxy.state
    assert state is not None
    with trio.fail_after(120):
        assert await in_thread(retr_once, proxy.port, box.user, password) == "ok"
        await proxy.wait_closed(1)  # its lease is back: nothing in flight
        assert (await in_thread(readyz, proxy.metrics_url)).startswith("ready")
        private_redis.pause()
        try:
            began = time.monotonic()
            assert await in_thread(retr_once, proxy.port, box.user, password) == "ok"
            took = time.monotonic() - began
            ready = await in_thread(readyz, proxy.metrics_url)
            errors = await in_thread(metric, proxy.metrics_url, "popproxy_state_errors_total")
        finally:
            private_redis.resume()
        # The first call waits out the timeout (250 ms); the circuit then
        # answers the session's other calls at once.
        assert took < 0.25 * 3 + 1.0
        assert ready.startswith("degraded: shared state (redis) failing")
        assert errors >= 1
        # Back: once the circuit's short wait is over, Redis is asked again,
        # and its count, where one RETR was made before, admits exactly four
        # more.  (Until then this process's own count decides.)
        await trio.sleep(redis_of(proxy).retry_in())
        asked_redis: list[str] = []
        for _ in range(6):
            asked = state.state.calls["take"]
            asked_redis.append(await in_thread(retr_once, proxy.port, box.user, password))
            assert state.state.calls["take"] == asked + 1
        assert [r == "ok" for r in asked_redis] == [True] * 4 + [False] * 2
        assert asked_redis[-1].startswith("-ERR [SYS/TEMP] rate limit exceeded")
        assert not state.health().degraded
        assert (await in_thread(readyz, proxy.metrics_url)).startswith("ready")


async def test_redis_frozen_deny(
    nursery: trio.Nursery, dovecot: Dovecot, private_redis: RedisServer, redis_prefix: str,
    fresh_mailbox: MailboxFactory,
) -> None:
    """``on_error = "deny"``: what needs the shared state is refused within
    the timeout (here the connection itself: the per-IP cap is shared), and
    nothing hangs; once Redis is back, sessions are served again."""
    box = fresh_mailbox("alice")
    password = dovecot.users[box.user]
    cfg = config(dovecot, private_redis, redis_prefix, rules=(RETR_5,), on_error="deny")
    proxy = await start(nursery, cfg)
    with trio.fail_after(60):
        private_redis.pause()
        try:
            began = time.monotonic()
            refused = await in_thread(attempt, proxy.port, box.user, password)
            took = time.monotonic() - began
        finally:
            private_redis.resume()
        assert refused == "-ERR [SYS/TEMP] service temporarily unavailable, try again later"
        assert took < 0.25 + 1.0
        await trio.sleep(redis_of(proxy).retry_in())  # the circuit's short wait
        assert await in_thread(attempt, proxy.port, box.user, password) == "ok"


def redis_of(proxy: Running) -> RedisState:
    state = proxy.app.proxy.state
    assert state is not None
    assert isinstance(state.state, RedisState)
    return state.state


def attempt(port: int, user: str, password: str) -> str:
    """``retr_once``, with a refused connection or login as its error line."""
    try:
        return retr_once(port, user, password)
    except poplib.error_proto as exc:
        return str(exc.args[0].decode())
