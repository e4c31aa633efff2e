"""The session log lines as ``popproxy run`` writes them (JSON), captured."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from popproxy import logs
from popproxy.logs import configure_logging

__all__ = ["captured_log"]


@contextmanager
def captured_log(level: str) -> Iterator[io.BytesIO]:
    """Capture the log lines at ``level`` while the block runs.

    The session logger of ``popproxy.logs`` is cached on first use, so a
    fresh one stands in for it while the capture lasts.
    """
    buf = io.BytesIO()
    saved = logs.logger, logs._debug
    configure_logging(level, "json", file=buf)
    logs.logger = structlog.get_logger("popproxy.session")
    try:
        yield buf
    finally:
        logs.logger, logs._debug = saved
        structlog.reset_defaults()
