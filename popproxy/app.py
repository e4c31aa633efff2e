"""Assembles a running popproxy from a ``Config``.

The proxy, its observers (logs, audit, metrics) and the metrics endpoint
are put together here and nowhere else, so ``popproxy run``, ``popproxy
demo`` and the tests run the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
from prometheus_client import CollectorRegistry

from .audit import open_audit
from .config import Config
from .logs import log_observer
from .metrics import Metrics, serve_metrics
from .server import Proxy, serve

__all__ = ["build_proxy", "run"]


def build_proxy(config: Config, registry: CollectorRegistry | None = None) -> tuple[Proxy, Metrics]:
    """A proxy with the log, audit and metrics observers attached."""
    proxy = Proxy(config, observers=[log_observer])
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    proxy.observers.append(metrics.observe)
    return proxy, metrics


async def run(
    config: Config,
    listeners: Sequence[trio.SocketListener] | None = None,
    *,
    registry: CollectorRegistry | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM (drain) or SIGINT; audit records are flushed at the end."""
    proxy, metrics = build_proxy(config, registry)
    trail = open_audit(config.audit, metrics)
    if trail is not None:
        proxy.observers.append(trail.observe)
        proxy.admission.append(trail.refusal)
    try:
        async with trio.open_nursery() as nursery:
            if config.metrics.address is not None:
                await nursery.start(serve_metrics, config.metrics, metrics, proxy)
            await serve(proxy, listeners, task_status=task_status)
            nursery.cancel_scope.cancel()
    finally:
        if trail is not None:
            trail.close()
