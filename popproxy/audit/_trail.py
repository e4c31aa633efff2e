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

Signed checkpoints (``sign_key``; see ``_checkpoint``).  A checkpoint is an
``audit.checkpoint`` record, chained, that signs the record before it.
While ``write_behind`` runs, checkpoints are its business alone: a task of
its own writes one every ``checkpoint_interval``, when the render has
counted ``checkpoint_records`` records since the last (it only sets an
event: nothing is signed on a command's or a session's path), and when the
file has reached ``rotate_size`` (the file then ends with the checkpoint
and is rotated; with checkpoints the trail rotates the file, not the sink).
After each, the trail file is synced and the copy appended to
``checkpoint_path`` and synced, in a worker thread, so the copy is never
ahead of the trail on disk.  Outside ``write_behind`` (tools, tests) all
of this happens inline, at the end of the batch that reaches the count or
the size.  ``close()`` writes a last checkpoint.  A signature that fails,
or a copy that cannot be written, is logged and counted, tried again within
a second, and with ``fail_closed`` refuses new sessions until it works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime

import structlog
import trio
from structlog.typing import EventDict, WrappedLogger

from ..events import Event
from ._chain import ChainHead
from ._chain import line as unchained_line
from ._checkpoint import CheckpointCopies, CopyJob, checkpoint_record
from ._records import Record, RecordBuilder, SessionRef, rfc3339, utcnow
from ._recovery import LookBack, start_records
from ._sinks import FileSink, Sink, Writer
from .config import AuditConfig, default_origin

__all__ = ["AuditTrail"]


logger = structlog.get_logger("popproxy.audit")


def _noop(*args: object) -> None:
    return None


