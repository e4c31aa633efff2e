"""Operational logging: structlog configured once, at the edge.

JSON lines when stdout is not a terminal (for journald, Docker, Loki),
readable console output when it is.  The audit trail is a separate
observer; these are the proxy's own logs.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

import orjson
import structlog

from .events import (
    AuthResult,
    Event,
    Greeting,
    Outcome,
    ProtocolAnomaly,
    Response,
    SessionClosed,
    SessionOpened,
    Unsolicited,
)
from .jsonl import one_line
from .observe import SessionInfo, listens_to
from .pop3 import arg_octets, recorded
from .timefmt import utcnow_rfc3339

__all__ = ["configure_logging", "log_observer"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

logger = structlog.get_logger("popproxy.session")


def configure_logging(
    level: str = "info", fmt: str = "auto", worker: int | None = None,
    file: BinaryIO | None = None,
) -> None:
    """The only ``structlog.configure`` call in popproxy.

    ``worker``: in worker process N (``[server] workers > 1``) every line
    carries ``worker=N`` and the process id, whichever thread logs it.
    ``file``: where the lines go instead of stdout (tests), as bytes.
    """
    global _debug
    _debug = _LEVELS[level] <= logging.DEBUG
    json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *([_WorkerFields(worker)] if worker is not None else []),
        structlog.processors.add_log_level,
        _timestamp,
    ]
    factory: Any
    # Tracebacks never show local variables: a frame's locals can hold a
    # password or a SASL response (structlog's defaults would print them).
    if json:
        # orjson and bytes straight to stdout: a line costs half of what
        # the standard json module and a text stream cost, and a session
        # logs three (open, auth, close).
        processors += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
        factory = structlog.BytesLoggerFactory(file=file or sys.stdout.buffer)
    else:
        processors.append(
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        )
        factory = structlog.WriteLoggerFactory(
            file=sys.stdout if file is None else io.TextIOWrapper(file, write_through=True))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def _dumps(obj: Any, **kw: Any) -> bytes:
    """orjson, with what would split a line for some readers escaped (``jsonl``)."""
    return one_line(orjson.dumps(obj, **kw))


def _timestamp(logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """``timestamp`` as structlog's ``TimeStamper(fmt="iso", utc=True)``
    writes it, formatted once a second rather than once a line."""
    event_dict["timestamp"] = utcnow_rfc3339()
    return event_dict


class _WorkerFields:
    """A processor: ``worker`` and ``pid`` on every line of a worker process.

    A processor rather than context variables, so that lines logged from
    threads (the audit's fsync thread, the supervisor channel) carry them too.
    """

    __slots__ = ("pid", "worker")

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.pid = os.getpid()

    def __call__(self, logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["worker"] = self.worker
        event_dict["pid"] = self.pid
        return event_dict


def log_observer(info: SessionInfo, event: Event) -> None:
    """One log line per session milestone; commands only at debug level.

    Commands are logged with ``redacted_args``: never a password, digest or
    SASL response.  Dispatch is by exact type, since this runs for every
    event of every session.
    """
    handler = _HANDLERS.get(type(event))
    if handler is not None:
        handler(info, event)


def _opened(info: SessionInfo, event: Any) -> None:
    logger.info("session.open", client=event.client, via=event.via)


def _closed(info: SessionInfo, event: Any) -> None:
    logger.info(
        "session.close", user=info.user, reason=event.reason.value, detail=event.detail or None,
        duration=round(event.duration, 6), bytes_in=event.bytes_in,
        bytes_out=event.bytes_out, commands=event.commands,
    )


def _auth(info: SessionInfo, event: Any) -> None:
    logger.info("auth", user=event.user, mechanism=event.mechanism,
                outcome="ok" if event.ok else "fail", code=event.code,
                **({"upstream": event.upstream, "route": event.route} if event.upstream else {}))


def _greeting(info: SessionInfo, event: Any) -> None:
    if not event.ok:
        logger.warning("upstream.refused", text=event.text)


def _unsolicited(info: SessionInfo, event: Any) -> None:
    logger.info("upstream.unsolicited", ok=event.ok, code=event.code, text=event.text)


def _anomaly(info: SessionInfo, event: Any) -> None:
    logger.info("protocol.anomaly", side=event.side, kind=event.kind, detail=event.detail)


def _response(info: SessionInfo, event: Any) -> None:
    if _debug:  # build the arguments only when the line will be written
        # As in the audit (``pop3.recorded``): an unknown verb's arguments,
        # and those of a command refused before login, are not written.
        cmd = event.command
        verb, args = recorded(cmd, refused=info.user is None and event.outcome is Outcome.DENIED)
        logger.debug(
            "command", verb=verb, args=list(args) if args is not None else None,
            **({"arg_octets": arg_octets(cmd)} if args is None else {}),
            outcome=event.outcome.value, local=event.local, latency=event.latency,
        )


_HANDLERS: dict[type[Event], Callable[[SessionInfo, Any], None]] = {
    SessionOpened: _opened,
    SessionClosed: _closed,
    AuthResult: _auth,
    Greeting: _greeting,
    Unsolicited: _unsolicited,
    ProtocolAnomaly: _anomaly,
    Response: _response,
}
listens_to(*_HANDLERS)(log_observer)
_debug = False  # configure_logging turns it on for level = "debug"
