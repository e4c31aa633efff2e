"""Configuration: TOML parsed once into frozen, typed objects.

Strict on purpose: unknown keys are errors, a string is never coerced into a
number, and every error names the key (``limits.idle_timeout: ...``).
Durations accept units ("30s", "10m", "1h", "250ms"), sizes accept binary
units ("1KiB", "16KiB", "10MiB").  Nothing outside this module reads raw
configuration dicts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .addr import HostPort
from .audit.config import AuditConfig, parse_audit
from .confparse import (
    ConfigError,
    Section,
    parse_address,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_int,
    parse_size,
)
from .policy.config import PolicyConfig, parse_policy
from .routing.config import RoutingConfig, parse_routing
from .state.config import StateConfig, parse_state

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_TLS_MODES = ("none", "implicit", "starttls")

__all__ = [
    "Config",
    "ConfigError",
    "HostPort",
    "LimitsConfig",
    "ListenConfig",
    "LogConfig",
    "MetricsConfig",
    "ServerConfig",
    "StateConfig",
    "UpstreamConfig",
    "available_cpus",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
    "parse_size",
]


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """One listener: addresses, TLS mode and the PROXY protocol."""

    addresses: tuple[HostPort, ...] = (HostPort("127.0.0.1", 1110),)
    tls: str = "none"  # "none" | "implicit" (POP3S, RFC 8314) | "starttls" (STLS, RFC 2595)
    cert: Path | None = None
    key: Path | None = None
    min_version: str = "1.2"
    client_ca: Path | None = None  # verify client certificates against this CA
    require_client_cert: bool = False
    # Refuse USER/PASS/APOP/AUTH before TLS (RFC 2595 §2.1); on by default
    # whenever the listener offers TLS.
    require_tls_for_auth: bool = False
    proxy_protocol: bool = False  # expect a PROXY v1/v2 header first
    trusted_proxies: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream: ``[upstream]`` (named ``default``) or ``[upstreams.NAME]``.

    ``address`` and then ``fallbacks`` are its pool: tried in that order, an
    address that fails to connect or greet skipped for ``routing.down_time``.
    """

    address: HostPort = HostPort("127.0.0.1", 110)
    connect_timeout: float = 5.0
    # How long a command may wait for the upstream's next octet.
    response_timeout: float = 60.0
    tls: str = "none"  # "none" | "implicit" | "starttls"
    verify: bool = True
    ca_file: Path | None = None  # None: the system's trust store
    server_name: str | None = None  # for SNI and verification; default: the host
    # Tell the upstream who the client is: Dovecot's XCLIENT (when its
    # greeting says [XCLIENT]) or a PROXY protocol header.
    forward_client: str = "none"  # "none" | "xclient" | "proxy-v1" | "proxy-v2"
    name: str = "default"
    fallbacks: tuple[HostPort, ...] = ()

    @property
    def addresses(self) -> tuple[HostPort, ...]:
        """The pool, in the order addresses are tried."""
        return (self.address, *self.fallbacks)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # RFC 1939 §3: an autologout timer, if any, MUST be at least 10 minutes.
    idle_timeout: float = 600.0
    max_sessions: int = 1000
    command_line: int = 1024
    sasl_line: int = 16384
    max_pipeline: int = 4096
    send_timeout: float = 60.0
    drain_timeout: float = 30.0
    handshake_timeout: float = 15.0  # TLS handshakes, both sides
    max_refused_before_login: int = 10  # then -ERR and close (issue 17)
    # From connect to a successful login; a slowloris holds a slot no longer.
    login_timeout: float = 60.0
    # Sessions not yet logged in may hold at most this many of max_sessions
    # (None: half of them), so that they cannot take the logged-in users' slots.
    max_unauthenticated: int | None = None
    # Longest multi-line reply other than RETR/TOP (LIST, UIDL, CAPA...).
    max_listing: int = 64 << 20

    @property
    def unauthenticated_cap(self) -> int:
        """``max_unauthenticated``, or half of ``max_sessions`` (at least 1)."""
        if self.max_unauthenticated is not None:
            return self.max_unauthenticated
        return max(1, self.max_sessions // 2)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # "auto" (JSON unless a terminal), "json", "console"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    address: HostPort | None = None  # None: no HTTP endpoint


#: More worker processes than this is a typing error, not a machine.
MAX_WORKERS = 256


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1.

    A container's CPU quota is not an affinity mask: under a Kubernetes CPU
    limit this still counts the node's CPUs (set ``workers`` explicitly there).
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: how many worker processes serve the listeners."""

    workers: int | Literal["auto"] = 1  # "auto": one per CPU available

    def worker_count(self) -> int:
        """``workers`` as a number (``"auto"`` resolved now, on this machine)."""
        return available_cpus() if self.workers == "auto" else self.workers


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenConfig, ...] = (ListenConfig(),)
    # The upstream of transparent mode: ``[upstream]``.  In routed mode it is
    # ``routing.default``'s (or the first named one), for health checks.
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    state: StateConfig = field(default_factory=StateConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    # ``[upstream]`` (as ``default``) and every ``[upstreams.NAME]``.
    upstreams: tuple[UpstreamConfig, ...] = ()
    # ``[routing]``: routed mode; None: transparent mode.
    routing: RoutingConfig | None = None

    def named_upstream(self, name: str) -> UpstreamConfig:
        """``[upstreams.NAME]``, or ``[upstream]`` for ``default``."""
        for upstream in self.upstreams or (self.upstream,):
            if upstream.name == name:
                return upstream
        raise KeyError(name)


_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("auto", "json", "console")


def _path(value: object, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a file path, got {value!r}")
    return Path(value)


def _listen(raw: object, name: str = "listen") -> ListenConfig:
    s = Section(raw, name)
    value = s.get("address", "127.0.0.1:1110")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"{name}.address: give at least one address")
    addresses = tuple(
        parse_address(v, s.key("address") + (f"[{i}]" if isinstance(value, list) else ""))
        for i, v in enumerate(items)
    )
    tls = parse_choice(s.get("tls", "none"), s.key("tls"), _TLS_MODES)
    cert = _path(s.get("cert"), s.key("cert")) if s.has("cert") else None
    key = _path(s.get("key"), s.key("key")) if s.has("key") else None
    if tls != "none" and cert is None:
        raise ConfigError(f"{name}.cert: required with tls = {tls!r}")
    trusted = s.get("trusted_proxies", [])
    if not isinstance(trusted, list):
        raise ConfigError(f"{s.key('trusted_proxies')}: expected a list of CIDR networks")
    networks = []
    for i, net in enumerate(trusted):
        try:
            networks.append(ipaddress.ip_network(str(net), strict=False))
        except ValueError:
            raise ConfigError(
                f"{s.key('trusted_proxies')}[{i}]: not a network in CIDR form: {net!r}"
            ) from None
    proxy_protocol = parse_bool(s.get("proxy_protocol", False), s.key("proxy_protocol"))
    if proxy_protocol and not networks:
        raise ConfigError(
            f"{name}.trusted_proxies: required with proxy_protocol = true "
            "(only trusted load balancers may tell us the client address)"
        )
    cfg = ListenConfig(
        addresses=addresses,
        tls=tls,
        cert=cert,
        key=key,
        min_version=parse_choice(s.get("min_version", "1.2"), s.key("min_version"),
                                 ("1.2", "1.3")),
        client_ca=_path(s.get("client_ca"), s.key("client_ca")) if s.has("client_ca") else None,
        require_client_cert=parse_bool(
            s.get("require_client_cert", False), s.key("require_client_cert")),
        require_tls_for_auth=parse_bool(
            s.get("require_tls_for_auth", tls != "none"), s.key("require_tls_for_auth")),
        proxy_protocol=proxy_protocol,
        trusted_proxies=tuple(networks),
    )
    s.finish()
    if cfg.require_client_cert and cfg.client_ca is None:
        raise ConfigError(f"{name}.client_ca: required with require_client_cert = true")
    if cfg.require_tls_for_auth and cfg.tls == "none":
        raise ConfigError(f"{name}.require_tls_for_auth: this listener offers no TLS")
    return cfg


def _listeners(raw: object) -> tuple[ListenConfig, ...]:
    """``[listen]`` (one listener) or ``[[listen]]`` (several)."""
    if isinstance(raw, list):
        if not raw:
            raise ConfigError("listen: give at least one listener")
        return tuple(_listen(item, f"listen[{i}]") for i, item in enumerate(raw))
    return (_listen(raw),)


def _upstream(raw: object, name: str = "default", key: str = "upstream") -> UpstreamConfig:
    s = Section(raw, key)
    d = UpstreamConfig()
    if not s.has("address"):
        raise ConfigError(f"{key}.address: required (the POP3 server to proxy to)")
    value = s.get("address")
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{key}.address: give at least one address")
        pool = tuple(parse_address(v, f"{s.key('address')}[{i}]") for i, v in enumerate(value))
    else:
        pool = (parse_address(value, s.key("address")),)
    cfg = UpstreamConfig(
        address=pool[0],
        fallbacks=pool[1:],
        name=name,
        connect_timeout=parse_duration(
            s.get("connect_timeout", d.connect_timeout), s.key("connect_timeout")
        ),
        response_timeout=parse_duration(
            s.get("response_timeout", d.response_timeout), s.key("response_timeout")
        ),
        tls=parse_choice(s.get("tls", "none"), s.key("tls"), _TLS_MODES),
        verify=parse_bool(s.get("verify", True), s.key("verify")),
        ca_file=_path(s.get("ca_file"), s.key("ca_file")) if s.has("ca_file") else None,
        server_name=str(s.get("server_name")) if s.has("server_name") else None,
        forward_client=parse_choice(
            s.get("forward_client", "none"), s.key("forward_client"),
            ("none", "xclient", "proxy-v1", "proxy-v2"),
        ),
    )
    s.finish()
    return cfg


def _upstreams(raw: Mapping[str, Any]) -> tuple[UpstreamConfig, ...]:
    """``[upstream]`` (the one named ``default``) and ``[upstreams.NAME]``."""
    found: list[UpstreamConfig] = []
    if "upstream" in raw:
        found.append(_upstream(raw["upstream"]))
    named = raw.get("upstreams", {})
    if not isinstance(named, Mapping):
        raise ConfigError("upstreams: expected tables such as [upstreams.legacy]")
    for name, table in named.items():
        if not _UPSTREAM_NAME.fullmatch(name):
            raise ConfigError(f"upstreams.{name}: a name is letters, digits, '-' and '_'")
        if name == "default" and "upstream" in raw:
            raise ConfigError("upstreams.default: [upstream] is already the one named default")
        if name == "http":
            raise ConfigError("upstreams.http: 'http' stands for servers the auth hook names")
        found.append(_upstream(table, name, f"upstreams.{name}"))
    return tuple(found)


_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _limits(raw: object) -> LimitsConfig:
    s = Section(raw, "limits")
    d = LimitsConfig()
    cfg = LimitsConfig(
        idle_timeout=parse_duration(s.get("idle_timeout", d.idle_timeout), s.key("idle_timeout")),
        max_sessions=parse_int(
            s.get("max_sessions", d.max_sessions), s.key("max_sessions"), 1, 10**6
        ),
        command_line=parse_size(s.get("command_line", d.command_line), s.key("command_line")),
        sasl_line=parse_size(s.get("sasl_line", d.sasl_line), s.key("sasl_line")),
        max_pipeline=parse_int(
            s.get("max_pipeline", d.max_pipeline), s.key("max_pipeline"), 1, 10**6
        ),
        send_timeout=parse_duration(s.get("send_timeout", d.send_timeout), s.key("send_timeout")),
        drain_timeout=parse_duration(
            s.get("drain_timeout", d.drain_timeout), s.key("drain_timeout")
        ),
        handshake_timeout=parse_duration(
            s.get("handshake_timeout", d.handshake_timeout), s.key("handshake_timeout")
        ),
        max_refused_before_login=parse_int(
            s.get("max_refused_before_login", d.max_refused_before_login),
            s.key("max_refused_before_login"), 1, 10**6,
        ),
        login_timeout=parse_duration(
            s.get("login_timeout", d.login_timeout), s.key("login_timeout")
        ),
        max_unauthenticated=parse_int(
            s.get("max_unauthenticated"), s.key("max_unauthenticated"), 1, 10**6
        ) if s.has("max_unauthenticated") else None,
        max_listing=parse_size(s.get("max_listing", d.max_listing), s.key("max_listing")),
    )
    s.finish()
    if cfg.command_line < 255:
        # RFC 2449 §4: servers that support CAPA MUST accept 255-octet commands.
        raise ConfigError("limits.command_line: must be at least 255 octets (RFC 2449 §4)")
    if cfg.sasl_line < cfg.command_line:
        raise ConfigError("limits.sasl_line: must not be smaller than limits.command_line")
    if cfg.unauthenticated_cap > cfg.max_sessions:
        raise ConfigError("limits.max_unauthenticated: must not exceed limits.max_sessions")
    return cfg


def _log(raw: object) -> LogConfig:
    s = Section(raw, "log")
    cfg = LogConfig(
        level=parse_choice(s.get("level", "info"), s.key("level"), _LOG_LEVELS),
        format=parse_choice(s.get("format", "auto"), s.key("format"), _LOG_FORMATS),
    )
    s.finish()
    return cfg


def parse_metrics(raw: object) -> MetricsConfig:
    s = Section(raw, "metrics")
    address = s.get("address")
    cfg = MetricsConfig(parse_address(address, s.key("address")) if address is not None else None)
    s.finish()
    return cfg


def _server(raw: object) -> ServerConfig:
    s = Section(raw, "server")
    value = s.get("workers", 1)
    if value != "auto" and (
        isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS
    ):
        raise ConfigError(
            f'{s.key("workers")}: expected a number of processes (1..{MAX_WORKERS}) or "auto", '
            f"got {value!r}"
        )
    s.finish()
    return ServerConfig(workers=value)


_SECTIONS = {
    "listen": _listeners,
    "upstream": _upstream,
    "upstreams": _upstreams,
    "routing": parse_routing,
    "limits": _limits,
    "log": _log,
    "audit": parse_audit,
    "metrics": parse_metrics,
    "policy": parse_policy,
    "server": _server,
    "state": parse_state,
}


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate a decoded TOML document into a ``Config``."""
    for name in raw:
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section")
    if "routing" not in raw:
        if "upstreams" in raw:
            raise ConfigError("upstreams: named upstreams are only used with [routing]")
        if "upstream" not in raw:
            raise ConfigError("upstream: required section (where is the POP3 server?)")
    upstreams = _upstreams(raw)
    if not upstreams:
        raise ConfigError("upstreams: [routing] needs [upstream] or [upstreams.NAME] tables")
    routing = (parse_routing(raw["routing"], frozenset(u.name for u in upstreams))
               if "routing" in raw else None)
    default = next((u for u in upstreams if routing is not None and u.name == routing.default),
                   upstreams[0])
    return Config(
        listeners=_listeners(raw.get("listen", {})),
        upstream=default,
        limits=_limits(raw.get("limits", {})),
        log=_log(raw.get("log", {})),
        audit=parse_audit(raw["audit"]) if "audit" in raw else AuditConfig(),
        metrics=parse_metrics(raw.get("metrics", {})),
        policy=parse_policy(raw.get("policy", {})),
        state=parse_state(raw["state"]) if "state" in raw else StateConfig(),
        upstreams=upstreams,
        routing=routing,
        server=_server(raw.get("server", {})),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; ``ConfigError`` names file and key.

    The TLS files a configuration names are read at start and on reload
    (``tls.check_files``), not here: parsing stays free of TLS code.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw)
