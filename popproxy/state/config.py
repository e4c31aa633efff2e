"""The ``[state]`` section: where limits and session caps are counted.

```toml
[state]
backend = "redis"                  # "memory" (default) | "redis" (Redis or Valkey)
url = "redis://127.0.0.1:6379/0"   # also "rediss://" and "unix:///run/redis.sock"
key_prefix = "popproxy:"
timeout = "250ms"
on_error = "local"                 # "local": fall back to this process's own counts; "deny"
lease_time = "30s"                 # a session-cap slot of a process that died comes back
                                   # after this long; live sessions renew theirs
```

The URL may carry credentials (``redis://user:secret@host``).  They stay in
``RedisTarget.password`` (kept out of ``repr``), and every error message and
``StateConfig.redacted_url`` show ``***`` in their place.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

from ..confparse import ConfigError, Section, parse_choice, parse_duration

__all__ = ["RedisTarget", "StateConfig", "parse_redis_url", "parse_state", "redact_url"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
MAX_TIMEOUT = 30.0
MIN_LEASE, MAX_LEASE = 1.0, 3600.0
_PREFIX = re.compile(r"[\x21-\x7e]{0,64}")  # printable ASCII, no spaces


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``redis://``, ``rediss://`` or ``unix://`` URL."""

    tls: bool = False
    host: str = "127.0.0.1"
    port: int = 6379
    unix_socket: str | None = None  # set for unix://; host and port unused then
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        """The address without credentials, for logs and errors."""
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


@dataclass(frozen=True, slots=True)
class StateConfig:
    backend: str = "memory"  # "memory" | "redis"
    url: str = field(default=DEFAULT_URL, repr=False)  # may hold a password
    key_prefix: str = "popproxy:"
    timeout: float = 0.25
    on_error: str = "local"  # "local" | "deny"
    target: RedisTarget = field(default_factory=RedisTarget)
    lease_time: float = 30.0

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        return (
            f"StateConfig(backend={self.backend!r}, url={self.redacted_url!r}, "
            f"key_prefix={self.key_prefix!r}, timeout={self.timeout!r}, "
            f"on_error={self.on_error!r}, lease_time={self.lease_time!r})"
        )


def redact_url(url: str) -> str:
    """``url`` with its user information replaced by ``***`` (safe to log).

    Everything up to the last ``@`` goes, so a password that itself holds
    ``/``, ``@`` or ``:`` (written unescaped by mistake) is hidden too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url else url
    _, at, after = rest.rpartition("@")
    shown = f"{scheme}://***@{after}" if at else url
    # A password in the query (as some clients take it) is refused, but must
    # not be echoed by the error that says so either.
    return re.sub(r"(?i)(password=)[^&#]*", r"\1***", shown)


def parse_redis_url(url: object, key: str) -> RedisTarget:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS)
    or ``unix://[[user]:password@]/path/to/socket[?db=N]``."""
    if not isinstance(url, str):
        raise ConfigError(f'{key}: expected a URL such as "{DEFAULT_URL}", got {url!r}')
    shown = redact_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: not a valid URL: {shown!r}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f'{key}: the scheme must be redis://, rediss:// or unix://, got {shown!r}'
        )
    if parts.fragment:
        raise ConfigError(f"{key}: no #fragment allowed, got {shown!r}")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise ConfigError(
            f"{key}: unknown URL parameter {unknown[0]!r} (only db= is understood): {shown!r}"
        )
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if password == "":
        password = None
    db_text = query["db"][0] if "db" in query else None
    if parts.scheme == "unix":
        if parts.hostname or port is not None:
            raise ConfigError(
                f'{key}: write a unix socket as "unix:///path/to/redis.sock", got {shown!r}'
            )
        if not parts.path.startswith("/") or parts.path == "/":
            raise ConfigError(f"{key}: a unix:// URL needs an absolute socket path, got {shown!r}")
        return RedisTarget(unix_socket=parts.path, db=_db(db_text, key, shown),
                           username=username, password=password)
    if not parts.hostname:
        raise ConfigError(f"{key}: the URL has no host: {shown!r}")
    path = parts.path.strip("/")
    if path and db_text is not None:
        raise ConfigError(f"{key}: the database is given twice (path and db=): {shown!r}")
    return RedisTarget(
        tls=parts.scheme == "rediss",
        host=parts.hostname,
        port=6379 if port is None else port,
        db=_db(path or db_text, key, shown),
        username=username,
        password=password,
    )


def _db(text: str | None, key: str, shown: str) -> int:
    if text is None or text == "":
        return 0
    if not (text.isascii() and text.isdigit()) or int(text) > 10_000:
        raise ConfigError(f"{key}: the database must be a number 0-10000, got {shown!r}")
    return int(text)


def parse_state(raw: object) -> StateConfig:
    """Parse ``[state]``; errors name the key (``state.timeout: ...``)."""
    s = Section(raw, "state")
    d = StateConfig()
    backend = parse_choice(s.get("backend", d.backend), s.key("backend"), ("memory", "redis"))
    url = s.get("url", d.url)
    target = parse_redis_url(url, s.key("url"))
    prefix = s.get("key_prefix", d.key_prefix)
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"{s.key('key_prefix')}: expected up to 64 printable ASCII characters "
            f"without spaces, got {prefix!r}"
        )
    timeout = parse_duration(s.get("timeout", d.timeout), s.key("timeout"))
    if timeout > MAX_TIMEOUT:
        raise ConfigError(
            f"{s.key('timeout')}: at most {MAX_TIMEOUT:.0f}s (every call waits up to this "
            f"long while Redis is unreachable), got {s.raw['timeout']!r}"
        )
    on_error = parse_choice(s.get("on_error", d.on_error), s.key("on_error"), ("local", "deny"))
    lease_time = parse_duration(s.get("lease_time", d.lease_time), s.key("lease_time"))
    if not MIN_LEASE <= lease_time <= MAX_LEASE:
        raise ConfigError(
            f"{s.key('lease_time')}: between {MIN_LEASE:g}s and {MAX_LEASE:g}s (slots of a "
            f"process that died stay taken this long), got {lease_time:g}s"
        )
    if lease_time < 3 * timeout:
        raise ConfigError(
            f"{s.key('lease_time')}: at least three times state.timeout, so a renewal "
            f"can fail and be retried before the lease runs out, got {lease_time:g}s"
        )
    s.finish()
    return StateConfig(backend, url, prefix, timeout, on_error, target, lease_time)
