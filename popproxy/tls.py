"""TLS contexts from configuration (stdlib ``ssl``; streams are ``trio.SSLStream``).

Client side (the proxy's listeners): certificate and key from files, a
minimum protocol version (1.2 unless configured higher), optional client
certificates.  Upstream side: verification on by default, against a CA
file or the system store, with the configured server name; ``verify =
false`` is for legacy boxes and is logged as a warning at start.
"""

from __future__ import annotations

import ssl
from contextvars import ContextVar

import trio

from .config import Config, ConfigError, ListenConfig, UpstreamConfig

__all__ = [
    "TLSContexts",
    "TLSHandshakeError",
    "TLSSetupError",
    "check_files",
    "client_context",
    "handshake",
    "server_context",
]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSHandshakeError(Exception):
    """A TLS handshake failed (bad certificate, protocol, timeout)."""


class TLSSetupError(ValueError):
    """A TLS file or setting that cannot be used; ``key`` names the setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def server_context(cfg: ListenConfig) -> ssl.SSLContext:
    """The context a listener serves TLS with."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    if cfg.cert is None:
        raise TLSSetupError("cert", "a certificate is required")
    try:
        ctx.load_cert_chain(str(cfg.cert), str(cfg.key) if cfg.key else None)
    except FileNotFoundError as exc:
        raise TLSSetupError("cert", f"cannot read {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSSetupError("cert", f"cannot load certificate/key: {exc}") from None
    if cfg.client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(cfg.client_ca))
        except (ssl.SSLError, OSError) as exc:
            raise TLSSetupError("client_ca", f"cannot load: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    # Record the SNI name the client asked for, for the audit.
    ctx.sni_callback = _remember_sni
    return ctx


def client_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    """The context the proxy connects to a TLS upstream with."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif cfg.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(cfg.ca_file))
        except FileNotFoundError as exc:
            raise TLSSetupError("ca_file", f"cannot read {exc.filename}") from None
        except (ssl.SSLError, OSError) as exc:
            raise TLSSetupError("ca_file", f"cannot load: {exc}") from None
    return ctx


def check_files(config: Config) -> None:
    """Load every certificate, key and CA file the configuration names.

    ``ConfigError`` names the key (``listen.cert: cannot read ...``), so a
    configuration with an unreadable file fails at start, at
    ``check-config`` and at reload (which then keeps the old one), not at
    the first client.
    """
    several = len(config.listeners) > 1
    for i, lc in enumerate(config.listeners):
        if lc.tls != "none":
            name = f"listen[{i}]" if several else "listen"
            try:
                server_context(lc)
            except TLSSetupError as exc:
                raise ConfigError(f"{name}.{exc.key}: {exc}") from None
    if config.upstream.tls != "none":
        try:
            client_context(config.upstream)
        except TLSSetupError as exc:
            raise ConfigError(f"upstream.{exc.key}: {exc}") from None


# The SNI name of the handshake in progress.  The SNI callback runs inside
# ``do_handshake``, in the task doing the handshake, so a context variable
# carries the name back to that task and to no other.
_SNI: ContextVar[str | None] = ContextVar("popproxy_sni", default=None)


def _remember_sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None,
                  ctx: ssl.SSLContext) -> None:
    _SNI.set(name)


async def handshake(
    stream: trio.SSLStream[trio.abc.Stream], seconds: float
) -> tuple[str | None, str | None, str | None]:
    """Do the TLS handshake; return (protocol version, cipher, SNI).

    Raises ``TLSHandshakeError`` with a reason fit for logs and clients.
    """
    _SNI.set(None)
    try:
        with trio.fail_after(seconds):
            await stream.do_handshake()
    except trio.TooSlowError:
        raise TLSHandshakeError("TLS handshake timed out") from None
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ or exc
        raise TLSHandshakeError(f"TLS handshake failed: {cause}") from None
    cipher = stream.cipher()
    return stream.version(), cipher[0] if cipher else None, _SNI.get()


class TLSContexts:
    """Builds TLS contexts once and keeps them until a reload replaces this.

    A reload (SIGHUP) installs a fresh ``TLSContexts``, so renewed
    certificates are read for the next handshake while live connections
    keep the context they started with.
    """

    def __init__(self) -> None:
        self._servers: dict[ListenConfig, ssl.SSLContext] = {}
        self._upstream: dict[UpstreamConfig, ssl.SSLContext] = {}

    def server(self, cfg: ListenConfig) -> ssl.SSLContext:
        ctx = self._servers.get(cfg)
        if ctx is None:
            ctx = self._servers[cfg] = server_context(cfg)
        return ctx

    def upstream(self, cfg: UpstreamConfig) -> ssl.SSLContext:
        ctx = self._upstream.get(cfg)
        if ctx is None:
            ctx = self._upstream[cfg] = client_context(cfg)
        return ctx