# Stands in a batch for "a checkpoint here": the render signs the head of
# the chain as it stands at that point.
_CHECKPOINT: Record = {"event": "audit.checkpoint"}
# How soon a checkpoint that failed (signature, copy) is tried again.
CHECKPOINT_RETRY = 1.0
# How often write_behind tries a failing sink again while nothing else
# does (no session comes: /readyz sends them elsewhere while it fails).
SINK_RETRY = 1.0


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
        render = trail.head.link if trail.head is not None else unchained_line
        lines: list[bytes] = []
        size = 0
        since = trail._since_checkpoint
        for record in records:
            if record is _CHECKPOINT:
                if since and (line := trail._checkpoint_line()) is not None:
                    lines.append(line)
                    size += len(line) + 1
                    since = 0
                continue
            if trail._queued and any(w.full(len(lines), size) for w in trail._writers):
                trail._lost(record)
                continue
            line = render(record)
            lines.append(line)
            size += len(line) + 1
            since += 1
        if trail.signer is not None:
            if since >= trail._checkpoint_every:
                if trail._checkpoint_task:
                    # After a failed signature the task tries again on its
                    # timer, not at once (it would spin).
                    if not trail._sign_failed:
                        trail._checkpoint_due.set()
                elif (line := trail._checkpoint_line()) is not None:
                    lines.append(line)
                    since = 0
            trail._since_checkpoint = since
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
        worker: int | None = None,
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
        self._started = False  # start() wrote proxy.start: close() writes proxy.stop
        # message.retrieving records still in the batch, by (session,
        # command, msg): dropped unwritten when their message.retrieve comes.
        self._starts: dict[tuple[object, ...], Record] = {}
        self._retry_due = trio.Event()  # a sink failed (for write_behind)
        # Signed checkpoints (None: off).
        self.signer = config.signer if self.head is not None else None
        self.worker = worker
        origin = config.origin or default_origin()
        self.origin = origin if worker is None else f"{origin}/w{worker}"
        self._checkpoint_every = config.checkpoint_records
        self._since_checkpoint = 0  # records chained since the last checkpoint
        self._checkpoint_task = False  # write_behind's checkpoint task runs
        self._checkpoint_due = trio.Event()
        self._rotation_wanted = False
        self._sealing = False
        self._sign_failed = False
        self._just_signed: list[int] = []  # checkpoints in the batch being written
        self._copies = (CheckpointCopies(config.checkpoint_path)
                        if self.signer is not None and config.checkpoint_path else None)
        self.checkpoints = 0  # written so far
        self._file_sinks = [s for s in sinks if isinstance(s, FileSink)]  # to sync
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
        event = record["event"]
        if event == "message.retrieving":
            self._starts[(record["session"], record["command"], record["msg"])] = record
        elif event == "message.retrieve" and self._starts:
            start = self._starts.pop((record["session"], record["command"], record["msg"]), None)
            if start is not None:
                # Both would go out in the same write: the start adds nothing.
                batch.remove(start)
        batch.append(record)
        if event == "session.close":
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
        self._starts.clear()
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
        if self._just_signed:
            for seq in self._just_signed:  # written now (or queued, if the sink fails)
                logger.debug("audit.checkpoint", seq=seq, signed=seq - 1, origin=self.origin)
            self._just_signed.clear()
        if self._fsync_always:
            self._sync(now=True)
        elif self._sync_due:
            self._sync_due = False
            self._sync(now=False)
        if self.signer is not None and not self._checkpoint_task and not self._sealing:
            # No write_behind task: checkpoint work happens here.
            if self._rotation_wanted:
                self._seal_and_rotate()
            job = self._copy_job()
            if job is not None:
                job.run()
                self._copied(job)

    async def write_behind(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run in the proxy's nursery: until cancelled, records wait up to
        ``BATCH_WAIT`` and are written together (see the module docstring).
        What waits is written on the way out."""
        self._deferred = True
        try:
            async with trio.open_nursery() as nursery:
                if self.signer is not None:
                    self._checkpoint_task = True
                    nursery.start_soon(self._checkpointer)
                nursery.start_soon(self._retrier)
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
            self._checkpoint_task = False
            self.flush()

    async def _retrier(self) -> None:
        """write_behind's task that writes a failed sink's queue once it
        works again, even while no record and no session comes."""
        while True:
            if not self._queued:  # else it failed before this task ran
                await self._retry_due.wait()
            self._retry_due = trio.Event()
            while self._queued and not self.retry():
                with trio.move_on_after(SINK_RETRY):
                    await self._retry_due.wait()  # a new failure: try at once
                self._retry_due = trio.Event()

    async def _checkpointer(self) -> None:
        """write_behind's second task: checkpoints, and their copies."""
        interval = self.config.checkpoint_interval
        last = trio.current_time()
        while True:
            deadline = last + interval
            if self._sign_failed or self._copy_failing:
                deadline = min(deadline, trio.current_time() + CHECKPOINT_RETRY)
            with trio.move_on_at(deadline):
                await self._checkpoint_due.wait()
            self._checkpoint_due = trio.Event()
            try:
                if self._rotation_wanted or self._rotation_due(retry=True):
                    self._seal_and_rotate()
                elif self._since_checkpoint or self._batch:
                    self.checkpoint()  # writes what waits first
                job = self._copy_job()
                if job is not None:
                    await trio.to_thread.run_sync(job.run)
                    self._copied(job)
            except Exception as exc:  # a bug: keep the proxy up, say so
                logger.error("audit.checkpoint_failed", error_type=type(exc).__name__)
                self._count_error()
            if not self._sign_failed:
                last = trio.current_time()

    # --------------------------------------------------------- checkpoints

    def checkpoint(self) -> None:
        """Write what waits, then a checkpoint over it (unless nothing was
        written since the last one).  Never raises."""
        if self.signer is None or self._closed:
            return
        self._batch.append(_CHECKPOINT)
        self.flush()

    def _checkpoint_line(self) -> bytes | None:
        """For the render: sign the chain's head, chain the checkpoint record
        after it and return its line (None if signing failed)."""
        head, signer = self.head, self.signer
        assert head is not None
        assert signer is not None
        try:
            record = checkpoint_record(signer, self.origin, head.seq, head.hash,
                                       rfc3339(self.now()))
        except Exception as exc:
            if not self._sign_failed:
                logger.error("audit.sign_failed", error_type=type(exc).__name__,
                             error=str(exc), seq=head.seq)
            self._sign_failed = True
            self._count_error()
            return None
        if self._sign_failed:
            logger.warning("audit.sign_recovered", seq=head.seq)
            self._sign_failed = False
        line = head.link(record)
        self.checkpoints += 1
        if self._copies is not None:
            self._copies.add(line)
        self._just_signed.append(head.seq)
        return line

    def _rotation_due(self, *, retry: bool) -> bool:
        """A file the trail rotates has reached ``rotate_size`` (and its lines
        are all written).  After a rename that failed, only when ``retry``:
        the checkpoint task tries again once an interval, not every batch."""
        return any(
            isinstance(w.sink, FileSink) and not w.sink.auto_rotate and not w.pending
            and w.sink.rotation_due and (retry or not w.sink.rotate_failed)
            for w in self._writers
        )

    def _seal_and_rotate(self) -> None:
        """End the live file with a checkpoint, then rotate it."""
        self._rotation_wanted = False
        self._sealing = True
        try:
            self.checkpoint()
        finally:
            self._sealing = False
        for w in self._writers:
            if isinstance(w.sink, FileSink) and not w.pending and w.sink.rotation_due:
                w.sink.rotate()

    @property
    def _copy_failing(self) -> bool:
        return self._copies is not None and self._copies.failed

    def _copy_job(self) -> CopyJob | None:
        """The next copy to ``checkpoint_path``; None: nothing to do, or not
        yet (lines of the trail still wait to be written)."""
        if self._copies is None or self.failing:
            return None
        return self._copies.job(self._file_sinks)

    def _copied(self, job: CopyJob) -> None:
        assert self._copies is not None
        if self._copies.copied(job):
            self._count_error()

    def _write(self, data: bytes, lines: int) -> None:
        queued = False
        for w in self._writers:
            if not w.write(data, lines):
                queued = True
        if queued:
            self._queued = True
            self._count_error()
            if self._deferred:
                self._retry_due.set()
        self._count_written()
        if (self.signer is not None and not self._sealing and not self._rotation_wanted
                and self._rotation_due(retry=False)):
            # Sign the file's end, then rotate: write_behind's task does it,
            # or _flush when there is none.
            self._rotation_wanted = True
            if self._checkpoint_task:
                self._checkpoint_due.set()

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

    @property
    def refusing(self) -> str | None:
        """Why new sessions are refused now (``fail_closed``), else None.

        For ``/readyz``, from any thread: it only looks (``refusal``, on
        the event loop, also tries the sink again)."""
        if not self.config.fail_closed:
            return None
        if self._sign_failed or self._copy_failing or self.failing:
            return "audit trail unavailable"
        return None

    def refusal(self) -> str | None:
        """For ``Proxy.admission``: a reason to refuse new sessions, or None.

        With ``fail_closed``: while a sink fails, or checkpoints cannot be
        signed or copied."""
        if not self.config.fail_closed:
            return None
        if self._sign_failed or self._copy_failing:
            # write_behind's task tries again within CHECKPOINT_RETRY.
            return "audit trail unavailable"
        if not self.failing or self.retry():
            return None
        return "audit trail unavailable"

    def start(self, previous: LookBack | None) -> None:
        """Begin a run of the proxy: ``proxy.start`` and, after an unclean end
        of the previous run, the records closing what it left open, from
        ``previous`` (``_recovery.start_records``); written and synced now."""
        if self._closed:
            return
        self._started = True
        for record in start_records(previous, lambda: rfc3339(self.now()), self.worker,
                                    self.head.seq if self.head is not None else None):
            self.record(record)
        self.flush()
        if self.config.fsync != "never":
            self._sync(now=True)

    def close(self) -> None:
        """Write what is left (sessions still open, queued lines), after
        ``start`` a ``proxy.stop`` record, and, with ``sign_key``, a last
        checkpoint over it; sync, close."""
        if self._closed:
            return
        try:
            self._deferred = False
            self._checkpoint_task = False
            left = self.builder.close_all()
            for record in left:
                self.record(record)
            if self._started:
                # The run's last record: the next start reads that it ended
                # cleanly, every session closed above.
                self.record({"ts": rfc3339(self.now()), "event": "proxy.stop",
                             "sessions": sum(r["event"] == "session.close" for r in left)})
            self.flush()
            self.checkpoint()  # the last one: signs all written
            self.retry()
            if self.config.fsync != "never":
                self._sync(now=True)
            job = self._copy_job()
            if job is not None:
                job.run()
                self._copied(job)
            if self._copies is not None and self._copies.waiting:
                logger.error("audit.checkpoints_not_copied", checkpoints=len(self._copies.waiting))
        finally:
            self._closed = True
            for w in self._writers:
                if w.pending:
                    logger.error("audit.unwritten_at_close", sink=w.sink.name,
                                 records=len(w.pending))
                w.sink.close()
