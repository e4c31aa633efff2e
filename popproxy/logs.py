"""Operational logging: structlog configured once, at the edge.

JSON lines when stdout is not a terminal (for journald, Docker, Loki),
readable console output when it is.  The audit trail is a separate
observer; these are the proxy's own logs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from .events import (
    AuthResult,
    Event,
    Greeting,
    ProtocolAnomaly,
    Response,
    SessionClosed,
    SessionOpened,
    Unsolicited,
)
from .server import SessionInfo

__all__ = ["configure_logging", "log_observer"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

logger = structlog.get_logger("popproxy.session")


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """The only ``structlog.configure`` call in popproxy."""
    json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks never show local variables: a frame's locals can hold a
    # password or a SASL response (structlog's defaults would print them).
    if json:
        processors += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors.append(
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


def log_observer(info: SessionInfo, event: Event) -> None:
    """One log line per session milestone; commands only at debug level.

    Commands are logged with ``redacted_args``: never a password, digest or
    SASL response.
    """
    if isinstance(event, SessionOpened):
        logger.info("session.open", client=event.client)
    elif isinstance(event, SessionClosed):
        logger.info(
            "session.close", user=info.user, reason=event.reason,
            duration=round(event.duration, 6), bytes_in=event.bytes_in,
            bytes_out=event.bytes_out, commands=event.commands,
        )
    elif isinstance(event, AuthResult):
        logger.info("auth", user=event.user, mechanism=event.mechanism,
                    outcome="ok" if event.ok else "fail", code=event.code)
    elif isinstance(event, Greeting) and not event.ok:
        logger.warning("upstream.refused", text=event.text)
    elif isinstance(event, Unsolicited):
        logger.info("upstream.unsolicited", ok=event.ok, code=event.code, text=event.text)
    elif isinstance(event, ProtocolAnomaly):
        logger.info("protocol.anomaly", side=event.side, kind=event.kind, detail=event.detail)
    elif isinstance(event, Response):
        logger.debug(
            "command", verb=event.command.verb, args=list(event.command.redacted_args()),
            outcome="ok" if event.ok else "err", local=event.local, latency=event.latency,
        )
