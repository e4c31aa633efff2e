"""SASL data in POP3 (RFC 5034): what a client line may be, and who it names.

Only the authentication identity is ever taken out of a response; the
decoded octets holding a password are dropped at once and never returned.
"""

from __future__ import annotations

import base64
import binascii
import re

__all__ = ["is_sasl_line", "sasl_user"]

# A client's SASL response: base64, or "*" to cancel (RFC 5034 §4).
_SASL_LINE = re.compile(rb"[A-Za-z0-9+/=]*|\*")


def is_sasl_line(line: bytes) -> bool:
    """Whether a client line can be a SASL response."""
    return _SASL_LINE.fullmatch(line) is not None


def sasl_user(mech: str | None, b64: bytes) -> str | None:
    """The authentication identity in a PLAIN or LOGIN response, if any.

    A name with CR, LF or NUL is not a name (nginx's credential-injection
    fix) and is not returned.
    """
    if mech not in ("PLAIN", "LOGIN") or b64 in (b"=", b"*", b""):
        return None
    try:
        decoded = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if mech == "PLAIN":
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return None
        name = parts[1]
    else:
        name = decoded
    if any(c in name for c in b"\r\n\0"):
        return None
    return name.decode("utf-8", "replace") or None
