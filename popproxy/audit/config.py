"""The ``[audit]`` section.

No ``[audit]`` section means no audit trail (``AuditConfig().enabled`` is
false).  A present section, even an empty one, turns it on; every key has a
default except ``path``, which the file sinks require.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..confparse import (
    ConfigError,
    Section,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_int,
    parse_size,
)
from ._note import NoteError, Signer

__all__ = [
    "COMMAND_SETS",
    "FSYNC_MODES",
    "SINKS",
    "AuditConfig",
    "default_origin",
    "load_sign_key",
    "parse_audit",
    "valid_origin",
]

SINKS = ("stdout", "file", "both")
FSYNC_MODES = ("always", "session", "never")
COMMAND_SETS = ("all", "messages")

# A key file is small; anything much larger is not one.
_KEY_FILE_LIMIT = 4096

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

    Signed checkpoints are on when ``signer`` is set (``sign_key`` is the
    file it was read from, for messages): one every ``checkpoint_interval``
    seconds or ``checkpoint_records`` records, a copy of each appended to
    ``checkpoint_path`` when set.  ``origin`` names the trail in them
    (None: ``<hostname>/popproxy``).

    ``command`` records before login are bounded, so that a client that is
    not logged in costs the trail a bounded number of bytes:
    ``prelogin_commands`` per session and ``prelogin_commands_per_client``
    per client address a minute; the rest are counted, not written (the
    session's ``session.close`` says how many: ``suppressed_commands``).
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
    sign_key: Path | None = None
    signer: Signer | None = field(default=None, repr=False)
    checkpoint_interval: float = 60.0
    checkpoint_records: int = 1000
    checkpoint_path: Path | None = None
    origin: str | None = None
    prelogin_commands: int = 16
    prelogin_commands_per_client: int = 256

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
        prelogin_commands=parse_int(s.get("prelogin_commands", d.prelogin_commands),
                                    s.key("prelogin_commands"), 0, 10**6),
        prelogin_commands_per_client=parse_int(
            s.get("prelogin_commands_per_client", d.prelogin_commands_per_client),
            s.key("prelogin_commands_per_client"), 0, 10**9),
    )
    cfg = _checkpoints(s, cfg)
    s.finish()
    if cfg.to_file and cfg.path is None:
        raise ConfigError(f'{s.key("path")}: required with sink = "{sink}"')
    if not cfg.to_file:
        for key in ("path", "rotate_size"):
            if s.has(key):
                raise ConfigError(f'{s.key(key)}: only used with sink = "file" or "both"')
    return cfg


def _checkpoints(s: Section, d: AuditConfig) -> AuditConfig:
    """``d`` with ``sign_key`` and the keys that only mean something with it."""
    keys = ("checkpoint_interval", "checkpoint_records", "checkpoint_path", "origin")
    if not s.has("sign_key"):
        for key in keys:
            if s.has(key):
                raise ConfigError(f"{s.key(key)}: only used with sign_key (signed checkpoints)")
        return d
    raw = s.get("sign_key")
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{s.key('sign_key')}: expected a file name, got {raw!r}")
    if s.get("hash_chain", True) is False:
        raise ConfigError(f"{s.key('sign_key')}: checkpoints sign the hash chain: "
                          "it needs hash_chain = true")
    sign_key = Path(raw)
    signer = load_sign_key(sign_key, s.key("sign_key"))
    interval = parse_duration(s.get("checkpoint_interval", d.checkpoint_interval),
                              s.key("checkpoint_interval"))
    if interval < 1:
        raise ConfigError(f"{s.key('checkpoint_interval')}: must be at least 1s")
    records = parse_int(s.get("checkpoint_records", d.checkpoint_records),
                        s.key("checkpoint_records"), 1, 10_000_000)
    path: Path | None = None
    raw_path = s.get("checkpoint_path")
    if raw_path is not None:
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise ConfigError(f"{s.key('checkpoint_path')}: expected a file name, "
                              f"got {raw_path!r}")
        path = Path(raw_path)
        if s.get("path") is not None and path == Path(str(s.get("path"))):
            raise ConfigError(f"{s.key('checkpoint_path')}: must not be the audit file itself")
    origin = s.get("origin")
    if origin is not None and (not isinstance(origin, str) or not valid_origin(origin)):
        raise ConfigError(f"{s.key('origin')}: expected a name without spaces or '+', "
                          f"such as \"mail.example.org/popproxy\", got {origin!r}")
    return replace(d, sign_key=sign_key, signer=signer, checkpoint_interval=interval,
                   checkpoint_records=records, checkpoint_path=path, origin=origin)


def load_sign_key(path: Path, key: str = "audit.sign_key") -> Signer:
    """The private key in ``path`` (``popproxy audit keygen`` format).

    A file that cannot be read, is not a key, or can be read by any user
    is a ``ConfigError`` starting with ``key``.  The key itself never
    appears in a message.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{key}: {path} is not a regular file")
        if info.st_mode & 0o007:
            raise ConfigError(
                f"{key}: {path} can be used by any user on this host "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); make it private: chmod o-rwx {path}"
            )
        data = os.read(fd, _KEY_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        if len(data) > _KEY_FILE_LIMIT:
            raise NoteError("too large")
        return Signer.parse(data.decode("ascii"))
    except (NoteError, UnicodeDecodeError) as exc:
        reason = exc if isinstance(exc, NoteError) else "not ASCII text"
        raise ConfigError(f"{key}: {path} is not a signing key made by "
                          f"`popproxy audit keygen` ({reason})") from None


def valid_origin(origin: str) -> bool:
    """A checkpoint origin: printable, no white space, no ``+``, at most 255 characters."""
    return (0 < len(origin) <= 255 and origin.isprintable() and "+" not in origin
            and not any(c.isspace() for c in origin))


def default_origin(worker: int | None = None) -> str:
    """``<hostname>/popproxy``, and ``/w<N>`` for worker N."""
    host = socket.gethostname() or "localhost"
    host = "".join(c for c in host if c.isprintable() and not c.isspace() and c != "+")
    base = f"{host or 'localhost'}/popproxy"
    return base if worker is None else f"{base}/w{worker}"


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
