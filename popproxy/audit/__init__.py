"""The audit trail: who read or deleted which message, when, from where.

An observer of the proxy's session events that writes JSON lines (one
record per line) to stdout and/or an append-only file, with an optional
SHA-256 hash chain that ``popproxy audit verify`` checks, and, with a
signing key, Ed25519-signed checkpoints of that chain (C2SP signed notes)
that ``popproxy audit verify --key`` checks.  See ``docs/audit.md`` for
the records, the configuration and the threat model.
"""

from __future__ import annotations

from ._chain import ChainHead as ChainHead
from ._chain import verify_files as verify_files
from ._note import Signer as Signer
from ._note import Verifier as Verifier
from ._open import open_audit as open_audit
from ._open import previous_run as previous_run
from ._open import worker_path as worker_path
from ._records import RecordBuilder as RecordBuilder
from ._trail import AuditTrail as AuditTrail
from ._verify import verify_trail as verify_trail
from .config import AuditConfig as AuditConfig
from .config import parse_audit as parse_audit

__all__ = [
    "AuditConfig",
    "AuditTrail",
    "ChainHead",
    "RecordBuilder",
    "Signer",
    "Verifier",
    "open_audit",
    "parse_audit",
    "previous_run",
    "verify_files",
    "verify_trail",
    "worker_path",
]
