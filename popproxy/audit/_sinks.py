"""Where audit lines go: an append-only file (with rotation) and/or stdout.

A sink's ``write`` takes one complete line (newline included) and either
writes all of it or raises ``OSError``.  Failures are handled one level up
(``_trail.Writer``): lines are queued, the failure is logged and counted,
and the queue is written out in order once the sink works again.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

import structlog
import trio

__all__ = ["FileSink", "Sink", "StreamSink"]

logger = structlog.get_logger("popproxy.audit")

ErrorHandler = Callable[["Sink", OSError], None]


class Sink(Protocol):
    """One destination of audit lines."""

    @property
    def name(self) -> str: ...

    def write(self, data: bytes) -> None:
        """Write one whole line, or raise ``OSError`` having written none of it."""

    def sync(self) -> None:
        """Make what was written durable now (``fsync``); may raise ``OSError``."""

    def sync_soon(self) -> None:
        """Make what was written durable shortly, without blocking for long."""

    def close(self) -> None: ...


class StreamSink:
    """Lines to a binary stream (stdout by default), flushed after each line."""

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
    ``write(2)`` per line, unbuffered, so a record is in the kernel as soon
    as ``write`` returns.

    ``sync_soon`` (group commit): inside trio the fsync runs in a worker
    thread, so the event loop never waits for the disk.  A request when
    the disk is idle is served at once; requests that arrive while an
    fsync runs are served together by one more fsync, started no sooner than
    ``sync_spacing`` seconds after the previous one.  Under load that bounds
    the fsync rate (and its CPU and journal traffic) while every record is
    still on disk within about ``sync_spacing`` plus one fsync.
    """

    sync_spacing = 0.01

    def __init__(
        self,
        path: Path,
        *,
        rotate_size: int | None = None,
        fsync_on_rotate: bool = True,
        now: Callable[[], datetime],
        on_error: ErrorHandler | None = None,
    ) -> None:
        self.path = path
        self.rotate_size = rotate_size
        self.fsync_on_rotate = fsync_on_rotate
        self._now = now
        self._on_error = on_error
        self._fd: int | None = None
        self.size = 0
        self._dirty = False
        self._syncing = False
        self._rotate_failed = False
        self.rotations = 0

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
        return fd

    def write(self, data: bytes) -> None:
        fd = self._fd if self._fd is not None else self._open()
        if self.rotate_size is not None and self.size > 0 and (
            self.size + len(data) > self.rotate_size
        ):
            fd = self._rotate(fd)
        view = memoryview(data)
        written = 0
        try:
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
        if not trio.lowlevel.in_trio_task():
            self._report(_fsync_and_close(os.dup(self._fd)))
            return
        self._dirty = True
        if not self._syncing:
            self._syncing = True
            trio.lowlevel.spawn_system_task(self._sync_loop, name="popproxy.audit.fsync")

    async def _sync_loop(self) -> None:
        try:
            while self._dirty and self._fd is not None:
                self._dirty = False
                # A duplicate descriptor: rotation or close may close ours
                # while the thread runs.
                fd = os.dup(self._fd)
                started = trio.current_time()
                self._report(await trio.to_thread.run_sync(_fsync_and_close, fd))
                if self._dirty:
                    await trio.sleep_until(started + self.sync_spacing)
        except OSError as exc:  # os.dup
            self._report(exc)
        finally:
            self._syncing = False

    def _report(self, exc: OSError | None) -> None:
        if exc is not None:
            logger.error("audit.fsync_failed", path=str(self.path), error=str(exc))
            if self._on_error is not None:
                self._on_error(self, exc)

    def close(self) -> None:
        self._drop_fd()
