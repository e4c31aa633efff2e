"""Start a popproxy in the test's own trio run, on 127.0.0.1 port 0."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import pytest
import trio

from popproxy.app import App, build
from popproxy.audit import AuditConfig
from popproxy.config import Config, HostPort, LimitsConfig, ListenConfig, UpstreamConfig
from popproxy.events import Event
from popproxy.observe import SessionInfo
from popproxy.policy.config import PolicyConfig
from popproxy.server import Proxy, serve

E = TypeVar("E", bound=Event)


@dataclass
class RunningProxy:
    host: str
    port: int
    proxy: Proxy
    app: App
    events: list[tuple[SessionInfo, Event]] = field(default_factory=list)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    _changed: trio.Event = field(default_factory=trio.Event)

    def observe(self, info: SessionInfo, event: Event) -> None:
        self.events.append((info, event))
        self._changed.set()

    def of_type(self, kind: type[E]) -> list[E]:
        return [e for _, e in self.events if isinstance(e, kind)]

    async def wait_for(self, kind: type[Event], count: int = 1) -> None:
        """Wait until ``count`` events of ``kind`` were observed."""
        while len(self.of_type(kind)) < count:
            self._changed = trio.Event()
            await self._changed.wait()


async def start_proxy(
    nursery: trio.Nursery,
    upstream: HostPort,
    limits: LimitsConfig | None = None,
    upstream_config: UpstreamConfig | None = None,
    policy: PolicyConfig | None = None,
    listener: ListenConfig | None = None,
    audit: AuditConfig | None = None,
) -> RunningProxy:
    """Run the proxy as ``popproxy run`` assembles it (``app.build``), with
    an extra observer that records every event; returns once it listens."""
    config = Config(
        listeners=(listener or ListenConfig((HostPort("127.0.0.1", 0),)),),
        upstream=upstream_config or UpstreamConfig(address=upstream),
        limits=limits or LimitsConfig(),
        policy=policy or PolicyConfig(),
        audit=audit or AuditConfig(),
    )
    return await start_proxy_config(nursery, config)


async def start_proxy_config(nursery: trio.Nursery, config: Config) -> RunningProxy:
    """``start_proxy`` for a whole ``Config`` (routed mode, say)."""
    app = build(config)
    running = RunningProxy("127.0.0.1", 0, app.proxy, app=app)
    running.proxy.observers.append(running.observe)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    running.port = listeners[0].socket.getsockname()[1]

    async def run(
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with running.cancel_scope:
            await serve(running.proxy, listeners, task_status=task_status)

    await nursery.start(run)
    return running


@pytest.fixture
async def demo_upstream(nursery: trio.Nursery) -> HostPort:
    """The built-in demo mailbox server, fresh sample mail for each test."""
    from popproxy.demo import MailStore, serve_demo

    listeners = await nursery.start(serve_demo, MailStore.load_samples(), "127.0.0.1", 0)
    return HostPort("127.0.0.1", listeners[0].socket.getsockname()[1])


@pytest.fixture
async def demo_proxy(nursery: trio.Nursery, demo_upstream: HostPort) -> RunningProxy:
    return await start_proxy(nursery, demo_upstream)
