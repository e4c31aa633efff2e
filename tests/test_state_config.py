"""``[state]``: strict parsing, errors that name the key, URLs without leaks."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.confparse import ConfigError
from popproxy.state import RedisTarget, StateConfig, parse_state
from popproxy.state.config import redact_url

DESIGN_EXAMPLE = """
[state]
backend = "redis"                  # "memory" (default) | "redis" (Redis or Valkey)
url = "redis://127.0.0.1:6379/0"   # also "rediss://" and "unix:///run/redis.sock"
key_prefix = "popproxy:"
timeout = "250ms"
on_error = "local"                 # "local": fall back to this process's own counts; "deny"
"""


def test_the_design_example_parses() -> None:
    cfg = parse_state(tomllib.loads(DESIGN_EXAMPLE)["state"])
    assert cfg == StateConfig(
        "redis", "redis://127.0.0.1:6379/0", "popproxy:", 0.25, "local",
        RedisTarget(tls=False, host="127.0.0.1", port=6379, db=0),
    )


def test_defaults() -> None:
    cfg = parse_state({})
    assert (cfg.backend, cfg.key_prefix, cfg.timeout, cfg.on_error) == (
        "memory", "popproxy:", 0.25, "local")
    assert cfg.target == RedisTarget()


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://10.0.0.7", RedisTarget(host="10.0.0.7")),
        ("redis://cache.example:6380/2", RedisTarget(host="cache.example", port=6380, db=2)),
        ("redis://[::1]:7000/1", RedisTarget(host="::1", port=7000, db=1)),
        ("redis://h?db=3", RedisTarget(host="h", db=3)),
        ("rediss://h:6380", RedisTarget(tls=True, host="h", port=6380)),
        ("redis://:s%40cret@h/0", RedisTarget(host="h", password="s@cret")),
        ("redis://bob:pw@h/0", RedisTarget(host="h", username="bob", password="pw")),
        ("unix:///run/redis.sock", RedisTarget(unix_socket="/run/redis.sock")),
        ("unix://:pw@/run/redis.sock?db=5",
         RedisTarget(unix_socket="/run/redis.sock", db=5, password="pw")),
    ],
)
def test_urls(url: str, target: RedisTarget) -> None:
    assert parse_state({"backend": "redis", "url": url}).target == target


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"backend": "postgres"}, "state.backend: expected one of memory, redis"),
        ({"bakend": "redis"}, "state.bakend: unknown key"),
        ({"on_error": "ignore"}, "state.on_error: expected one of local, deny"),
        ({"timeout": "0s"}, "state.timeout: must be greater than zero"),
        ({"timeout": "2m"}, "state.timeout: at most 30s"),
        ({"timeout": "soon"}, "state.timeout: expected a duration"),
        ({"key_prefix": "has space"}, "state.key_prefix: expected up to 64 printable"),
        ({"key_prefix": 7}, "state.key_prefix: expected"),
        ({"url": 6379}, "state.url: expected a URL"),
        ({"url": "http://h:6379"}, "state.url: the scheme must be redis://, rediss:// or unix://"),
        ({"url": "redis://"}, "state.url: the URL has no host"),
        ({"url": "redis://h:99999"}, "state.url: not a valid URL"),
        ({"url": "redis://h/x"}, "state.url: the database must be a number"),
        ({"url": "redis://h/1?db=2"}, "state.url: the database is given twice"),
        ({"url": "redis://h?timeout=1"}, "state.url: unknown URL parameter 'timeout'"),
        ({"url": "unix://host/run/r.sock"}, "state.url: write a unix socket as"),
        ({"url": "unix://"}, "state.url: a unix:// URL needs an absolute socket path"),
        ("not a table", "state: expected a table"),
    ],
)
def test_errors_name_the_key(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_state(raw)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2-secret@h:6379/zz",         # bad db
        "redis://user:hunter2-secret@h?password=hunter2-secret&x=1",
        "http://user:hunter2-secret@h/0",           # bad scheme
        "redis://user:hunter2-secret@h:notaport/0",
        "unix://:hunter2-secret@relative/path",
        "redis://:hunter2/secret@h/0",              # unescaped '/' in the password
    ],
)
def test_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_state({"url": url})
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)


def test_repr_hides_the_password() -> None:
    cfg = parse_state({"backend": "redis", "url": "redis://bob:hunter2@h:6379/0"})
    assert cfg.target.password == "hunter2"
    for text in (repr(cfg), str(cfg), repr(cfg.target), str(cfg.target), cfg.redacted_url):
        assert "hunter2" not in text
    assert cfg.redacted_url == "redis://***@h:6379/0"
    assert str(cfg.target) == "redis://h:6379/0"


@given(st.text(max_size=60))
def test_any_url_parses_or_fails_cleanly(url: str) -> None:
    """No URL crashes the parser, and a password in it never reaches the error."""
    secret = "Zq9-secret"
    for candidate in (url, f"redis://:{secret}@{url}", f"rediss://u:{secret}@h/{url}"):
        message = ""
        try:
            parse_state({"url": candidate})
        except ConfigError as exc:
            message = str(exc)
        assert message == "" or message.startswith("state.url: ")
        assert secret not in message


@given(st.text(max_size=40))
def test_redact_url_hides_whatever_precedes_the_at(password: str) -> None:
    """Whatever the password (even holding '@', '/' or ':'), it is not shown."""
    shown = redact_url(f"redis://user:{password}x@host:6379/0")
    assert shown == "redis://***@host:6379/0"
