"""The audit trail: an observer that writes what happened to every mailbox."""

from __future__ import annotations

from .config import AuditConfig as AuditConfig
from .config import parse_audit as parse_audit

__all__ = ["AuditConfig", "parse_audit"]


class AuditTrail:
    """Placeholder until the audit observer lands."""

    def observe(self, info: object, event: object) -> None:
        return None

    def refusal(self) -> str | None:
        return None

    def close(self) -> None:
        return None


def open_audit(config: AuditConfig, metrics: object = None) -> AuditTrail | None:
    return None
