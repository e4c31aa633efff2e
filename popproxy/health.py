"""Liveness and readiness, answered from the metrics HTTP thread.

``/healthz`` (liveness) says the process is alive *and its event loop
runs*: ``serve_metrics`` beats a heartbeat from the trio loop every second,
and a heartbeat older than ``stale_after`` means the loop is stuck (a
blocking call, a deadlock), which a restart would cure.

``/readyz`` (readiness) says the proxy can take sessions: its listeners
accept (``Proxy.listening``, false while draining), it does not refuse
every new session (``refusing``: the audit's ``fail_closed`` while the
trail fails, or ``limits.max_sessions`` reached), and the upstream (in
routed mode: ``routing.default``'s, else the first named one) has an address
that accepts a TCP connection.  While the shared state (``[state] backend =
"redis"``) fails, it answers 200 with a body starting "degraded:".
Every address of every upstream is probed for
``popproxy_upstream_up{upstream,address}``, which is 0 also while a
session's failed connect has the address marked down in the pool.  The
probes run on the HTTP thread with a short timeout and their results are
cached for a few seconds, so a burst of probes or scrapes does not turn
into a burst of connections to the mail server, and nothing here ever
touches the trio loop.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Final, Protocol

from .addr import HostPort
from .config import Config

__all__ = ["Health", "ProxyStatus", "degraded", "refusing", "tcp_probe"]

PROBE_TIMEOUT: Final = 1.0
CACHE_SECONDS: Final = 5.0
STALE_AFTER: Final = 30.0

Probe = Callable[[str, int, float], "str | None"]


def tcp_probe(host: str, port: int, timeout: float) -> str | None:
    """Open and close a TCP connection: None if it worked, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


class Marks(Protocol):
    """The pools' down marks (``routing.Pools``)."""

    def is_up(self, upstream: str, address: HostPort) -> bool: ...


class ProxyStatus(Protocol):
    """What health needs to know of the running proxy (``server.Proxy``)."""

    @property
    def config(self) -> Config: ...

    @property
    def listening(self) -> bool: ...

    @property
    def pools(self) -> Marks | None: ...


class Health:
    """Health of one proxy.  Thread-safe; the clock and probe are injectable."""

    def __init__(
        self,
        proxy: ProxyStatus,
        *,
        probe: Probe = tcp_probe,
        probe_timeout: float = PROBE_TIMEOUT,
        cache_seconds: float = CACHE_SECONDS,
        stale_after: float = STALE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proxy = proxy
        self.probe = probe
        self.probe_timeout = probe_timeout
        self.cache_seconds = cache_seconds
        self.stale_after = stale_after
        self.clock = clock
        self._heartbeat = clock()
        self._lock = threading.Lock()
        self._checked: float | None = None
        # (upstream, address) -> why the last probe failed, or None
        self._probes: dict[tuple[str, HostPort], str | None] = {}

    def beat(self) -> None:
        """Called from the event loop: it is running."""
        self._heartbeat = self.clock()

    def lag(self) -> float:
        """Seconds since the event loop last beat."""
        return self.clock() - self._heartbeat

    def alive(self) -> tuple[bool, str]:
        lag = self.lag()
        if lag > self.stale_after:
            return False, f"event loop unresponsive for {lag:.0f}s"
        return True, "ok"

    def _probe_all(self) -> dict[tuple[str, HostPort], str | None]:
        with self._lock:
            now = self.clock()
            if self._checked is None or now - self._checked >= self.cache_seconds:
                config = self.proxy.config
                self._probes = {
                    (u.name, a): self.probe(a.host, a.port, self.probe_timeout)
                    for u in config.upstreams or (config.upstream,) for a in u.addresses
                }
                self._checked = self.clock()
            return self._probes

    def upstreams(self) -> list[tuple[str, HostPort, bool]]:
        """For ``popproxy_upstream_up``: (upstream, address, up) of every address."""
        pools = self.proxy.pools
        return [(name, address, error is None and (pools is None or pools.is_up(name, address)))
                for (name, address), error in self._probe_all().items()]

    def upstream_error(self) -> str | None:
        """None if an address of the upstream accepted a connection recently,
        else why not (the first address's reason)."""
        probes = self._probe_all()
        upstream = self.proxy.config.upstream
        errors = [probes.get((upstream.name, a), "not probed") for a in upstream.addresses]
        if any(e is None for e in errors):
            return None
        return f"upstream {upstream.address}: {errors[0]}"

    def upstream_up(self) -> float:
        """1.0 if the upstream (see ``upstream_error``) is reachable, else 0.0."""
        return 0.0 if self.upstream_error() is not None else 1.0

    def ready(self) -> tuple[bool, str]:
        if not self.proxy.listening:
            return False, "not listening"
        why_refusing = refusing(self.proxy)
        if why_refusing is not None:
            return False, why_refusing
        error = self.upstream_error()
        if error is not None:
            return False, error
        alive, why = self.alive()
        if not alive:
            return False, why
        why_degraded = degraded(self.proxy)
        if why_degraded is not None:
            # Still ready: on_error says what sessions get meanwhile, and
            # every replica shares the same Redis, so taking this one out
            # of the load balancer would help no client.
            return True, why_degraded
        return True, "ready"


def refusing(proxy: ProxyStatus) -> str | None:
    """``"refusing new sessions: ..."`` while every new session would be
    refused (``Proxy.refusals`` say why, or ``max_sessions`` are open), else
    None.  Only looks: safe from the HTTP thread."""
    for why in getattr(proxy, "refusals", ()):
        reason = why()
        if reason is not None:
            return f"refusing new sessions: {reason}"
    active = getattr(proxy, "active", 0)
    limit = proxy.config.limits.max_sessions
    if active >= limit:
        return f"refusing new sessions: {active} open, limits.max_sessions is {limit}"
    return None


def degraded(proxy: object) -> str | None:
    """``"degraded: ..."`` while the proxy's shared state fails, else None."""
    state = getattr(proxy, "state", None)
    health = state.health() if state is not None else None
    if health is not None and health.degraded:
        return (f"degraded: shared state ({health.backend}) failing: "
                f"{health.last_error_op}: {health.last_error_reason}")
    return None
