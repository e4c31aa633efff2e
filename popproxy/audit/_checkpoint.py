"""Signed checkpoints of the hash chain: their text, their records, their copies.

A checkpoint signs the head of the chain, ``(origin, seq, hash)``, as a
C2SP ``tlog-checkpoint`` body in a C2SP ``signed-note``::

    mail.example.org/popproxy            <- origin: which trail (and worker)
    1000                                  <- size: the seq of the record signed
    3q2+7w0Jc7mJv0ZPnC6s5XbAGU1Nj3C7QIu1DyJ0R3E=   <- base64 of that record's hash
                                          <- blank line
    — mail.example.org/popproxy Zm9v...   <- signature: key name, base64(key hash || sig)

Unlike a transparency log's checkpoint, the hash is the head of a hash
chain (the SHA-256 ``hash`` of record ``seq``, which covers every record
before it through ``prev``), not the root of a Merkle tree: there are no
inclusion or consistency proofs, an auditor replays the chain.  The text
format is the standard one, so any signed-note verifier (Go's
``golang.org/x/mod/sumdb/note`` among them) checks the signature.

In the trail the checkpoint is a record of its own, ``audit.checkpoint``,
chained like every other: it stands right after the record it signs (its
``seq`` is the signed size + 1, its ``prev`` the signed hash), and is
itself covered by the next checkpoint.  ``checkpoint_path`` receives a
byte-for-byte copy of each such line, for shipping off the host.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from ._note import NoteError, Signer, sign_note

__all__ = [
    "CHECKPOINT_EVENT",
    "COPY_LIMIT",
    "CheckpointCopies",
    "CheckpointFile",
    "CopyJob",
    "checkpoint_record",
    "checkpoint_text",
    "parse_checkpoint_text",
]

CHECKPOINT_EVENT = "audit.checkpoint"

logger = structlog.get_logger("popproxy.audit")

_SIZE = re.compile(r"0|[1-9][0-9]{0,18}")


def checkpoint_text(origin: str, seq: int, chain_hash: str) -> str:
    """The checkpoint body: origin, size and base64 hash, each on a line."""
    raw = bytes.fromhex(chain_hash)
    return f"{origin}\n{seq}\n{base64.b64encode(raw).decode('ascii')}\n"


def parse_checkpoint_text(text: str) -> tuple[str, int, str]:
    """``(origin, seq, hash as hex)`` from a checkpoint body.

    Extension lines after the third (C2SP allows them) are accepted and
    ignored; popproxy writes none.
    """
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("not a checkpoint: expected origin, size and hash lines")
    origin, size, hash64 = lines[0], lines[1], lines[2]
    if not origin:
        raise NoteError("not a checkpoint: empty origin line")
    if not _SIZE.fullmatch(size):
        raise NoteError(f"not a checkpoint: the size {size!r} is not a decimal number")
    try:
        raw = base64.b64decode(hash64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise NoteError("not a checkpoint: the hash is not base64") from None
    if len(raw) != 32:
        raise NoteError(f"not a checkpoint: the hash has {len(raw)} bytes, not 32")
    if any(not line for line in lines[3:-1]):
        raise NoteError("not a checkpoint: an empty extension line")
    return origin, int(size), raw.hex()


def checkpoint_record(signer: Signer, origin: str, seq: int, chain_hash: str,
                      ts: str) -> dict[str, Any]:
    """The ``audit.checkpoint`` record that signs record ``seq`` (hash
    ``chain_hash``); it is to be chained right after that record."""
    note = sign_note(checkpoint_text(origin, seq, chain_hash), signer)
    return {"ts": ts, "event": CHECKPOINT_EVENT, "origin": origin, "note": note}


def is_checkpoint(record: Mapping[str, Any]) -> bool:
    return record.get("event") == CHECKPOINT_EVENT


# An append-only file needs its data and its size on disk, not its times.
_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


class CheckpointFile:
    """``checkpoint_path``: the copies of the checkpoint lines, appended and synced.

    Opened for each append (once a minute or so), so a shipper or
    logrotate may move it away at any time.  Not thread-safe: one writer.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, data: bytes) -> None:
        """Append whole lines and make them durable; raises ``OSError``."""
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size and _last_byte(self.path, size) != b"\n":
                data = b"\n" + data  # a copy torn by a crash: end it first
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            _datasync(fd)
        finally:
            os.close(fd)
        if created:
            # The new file's name must survive a crash too.
            with contextlib.suppress(OSError):
                dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)


# Copies of checkpoints kept while ``checkpoint_path`` cannot be written.
COPY_LIMIT = 10_000


class CopyJob:
    """One copy to ``checkpoint_path``: sync the trail's files (duplicated
    descriptors), then append the lines.  ``run`` blocks: a worker thread
    runs it (or ``close``)."""

    __slots__ = ("error", "fds", "file", "lines")

    def __init__(self, file: CheckpointFile, fds: list[int], lines: list[bytes]) -> None:
        self.file = file
        self.fds = fds
        self.lines = lines
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for fd in self.fds:
                _datasync(fd)
            self.file.append(b"".join(line + b"\n" for line in self.lines))
        except Exception as exc:
            self.error = exc
        finally:
            for fd in self.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


class CheckpointCopies:
    """Checkpoint lines on their way to ``checkpoint_path``, in order.

    Each copy follows a sync of the trail's files, so a copy is never ahead
    of the trail on disk; one that fails is kept (up to ``COPY_LIMIT``) and
    goes first next time.
    """

    def __init__(self, path: Path) -> None:
        self.file = CheckpointFile(path)
        self.waiting: list[bytes] = []
        self.failed = False

    def add(self, line: bytes) -> None:
        self.waiting.append(line)
        self._bound()

    def job(self, sinks: Sequence[SyncSource]) -> CopyJob | None:
        if not self.waiting:
            return None
        lines, self.waiting = self.waiting, []
        fds = [fd for s in sinks if (fd := s.dup_fd()) is not None]
        return CopyJob(self.file, fds, lines)

    def copied(self, job: CopyJob) -> bool:
        """Account for a job run; True when it failed (to be counted)."""
        path = str(self.file.path)
        if job.error is None:
            if self.failed:
                logger.warning("audit.checkpoint_copy_recovered", path=path)
                self.failed = False
            logger.debug("audit.checkpoint_copied", path=path, checkpoints=len(job.lines))
            return False
        if not self.failed:
            logger.error("audit.checkpoint_copy_failed", path=path, error=str(job.error))
        self.failed = True
        self.waiting[:0] = job.lines  # in order, before any made meanwhile
        self._bound()
        return True

    def _bound(self) -> None:
        if len(self.waiting) > COPY_LIMIT:
            del self.waiting[:len(self.waiting) - COPY_LIMIT]
            logger.error("audit.checkpoint_copy_dropped", path=str(self.file.path))


class SyncSource(Protocol):
    def dup_fd(self) -> int | None: ...


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def loads_record(raw: bytes) -> dict[str, Any] | None:
    """A line as a JSON object, or None."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
