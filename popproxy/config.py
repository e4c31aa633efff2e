"""Configuration: TOML parsed once into frozen, typed objects.

Strict on purpose: unknown keys are errors, a string is never coerced into a
number, and every error names the key (``limits.idle_timeout: ...``).
Durations accept units ("30s", "10m", "1h", "250ms"), sizes accept binary
units ("1KiB", "16KiB", "10MiB").  Nothing outside this module reads raw
configuration dicts.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit.config import AuditConfig, parse_audit
from .confparse import (
    ConfigError,
    HostPort,
    Section,
    parse_address,
    parse_choice,
    parse_duration,
    parse_int,
    parse_size,
)
from .metrics import MetricsConfig, parse_metrics
from .policy.config import PolicyConfig, parse_policy
from .session import SessionLimits

__all__ = [
    "Config",
    "ConfigError",
    "HostPort",
    "LimitsConfig",
    "ListenConfig",
    "LogConfig",
    "UpstreamConfig",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
    "parse_size",
]


@dataclass(frozen=True, slots=True)
class ListenConfig:
    addresses: tuple[HostPort, ...] = (HostPort("127.0.0.1", 1110),)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    address: HostPort = HostPort("127.0.0.1", 110)
    connect_timeout: float = 5.0
    # How long a command may wait for the upstream's next octet.
    response_timeout: float = 60.0


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

    def session_limits(self) -> SessionLimits:
        return SessionLimits(
            command_line=self.command_line,
            sasl_line=self.sasl_line,
            max_pipeline=self.max_pipeline,
        )


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # "auto" (JSON unless a terminal), "json", "console"


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("auto", "json", "console")


def _listen(raw: object) -> ListenConfig:
    s = Section(raw, "listen")
    value = s.get("address", "127.0.0.1:1110")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError("listen.address: give at least one address")
    addresses = tuple(
        parse_address(v, s.key("address") + (f"[{i}]" if isinstance(value, list) else ""))
        for i, v in enumerate(items)
    )
    s.finish()
    return ListenConfig(addresses)


def _upstream(raw: object) -> UpstreamConfig:
    s = Section(raw, "upstream")
    d = UpstreamConfig()
    if not s.has("address"):
        raise ConfigError("upstream.address: required (the POP3 server to proxy to)")
    cfg = UpstreamConfig(
        address=parse_address(s.get("address"), s.key("address")),
        connect_timeout=parse_duration(
            s.get("connect_timeout", d.connect_timeout), s.key("connect_timeout")
        ),
        response_timeout=parse_duration(
            s.get("response_timeout", d.response_timeout), s.key("response_timeout")
        ),
    )
    s.finish()
    return cfg


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
    )
    s.finish()
    if cfg.command_line < 255:
        # RFC 2449 §4: servers that support CAPA MUST accept 255-octet commands.
        raise ConfigError("limits.command_line: must be at least 255 octets (RFC 2449 §4)")
    if cfg.sasl_line < cfg.command_line:
        raise ConfigError("limits.sasl_line: must not be smaller than limits.command_line")
    return cfg


def _log(raw: object) -> LogConfig:
    s = Section(raw, "log")
    cfg = LogConfig(
        level=parse_choice(s.get("level", "info"), s.key("level"), _LOG_LEVELS),
        format=parse_choice(s.get("format", "auto"), s.key("format"), _LOG_FORMATS),
    )
    s.finish()
    return cfg


_SECTIONS = {
    "listen": _listen,
    "upstream": _upstream,
    "limits": _limits,
    "log": _log,
    "audit": parse_audit,
    "metrics": parse_metrics,
    "policy": parse_policy,
}


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate a decoded TOML document into a ``Config``."""
    for name in raw:
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section")
    if "upstream" not in raw:
        raise ConfigError("upstream: required section (where is the POP3 server?)")
    return Config(
        listen=_listen(raw.get("listen", {})),
        upstream=_upstream(raw["upstream"]),
        limits=_limits(raw.get("limits", {})),
        log=_log(raw.get("log", {})),
        audit=parse_audit(raw["audit"]) if "audit" in raw else AuditConfig(),
        metrics=parse_metrics(raw.get("metrics", {})),
        policy=parse_policy(raw.get("policy", {})),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; ``ConfigError`` names file and key."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw)
