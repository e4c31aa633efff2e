"""Configuration: strict parsing, errors that name the key, and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from popproxy.cli import main
from popproxy.config import (
    Config,
    ConfigError,
    HostPort,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "popproxy.example.toml"


def minimal(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"upstream": {"address": "127.0.0.1:110"}}
    raw.update(sections)
    return raw


class TestParse:
    def test_minimal_config_has_documented_defaults(self) -> None:
        cfg = parse_config(minimal())
        assert cfg.listeners[0].addresses == (HostPort("127.0.0.1", 1110),)
        assert cfg.limits.idle_timeout == 600
        assert cfg.limits.command_line == 1024
        assert cfg.limits.sasl_line == 16384

    def test_example_config_is_valid(self) -> None:
        cfg = load_config(EXAMPLE)
        assert isinstance(cfg, Config)
        assert HostPort("::1", 1110) in cfg.listeners[0].addresses

    @pytest.mark.parametrize(
        ("raw", "key"),
        [
            (minimal(listen={"adress": "x:1"}), r"listen\.adress: unknown key"),
            (minimal(limits={"idle_timeout": "ten minutes"}), r"limits\.idle_timeout"),
            (minimal(limits={"max_sessions": "10"}), r"limits\.max_sessions: expected an integer"),
            (minimal(limits={"max_sessions": True}), r"limits\.max_sessions"),
            (minimal(limits={"command_line": 100}), r"limits\.command_line: .*255"),
            (minimal(limits={"sasl_line": "512"}), r"limits\.sasl_line"),
            (minimal(upstream={"address": "::1:110"}), r"upstream\.address: .*brackets"),
            (minimal(upstream={"address": "host:99999"}), r"upstream\.address"),
            (minimal(upstream={}), r"upstream\.address: required"),
            ({"listen": {}}, r"upstream: required"),
            (minimal(log={"level": "loud"}), r"log\.level"),
            (minimal(bogus={}), r"bogus: unknown section"),
            (minimal(metrics={"adress": "x:1"}), r"metrics\.adress: unknown key"),
        ],
    )
    def test_errors_name_the_key(self, raw: dict[str, Any], key: str) -> None:
        with pytest.raises(ConfigError, match=key):
            parse_config(raw)

    @pytest.mark.parametrize(
        ("text", "seconds"), [("30s", 30.0), ("10m", 600.0), ("250ms", 0.25), ("1h", 3600.0),
                              (5, 5.0)]
    )
    def test_durations(self, text: object, seconds: float) -> None:
        assert parse_duration(text, "k") == seconds

    @pytest.mark.parametrize(
        ("text", "octets"), [("1KiB", 1024), ("16KiB", 16384), ("10MiB", 10 << 20), (300, 300)]
    )
    def test_sizes(self, text: object, octets: int) -> None:
        assert parse_size(text, "k") == octets

    def test_ipv6_listen_address(self) -> None:
        cfg = parse_config(minimal(listen={"address": "[::1]:1995"}))
        assert cfg.listeners[0].addresses == (HostPort("::1", 1995),)
        assert str(cfg.listeners[0].addresses[0]) == "[::1]:1995"


class TestCli:
    def test_check_config_accepts_the_example(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["check-config", str(EXAMPLE)]) == 0
        assert "OK" in capsys.readouterr().out

    def test_check_config_names_the_key(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        bad = tmp_path / "bad.toml"
        bad.write_text('[upstream]\naddress = "127.0.0.1:110"\n[limits]\nidle = "1m"\n')
        assert main(["check-config", str(bad)]) == 1
        assert "limits.idle: unknown key" in capsys.readouterr().err

    def test_check_config_reports_toml_syntax(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        bad = tmp_path / "bad.toml"
        bad.write_text("[upstream\n")
        assert main(["check-config", str(bad)]) == 1
        assert "not valid TOML" in capsys.readouterr().err

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith("popproxy ")

    def test_help_mentions_every_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        for command in ("run", "check-config", "demo"):
            assert command in out

    def test_run_with_invalid_config_exits_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        bad = tmp_path / "bad.toml"
        bad.write_text("[listen]\n")
        assert main(["run", "-c", str(bad)]) == 2
        assert "upstream" in capsys.readouterr().err
