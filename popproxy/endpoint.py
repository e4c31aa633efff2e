"""The HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``.

``/metrics`` is prometheus-client's own WSGI exposition of the registry;
``/healthz`` and ``/readyz`` are answered by ``health.Health``.  It is
served by ``wsgiref`` in a daemon thread, so that a scrape never runs on,
or waits for, the trio event loop; the trio task only starts the thread,
beats the heartbeat ``/healthz`` checks, and stops the server when
cancelled.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
import trio
from prometheus_client import CollectorRegistry
from prometheus_client import make_wsgi_app as _make_metrics_app

from .addr import HostPort
from .config import MetricsConfig
from .exits import CannotListen
from .health import Health, ProxyStatus
from .metrics import Metrics

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["HEARTBEAT_SECONDS", "make_app", "serve_http", "serve_metrics"]

logger = structlog.get_logger("popproxy.endpoint")

#: How often the event loop proves it is alive to ``/healthz``.
HEARTBEAT_SECONDS: Final = 1.0
#: How often the HTTP thread checks whether it was asked to stop.
_POLL_SECONDS: Final = 0.1


def make_app(registry: CollectorRegistry, health: Health) -> WSGIApplication:
    """The WSGI application: ``/metrics``, ``/healthz``, ``/readyz``."""
    metrics_app = _make_metrics_app(registry)

    def plain(start_response: StartResponse, status: str, text: str) -> list[bytes]:
        body = (text + "\n").encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [body]

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            alive, why = health.alive()
            return plain(start_response, "200 OK" if alive else "503 Service Unavailable", why)
        if path == "/readyz":
            ready, why = health.ready()
            return plain(start_response, "200 OK" if ready else "503 Service Unavailable", why)
        if path == "/":
            return plain(start_response, "200 OK", "popproxy: /metrics /healthz /readyz")
        return plain(start_response, "404 Not Found", "not found")

    return app


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        """Bind without ``HTTPServer``'s reverse DNS look-up of the address."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: Prometheus scrapes every few seconds."""


def _bind(address: HostPort, app: WSGIApplication) -> _Server:
    """Bind the HTTP server (blocking: name resolution).  Run in a thread."""
    try:
        family = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        server_class = _Server6 if family == socket.AF_INET6 else _Server
        server = make_server(address.host, address.port, app, server_class, _QuietHandler)
    except OSError as exc:
        raise CannotListen("serve metrics", address, exc) from None
    assert isinstance(server, _Server)
    return server


def _stop(server: _Server, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5.0)


async def serve_metrics(
    config: MetricsConfig,
    metrics: Metrics,
    proxy: ProxyStatus,
    *,
    task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` until cancelled.

    The HTTP server runs in a daemon thread; this task only starts it,
    reports the bound address (``task_status.started(HostPort)``; the port
    is the real one when the configured port is 0), beats the heartbeat
    ``/healthz`` checks, and stops the server when cancelled.
    """
    if config.address is None:
        raise ValueError("serve_metrics: [metrics] address is not set")
    health = Health(proxy)
    metrics.upstream_up.source = health.upstreams
    await serve_http(config.address, make_app(metrics.registry, health), health,
                     task_status=task_status)


async def serve_http(
    address: HostPort,
    app: WSGIApplication,
    health: Health,
    *,
    task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the WSGI ``app`` on ``address`` from a daemon thread until
    cancelled, beating ``health``'s heartbeat from this event loop.

    ``serve_metrics`` for one proxy; ``popproxy.workers`` for the
    supervisor's view of all its workers.
    """
    server = await trio.to_thread.run_sync(_bind, address, app)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": _POLL_SECONDS},
        name="popproxy-metrics-http", daemon=True,
    )
    thread.start()
    try:
        host, port = server.server_address[:2]
        bound = HostPort(str(host), int(port))
        logger.info("metrics.listening", address=str(bound))
        task_status.started(bound)
        while True:
            health.beat()
            await trio.sleep(HEARTBEAT_SECONDS)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_stop, server, thread)
