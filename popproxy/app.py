"""Assembles a running popproxy from a ``Config``.

The proxy, its observers (logs, audit, metrics), the policy engine, the
metrics endpoint and configuration reload are put together here and nowhere
else, so ``popproxy run``, ``popproxy demo`` and the tests run the same thing.
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import structlog
import trio
from prometheus_client import CollectorRegistry

from .addr import HostPort
from .audit import AuditConfig, open_audit, previous_run, worker_path
from .config import Config, ConfigError, load_config
from .endpoint import serve_metrics
from .events import Event, SessionClosed
from .logs import log_observer
from .metrics import Metrics
from .observe import SessionInfo, listens_to
from .policy import Deny
from .policy.engine import BUILTIN_RULE_NAMES, SwitchablePolicy
from .policy.shared import SharedEngine, engine_for
from .routing import AuthHttpClient, Router, UserMap, load_map_file
from .server import ListenerGroup, Proxy, serve
from .state import StateError, open_state
from .state.client import StateClient
from .tls import TLSContexts, check_files

__all__ = ["App", "build", "load", "reload", "run", "user_map"]

logger = structlog.get_logger("popproxy.app")


@dataclass
class App:
    proxy: Proxy
    metrics: Metrics
    policy: SwitchablePolicy
    # Routed mode: the auth_http client (closed when ``run`` ends).
    hook: AuthHttpClient | None = None
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
    user_map(config)  # a bad map file is a configuration error too
    return config


def user_map(config: Config) -> UserMap | None:
    """Read ``routing.map_file``, if any; ``MapFileError`` names file and line.

    The last map read is kept and used again while the file is unchanged
    (same size and modification time): a reload validates the file and
    then installs it without reading 100,000 lines twice.
    """
    routing = config.routing
    if routing is None or routing.map_file is None:
        return None
    names = frozenset(u.name for u in config.upstreams)
    try:
        st = os.stat(routing.map_file)
    except OSError:
        return load_map_file(routing.map_file, names)  # raises, naming the file
    key = (str(routing.map_file), st.st_mtime_ns, st.st_size, names)
    cached = _last_map.get(key)
    if cached is None:
        cached = load_map_file(routing.map_file, names)
        _last_map.clear()
        _last_map[key] = cached
    return cached


_last_map: dict[tuple[str, int, int, frozenset[str]], UserMap] = {}


def build(config: Config, registry: CollectorRegistry | None = None) -> App:
    """A proxy with policy and the log and metrics observers attached
    (and, in routed mode, its router)."""
    policy = SwitchablePolicy(engine_for(config.policy, config.state.backend,
                                         config.state.on_error))
    proxy = Proxy(config, observers=[log_observer], policy=policy)
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    _announce_rules(metrics, config)
    hook: AuthHttpClient | None = None
    if config.routing is not None:
        hook = AuthHttpClient()  # the router gives it its settings
        proxy.router = Router(config.routing, user_map(config), hook,
                              observer=metrics.route_lookup)
    proxy.pools_for(config)
    proxy.observers.append(metrics.observe)
    proxy.admission.append(lambda peer: policy.current.admit_client(peer))

    @listens_to(SessionClosed)
    def session_counts(info: SessionInfo, event: Event) -> None:
        if isinstance(event, SessionClosed):
            policy.current.session_ended(info.client, info.user)

    proxy.observers.append(session_counts)
    return App(proxy, metrics, policy, hook)


def reload(app: App, load: Callable[[], Config]) -> bool:
    """Swap in a new configuration; on any error keep the old one.

    Reloadable: policy (rules, mode, protections), limits and listener
    settings (certificates are read again) for new sessions and commands.
    Rate-limit state survives for rules whose name did not change.  Listen
    and upstream addresses, [audit], [metrics] and [state] need a restart.
    """
    old = app.proxy.config
    try:
        new = load()
    except ConfigError as exc:
        logger.error("config.reload_failed", error=str(exc))
        app.metrics.config_reload(False)
        app._count_reload()
        return False
    if (new.routing is None) != (old.routing is None):
        logger.error("config.reload_failed",
                     error="routing: switching between routed and transparent mode "
                           "needs a restart")
        app.metrics.config_reload(False)
        app._count_reload()
        return False
    if [lc.addresses for lc in new.listeners] != [lc.addresses for lc in old.listeners] or (
        new.routing is None and new.upstream.address != old.upstream.address
    ):
        logger.warning("config.reload_partial",
                       detail="listen and upstream addresses change after a restart")
        new = replace(new, upstream=replace(new.upstream, address=old.upstream.address))
    router = app.proxy.router
    if new.routing is not None and router is not None:
        # Routed mode: upstreams, rules and the map apply to new logins; a
        # bad map file keeps the old configuration, as a bad file does.
        try:
            router.reload(new.routing, user_map(new))
        except (ConfigError, ValueError) as exc:
            logger.error("config.reload_failed", error=str(exc))
            app.metrics.config_reload(False)
            app._count_reload()
            return False
        app.proxy.pools_for(new)
    if new.state != old.state:
        # The connection to the shared state, and which engine asks it, are
        # made at start: a live session may hold leases in the old one.
        logger.warning("config.reload_partial",
                       detail="[state] changes take effect after a restart")
        new = replace(new, state=old.state)
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
    audit_config = _worker_audit(config.audit, worker)
    trail = open_audit(audit_config, app.metrics, worker=worker)
    if trail is not None:
        # proxy.start, and the crash trace of a previous run that ended
        # uncleanly, before the first session.
        trail.start(previous_run(audit_config))
        # First: a session's records are written before the other observers
        # (logs, metrics) report it closed.
        app.proxy.observers.insert(0, trail.observe)
        app.proxy.admission.append(lambda peer: trail.refusal())
        app.proxy.refusals.append(lambda: trail.refusing)
    # Everything built so far lives as long as the process: keep it out of
    # the cyclic garbage collector's scans, which otherwise grow with it and
    # run every few hundred allocations on the per-command path.
    gc.freeze()
    try:
        async with app.hook or _nothing(), _shared_state(app) as state, \
                trio.open_nursery() as nursery:
            if state is not None:
                await nursery.start(state.maintain)
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


def _worker_audit(audit: AuditConfig, worker: int | None) -> AuditConfig:
    """Worker N's audit settings: a chain of its own in files of its own
    (``audit.w2.jsonl``, and ``audit.w2.checkpoints`` for the copies)."""
    if worker is None:
        return audit
    return replace(
        audit,
        path=worker_path(audit.path, worker) if audit.path is not None else None,
        checkpoint_path=(worker_path(audit.checkpoint_path, worker)
                         if audit.checkpoint_path is not None else None),
    )


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


@asynccontextmanager
async def _shared_state(app: App) -> AsyncIterator[StateClient | None]:
    """With ``[state] backend = "redis"``: connect, and let the policy's
    questions reach it (``Proxy.state``) and the per-IP cap be asked as a
    gate.  Nothing with ``memory``: the engine then counts in-process."""
    config = app.proxy.config.state
    if config.backend == "memory":
        yield None
        return
    try:
        async with open_state(config) as backend:
            client = StateClient(backend, lease_time=config.lease_time,
                                 errors=app.metrics.state_error)
            app.proxy.state = client
            policy = app.policy

            async def per_ip_cap(info: SessionInfo) -> str | None:
                engine = policy.current
                ask = engine.client_lease(info.client) if isinstance(engine, SharedEngine) else None
                if ask is None:
                    return None
                decision = await client.decide(ask, info.id)
                if isinstance(decision, Deny):
                    return decision.reply.removeprefix(b"-ERR [SYS/TEMP] ").rstrip().decode()
                return None

            app.proxy.gates.append(per_ip_cap)
            logger.info("state.ready", backend=config.backend, url=config.redacted_url,
                        on_error=config.on_error)
            try:
                yield client
            finally:
                app.proxy.gates.remove(per_ip_cap)
                app.proxy.state = None
    except StateError as exc:
        # Cannot even set the client up (a bad TLS setting, say): the
        # proxy must not start half-configured.
        raise ConfigError(f"state.url: {exc.reason}") from None


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
            # Reading files (the configuration, certificates, a map of
            # 100,000 lines) happens in a thread, not in the sessions' loop.
            loaded = await trio.to_thread.run_sync(_attempt, load)
            reload(app, partial(_outcome, loaded))


def _attempt(load: Callable[[], Config]) -> Config | ConfigError:
    try:
        return load()
    except ConfigError as exc:
        return exc


def _outcome(loaded: Config | ConfigError) -> Config:
    if isinstance(loaded, ConfigError):
        raise loaded
    return loaded
