"""The audit trail: who read or deleted which message, when, from where.

An observer of the proxy's session events that writes JSON lines (one
record per line) to stdout and/or an append-only file, with an optional
SHA-256 hash chain that ``popproxy audit verify`` checks.  See
``docs/audit.md`` for the records and the configuration.
"""

from __future__ import annotations

from ._chain import ChainHead as ChainHead
from ._chain import verify_files as verify_files
from ._records import RecordBuilder as RecordBuilder
from ._trail import AuditTrail as AuditTrail
from ._trail import open_audit as open_audit
from ._trail import worker_path as worker_path
from .config import AuditConfig as AuditConfig
from .config import parse_audit as parse_audit

__all__ = [
    "AuditConfig",
    "AuditTrail",
    "ChainHead",
    "RecordBuilder",
    "open_audit",
    "parse_audit",
    "verify_files",
    "worker_path",
]
