"""``[routing]`` parsing: DESIGN.md part 2's keys, strict, errors name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.confparse import ConfigError
from popproxy.routing import RoutingConfig, RoutingRule, parse_routing
from popproxy.routing.config import check_user_name

NAMES = frozenset({"default", "legacy", "new"})

# DESIGN.md part 2, as written there (the [upstreams.*] tables are not ours).
DESIGN_EXAMPLE = """
[routing]
default = "legacy"                 # for users nothing else routes; absent: -ERR [AUTH]
map_file = "/etc/popproxy/users.map"
auth_http = "http://127.0.0.1:9000/auth"   # optional, nginx auth_http compatible
auth_http_timeout = "2s"
down_time = "10s"                  # an address that failed to connect is skipped this long

[[routing.rules]]                  # first match wins, before map_file and auth_http
users = ["acc*"]
upstream = "new"
# backend_user = "..."            # optional rewrite
"""


def test_design_example_parses() -> None:
    cfg = parse_routing(tomllib.loads(DESIGN_EXAMPLE)["routing"], NAMES)
    assert cfg == RoutingConfig(
        default="legacy",
        map_file=Path("/etc/popproxy/users.map"),
        auth_http="http://127.0.0.1:9000/auth",
        auth_http_timeout=2.0,
        down_time=10.0,
        rules=(RoutingRule(("acc*",), "new"),),
    )


def test_defaults_and_optional_keys() -> None:
    cfg = parse_routing({"default": "legacy"}, NAMES)
    assert cfg.map_file is None
    assert cfg.auth_http is None
    assert cfg.rules == ()
    assert cfg.auth_http_timeout == 5.0
    assert cfg.auth_http_concurrency == 64
    assert cfg.down_time == 10.0
    full = parse_routing({
        "auth_http": "https://auth.example.org:8443/pop",
        "auth_http_concurrency": 8,
        "auth_http_headers": {"X-Auth-Key": "s3cret"},
        "rules": [{"users": ["bob", "b?b"], "upstream": "new", "backend_user": "bob.smith"}],
    }, NAMES)
    assert full.auth_http_concurrency == 8
    assert full.auth_http_headers == (("X-Auth-Key", "s3cret"),)
    assert "s3cret" not in repr(full)
    assert full.rules[0] == RoutingRule(("bob", "b?b"), "new", "bob.smith")


def rules(**rule: Any) -> dict[str, Any]:
    return {"default": "legacy", "rules": [rule]}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"defualt": "legacy"}, r"^routing\.defualt: unknown key$"),
        ({"default": "x"}, r'^routing\.default: no upstream named "x"'),
        ({"default": 3}, r"^routing\.default: expected the name of an upstream"),
        ({}, r"^routing: routes nobody"),
        ("legacy", r"^routing: expected a table"),
        (rules(users=["a*"], upstream="x"),
         r'^routing\.rules\[0\]\.upstream: no upstream named "x"'),
        (rules(users=["a*"]), r"^routing\.rules\[0\]\.upstream: required"),
        (rules(upstream="new"), r"^routing\.rules\[0\]\.users: required"),
        (rules(users="a*", upstream="new"), r"^routing\.rules\[0\]\.users: expected a non-empty"),
        (rules(users=[], upstream="new"), r"^routing\.rules\[0\]\.users: expected a non-empty"),
        (rules(users=[""], upstream="new"), r"^routing\.rules\[0\]\.users"),
        (rules(users=["a"], upstream="new", match="x"),
         r"^routing\.rules\[0\]\.match: unknown key"),
        (rules(users=["a"], upstream="new", backend_user="a b"),
         r"^routing\.rules\[0\]\.backend_user: .*whitespace"),
        (rules(users=["a"], upstream="new", backend_user="a\r\nDELE 1"),
         r"^routing\.rules\[0\]\.backend_user: .*control"),
        (rules(users=["a"], upstream="new", backend_user=""),
         r"^routing\.rules\[0\]\.backend_user: empty"),
        ({"default": "legacy", "rules": {"users": ["a"]}},
         r"^routing\.rules: expected \[\[routing"),
        ({"default": "legacy", "rules": ["x"]}, r"^routing\.rules\[0\]: expected a table"),
        ({"map_file": ""}, r"^routing\.map_file: expected a file path"),
        ({"map_file": 7}, r"^routing\.map_file: expected a file path"),
        ({"auth_http": "ftp://h/x"}, r"^routing\.auth_http: expected an http:// or https://"),
        ({"auth_http": "http:///auth"}, r"^routing\.auth_http: expected an http"),
        ({"auth_http": "http://u:pw@h/auth"}, r"^routing\.auth_http: no credentials in the URL"),
        ({"auth_http": "ftp://u:pw@h/auth"}, r"^routing\.auth_http: no credentials in the URL"),
        ({"auth_http": "http://tok3n@h:99999/"}, r"^routing\.auth_http: no credentials"),
        ({"auth_http": "http://h:99999/auth"}, r"^routing\.auth_http: not a valid URL"),
        ({"auth_http": "http://h/a b"}, r"^routing\.auth_http: not a usable URL"),
        ({"auth_http": 1}, r"^routing\.auth_http: expected a URL"),
        ({"auth_http": "http://h/", "auth_http_timeout": "soon"}, r"^routing\.auth_http_timeout"),
        ({"auth_http": "http://h/", "auth_http_timeout": 0}, r"^routing\.auth_http_timeout"),
        ({"auth_http": "http://h/", "auth_http_concurrency": 0},
         r"^routing\.auth_http_concurrency: expected 1\.\.100000"),
        ({"auth_http": "http://h/", "auth_http_concurrency": "8"},
         r"^routing\.auth_http_concurrency: expected an integer"),
        ({"auth_http": "http://h/", "auth_http_headers": ["X-A"]},
         r"^routing\.auth_http_headers: expected a table"),
        ({"auth_http": "http://h/", "auth_http_headers": {"X A": "v"}},
         r"^routing\.auth_http_headers\.X A: not a valid HTTP header name"),
        ({"auth_http": "http://h/", "auth_http_headers": {"Auth-Pass": "v"}},
         r"^routing\.auth_http_headers\.Auth-Pass: set by the proxy"),
        ({"auth_http": "http://h/", "auth_http_headers": {"X-Key": "a\r\nb"}},
         r"^routing\.auth_http_headers\.X-Key: expected one line of ASCII"),
        ({"default": "legacy", "auth_http_timeout": "2s"},
         r"^routing\.auth_http_timeout: only meaningful with routing\.auth_http"),
        ({"default": "legacy", "down_time": "-1s"}, r"^routing\.down_time"),
    ],
)
def test_errors_name_the_key(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_routing(raw, NAMES)


def test_unknown_upstream_error_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_routing(rules(users=["a"], upstream="nwe"), NAMES)
    assert str(info.value) == (
        'routing.rules[0].upstream: no upstream named "nwe" '
        '(known: "default", "legacy", "new")'
    )


def test_a_shared_secret_is_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse_routing({"auth_http": "http://h/", "auth_http_headers": {"X-Key": "t0p\x01secret"}},
                      NAMES)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "ok"),
    [("alice", True), ("bob@example.org", True), ("jürgen", True), ("", False),
     ("a b", False), ("a\tb", False), ("a\rb", False), ("a\nb", False), ("a\0b", False),
     ("a\x7fb", False)],
)
def test_check_user_name(name: str, ok: bool) -> None:
    assert (check_user_name(name) is None) is ok


_toml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False)
    | st.sampled_from(["legacy", "new", "x", "2s", "0s", "http://h/a", "acc*", "", "a b"])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["users", "upstream", "backend_user", "X-Key", "other"]), inner,
        max_size=3),
    max_leaves=8,
)
_routing_keys = st.sampled_from([
    "default", "map_file", "auth_http", "auth_http_timeout", "auth_http_concurrency",
    "auth_http_headers", "down_time", "rules", "bogus",
])


@given(st.dictionaries(_routing_keys, _toml_values, max_size=5))
@settings(max_examples=300)
def test_any_table_gives_a_config_or_an_error_naming_routing(raw: dict[str, object]) -> None:
    error: ConfigError | None = None
    try:
        cfg = parse_routing(raw, NAMES)
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert str(error).startswith("routing")
    else:
        assert isinstance(cfg, RoutingConfig)
        assert all(r.upstream in NAMES for r in cfg.rules)
        assert cfg.default is None or cfg.default in NAMES
