"""The crash trace: what the previous run left open, read from its trail.

A proxy that is killed (``kill -9``, the OOM killer, a power cut) writes
nothing more: the sessions it served have no ``session.close``, their
deletion marks no ``message.delete.uncommitted``, and a RETR it was
streaming no ``message.retrieve``.  On the next start ``look_back`` reads
the end of the trail it continues and ``recovery_records`` makes those
records, so the trail says how every session ended:

* the run ended cleanly if its last record (checkpoints aside) is
  ``proxy.stop``, which ``AuditTrail.close`` writes after closing every
  session; then nothing is read further;
* otherwise the trail is read backwards, newest record first, from the
  live file into its rotated files, until the last point where no session
  was open: a ``proxy.start`` or ``proxy.stop`` (every earlier session was
  closed there, by recovery or shutdown), a ``session.close`` with
  ``sessions_open: 0``, or the beginning of the trail.  It never reads more
  than ``WINDOW`` bytes: a session opened before that (one held open for
  days on a busy proxy) is not closed, and ``proxy.start`` says the look
  back was cut short (``look_back.stopped_at = "window"``).
* every session with records in that stretch and no ``session.close`` was
  open at the crash.  Its marks (``message.delete.marked`` not followed by
  a reset, commit or uncommit) become ``message.delete.uncommitted``: the
  server discards marks when a connection drops without QUIT (RFC 1939
  §6).  A ``message.retrieving`` with no ``message.retrieve`` after it
  becomes a ``message.retrieve`` with ``complete: false`` and unknown
  ``octets`` and ``sha256`` (null): bytes of it may have reached the client.

Each worker process (``workers > 1``) keeps its own chain in its own file
and recovers that file when it starts (also when the supervisor restarts
it after a crash).  No I/O happens here beyond reading; the trail writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import structlog

from .. import __version__
from ..events import EndReason
from ._chain import rotated_files

__all__ = ["WINDOW", "LookBack", "OpenSession", "look_back", "recovery_records",
           "start_records"]

#: The most bytes of trail read back on an unclean start (64 MiB: about
#: 200,000 records, well under a second to parse).
WINDOW = 64 << 20
_BLOCK = 1 << 20
# Records that do not belong to a run's sessions and do not say how it ended.
_NEUTRAL = frozenset({"audit.checkpoint", "audit.lost"})
_BARRIERS = frozenset({"proxy.start", "proxy.stop"})
# A session's records that matter to its crash trace.
_KEPT = frozenset({
    "session.open", "auth", "message.delete.marked", "message.delete.reset",
    "message.delete.committed", "message.delete.uncommitted", "message.retrieving",
    "message.retrieve",
})

Record = dict[str, Any]

logger = structlog.get_logger("popproxy.audit")


@dataclass
class OpenSession:
    """A session the trail shows open: its records, oldest first."""

    id: str
    records: list[Record] = field(default_factory=list)
    last_ts: str | None = None  # its newest record's

    @property
    def opened(self) -> bool:
        """Its ``session.open`` is within the look back."""
        return any(r.get("event") == "session.open" for r in self.records)


@dataclass
class LookBack:
    """What the end of the previous run's trail says."""

    records: bool = False  # the trail has any record at all
    clean: bool = True  # it ended with proxy.stop (or has no record)
    sessions: list[OpenSession] = field(default_factory=list)  # open, oldest first
    bytes: int = 0  # read back
    # What ended the look back: "clean stop", "proxy.start", "quiet point"
    # (a session.close with sessions_open 0), "trail start", or "window".
    stopped_at: str = "trail start"


class _Budget:
    __slots__ = ("exhausted", "left")

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.exhausted = False


def _lines_backwards(path: Path, budget: _Budget) -> Iterator[bytes]:
    """Complete lines of ``path``, last first, reading at most ``budget``
    bytes; a torn last line (a write cut by the crash) is skipped."""
    if not path.is_file():  # missing, or a device or FIFO (opening one may block)
        return
    try:
        f = open(path, "rb")  # noqa: SIM115 (a generator holds it)
    except FileNotFoundError:
        return
    with f:
        pos = f.seek(0, os.SEEK_END)
        rest = b""
        skip_tail = True  # the bytes after the file's last newline are no record
        while pos > 0:
            if budget.left <= 0:
                budget.exhausted = True
                return
            n = min(_BLOCK, pos, budget.left)
            pos -= n
            f.seek(pos)
            data = f.read(n) + rest
            budget.left -= n
            parts = data.split(b"\n")
            # The first part may begin before this block.
            rest = parts.pop(0) if pos > 0 else b""
            if skip_tail and (parts or pos == 0):
                if parts:
                    parts.pop()
                skip_tail = False
            for line in reversed(parts):
                if line:
                    yield line


def _records_backwards(path: Path, budget: _Budget) -> Iterator[Record]:
    """The trail's records, newest first: the live file, then its rotated
    files from the newest.  Lines that are not JSON objects are skipped."""
    for file in [path, *reversed(rotated_files(path))]:
        for line in _lines_backwards(file, budget):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record
        if budget.exhausted:
            return


