"""Where audit lines go: an append-only file (with rotation) and/or stdout.

A sink's ``write`` takes complete lines (newlines included), one or a
batch, and either writes all of them or raises ``OSError``.  Failures are
handled one level up (``Writer``): lines are queued, the failure is
logged and counted, and the queue is written out in order once the sink
works again.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

import structlog

__all__ = ["FileSink", "Sink", "StreamSink", "Writer"]

logger = structlog.get_logger("popproxy.audit")

ErrorHandler = Callable[["Sink", OSError], None]


class Sink(Protocol):
    """One destination of audit lines."""

    @property
    def name(self) -> str: ...

    def write(self, data: bytes) -> None:
        """Write whole lines, or raise ``OSError`` having written none of them."""

    def sync(self) -> None:
        """Make what was written durable now (``fsync``); may raise ``OSError``."""

    def sync_soon(self) -> None:
        """Make what was written durable shortly, without blocking for long."""

    def close(self) -> None: ...


class StreamSink:
    """Lines to a binary stream (stdout by default), flushed after each write."""

    def __init__(self, stream: BinaryIO | None = None, name: str = "stdout") -> None:
        self._stream = stream
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def _out(self) -> BinaryIO:
        if self._stream is not None:
            return self._stream
        return sys.stdout.buffer

    def write(self, data: bytes) -> None:
        if self._stream is None:
            sys.stdout.flush()  # operational log lines written as text go first
        out = self._out()
        out.write(data)
        out.flush()

    def sync(self) -> None:
        self._out().flush()

    def sync_soon(self) -> None:
        self.sync()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out().flush()


# An append-only file needs its data and its size on disk, not its times:
# fdatasync does that with less journal work where the OS has it.
_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def _fsync_and_close(fd: int) -> OSError | None:
    try:
        _datasync(fd)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
    return None


class FileSink:
    """Appends lines to ``path``; rotates by size between lines, never inside one.

    A rotated file is renamed to ``<path>.<UTC time>`` (names sort in time
    order) and a new ``path`` is started; the hash chain simply continues in
    it.  The file is opened with ``O_APPEND`` and written with one
    ``write(2)`` per batch of lines, unbuffered, so the records are in the
    kernel as soon as ``write`` returns.  A batch is rotated as a whole, so a
    file may end up to one batch over ``rotate_size``.

    ``sync_soon`` (group commit): the fsync runs in a thread of the sink's
    own, so the event loop never waits for the disk.  A request when the
    disk is idle is served at once; requests that arrive while an fsync
    runs are served together by one more fsync, started no sooner than
    ``sync_spacing`` seconds after the previous one.  Under load that bounds
    the fsync rate (and its CPU and journal traffic) while every record is
    still on disk within about ``sync_spacing`` plus one fsync.

    ``auto_rotate = False`` leaves rotation to the owner: ``write`` never
    rotates, ``rotation_due`` says when the file has reached
    ``rotate_size`` and ``rotate()`` does it (the trail with signed
    checkpoints ends each file with a checkpoint first).
    """

    sync_spacing = 0.05

    def __init__(
        self,
        path: Path,
        *,
        rotate_size: int | None = None,
        fsync_on_rotate: bool = True,
        now: Callable[[], datetime],
        on_error: ErrorHandler | None = None,
        auto_rotate: bool = True,
    ) -> None:
        self.path = path
        self.rotate_size = rotate_size
        self.auto_rotate = auto_rotate
        self.fsync_on_rotate = fsync_on_rotate
        self._now = now
        self._on_error = on_error
        self._fd: int | None = None
        self.size = 0
        self._syncer: _Syncer | None = None
        self._rotate_failed = False
        self.rotations = 0
        self.opened = 0  # files opened so far (a new one after rotation or an error)

    @property
    def name(self) -> str:
        return str(self.path)

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
                # A line torn by a crash or a failed write: end it, so the next
                # record starts on a line of its own.  `audit verify` reports
                # the torn line as a warning when the chain jumps over it.
                os.write(fd, b"\n")
                size += 1
                logger.warning("audit.torn_line", path=str(self.path))
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self.size = size
        self.opened += 1
        return fd

    def write(self, data: bytes) -> None:
        fd = self._fd if self._fd is not None else self._open()
        if self.auto_rotate and self.rotate_size is not None and self.size > 0 and (
            self.size + len(data) > self.rotate_size
        ):
            fd = self._rotate(fd)
        written = 0
        try:
            written = os.write(fd, data)
            if written < len(data):
                view = memoryview(data)
                while written < len(data):
                    written += os.write(fd, view[written:])
        except OSError:
            if written:
                # Take back the part of the line that got out, if we can;
                # otherwise _open() ends the torn line on the next attempt.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, self.size)
            self._drop_fd()
            raise
        self.size += written

    @property
    def rotation_due(self) -> bool:
        """With ``auto_rotate = False``: the file has reached ``rotate_size``."""
        return self.rotate_size is not None and self.size >= self.rotate_size

    @property
    def rotate_failed(self) -> bool:
        """The last rotation could not rename the file (logged once)."""
        return self._rotate_failed

    def rotate(self) -> None:
        """Sync and rename the live file now; the next write starts a new one.
        A failure is logged and reported (``on_error``); the file goes on."""
        if self._fd is not None and self.size > 0:
            self._rotate(self._fd)

    def dup_fd(self) -> int | None:
        """A duplicate of the live file's descriptor (the caller closes it),
        to sync it from another thread while this sink writes and rotates."""
        return os.dup(self._fd) if self._fd is not None else None

    def _rotated_name(self) -> Path:
        stamp = self._now().strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
        return target

    def _rotate(self, fd: int) -> int:
        try:
            if self.fsync_on_rotate:
                _datasync(fd)
            os.rename(self.path, self._rotated_name())
        except OSError as exc:
            # Keep appending to the current file rather than lose records;
            # try again at the next line.
            if not self._rotate_failed:
                self._rotate_failed = True
                logger.error("audit.rotate_failed", path=str(self.path), error=str(exc))
                if self._on_error is not None:
                    self._on_error(self, exc)
            return fd
        if self._rotate_failed:
            self._rotate_failed = False
            logger.info("audit.rotate_recovered", path=str(self.path))
        self._drop_fd()
        self.rotations += 1
        return self._open()

    def _drop_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def sync(self) -> None:
        if self._fd is not None:
            _datasync(self._fd)

    def sync_soon(self) -> None:
        if self._fd is None:
            return
        if self._syncer is None:
            self._syncer = _Syncer(self)
        self._syncer.request(self._fd, self.opened)

    def _report(self, exc: OSError | None) -> None:
        if exc is not None:
            logger.error("audit.fsync_failed", path=str(self.path), error=str(exc))
            if self._on_error is not None:
                self._on_error(self, exc)

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.stop()
            self._syncer = None
        self._drop_fd()


class _Syncer:
    """A thread that fsyncs for one ``FileSink``: group commit off the event loop.

    ``request`` hands over a duplicate of the file descriptor (the sink may
    close or rotate its own meanwhile) and returns at once; a request made
    while another waits is already covered by it, and a waiting request is
    served no sooner than ``sync_spacing`` after the start of the previous
    fsync.
    A plain thread and a condition variable cost the event loop a few
    microseconds per request, far less than a ``trio.to_thread`` round trip.
    """

    def __init__(self, sink: FileSink) -> None:
        self._sink = sink
        self._cond = threading.Condition()
        self._fd: int | None = None  # the request waiting, as a descriptor to sync
        self._opened = 0  # which of the sink's files it is
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="popproxy-audit-fsync",
                                        daemon=True)
        self._thread.start()

    def request(self, fd: int, opened: int) -> None:
        """Ask for an fsync of ``fd`` (duplicated here), the sink's ``opened``-th
        file, soon."""
        with self._cond:
            old = self._fd
            if old is not None and self._opened == opened:
                # A request for the same file waits: its fsync starts later
                # and covers all written by then.  Under load most end here.
                return
            self._fd, self._opened = os.dup(fd), opened
            self._cond.notify()
        if old is not None:
            os.close(old)  # an older file: rotation synced it when it ended

    def stop(self) -> None:
        """Finish a waiting request, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        last = -self._sink.sync_spacing
        while True:
            with self._cond:
                while self._fd is None and not self._stopping:
                    self._cond.wait()
                fd, self._fd = self._fd, None
                if fd is None:
                    return
            # Pace: under load, one fsync per sync_spacing covers many requests.
            time.sleep(max(0.0, last + self._sink.sync_spacing - time.monotonic()))
            with self._cond:  # take a request that came in while we waited
                if self._fd is not None:
                    os.close(fd)
                    fd, self._fd = self._fd, None
            last = time.monotonic()
            self._sink._report(_fsync_and_close(fd))


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
