"""Assembles a running popproxy from a ``Config``.

The proxy, its observers (logs, audit, metrics), the policy engine, the
metrics endpoint and configuration reload are put together here and nowhere
else, so ``popproxy run``, ``popproxy demo`` and the tests run the same thing.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
import trio
from prometheus_client import CollectorRegistry

from .addr import HostPort
from .audit import open_audit
from .config import Config, ConfigError, load_config
from .endpoint import serve_metrics
from .events import Event, SessionClosed
from .logs import log_observer
from .metrics import Metrics
from .observe import SessionInfo, listens_to
from .policy.engine import BUILTIN_RULE_NAMES, PolicyEngine, SwitchablePolicy
from .server import ListenerGroup, Proxy, serve
from .tls import TLSContexts, check_files

__all__ = ["App", "build", "load", "reload", "run"]

logger = structlog.get_logger("popproxy.app")


@dataclass
class App:
    proxy: Proxy
    metrics: Metrics
    policy: SwitchablePolicy
    reloads: int = 0  # attempts, successful or not
    metrics_address: HostPort | None = None  # where /metrics answers, once started
    _reloaded: trio.Event = field(default_factory=trio.Event)

    def _count_reload(self) -> None:
        self.reloads += 1
        self._reloaded.set()
        self._reloaded = trio.Event()

    async def wait_for_reloads(self, count: int) -> None:
        """Wait until ``count`` reloads were attempted (for tests and tools)."""
        while self.reloads < count:
            await self._reloaded.wait()


def load(path: str | Path) -> Config:
    """Read a configuration file and the TLS files it names.

    ``ConfigError`` names the file or the key; ``popproxy run``,
    ``check-config`` and SIGHUP reloads all read a file this way.
    """
    config = load_config(path)
    check_files(config)
    return config


def build(config: Config, registry: CollectorRegistry | None = None) -> App:
    """A proxy with policy and the log and metrics observers attached."""
    policy = SwitchablePolicy(PolicyEngine(config.policy))
    proxy = Proxy(config, observers=[log_observer], policy=policy)
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    _announce_rules(metrics, config)
    proxy.observers.append(metrics.observe)
    proxy.admission.append(lambda peer: policy.current.admit_client(peer))

    @listens_to(SessionClosed)
    def session_counts(info: SessionInfo, event: Event) -> None:
        if isinstance(event, SessionClosed):
            policy.current.session_ended(info.client, info.user)

    proxy.observers.append(session_counts)
    return App(proxy, metrics, policy)


def reload(app: App, load: Callable[[], Config]) -> bool:
    """Swap in a new configuration; on any error keep the old one.

    Reloadable: policy (rules, mode, protections), limits and listener
    settings (certificates are read again) for new sessions and commands.
    Rate-limit state survives for rules whose name did not change.  Listen
    and upstream addresses, [audit] and [metrics] need a restart.
    """
    old = app.proxy.config
    try:
        new = load()
    except ConfigError as exc:
        logger.error("config.reload_failed", error=str(exc))
        app.metrics.config_reload(False)
        app._count_reload()
        return False
    if [lc.addresses for lc in new.listeners] != [lc.addresses for lc in old.listeners] or (
        new.upstream.address != old.upstream.address
    ):
        logger.warning("config.reload_partial",
                       detail="listen and upstream addresses change after a restart")
        new = replace(new, upstream=replace(new.upstream, address=old.upstream.address))
    if new.server != old.server:
        logger.warning("config.reload_partial",
                       detail="[server] workers change after a restart")
        new = replace(new, server=old.server)
    if new.audit != old.audit or new.metrics != old.metrics:
        # The audit trail tracks every live session (marks, retrievals) to
        # write its records; swapping it under them would lose that, so
        # audit and metrics settings change at the next restart.
        logger.warning("config.reload_partial",
                       detail="[audit] and [metrics] changes take effect after a restart")
        new = replace(new, audit=old.audit, metrics=old.metrics)
    app.policy.current = app.policy.current.reloaded(new.policy)
    _announce_rules(app.metrics, new)
    app.proxy.config = new
    # Certificates are read again for the next handshake.
    app.proxy.tls = TLSContexts()
    logger.info("config.reloaded", rules=len(new.policy.rules), mode=new.policy.mode)
    app.metrics.config_reload(True)
    app._count_reload()
    return True


async def run(
    config: Config,
    listeners: Sequence[trio.SocketListener] | Sequence[ListenerGroup] | None = None,
    *,
    config_path: str | Path | None = None,
    registry: CollectorRegistry | None = None,
    app: App | None = None,
    worker: int | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM (drain) or SIGINT; SIGHUP reloads ``config_path``.

    Pass ``app`` (from ``build``) to keep a handle on the running parts.
    ``worker``: this process is worker number ``worker`` of ``popproxy run``
    with ``[server] workers > 1`` (``popproxy.worker``): it writes its own
    audit file, and the supervisor, not this process, serves ``[metrics]``.
    """
    app = app or build(config, registry)
    trail = open_audit(config.audit, app.metrics, worker=worker)
    if trail is not None:
        # First: a session's records are written before the other observers
        # (logs, metrics) report it closed.
        app.proxy.observers.insert(0, trail.observe)
        app.proxy.admission.append(lambda peer: trail.refusal())
    # Everything built so far lives as long as the process: keep it out of
    # the cyclic garbage collector's scans, which otherwise grow with it and
    # run every few hundred allocations on the per-command path.
    gc.freeze()
    try:
        async with trio.open_nursery() as nursery:
            if trail is not None:
                # Audit records wait up to 10 ms and are written together
                # (see popproxy.audit._trail).
                await nursery.start(trail.write_behind)
            if config.metrics.address is not None and worker is None:
                app.metrics_address = await nursery.start(
                    serve_metrics, config.metrics, app.metrics, app.proxy)
            if config_path is not None:
                path = config_path
                nursery.start_soon(_reload_on_sighup, app, lambda: load(path))
            await serve(app.proxy, listeners, task_status=task_status)
            nursery.cancel_scope.cancel()
    finally:
        if trail is not None:
            trail.close()


def _announce_rules(metrics: Metrics, config: Config) -> None:
    """Create every rule's series at zero, so rate() sees its first decision."""
    metrics.policy_rules(
        [(r.name, r.action) for r in config.policy.rules]
        + [(name, "deny") for name in BUILTIN_RULE_NAMES],
        enforced=config.policy.mode == "enforce",
    )


async def _reload_on_sighup(app: App, load: Callable[[], Config]) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            reload(app, load)
