"""Assembling the app and reloading its configuration (no network)."""

from __future__ import annotations

from typing import Any

from popproxy.app import build, reload
from popproxy.config import Config, ConfigError, parse_config

BASE: dict[str, Any] = {"upstream": {"address": "127.0.0.1:110"}}


def config(**sections: Any) -> Config:
    return parse_config({**BASE, **sections})


def test_reload_swaps_policy_and_keeps_what_needs_a_restart() -> None:
    app = build(config())
    new = config(
        upstream={"address": "127.0.0.1:995"},
        audit={"sink": "stdout"},
        limits={"idle_timeout": "20m"},
        policy={"rules": [{"name": "ro", "action": "deny", "match": {"commands": ["DELE"]}}]},
    )
    assert reload(app, lambda: new)
    assert app.reloads == 1
    assert [r.name for r in app.policy.current.config.rules] == ["ro"]
    assert app.proxy.config.limits.idle_timeout == 1200  # new sessions get it
    assert app.proxy.config.upstream.address.port == 110  # a restart changes it
    assert app.proxy.config.audit.enabled is False  # likewise


def test_invalid_reload_keeps_the_old_configuration() -> None:
    app = build(config(policy={"rules": [{"name": "a", "action": "allow"}]}))

    def broken() -> Config:
        raise ConfigError("limits.idle_timeout: expected a duration")

    assert not reload(app, broken)
    assert app.reloads == 1
    assert [r.name for r in app.policy.current.config.rules] == ["a"]
