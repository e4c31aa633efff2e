"""Liveness and readiness, answered from the metrics HTTP thread.

``/healthz`` (liveness) says the process is alive *and its event loop
runs*: ``serve_metrics`` beats a heartbeat from the trio loop every second,
and a heartbeat older than ``stale_after`` means the loop is stuck (a
blocking call, a deadlock), which a restart would cure.

``/readyz`` (readiness) says the proxy can take sessions: its listeners
accept (``Proxy.listening``, false while draining) and the upstream accepts a
TCP connection.  That probe runs on the HTTP thread with a short timeout and
its result is cached for a few seconds, so a burst of probes or scrapes does
not turn into a burst of connections to the mail server, and nothing here
ever touches the trio loop.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Final, Protocol

from .config import Config

__all__ = ["Health", "ProxyStatus", "tcp_probe"]

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


class ProxyStatus(Protocol):
    """What health needs to know of the running proxy (``server.Proxy``)."""

    @property
    def config(self) -> Config: ...

    @property
    def listening(self) -> bool: ...


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
        self._upstream_error: str | None = None

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

    def upstream_error(self) -> str | None:
        """None if the upstream accepted a connection recently, else why not."""
        with self._lock:
            now = self.clock()
            if self._checked is None or now - self._checked >= self.cache_seconds:
                addr = self.proxy.config.upstream.address
                error = self.probe(addr.host, addr.port, self.probe_timeout)
                self._upstream_error = None if error is None else f"upstream {addr}: {error}"
                self._checked = self.clock()
            return self._upstream_error

    def upstream_up(self) -> float:
        """For the ``popproxy_upstream_up`` gauge: 1.0 or 0.0."""
        return 0.0 if self.upstream_error() is not None else 1.0

    def ready(self) -> tuple[bool, str]:
        if not self.proxy.listening:
            return False, "not listening"
        error = self.upstream_error()
        if error is not None:
            return False, error
        alive, why = self.alive()
        if not alive:
            return False, why
        return True, "ready"
