"""Opening the trail a configuration asks for, and where its files are.

``open_audit`` finds where the hash chain continues (``read_head``) and
sets up the sinks; ``previous_run`` reads what the previous run left
(``_recovery``) for ``AuditTrail.start``; ``worker_path`` names a worker
process's own file.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import structlog

from ._chain import ChainHead, read_head
from ._records import utcnow
from ._recovery import LookBack, look_back
from ._sinks import FileSink, Sink, StreamSink
from ._trail import AuditTrail
from .config import AuditConfig

__all__ = ["open_audit", "previous_run", "worker_path"]

logger = structlog.get_logger("popproxy.audit")


def open_audit(config: AuditConfig, metrics: object = None, *,
               now: Callable[[], datetime] = utcnow,
               worker: int | None = None) -> AuditTrail | None:
    """The trail ``config`` asks for; None when the audit is off.

    ``worker`` (a number) is added to the checkpoints' origin as ``/w<N>``
    when several processes each write a trail of their own (each in files
    of its own: ``worker_path``).

    A file that cannot be opened yet is not an error here: the trail starts
    failing (logged, counted, and refusing sessions with ``fail_closed``)
    and recovers when the file can be written.
    """
    if not config.enabled:
        return None
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
        signed = config.signer is not None and config.hash_chain
        # With checkpoints the trail rotates (a file ends with a checkpoint),
        # and always syncs the file it rotates away: a copy of its checkpoint
        # in checkpoint_path must not be ahead of it on disk.
        sinks.append(FileSink(config.path, rotate_size=config.rotate_size,
                              fsync_on_rotate=config.fsync != "never" or signed, now=now,
                              on_error=on_error, auto_rotate=not signed))
    if config.to_stdout:
        sinks.append(StreamSink())
    trail = AuditTrail(config, sinks, head=head, metrics=metrics, now=now, worker=worker)
    if head is not None and head.seq:
        logger.info("audit.chain_resumed", seq=head.seq, path=str(config.path))
    return trail


def previous_run(config: AuditConfig) -> LookBack | None:
    """What the trail's file tells of the previous run, for ``AuditTrail.start``;
    None without a file (stdout), or when it cannot be read (logged)."""
    if not config.to_file or config.path is None:
        return None
    try:
        return look_back(config.path)
    except OSError as exc:
        logger.error("audit.look_back_failed", path=str(config.path), error=str(exc))
        return None


def worker_path(path: Path, worker: int) -> Path:
    """Worker ``worker``'s audit file: ``audit.jsonl`` -> ``audit.w2.jsonl``.

    Each worker process keeps its own hash chain (two processes cannot
    append to one chain without coordinating on every record); rotated
    files are named after the worker's file as usual.
    """
    stem, dot, suffix = path.name.rpartition(".")
    name = f"{stem}.w{worker}.{suffix}" if dot and stem else f"{path.name}.w{worker}"
    return path.with_name(name)
