"""Which modules are compiled with mypyc, and the guard against stale builds.

``setup.py`` compiles the modules in ``COMPILED`` (the sans-IO core: the
framing, the session state machine, the events and the audit records,
the code that runs for every command) to C extensions with mypyc when it
can; the ``.py`` files beside them are the same program, and the pure
fallback.  Python's importer prefers an extension to a source file, so an
edited ``.py`` whose extension was not rebuilt would silently run the old
code: ``install_guard`` puts a finder first on ``sys.meta_path`` that
loads the source instead whenever an extension is older than its source,
or always with ``POPPROXY_PURE=1``.  ``compiled_modules()`` says which
extensions are in use (``popproxy version`` prints it).

This module must not import anything from popproxy: ``setup.py`` loads it
by path, before the package's dependencies are installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Final

__all__ = ["COMPILED", "compiled_modules", "install_guard"]

#: Compiled by setup.py when mypyc and a C compiler are at hand.  Not the
#: policy engine (its classes are subclassed by plug-ins and tests, which
#: mypyc's native classes do not allow from interpreted code) and nothing
#: that does I/O (trio's code is interpreted either way).
COMPILED: Final = (
    "popproxy.pop3._bodies",
    "popproxy.pop3._command",
    "popproxy.pop3._reader",
    "popproxy.pop3._response",
    "popproxy.pop3._sasl",
    "popproxy.pop3._state",
    "popproxy.pop3._verbs",
    "popproxy.events",
    "popproxy.session_state",
    "popproxy.session_policy",
    "popproxy.session",
    "popproxy.routed",
    "popproxy.front",
    "popproxy.timefmt",
    "popproxy.audit._records",
    "popproxy.audit._chain",
)

_ROOT: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paths(name: str) -> tuple[str, list[str]]:
    base = os.path.join(_ROOT, *name.split("."))
    exts = [base + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    return base + ".py", [p for p in exts if os.path.exists(p)]


def _stale(name: str) -> bool:
    source, built = _paths(name)
    try:
        mtime = os.stat(source).st_mtime
    except OSError:
        return False
    return any(os.stat(p).st_mtime < mtime for p in built)


class _SourceFirst(MetaPathFinder):
    """Load the named modules from their ``.py`` files."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self.names:
            return None
        source = _paths(fullname)[0]
        loader = importlib.machinery.SourceFileLoader(fullname, source)
        return importlib.util.spec_from_file_location(fullname, source, loader=loader)


def install_guard() -> None:
    """Run sources instead of stale (or, with POPPROXY_PURE=1, any) extensions."""
    if os.environ.get("POPPROXY_PURE"):
        names = list(COMPILED)
    else:
        names = [n for n in COMPILED if _stale(n)]
        if names:
            print(f"popproxy: compiled modules older than their sources, running the "
                  f"sources: {', '.join(names)} (rebuild: make, or pip install -e .)",
                  file=sys.stderr)
    if names:
        sys.meta_path.insert(0, _SourceFirst(names))


def compiled_modules() -> list[str]:
    """The modules of ``COMPILED`` that were loaded from an extension."""
    return [n for n in COMPILED
            if (m := sys.modules.get(n)) is not None
            and (getattr(m, "__file__", "") or "").endswith(
                tuple(importlib.machinery.EXTENSION_SUFFIXES))]
