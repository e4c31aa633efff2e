"""The audit trail: records, hash chain, structlog rendering, sinks.

``AuditTrail.observe`` is a proxy observer.  For each event it asks the
``RecordBuilder`` for records and logs each through its own structlog
logger: a processor chain private to the audit (the record, then its
canonical JSON line with the hash chain) over a logger that writes to the
sinks.  It is built with ``structlog.wrap_logger``, so the global structlog
configuration (the operational logs, ``popproxy.logs``) neither affects it
nor sees it.

Durability and failures.  Records are written in order, each batch with
one ``write(2)`` per sink.  Outside ``write_behind``, or with ``fsync =
"always"``, a batch is what one event made, written at once.  While the
``write_behind`` task runs (``app.run`` starts it), records wait in memory
and are written together: ``BATCH_WAIT`` (10 ms) after the first of them,
once ``BATCH_LIMIT`` wait, or when a session ends (a ``session.close``
record is written at once, with everything that waits, so a session's
records are in the kernel before it is reported closed).  Rendering and
writing many records in a row costs less than one at a time between the
relay's own work, and a timer costs the event loop one wake-up per batch:
a trio instrument, called on every pass of the loop, cost more.
``fsync = "always"`` syncs after every record, ``"session"`` after each
``session.close`` record (in the file sink's own thread, coalesced) and at
``close()``, ``"never"`` leaves it to the kernel.
A sink that fails is logged (``audit.sink_failed``) and counted; its lines
wait in a bounded queue and are written, in order, as soon as a write works
again (each new batch and each ``refusal()`` tries).  If the queue is full,
new records are dropped *before* they are chained, so the chain stays
intact, and an ``audit.lost`` record with the count is written on recovery.
With ``fail_closed`` the proxy refuses new sessions while a sink is failing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import structlog
import trio
from structlog.typing import EventDict, WrappedLogger

from ..events import Event
from ._chain import ChainHead, canonical, read_head
from ._records import Record, RecordBuilder, SessionRef, rfc3339, utcnow
from ._sinks import FileSink, Sink, StreamSink
from .config import AuditConfig

__all__ = ["AuditTrail", "open_audit", "worker_path"]


logger = structlog.get_logger("popproxy.audit")


def _noop(*args: object) -> None:
    return None


class Writer:
    """One sink plus the queue of lines it has not taken yet.

    The queue holds chunks of whole lines as they were written, with their
    line counts; the limits are on lines and bytes.
    """

    __slots__ = (
        "failure", "max_bytes", "max_lines", "pending", "pending_bytes", "pending_lines",
        "sink", "written",
    )

    def __init__(self, sink: Sink, max_lines: int, max_bytes: int) -> None:
        self.sink = sink
        self.pending: deque[tuple[bytes, int]] = deque()
        self.pending_bytes = 0
        self.pending_lines = 0
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.failure: Exception | None = None
        self.written = 0  # lines written so far

    def full(self, lines: int = 0, size: int = 0) -> bool:
        """Would ``lines`` more lines (``size`` bytes) overflow the queue?"""
        return (self.pending_lines + lines >= self.max_lines
                or self.pending_bytes + size >= self.max_bytes)

    def write(self, data: bytes, lines: int) -> bool:
        """Write ``data`` (``lines`` whole lines) after what is queued;
        False if it had to be queued."""
        if not self.pending:
            try:
                self.sink.write(data)
            except Exception as exc:  # OSError mostly; ValueError from a closed stream
                self._queue(data, lines)
                self._failed(exc)
                return False
            self.written += lines
            return True
        self._queue(data, lines)
        self.drain()
        return not self.pending

    def _queue(self, data: bytes, lines: int) -> None:
        self.pending.append((data, lines))
        self.pending_bytes += len(data)
        self.pending_lines += lines

    def drain(self) -> int:
        """Write queued lines in order until done or the sink fails again."""
        done = 0
        while self.pending:
            data, lines = self.pending[0]
            try:
                self.sink.write(data)
            except Exception as exc:
                self._failed(exc)
                return done
            self.pending.popleft()
            self.pending_bytes -= len(data)
            self.pending_lines -= lines
            self.written += lines
            done += lines
        if self.failure is not None:
            logger.warning("audit.sink_recovered", sink=self.sink.name, written=done)
            self.failure = None
        return done

    def _failed(self, exc: Exception) -> None:
        if self.failure is None:
            logger.error("audit.sink_failed", sink=self.sink.name, error=str(exc),
                         queued=self.pending_lines)
        self.failure = exc


class _SinkLogger:
    """The structlog "logger" at the end of the audit's processor chain."""

    __slots__ = ("_trail",)

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    def info(self, data: bytes, lines: int) -> None:
        self._trail._write(data, lines)

    msg = info


