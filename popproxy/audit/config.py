"""The ``[audit]`` section.

No ``[audit]`` section means no audit trail (``AuditConfig().enabled`` is
false).  A present section, even an empty one, turns it on; every key has a
default except ``path``, which the file sinks require.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..confparse import ConfigError, Section, parse_bool, parse_choice, parse_size

__all__ = [
    "COMMAND_SETS",
    "FSYNC_MODES",
    "SINKS",
    "AuditConfig",
    "parse_audit",
]

SINKS = ("stdout", "file", "both")
FSYNC_MODES = ("always", "session", "never")
COMMAND_SETS = ("all", "messages")

# RFC 5322 §3.6.8: a field name is printable US-ASCII except the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """What to record and where.

    ``path`` is the live file of the ``file``/``both`` sinks; rotated files
    sit next to it.  ``rotate_size`` None means never rotate.  ``headers``
    are extra header fields recorded for ``message.retrieve`` (off by
    default: data minimisation).  ``resolve_uidl`` asks the proxy to look up
    a message's UIDL upstream when the client did not list it.
    """

    enabled: bool = False
    sink: str = "stdout"
    path: Path | None = None
    hash_chain: bool = True
    fsync: str = "session"
    fail_closed: bool = False
    rotate_size: int | None = None
    commands: str = "all"
    headers: tuple[str, ...] = ()
    resolve_uidl: bool = False

    @property
    def to_file(self) -> bool:
        return self.sink in ("file", "both")

    @property
    def to_stdout(self) -> bool:
        return self.sink in ("stdout", "both")


def parse_audit(raw: object) -> AuditConfig:
    """Validate the ``[audit]`` table; errors name the key."""
    s = Section(raw, "audit")
    d = AuditConfig()
    sink = parse_choice(s.get("sink", d.sink), s.key("sink"), SINKS)
    path: Path | None = None
    raw_path = s.get("path")
    if raw_path is not None:
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise ConfigError(f"{s.key('path')}: expected a file name, got {raw_path!r}")
        path = Path(raw_path)
    rotate_size: int | None = None
    if s.has("rotate_size"):
        rotate_size = parse_size(s.get("rotate_size"), s.key("rotate_size"))
        if rotate_size < 4096:
            raise ConfigError(f"{s.key('rotate_size')}: must be at least 4KiB")
    cfg = AuditConfig(
        enabled=True,
        sink=sink,
        path=path,
        hash_chain=parse_bool(s.get("hash_chain", d.hash_chain), s.key("hash_chain")),
        fsync=parse_choice(s.get("fsync", d.fsync), s.key("fsync"), FSYNC_MODES),
        fail_closed=parse_bool(s.get("fail_closed", d.fail_closed), s.key("fail_closed")),
        rotate_size=rotate_size,
        commands=parse_choice(s.get("commands", d.commands), s.key("commands"), COMMAND_SETS),
        headers=_headers(s.get("headers", []), s.key("headers")),
        resolve_uidl=parse_bool(s.get("resolve_uidl", d.resolve_uidl), s.key("resolve_uidl")),
    )
    s.finish()
    if cfg.to_file and cfg.path is None:
        raise ConfigError(f'{s.key("path")}: required with sink = "{sink}"')
    if not cfg.to_file:
        for key in ("path", "rotate_size"):
            if s.has(key):
                raise ConfigError(f'{s.key(key)}: only used with sink = "file" or "both"')
    return cfg


def _headers(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f'{key}: expected a list of header names such as ["Date", "From"]')
    names: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _FIELD_NAME.fullmatch(item):
            raise ConfigError(f"{key}[{i}]: expected a header field name, got {item!r}")
        if item.lower() in seen:
            raise ConfigError(f"{key}[{i}]: {item!r} is listed twice")
        if item.lower() == "message-id":
            raise ConfigError(f"{key}[{i}]: Message-ID is always recorded (as message_id)")
        seen.add(item.lower())
        names.append(item)
    return tuple(names)
