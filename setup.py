"""Build popproxy: the sans-IO core compiled with mypyc where it can be.

The modules in ``COMPILED`` (the protocol core: framing, the session state
machine, events, audit records) are compiled to C extensions with mypyc
when it is installed (``pyproject.toml`` asks for it at build time) and a C
compiler is at hand; the same ``.py`` files run as they are otherwise, or
with ``POPPROXY_PURE=1``.  ``popproxy/_compiled.py`` falls back to the
sources when a compiled module is older than its ``.py`` (an edited tree
that was not rebuilt).  The figures are in the README's performance section.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from setuptools import setup


def compiled_list() -> tuple[str, ...]:
    """popproxy/_compiled.py's list, loaded by path: the package's own
    dependencies are not installed yet when this runs."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "popproxy", "_compiled.py")
    spec = importlib.util.spec_from_file_location("_popproxy_compiled", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.COMPILED)


def extensions() -> list[object]:
    if os.environ.get("POPPROXY_PURE"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("popproxy: mypyc is not installed: pure Python", file=sys.stderr)
        return []
    if shutil.which(os.environ.get("CC", "cc")) is None:
        print("popproxy: no C compiler: pure Python", file=sys.stderr)
        return []
    paths = [name.replace(".", "/") + ".py" for name in compiled_list()]
    return list(mypycify(paths, opt_level="3", debug_level="0"))


setup(ext_modules=extensions())
