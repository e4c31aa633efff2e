"""Operational logging: configured once, never a credential in a traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from popproxy.logs import configure_logging


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """stdout as the logs see it (configure_logging binds sys.stdout when called)."""
    yield capsys
    structlog.reset_defaults()


def fail_with_a_secret_in_a_local() -> None:
    password = "hunter2-very-secret"  # noqa: F841 (the point: a local holding a secret)
    raise RuntimeError("something broke")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_never_show_local_variables(
    captured: pytest.CaptureFixture[str], fmt: str
) -> None:
    configure_logging("info", fmt)
    try:
        fail_with_a_secret_in_a_local()
    except RuntimeError:
        structlog.get_logger("t").exception("session.crashed")
    text = captured.readouterr().out
    assert "something broke" in text  # the traceback is there ...
    assert "hunter2-very-secret" not in text  # ... its locals are not


def test_json_lines_when_asked(captured: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    structlog.get_logger("t").info("listening", address="127.0.0.1:1110")
    record = json.loads(captured.readouterr().out)
    assert record["event"] == "listening"
    assert record["level"] == "info"
    assert record["timestamp"].endswith("Z")
