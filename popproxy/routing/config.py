"""The ``[routing]`` table and its ``[[routing.rules]]`` (DESIGN.md part 2).

Parsed once into frozen values, strict like the rest of the configuration:
unknown keys are errors and every error names the key
(``routing.rules[0].upstream: no upstream named "x"``).  Nothing here reads
files: ``map_file`` is only checked to be a path; loading the map is
``popproxy.routing.mapfile.load_map_file``, called by whoever owns reloads.

Keys (see ``RoutingConfig`` for the defaults):

``default``
    The upstream for users nothing else routes; absent, such a login gets
    ``-ERR [AUTH]``.
``map_file``
    ``USER UPSTREAM [BACKEND_USER]`` per line (see ``mapfile``).
``auth_http``
    URL of an nginx-compatible ``auth_http`` responder (``http`` or
    ``https``; no credentials in the URL: they would end up in logs).
``auth_http_timeout``
    The whole hook lookup, waiting for a free slot included.
``auth_http_concurrency``
    Not in nginx (which has no such bound): at most this many hook requests
    in flight per process.  Further lookups wait for a slot within their own
    ``auth_http_timeout``, so a hook that never answers costs at most this
    many open requests, and every lookup still ends within its timeout.
``auth_http_headers``
    Extra request headers, nginx's ``auth_http_header`` (typically a shared
    secret such as ``X-Auth-Key``, so the responder knows who asks).
``down_time``
    How long a pool address that failed to connect or greet is skipped.
``[[routing.rules]]``
    ``users`` (globs, matched case-insensitively), ``upstream``, optional
    ``backend_user``; first match wins, before ``map_file`` and ``auth_http``.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..confparse import ConfigError, Section, parse_duration, parse_int

__all__ = ["RoutingConfig", "RoutingRule", "check_user_name", "parse_routing"]

# RFC 9110 §5.6.2 token characters: what an HTTP header name may hold.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Request headers the client itself sets; a configured one must not clash.
_RESERVED_HEADERS = frozenset({
    "host", "auth-method", "auth-user", "auth-pass", "auth-protocol",
    "auth-login-attempt", "client-ip", "client-host", "auth-ssl", "auth-salt",
    "content-length", "transfer-encoding", "connection",
})


@dataclass(frozen=True, slots=True)
class RoutingRule:
    """One ``[[routing.rules]]`` entry: first match wins."""

    users: tuple[str, ...]  # fnmatch globs, matched case-insensitively
    upstream: str
    backend_user: str | None = None  # log in upstream as this user instead


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """The ``[routing]`` table; its presence switches the proxy to routed mode."""

    default: str | None = None
    map_file: Path | None = None
    auth_http: str | None = None
    auth_http_timeout: float = 5.0
    auth_http_concurrency: int = 64
    # repr=False: typically a shared secret, and configs end up in logs.
    auth_http_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    down_time: float = 10.0
    rules: tuple[RoutingRule, ...] = ()


def check_user_name(value: str) -> str | None:
    """Why ``value`` cannot be sent upstream as a ``USER`` argument, or None.

    A user name becomes a command line of its own: CR, LF or NUL in it
    would smuggle in extra commands (field notes 1.5), whitespace would
    split it into several arguments.
    """
    if not value:
        return "empty user name"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "user name contains whitespace or control characters"
    return None


def _upstream(value: object, key: str, upstream_names: frozenset[str]) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected the name of an upstream, got {value!r}")
    if value not in upstream_names:
        known = ", ".join(f'"{n}"' for n in sorted(upstream_names)) or "none"
        raise ConfigError(f'{key}: no upstream named "{value}" (known: {known})')
    return value


def _backend_user(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a user name, got {value!r}")
    reason = check_user_name(value)
    if reason is not None:
        raise ConfigError(f"{key}: {reason}")
    return value


def _users(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected a non-empty list of user names or globs, got {value!r}")
    return tuple(value)


def _rule(raw: object, index: int, upstream_names: frozenset[str]) -> RoutingRule:
    s = Section(raw, f"routing.rules[{index}]")
    if not s.has("users"):
        raise ConfigError(f"{s.key('users')}: required (which users this rule routes)")
    if not s.has("upstream"):
        raise ConfigError(f"{s.key('upstream')}: required (where the users go)")
    rule = RoutingRule(
        users=_users(s.get("users"), s.key("users")),
        upstream=_upstream(s.get("upstream"), s.key("upstream"), upstream_names),
        backend_user=(
            _backend_user(s.get("backend_user"), s.key("backend_user"))
            if s.has("backend_user") else None
        ),
    )
    s.finish()
    return rule


def _url(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f'{key}: expected a URL such as "http://127.0.0.1:9000/auth"')
    try:
        parts = urllib.parse.urlsplit(value)
        if "@" in parts.netloc:
            # A secret in the URL would reach every log line that names the
            # hook (and this error message, were it echoed).
            raise ConfigError(
                f"{key}: no credentials in the URL; send a shared secret with auth_http_headers")
        port = parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{key}: not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f'{key}: expected an http:// or https:// URL with a host, got {value!r}')
    if parts.fragment or port == 0 or any(c.isspace() or ord(c) < 0x20 for c in value):
        raise ConfigError(f"{key}: not a usable URL: {value!r}")
    return value


def _headers(value: object, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(f'{key}: expected a table such as {{ X-Auth-Key = "..." }}')
    headers = []
    for name, text in value.items():
        if not _TOKEN.fullmatch(name):
            raise ConfigError(f"{key}.{name}: not a valid HTTP header name")
        if name.lower() in _RESERVED_HEADERS:
            raise ConfigError(f"{key}.{name}: set by the proxy itself")
        if not isinstance(text, str) or not text.isascii() or any(
                ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            # Not echoing the value: it is typically a shared secret.
            raise ConfigError(f"{key}.{name}: expected one line of ASCII text")
        headers.append((name, text))
    return tuple(headers)


def parse_routing(raw: object, upstream_names: frozenset[str]) -> RoutingConfig:
    """Validate the ``[routing]`` table.

    ``upstream_names`` are the names every upstream reference is checked
    against (``default`` for ``[upstream]``, the ``NAME`` of each
    ``[upstreams.NAME]``).  Raises ``ConfigError`` naming the key.
    """
    s = Section(raw, "routing")
    d = RoutingConfig()
    rules_raw = s.get("rules", [])
    if not isinstance(rules_raw, list):
        raise ConfigError("routing.rules: expected [[routing.rules]] tables")
    cfg = RoutingConfig(
        default=(
            _upstream(s.get("default"), s.key("default"), upstream_names)
            if s.has("default") else None
        ),
        map_file=_path(s.get("map_file"), s.key("map_file")) if s.has("map_file") else None,
        auth_http=_url(s.get("auth_http"), s.key("auth_http")) if s.has("auth_http") else None,
        auth_http_timeout=parse_duration(
            s.get("auth_http_timeout", d.auth_http_timeout), s.key("auth_http_timeout")),
        auth_http_concurrency=parse_int(
            s.get("auth_http_concurrency", d.auth_http_concurrency),
            s.key("auth_http_concurrency"), 1, 100_000),
        auth_http_headers=(
            _headers(s.get("auth_http_headers"), s.key("auth_http_headers"))
            if s.has("auth_http_headers") else ()
        ),
        down_time=parse_duration(s.get("down_time", d.down_time), s.key("down_time")),
        rules=tuple(_rule(r, i, upstream_names) for i, r in enumerate(rules_raw)),
    )
    s.finish()
    if not (cfg.default or cfg.map_file or cfg.auth_http or cfg.rules):
        raise ConfigError(
            "routing: routes nobody; give default, map_file, auth_http or [[routing.rules]]")
    if cfg.auth_http is None:
        for k in ("auth_http_timeout", "auth_http_concurrency", "auth_http_headers"):
            if s.has(k):
                raise ConfigError(f"routing.{k}: only meaningful with routing.auth_http")
    return cfg


def _path(value: object, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a file path, got {value!r}")
    return Path(value)