class _Render:
    """The processor: a batch of records as their lines (canonical JSON,
    chained when on), ready for one write.

    The records travel as one keyword (``records=``), so structlog neither
    copies them field by field nor runs once per record.  A record is
    dropped here, before it takes a place in the chain, when a sink's queue
    is full.
    """

    __slots__ = ("_trail",)

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    def __call__(self, logger: WrappedLogger, name: str,
                 event_dict: EventDict) -> tuple[tuple[bytes, int], dict[str, object]]:
        records: list[Record] = event_dict["records"]
        trail = self._trail
        render = trail.head.link if trail.head is not None else canonical
        lines: list[bytes] = []
        size = 0
        for record in records:
            if trail._queued and any(w.full(len(lines), size) for w in trail._writers):
                trail._lost(record)
                continue
            line = render(record)
            lines.append(line)
            size += len(line) + 1
        if not lines:
            raise structlog.DropEvent
        count = len(lines)
        lines.append(b"")
        return (b"\n".join(lines), count), {}


# How long records may wait: in number, in seconds.
BATCH_LIMIT = 64
BATCH_WAIT = 0.01


class AuditTrail:
    """The audit observer; see the module docstring.

    ``head`` is where the hash chain continues (None: no chain).  ``now``
    gives the records' ``ts``.  ``metrics`` may have ``audit_record(n)`` and
    ``audit_error()``; both are optional.
    """

    def __init__(
        self,
        config: AuditConfig,
        sinks: Sequence[Sink],
        *,
        head: ChainHead | None = None,
        metrics: object = None,
        now: Callable[[], datetime] = utcnow,
        max_pending_lines: int = 100_000,
        max_pending_bytes: int = 64 << 20,
    ) -> None:
        self.config = config
        self.head = head if config.hash_chain else None
        self.now = now
        self.builder = RecordBuilder(config, now)
        self._writers = [Writer(s, max_pending_lines, max_pending_bytes) for s in sinks]
        self._count_records: Callable[[int], None] = getattr(metrics, "audit_record", _noop)
        self._count_error: Callable[[], None] = getattr(metrics, "audit_error", _noop)
        self._queued = False  # some sink has lines waiting (is failing)
        self._fsync_always = config.fsync == "always"
        self._fsync_session = config.fsync == "session"
        self._batch: list[Record] = []  # made, not yet written
        self._deferred = False  # write_behind runs: the batch may wait
        self._due = trio.Event()  # set when a batch starts (for write_behind)
        self._sync_due = False  # a session.close is in the batch (fsync = "session")
        self._counted = 0
        self._dropped = 0
        self._dropped_since: str | None = None
        self._closed = False
        # Proxy._emit calls the observer only for the events the builder uses.
        self.event_types = self.builder.event_types
        self._log = structlog.wrap_logger(
            _SinkLogger(self),
            processors=[_Render(self)],
            wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
            context_class=dict,
            cache_logger_on_first_use=False,
        ).bind()

    # ------------------------------------------------------------ observer

    def observe(self, info: SessionRef, event: Event) -> None:
        """Record what ``event`` means for the audit.  Never raises."""
        if self._closed:
            return
        try:
            records = self.builder.observe(info, event)
            for record in records:
                self.record(record)
        except Exception as exc:
            # No traceback: its locals could hold message data.
            logger.error("audit.record_failed", error_type=type(exc).__name__,
                         audit_event=type(event).__name__)
            self._count_error()

    def record(self, record: Record) -> None:
        """Add one record; it is written (in the order given) now, or, while
        ``write_behind`` runs, within ``BATCH_WAIT``."""
        batch = self._batch
        batch.append(record)
        if record["event"] == "session.close":
            # A session's records are written before the session is reported
            # closed (the trail observes first; logs and metrics follow).
            self._sync_due |= self._fsync_session
            self.flush()
            return
        if self._deferred and not self._fsync_always and len(batch) < BATCH_LIMIT:
            if len(batch) == 1:
                self._due.set()
            return
        self.flush()

    def flush(self) -> None:
        """Chain, render and write the waiting records.  Never raises."""
        try:
            self._flush()
        except Exception as exc:
            logger.error("audit.flush_failed", error_type=type(exc).__name__)
            self._count_error()

    def _flush(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._batch = []
        if self._queued:
            self.retry()  # make room in the queues before judging these records
        if self._dropped and not self._queued:
            lost: Record = {
                "ts": rfc3339(self.now()), "event": "audit.lost",
                "records": self._dropped, "since": self._dropped_since,
            }
            self._dropped = 0
            self._dropped_since = None
            batch.insert(0, lost)
        self._log.info(None, records=batch)
        if self._fsync_always:
            self._sync(now=True)
        elif self._sync_due:
            self._sync_due = False
            self._sync(now=False)

    async def write_behind(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run in the proxy's nursery: until cancelled, records wait up to
        ``BATCH_WAIT`` and are written together (see the module docstring).
        What waits is written on the way out."""
        self._deferred = True
        try:
            task_status.started()
            while True:
                await self._due.wait()
                # A batch started.  Records that join it while we sleep go
                # with it; one that starts a new batch after a session's
                # close wrote this one sets the next event.
                self._due = trio.Event()
                await trio.sleep(BATCH_WAIT)
                self.flush()
        finally:
            self._deferred = False
            self.flush()

    def _write(self, data: bytes, lines: int) -> None:
        queued = False
        for w in self._writers:
            if not w.write(data, lines):
                queued = True
        if queued:
            self._queued = True
            self._count_error()
        self._count_written()

    def _count_written(self) -> None:
        """Count the records that have now reached every sink."""
        writers = self._writers
        if len(writers) == 1:
            done = writers[0].written
        else:
            done = min(w.written for w in writers) if writers else 0
        if done > self._counted:
            self._count_records(done - self._counted)
            self._counted = done

    def _lost(self, record: Record) -> None:
        if not self._dropped:
            self._dropped_since = record.get("ts")
            logger.error("audit.records_dropped", reason="sink queue full")
        self._dropped += 1
        self._count_error()

    def _sync(self, *, now: bool) -> None:
        for w in self._writers:
            if w.pending:
                continue
            try:
                if now:
                    w.sink.sync()
                else:
                    w.sink.sync_soon()
            except (OSError, ValueError) as exc:
                self._sync_failed(w.sink, exc)

    def _sync_failed(self, sink: Sink, exc: Exception) -> None:
        logger.error("audit.fsync_failed", sink=sink.name, error=str(exc))
        self._count_error()

    # ------------------------------------------------------------- control

    @property
    def failing(self) -> bool:
        """A sink has lines it could not write."""
        return any(w.pending for w in self._writers)

    def retry(self) -> bool:
        """Try the queued lines again; True if every sink is now clear."""
        for w in self._writers:
            if w.pending:
                w.drain()
        self._count_written()
        self._queued = self.failing
        return not self._queued

    def refusal(self) -> str | None:
        """For ``Proxy.admission``: a reason to refuse new sessions, or None."""
        if not self.config.fail_closed or not self.failing:
            return None
        if self.retry():
            return None
        return "audit trail unavailable"

    def close(self) -> None:
        """Write what is left (sessions still open, queued lines), sync, close."""
        if self._closed:
            return
        try:
            self._deferred = False
            for record in self.builder.close_all():
                self.record(record)
            self.flush()
            self.retry()
            if self.config.fsync != "never":
                self._sync(now=True)
        finally:
            self._closed = True
            for w in self._writers:
                if w.pending:
                    logger.error("audit.unwritten_at_close", sink=w.sink.name,
                                 records=len(w.pending))
                w.sink.close()


def open_audit(config: AuditConfig, metrics: object = None, *,
               now: Callable[[], datetime] = utcnow, worker: int | None = None,
               ) -> AuditTrail | None:
    """The trail ``config`` asks for; None when the audit is off.

    A file that cannot be opened yet is not an error here: the trail starts
    failing (logged, counted, and refusing sessions with ``fail_closed``)
    and recovers when the file can be written.  ``worker`` (``[server]
    workers > 1``): worker N writes a chain of its own, in ``worker_path``.
    """
    if not config.enabled:
        return None
    if worker is not None and config.path is not None:
        config = replace(config, path=worker_path(config.path, worker))
    sinks: list[Sink] = []
    head: ChainHead | None = ChainHead() if config.hash_chain else None
    trail: AuditTrail | None = None

    def on_error(sink: Sink, exc: OSError) -> None:
        if trail is not None:
            trail._count_error()

    if config.to_file:
        assert config.path is not None
        if head is not None:
            try:
                head = read_head(config.path)
            except OSError as exc:
                # Cannot read where the chain ended: start a new chain rather
                # than fork the old one silently; verify shows the restart.
                logger.error("audit.chain_head_unreadable", path=str(config.path),
                             error=str(exc))
        sinks.append(FileSink(config.path, rotate_size=config.rotate_size,
                              fsync_on_rotate=config.fsync != "never", now=now,
                              on_error=on_error))
    if config.to_stdout:
        sinks.append(StreamSink())
    trail = AuditTrail(config, sinks, head=head, metrics=metrics, now=now)
    if head is not None and head.seq:
        logger.info("audit.chain_resumed", seq=head.seq, path=str(config.path))
    return trail


def worker_path(path: Path, worker: int) -> Path:
    """Worker ``worker``'s audit file: ``audit.jsonl`` -> ``audit.w2.jsonl``.

    Each worker process keeps its own hash chain (two processes cannot
    append to one chain without coordinating on every record); rotated
    files are named after the worker's file as usual.
    """
    stem, dot, suffix = path.name.rpartition(".")
    name = f"{stem}.w{worker}.{suffix}" if dot and stem else f"{path.name}.w{worker}"
    return path.with_name(name)
