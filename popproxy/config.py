"""Configuration: TOML parsed once into frozen, typed objects.

Strict on purpose: unknown keys are errors, a string is never coerced into a
number, and every error names the key (``limits.idle_timeout: ...``).
Durations accept units ("30s", "10m", "1h", "250ms"), sizes accept binary
units ("1KiB", "16KiB", "10MiB").  Nothing outside this module reads raw
configuration dicts.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    "parse_config",
    "parse_duration",
    "parse_size",
]


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key's path."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("auto", "json", "console")


def parse_duration(value: object, key: str) -> float:
    """``"30s"`` -> 30.0; a bare number is seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration such as \"30s\", got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(
            f"{key}: expected a duration such as \"30s\", \"10m\" or \"250ms\", got {value!r}"
        )
    if seconds <= 0:
        raise ConfigError(f"{key}: must be greater than zero, got {value!r}")
    return seconds


def parse_size(value: object, key: str) -> int:
    """``"16KiB"`` -> 16384; a bare integer is octets."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as \"1KiB\", got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{key}: expected a size such as \"1KiB\" or \"16KiB\", got {value!r}")
    if size <= 0:
        raise ConfigError(f"{key}: must be greater than zero, got {value!r}")
    return size


def parse_address(value: object, key: str) -> HostPort:
    """``"127.0.0.1:110"``, ``"[::1]:110"`` or ``"mail.example.org:110"``."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected \"host:port\", got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ConfigError(f"{key}: write IPv6 addresses in brackets, as \"[::1]:110\"")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected \"host:port\" with a port 0-65535, got {value!r}")
    return HostPort(host, int(port))


def _int(value: object, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: expected {lo}..{hi}, got {value}")
    return value


def _choice(value: object, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}; got {value!r}")
    assert isinstance(value, str)
    return value


class _Section:
    """Reads one table, remembering which keys were used."""

    def __init__(self, raw: object, name: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{name}: expected a table")
        self.raw: Mapping[str, Any] = raw
        self.name = name
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.name}.{k}"

    def get(self, k: str, default: object = None) -> Any:
        self.used.add(k)
        return self.raw.get(k, default)

    def has(self, k: str) -> bool:
        return k in self.raw

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _listen(raw: object) -> ListenConfig:
    s = _Section(raw, "listen")
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
    s = _Section(raw, "upstream")
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
    s = _Section(raw, "limits")
    d = LimitsConfig()
    cfg = LimitsConfig(
        idle_timeout=parse_duration(s.get("idle_timeout", d.idle_timeout), s.key("idle_timeout")),
        max_sessions=_int(s.get("max_sessions", d.max_sessions), s.key("max_sessions"), 1, 10**6),
        command_line=parse_size(s.get("command_line", d.command_line), s.key("command_line")),
        sasl_line=parse_size(s.get("sasl_line", d.sasl_line), s.key("sasl_line")),
        max_pipeline=_int(s.get("max_pipeline", d.max_pipeline), s.key("max_pipeline"), 1, 10**6),
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
    s = _Section(raw, "log")
    cfg = LogConfig(
        level=_choice(s.get("level", "info"), s.key("level"), _LOG_LEVELS),
        format=_choice(s.get("format", "auto"), s.key("format"), _LOG_FORMATS),
    )
    s.finish()
    return cfg


_SECTIONS = {"listen": _listen, "upstream": _upstream, "limits": _limits, "log": _log}
# Documented sections that later releases fill in; naming them gives a
# clearer error than "unknown section".
_NOT_YET = ("audit", "metrics", "policy")


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate a decoded TOML document into a ``Config``."""
    for name in raw:
        if name in _NOT_YET:
            raise ConfigError(f"{name}: this section is not supported by this version yet")
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section")
    if "upstream" not in raw:
        raise ConfigError("upstream: required section (where is the POP3 server?)")
    return Config(
        listen=_listen(raw.get("listen", {})),
        upstream=_upstream(raw["upstream"]),
        limits=_limits(raw.get("limits", {})),
        log=_log(raw.get("log", {})),
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
