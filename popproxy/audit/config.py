"""The ``[audit]`` section."""

from __future__ import annotations

from dataclasses import dataclass

from ..confparse import Section

__all__ = ["AuditConfig", "parse_audit"]


@dataclass(frozen=True, slots=True)
class AuditConfig:
    enabled: bool = False


def parse_audit(raw: object) -> AuditConfig:
    s = Section(raw, "audit")
    s.finish()
    return AuditConfig(enabled=True)
