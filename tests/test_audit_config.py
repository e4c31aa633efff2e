"""The ``[audit]`` section: defaults, strictness, errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from popproxy.audit import AuditConfig, open_audit, parse_audit
from popproxy.config import ConfigError, parse_config


def config(**audit: Any) -> AuditConfig:
    return parse_config({"upstream": {"address": "127.0.0.1:110"}, "audit": audit}).audit


class TestParseAudit:
    def test_no_section_means_no_audit(self) -> None:
        """Without ``[audit]`` the trail is off and open_audit gives None."""
        cfg = parse_config({"upstream": {"address": "127.0.0.1:110"}}).audit
        assert cfg.enabled is False
        assert open_audit(cfg) is None

    def test_empty_section_has_documented_defaults(self) -> None:
        """An empty ``[audit]`` turns the trail on, to stdout, chained, fsync per session."""
        cfg = config()
        assert cfg == AuditConfig(enabled=True, sink="stdout", path=None, hash_chain=True,
                                  fsync="session", fail_closed=False, rotate_size=None,
                                  commands="all", headers=(), resolve_uidl=False)

    def test_every_key(self) -> None:
        """All keys parse into typed values; sizes take units."""
        cfg = config(sink="both", path="/var/log/popproxy/audit.jsonl", hash_chain=False,
                     fsync="always", fail_closed=True, rotate_size="100MiB",
                     commands="messages", headers=["Date", "From", "Subject"],
                     resolve_uidl=True)
        assert cfg.path == Path("/var/log/popproxy/audit.jsonl")
        assert cfg.rotate_size == 100 * 1024 * 1024
        assert cfg.headers == ("Date", "From", "Subject")
        assert (cfg.sink, cfg.hash_chain, cfg.fsync, cfg.fail_closed, cfg.commands,
                cfg.resolve_uidl) == ("both", False, "always", True, "messages", True)

    @pytest.mark.parametrize(
        ("audit", "message"),
        [
            ({"sink": "syslog"}, "audit.sink: expected one of stdout, file, both"),
            ({"sink": "file"}, 'audit.path: required with sink = "file"'),
            ({"path": "/tmp/a.jsonl"}, 'audit.path: only used with sink = "file" or "both"'),
            ({"rotate_size": "1MiB"}, "audit.rotate_size: only used with sink"),
            ({"sink": "file", "path": "/tmp/a", "rotate_size": "ten"}, "audit.rotate_size:"),
            ({"sink": "file", "path": "/tmp/a", "rotate_size": 100},
             "audit.rotate_size: must be at least 4KiB"),
            ({"hash_chain": "yes"}, "audit.hash_chain: expected true or false"),
            ({"fsync": "sometimes"}, "audit.fsync: expected one of always, session, never"),
            ({"fail_closed": 1}, "audit.fail_closed: expected true or false"),
            ({"commands": "some"}, "audit.commands: expected one of all, messages"),
            ({"headers": "Subject"}, "audit.headers: expected a list"),
            ({"headers": ["Subject", "Bad Name"]}, "audit.headers[1]: expected a header"),
            ({"headers": ["Date", "date"]}, "audit.headers[1]: 'date' is listed twice"),
            ({"headers": ["Message-ID"]}, "audit.headers[0]: Message-ID is always recorded"),
            ({"resolve_uidl": "no"}, "audit.resolve_uidl: expected true or false"),
            ({"path": ""}, "audit.path: expected a file name"),
            ({"sinks": "stdout"}, "audit.sinks: unknown key"),
        ],
    )
    def test_errors_name_the_key(self, audit: dict[str, Any], message: str) -> None:
        """Every mistake is an error that starts with the key's path."""
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            parse_audit(audit)

    def test_not_a_table(self) -> None:
        """``audit = "on"`` is not a section."""
        with pytest.raises(ConfigError, match=r"^audit: expected a table"):
            parse_audit("on")
