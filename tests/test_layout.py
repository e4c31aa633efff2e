"""The architecture, checked from the source: layers, import cycles, sizes.

Read with ``ast`` (nothing is imported): a module's dependencies are every
``popproxy`` import it makes, at module level, in functions and under
``if TYPE_CHECKING:`` alike (a type-only import is the same dependency,
only not executed).  A package's ``__init__`` re-exporting its own
submodules is not a dependency of the package on itself.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "popproxy"

#: The sans-IO core: no trio, no I/O (DESIGN.md, "Architecture").
SANS_IO = ("popproxy.pop3", "popproxy.session", "popproxy.session_state",
           "popproxy.session_policy", "popproxy.policy",
           "popproxy.events", "popproxy.addr", "popproxy.observe", "popproxy.proxyproto")
#: Modules over 600 lines, and why.
LONG_MODULES = {
    "popproxy.session": "one state machine: the Session class itself is under 600 lines; "
                        "the rest is its imports and the module's account of pipelining",
}
MAX_LINES = 600


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


@cache
def imports(name: str) -> frozenset[str]:
    """The popproxy modules ``name`` imports (directly)."""
    path = modules()[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here[: len(here) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    known = modules()
    return frozenset(m for m in found
                     if m in known and m != name and not m.startswith(name + "."))


def third_party(name: str) -> set[str]:
    tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def closure(name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for dep in imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(imports(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in sorted(modules()):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycles_type_only_imports_included() -> None:
    assert cycles() == []


def test_the_checker_sees_a_type_only_cycle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check can fail: two modules importing each other, one only for types."""
    pkg = tmp_path / "popproxy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import B\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    modules.cache_clear()
    imports.cache_clear()
    try:
        assert cycles() == [["popproxy.a", "popproxy.b"]]
    finally:
        modules.cache_clear()
        imports.cache_clear()


@pytest.mark.parametrize("layer", SANS_IO)
def test_the_sans_io_core_imports_no_trio(layer: str) -> None:
    parts = [m for m in modules() if m == layer or m.startswith(layer + ".")]
    assert parts
    for part in parts:
        for dep in {part} | closure(part):
            assert "trio" not in third_party(dep), f"{part} reaches trio through {dep}"


def test_config_parsing_imports_no_metrics_tls_or_session_code() -> None:
    reached = closure("popproxy.config")
    for forbidden in ("popproxy.metrics", "popproxy.tls", "popproxy.session", "popproxy.server",
                      "popproxy.relay", "popproxy.endpoint", "popproxy.health"):
        assert forbidden not in reached


def test_observers_do_not_import_the_trio_shell() -> None:
    for observer in ("popproxy.metrics", "popproxy.logs", "popproxy.audit._records",
                     "popproxy.audit._trail", "popproxy.observe"):
        reached = closure(observer)
        assert not reached & {"popproxy.server", "popproxy.relay", "popproxy.upstream"}, observer


def test_modules_stay_small() -> None:
    for name, path in sorted(modules().items()):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if name not in LONG_MODULES:
            assert lines <= MAX_LINES, f"{name}: {lines} lines"


def test_the_session_class_is_under_600_lines() -> None:
    tree = ast.parse(modules()["popproxy.session"].read_text(encoding="utf-8"))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Session"]
    assert cls.end_lineno is not None
    assert cls.end_lineno - cls.lineno + 1 < MAX_LINES


def test_readme_layout_matches_the_files() -> None:
    """Every module and package of popproxy/ is in the README's layout, and
    everything the layout names exists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named: set[str] = set()
    for line in block.splitlines():
        first = re.match(r"\s*([\w.]+/?)", line)
        if first and (first.group(1).endswith(("/", ".py"))):
            named.add(first.group(1).rstrip("/"))
        named |= set(re.findall(r"\b\w+\.py\b", line))
    top = {p.name for p in PACKAGE.iterdir()
           if (p.is_dir() and (p / "__init__.py").exists())
           or (p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"))}
    assert top - named == set(), "files missing from the README's layout"
    listed = {n for n in named if n not in ("popproxy", "tests", "benchmarks", "deploy",
                                              "dashboards", "docs")}
    missing = {n for n in listed if not (PACKAGE / n).exists()}
    assert missing == set(), "the README's layout names files that do not exist"