def look_back(path: Path, window: int = WINDOW) -> LookBack:
    """Read the end of the trail at ``path`` (see the module docstring).

    Raises ``OSError`` if a file of it cannot be read.
    """
    result = LookBack()
    budget = _Budget(window)
    closed: set[str] = set()
    found: dict[str, OpenSession] = {}
    order: dict[str, int] = {}  # session -> index of its oldest record seen
    index = 0
    stopped_at = "trail start"
    for record in _records_backwards(path, budget):
        index += 1
        event = record.get("event")
        if not result.records:
            if event in _NEUTRAL:
                continue
            result.records = True
            if event == "proxy.stop":
                stopped_at = "clean stop"
                break
            result.clean = False
        if event in _BARRIERS:
            stopped_at = str(event)
            break
        sid = record.get("session")
        if not isinstance(sid, str):
            continue
        if event == "session.close":
            closed.add(sid)
            if record.get("sessions_open") == 0:
                stopped_at = "quiet point"
                break
            continue
        if sid in closed:
            continue
        session = found.get(sid)
        if session is None:
            session = found[sid] = OpenSession(sid, last_ts=_str(record.get("ts")))
        order[sid] = index
        if event in _KEPT:
            session.records.append(record)
    else:
        if budget.exhausted:
            stopped_at = "window"
    result.bytes = window - budget.left
    result.stopped_at = stopped_at
    for session in found.values():
        session.records.reverse()
    result.sessions = sorted(found.values(), key=lambda s: -order[s.id])
    return result


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _base(stamp: Callable[[], str], sid: str, user: str | None, client: str | None,
          name: str) -> Record:
    rec: Record = {"ts": stamp(), "event": name, "session": sid}
    if user is not None:
        rec["user"] = user
    rec["client"] = client
    return rec


def recovery_records(previous: LookBack, stamp: Callable[[], str]) -> list[Record]:
    """The records that close, in the trail, each session ``previous``
    shows open: an unfinished RETR/TOP, the marks, then ``session.close``."""
    records: list[Record] = []
    reason = EndReason.PROXY_CRASHED
    for session in previous.sessions:
        client: str | None = None
        user: str | None = None
        marks: dict[int, Record] = {}
        retrieving: dict[tuple[object, object], Record] = {}
        for r in session.records:
            client = _str(r.get("client")) or client
            if r.get("event") != "auth" or r.get("outcome") == "ok":
                user = _str(r.get("user")) or user
            event = r.get("event")
            if event == "message.delete.marked":
                if isinstance(r.get("msg"), int):
                    marks[r["msg"]] = r
            elif event in ("message.delete.reset", "message.delete.committed",
                           "message.delete.uncommitted"):
                marks.clear()  # RSET unmarks all; commit and uncommit end them all
            elif event == "message.retrieving":
                retrieving[(r.get("command"), r.get("msg"))] = r
            elif event == "message.retrieve":
                retrieving.pop((r.get("command"), r.get("msg")), None)

        base = partial(_base, stamp, session.id, user, client)
        for start in retrieving.values():
            rec = base("message.retrieve")
            rec["command"] = start.get("command")
            rec["msg"] = start.get("msg")
            if "lines" in start:
                rec["lines"] = start["lines"]
            rec["uidl"] = start.get("uidl")
            rec["octets"] = None  # unknown: the proxy died while it streamed
            rec["sha256"] = None
            rec["message_id"] = None
            rec["complete"] = False
            rec["announced"] = start.get("announced")
            rec["recovered"] = True
            records.append(rec)
        for msg, marked in marks.items():
            rec = base("message.delete.uncommitted")
            rec["msg"] = msg
            rec["uidl"] = marked.get("uidl")
            if "message_id" in marked:
                rec["message_id"] = marked["message_id"]
            rec["recovered"] = True
            records.append(rec)
        rec = base("session.close")
        rec["reason"] = reason.audit
        rec["outcome"] = reason.outcome
        rec["detail"] = ("the proxy stopped without closing the session (its last record: "
                         f"{session.last_ts})")
        rec["duration"] = None  # unknown, like the byte counts: the process died
        rec["bytes_in"] = None
        rec["bytes_out"] = None
        rec["commands"] = None
        rec["last_seen"] = session.last_ts
        rec["recovered"] = True
        records.append(rec)
    return records


def start_records(previous: LookBack | None, stamp: Callable[[], str], worker: int | None,
                  resumed: int | None) -> list[Record]:
    """``proxy.start`` and, after an unclean end, the crash trace.

    ``resumed`` is the seq of the record the chain continues from (0 for a
    new chain, None without one); ``previous`` None (no file to read back:
    stdout) makes ``unclean`` null: unknown.
    """
    record: Record = {"ts": stamp(), "event": "proxy.start", "pid": os.getpid(),
                      "version": __version__}
    if worker is not None:
        record["worker"] = worker
    record["resumed"] = resumed
    record["unclean"] = None if previous is None else not previous.clean
    if previous is None or previous.clean:
        return [record]
    record["sessions"] = len(previous.sessions)
    record["look_back"] = {"bytes": previous.bytes, "stopped_at": previous.stopped_at}
    logger.warning("audit.unclean_stop", resumed=resumed, sessions=len(previous.sessions),
                   read=previous.bytes, stopped_at=previous.stopped_at)
    return [record, *recovery_records(previous, stamp)]
