"""The routing map file: ``USER UPSTREAM [BACKEND_USER]`` per line.

Format (UTF-8)::

    # comments start with "#" at the beginning of a field
    alice        new                  # moved 2026-11-30
    bob          new     bob.smith    # logs in upstream as bob.smith
    acc*         new                  # a glob (fnmatch: * ? [...])
    *            legacy               # catch-all, still only after exact names

Fields are separated by whitespace; blank lines are ignored.  ``USER`` is
matched case-insensitively, as POP3 servers such as Dovecot compare login
names (``Alice`` and ``alice`` are one mailbox, so they must route alike).

Which entry wins: an exact name always beats a glob, wherever the lines
are; globs are tried only when no exact name matches, in file order, and
the first matching glob wins.  Exact lines are the specific statements
("alice has moved"), globs the general ones, so a catch-all glob at the
top of the file cannot shadow the users listed below it, and the common
case stays one dictionary look-up (O(1)) however long the file is.

A file is loaded whole or not at all: ``load_map_file`` returns a complete
``UserMap`` or raises ``MapFileError`` naming the file and line
(``users.map:17: unknown upstream "x"``), so a caller that reloads on
SIGHUP keeps its old map when the new file is bad.

Speed: 100,000 lines (3.6 MB: exact names, a third with a backend user and
a trailing comment, one catch-all glob) take about 0.2 s of CPU to load
(0.21-0.24 s in three runs, Python 3.11 on the 2-core development machine;
0.2-0.3 s wall clock when idle, up to 0.7 s while other jobs held both
cores).  ``tests/test_routing_mapfile.py`` loads such a file (for
correctness, not timing).  Globs cost more, each is compiled to a regex:
10,000 glob lines took about 1.3 s, so keep them few.  Loading is blocking
file I/O and CPU: from trio, call it through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

from ..confparse import ConfigError

__all__ = ["MapEntry", "MapFileError", "UserMap", "is_glob", "load_map_file", "parse_map"]

# C0 controls but TAB, LF, CR (field separators and line ends), and DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class MapFileError(ConfigError):
    """A map file that cannot be used; the message starts ``FILE:LINE: ``."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {reason}")
        self.source = source
        self.line = line
        self.reason = reason


class MapEntry(NamedTuple):
    """Where one map line sends its users.

    A NamedTuple rather than a frozen dataclass: one is built per line, and
    that alone was a third of the load time of a 100,000-line file.
    """

    upstream: str
    backend_user: str | None  # None: log in upstream with the client's user name
    line: int  # for diagnostics: which line routed the user


def is_glob(user: str) -> bool:
    """True when ``user`` has fnmatch wildcards (``*``, ``?``, ``[``)."""
    return "*" in user or "?" in user or "[" in user


class UserMap:
    """An immutable, loaded map: exact names in a dict, then globs in order."""

    __slots__ = ("_any_glob", "_exact", "_globs", "source")

    def __init__(
        self,
        exact: dict[str, MapEntry],
        globs: Iterable[tuple[str, MapEntry]] = (),
        source: str = "<map>",
    ) -> None:
        # Keys are expected lower-cased (parse_map does it).
        self._exact = exact
        self._globs: tuple[tuple[Callable[[str], object], MapEntry], ...] = tuple(
            (re.compile(fnmatch.translate(g.lower())).match, e) for g, e in globs
        )
        # One regex for "does any glob match at all": a miss (the common
        # case once exact names missed) costs one call however many globs.
        self._any_glob = (
            re.compile("|".join(f"(?:{fnmatch.translate(g.lower())})" for g, _ in globs)).match
            if self._globs else None
        )
        self.source = source

    def lookup(self, user: str) -> MapEntry | None:
        """The entry for ``user`` (case-insensitive), or None."""
        key = user.lower()
        entry = self._exact.get(key)
        if entry is not None or self._any_glob is None or not self._any_glob(key):
            return entry
        for match, glob_entry in self._globs:
            if match(key):
                return glob_entry
        return None  # pragma: no cover - the combined regex said one matches

    @property
    def exact_count(self) -> int:
        return len(self._exact)

    @property
    def glob_count(self) -> int:
        return len(self._globs)

    def __len__(self) -> int:
        return len(self._exact) + len(self._globs)

    def __repr__(self) -> str:
        return f"<UserMap {self.source}: {self.exact_count} names, {self.glob_count} globs>"


def parse_map(
    text: str, upstream_names: frozenset[str], source: str = "<map>"
) -> UserMap:
    """Parse map text; ``source`` names it in errors (``source:LINE: ...``)."""
    # One scan for control characters instead of one per field: they would
    # be smuggled into a USER line upstream (field notes 1.5).  Fields come
    # from str.split(), so they hold no whitespace either.
    if (bad := _CONTROL.search(text)) is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise MapFileError(source, line, f"control character {bad.group()!r}")
    exact: dict[str, MapEntry] = {}
    globs: list[tuple[str, MapEntry]] = []
    glob_lines: dict[str, int] = {}
    setdefault = exact.setdefault  # one dict operation per line, not two
    # split("\n"), not splitlines(): line numbers must be what editors show
    # (splitlines also breaks at form feeds and U+2028).
    for number, raw in enumerate(text.split("\n"), 1):
        fields = raw.split()
        if not fields:
            continue
        if "#" in raw:
            for i, f in enumerate(fields):
                if f.startswith("#"):
                    del fields[i:]
                    break
            if not fields:
                continue
        n = len(fields)
        if n == 2:
            user, upstream = fields
            backend = None
        elif n == 3:
            user, upstream, backend = fields
        elif n == 1:
            raise MapFileError(source, number, f'"{fields[0]}" has no upstream')
        else:
            raise MapFileError(
                source, number,
                f"expected USER UPSTREAM [BACKEND_USER], got {n} fields (a comment starts with #)")
        if upstream not in upstream_names:
            raise MapFileError(source, number, f'unknown upstream "{upstream}"')
        entry = MapEntry(upstream, backend, number)
        key = user.lower()
        if "*" in key or "?" in key or "[" in key:  # is_glob(), inlined: the hot loop
            if key in glob_lines:
                raise MapFileError(
                    source, number, f'"{user}" is already on line {glob_lines[key]}')
            glob_lines[key] = number
            globs.append((key, entry))
        elif (previous := setdefault(key, entry)) is not entry:
            raise MapFileError(source, number, f'"{user}" is already on line {previous.line}')
    return UserMap(exact, globs, source)


def load_map_file(path: str | os.PathLike[str], upstream_names: frozenset[str]) -> UserMap:
    """Read and parse a map file; ``MapFileError`` names the file and line.

    Blocking: from trio, ``await trio.to_thread.run_sync(load_map_file, ...)``.
    """
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise MapFileError(source, None, f"cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise MapFileError(source, line, "not UTF-8") from None
    return parse_map(text, upstream_names, source)
