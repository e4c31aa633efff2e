"""Building blocks for strict configuration parsing.

Every section parser (here and in the feature packages) uses these, so all
errors look alike and name the key: ``limits.idle_timeout: expected ...``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .addr import HostPort, parse_hostport

__all__ = [
    "ConfigError",
    "HostPort",
    "Section",
    "parse_address",
    "parse_bool",
    "parse_choice",
    "parse_duration",
    "parse_int",
    "parse_size",
]


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key's path."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}


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
    try:
        return parse_hostport(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def parse_bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def parse_int(value: object, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: expected {lo}..{hi}, got {value}")
    return value


def parse_choice(value: object, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}; got {value!r}")
    assert isinstance(value, str)
    return value


class Section:
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
