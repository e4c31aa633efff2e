"""The mypyc-compiled core: in use where it was built, the sources otherwise.

``make test`` runs the suite on the build ``make demo`` runs (the main
virtual environment, compiled) and again under the other Pythons on the
pure-Python package, so both are tested; these tests check that each run
is really the one it claims to be.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

from popproxy._compiled import COMPILED, compiled_modules

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def built_here() -> list[str]:
    """The modules of COMPILED with an extension for this interpreter."""
    found = []
    for name in COMPILED:
        base = ROOT.joinpath(*name.split("."))
        if any(base.with_name(base.name + s).exists() for s in SUFFIXES):
            found.append(name)
    return found


def _run(code: str, **env: str) -> tuple[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "POPPROXY_PURE"} | env
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, env=environ, timeout=60, check=True)
    return result.stdout, result.stderr


def test_a_build_is_whole_and_in_use() -> None:
    """Every compiled module that was built is the one imported: no stale or
    partial build runs unnoticed."""
    built = built_here()
    if os.environ.get("POPPROXY_BUILT") and not built:
        pytest.fail("make built the core but no compiled module is here (see the build's output)")
    if not built:
        pytest.skip("pure Python here: no compiled modules for this interpreter")
    for name in COMPILED:
        importlib.import_module(name)

    assert sorted(built) == sorted(COMPILED)
    assert sorted(compiled_modules()) == sorted(COMPILED)


def test_pure_mode_runs_the_sources() -> None:
    out, _ = _run("import popproxy.routed, popproxy.audit\n"
               "from popproxy._compiled import compiled_modules\n"
               "print(compiled_modules())", POPPROXY_PURE="1")
    assert out.strip() == "[]"


def test_a_module_newer_than_its_build_runs_from_source(tmp_path: Path) -> None:
    """An edited .py whose extension was not rebuilt: the source runs, and
    the process says so once on stderr."""
    if not built_here():
        pytest.skip("pure Python here: no compiled modules for this interpreter")
    source = ROOT / "popproxy" / "timefmt.py"
    stat = source.stat()
    later = max(p.stat().st_mtime for p in source.parent.glob("timefmt.*")) + 60
    try:
        os.utime(source, (stat.st_atime, later))
        out, err = _run("import popproxy.timefmt\n"
                   "from popproxy._compiled import compiled_modules\n"
                   "print('timefmt' in ' '.join(compiled_modules()),"
                   " popproxy.timefmt.__file__.endswith('.py'))")
    finally:
        os.utime(source, (stat.st_atime, stat.st_mtime))
    assert "older than their sources, running the sources: popproxy.timefmt" in err
    assert out.strip() == "False True"
