"""Timestamps as the audit and the logs write them: RFC 3339, UTC, with
microseconds (``2026-11-27T14:24:03.000123Z``).

``utcnow_rfc3339`` runs for every audit record and every log line, so it
formats the date and time of day once a second and only appends the
microseconds otherwise.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

__all__ = ["rfc3339", "utcnow_rfc3339"]

# (second, its "YYYY-MM-DDTHH:MM:SS." prefix), replaced whole so that a
# thread reading it never sees one second's number with another's text.
_prefix: tuple[int, str] = (-1, "")


def utcnow_rfc3339() -> str:
    """``rfc3339(datetime.now(UTC))``, without building a datetime."""
    global _prefix
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _prefix
    if second != cached[0]:
        cached = _prefix = (second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)))
    # str() of a seven-digit number, less its leading 1: the six digits,
    # zero-padded, without a format specification to interpret.
    return f"{cached[1]}{str(1_000_000 + micro)[1:]}Z"


def rfc3339(t: datetime) -> str:
    """``t`` as ``2026-11-27T14:24:03.000123Z``; a naive ``t`` is taken to be UTC."""
    if t.tzinfo is None:
        return t.isoformat(timespec="microseconds") + "Z"
    if t.tzinfo is not UTC:
        t = t.astimezone(UTC)
    return t.isoformat(timespec="microseconds")[:-6] + "Z"  # drop "+00:00"
