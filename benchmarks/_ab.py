"""A/B runs: an earlier revision's proxy beside the current one, and figures
compared across targets and across repeated runs.

``python -m benchmarks.run --baseline REV`` exports the ``popproxy/``
package of REV with ``git archive`` into the run's temporary directory and
starts a second proxy from it (same interpreter and virtualenv, the exported
tree first on ``PYTHONPATH`` and as the working directory).  Only the
package is exported: the load generator, the test helpers and the
installed dependencies are the current ones, so a baseline that needs a
dependency the virtualenv lacks fails to start, with its log.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._procs import REPO_ROOT, ProxyProcess

__all__ = [
    "TREE_LAUNCHER",
    "Figure",
    "Revision",
    "check_source",
    "describe_worktree",
    "export_package",
    "render_figures",
    "render_spread",
    "resolve_revision",
]


def _git(*args: str, repo: Path = REPO_ROOT) -> str:
    done = subprocess.run(
        ["git", *args], cwd=repo, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise ValueError(f"git {' '.join(args)}: {err or f'exit {done.returncode}'}")
    return done.stdout.decode(errors="replace").strip()


@dataclass(frozen=True)
class Revision:
    """A commit of this repository, as given and as resolved."""

    spec: str
    commit: str
    subject: str

    @property
    def label(self) -> str:
        short = self.commit[:10]
        name = short if self.spec in (self.commit, short) else f"{self.spec} = {short}"
        return f"{name} ({self.subject})"


def resolve_revision(spec: str, repo: Path = REPO_ROOT) -> Revision:
    """The commit ``spec`` names (a hash, branch, tag, ``HEAD~5``...).

    ``ValueError`` with git's reason when it names none, before anything
    is started.
    """
    if not spec or spec.startswith("-"):
        raise ValueError(f"not a revision: {spec!r}")
    try:
        commit = _git("rev-parse", "--verify", "--end-of-options", f"{spec}^{{commit}}",
                      repo=repo)
    except ValueError as exc:
        raise ValueError(f"{spec!r} names no commit of {repo} ({exc})") from None
    subject = _git("log", "-1", "--format=%s", commit, repo=repo)
    return Revision(spec, commit, subject)


def describe_worktree(repo: Path = REPO_ROOT) -> str:
    """What the current proxy runs: HEAD, and whether ``popproxy/`` differs from it."""
    head = _git("rev-parse", "--short=10", "HEAD", repo=repo)
    dirty = _git("status", "--porcelain", "--", "popproxy", repo=repo)
    return f"HEAD {head}" + (" + uncommitted changes in popproxy/" if dirty else "")


def export_package(rev: Revision, dest: Path, repo: Path = REPO_ROOT) -> Path:
    """Write ``popproxy/`` as of ``rev`` under ``dest``; returns ``dest``.

    ``git archive`` reads the object store only: no worktree is registered
    in the repository, so nothing is left behind there if the run dies.
    """
    dest.mkdir(parents=True, exist_ok=False)
    archive = dest.with_name(dest.name + ".tar")
    _git("archive", "--format=tar", f"--output={archive}", rev.commit, "--", "popproxy",
         repo=repo)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    finally:
        archive.unlink(missing_ok=True)
    if not (dest / "popproxy" / "__init__.py").is_file():
        raise ValueError(f"{rev.label} has no popproxy/__init__.py")
    return dest


# With an editable install of the current tree, the installed finder
# answers for any popproxy submodule the exported tree lacks: a baseline
# without, say, popproxy/__main__.py would run the current one's.  The
# baseline proxy drops that finder before importing anything, so a missing
# module is an ImportError, never the current tree's code.  The current
# proxy of an A/B run is started the same way from the working tree, so
# that the two arms differ in their code only.
_DROP_INSTALLED = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path\n"
    "                    if not getattr(f, '__module__', '').startswith('__editable___popproxy')]\n"
)
#: ``python -m popproxy run -c FILE`` for the tree that is ``source_root``
#: (see above); both proxies of an A/B run.
TREE_LAUNCHER: tuple[str, ...] = (
    "-c",
    _DROP_INSTALLED + "import runpy\n"
    "runpy.run_module('popproxy', run_name='__main__', alter_sys=True)\n",
    "run", "-c",
)
_PROBE = (
    "import importlib.util, json\n"
    "found = {}\n"
    "for name in ('popproxy', 'popproxy.__main__', 'popproxy.cli'):\n"
    "    spec = importlib.util.find_spec(name)\n"
    "    found[name] = spec.origin if spec is not None else None\n"
    "print(json.dumps(found))\n"
)


def check_source(proxy: ProxyProcess) -> Path:
    """Prove which tree's code ``proxy`` runs; returns its ``popproxy.__file__``.

    A child with the proxy's interpreter, environment, working directory and
    (for ``TREE_LAUNCHER``) import set-up finds ``popproxy``, its
    ``__main__`` and ``cli``: each must be in ``proxy.source_root``.  Once
    started, the running process's working directory must be that root.
    """
    root = proxy.source_root.resolve()
    prelude = _DROP_INSTALLED if proxy.launcher == TREE_LAUNCHER else ""
    done = subprocess.run(
        [proxy.python, "-c", prelude + _PROBE], cwd=root, env=proxy.child_env(),
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )
    out = (done.stdout + done.stderr).decode(errors="replace").strip()
    if done.returncode != 0:
        raise RuntimeError(f"finding popproxy in {root} failed: {out}")
    found: dict[str, str | None] = json.loads(done.stdout)
    for name, origin in found.items():
        if origin is None:
            raise RuntimeError(f"{root} has no {name}: `python -m popproxy run` cannot run it")
        if not Path(origin).resolve().is_relative_to(root / "popproxy"):
            raise RuntimeError(f"the proxy for {root} would import {name} from {origin}")
    if proxy.proc is not None:
        cwd = Path(os.readlink(f"/proc/{proxy.pid}/cwd")).resolve()
        if cwd != root:
            raise RuntimeError(f"proxy pid {proxy.pid} runs in {cwd}, not {root}")
    return Path(str(found["popproxy"])).resolve()


# --------------------------------------------------------------------------
# Figures: one number per target, compared across targets and runs
# --------------------------------------------------------------------------


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


@dataclass
class Figure:
    """One measured quantity: a value per target name (``direct``,
    ``baseline``, ``proxy``, ``floor``); a target it does not apply to is absent.

    ``rounds``: the same quantity per interleaved round (or block), where
    the scenario has them; ``paired`` compares two targets round by round.
    """

    key: str
    label: str
    values: dict[str, float]
    digits: int = 1
    rounds: dict[str, list[float]] = field(default_factory=dict)

    def ratio(self, num: str, den: str) -> float:
        return _div(self.values.get(num, math.nan), self.values.get(den, math.nan))

    def paired(self, num: str, den: str) -> float:
        """The median of the per-round ratios ``num / den``.

        Rounds measure the targets minutes apart at most, seconds apart
        within one; a drift of the machine between rounds (this 2-core VM
        drifts by 1.5x within minutes) moves both sides of a round's ratio
        alike, where it can move one target's median more than the other's.
        """
        pairs = [_div(a, b) for a, b in zip(self.rounds.get(num, ()),
                                            self.rounds.get(den, ()), strict=False)]
        real = sorted(r for r in pairs if not math.isnan(r))
        if not real:
            return math.nan
        mid = len(real) // 2
        return real[mid] if len(real) % 2 else (real[mid - 1] + real[mid]) / 2

    def as_dict(self) -> dict[str, object]:
        return {"key": self.key, "label": self.label, "values": self.values,
                "rounds": self.rounds}


def _num(value: float, digits: int) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}x"


def _compare(names: Sequence[str]) -> list[tuple[str, str]]:
    """The pairs ratios are taken of: current / baseline when there is a
    baseline, else proxy / direct; and proxy / floor (the trio-sockio relay
    of ``benchmarks.floor``) when it was measured."""
    pairs = [("proxy", "baseline") if "baseline" in names else ("proxy", "direct")]
    if "floor" in names:
        pairs.append(("proxy", "floor"))
    return pairs


def render_figures(
    figures: Sequence[Figure], names: Sequence[str], labels: Mapping[str, str],
) -> str:
    """A table: each figure's value per target and the ratios of ``_compare``'s pairs."""
    pairs = _compare(names)
    head = ["Figure", *(labels[n] for n in names)]
    for num, den in pairs:
        head += [f"{labels[num]} / {labels[den]}", "paired (median of rounds' ratios)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for f in figures:
        cells = [f.label, *(_num(f.values.get(n, math.nan), f.digits) for n in names)]
        for num, den in pairs:
            cells += [_ratio(f.ratio(num, den)), _ratio(f.paired(num, den))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _span(values: Sequence[float], fmt: str, suffix: str = "") -> str:
    real = [v for v in values if not math.isnan(v)]
    if not real:
        return "—"
    lo, hi = format(min(real), fmt), format(max(real), fmt)
    return (lo if lo == hi else f"{lo}-{hi}") + suffix


def render_spread(
    runs: Sequence[Sequence[Figure]], names: Sequence[str], labels: Mapping[str, str],
) -> str:
    """Each figure's min-max over ``runs`` per target, and the ratios of
    ``_compare``'s pairs in every run."""
    pairs = _compare(names)
    head = ["Figure (min-max over runs)", *(labels[n] for n in names)]
    for num, den in pairs:
        head += [f"{labels[num]} / {labels[den]}", "per run", "paired", "per run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    order: list[str] = []
    by_key: dict[str, list[Figure]] = {}
    for figures in runs:
        for f in figures:
            if f.key not in by_key:
                order.append(f.key)
            by_key.setdefault(f.key, []).append(f)
    for key in order:
        found = by_key[key]
        digits = found[0].digits
        cells = [found[0].label]
        for n in names:
            cells.append(_span([f.values.get(n, math.nan) for f in found], f",.{digits}f"))
        for num, den in pairs:
            for ratios in ([f.ratio(num, den) for f in found],
                           [f.paired(num, den) for f in found]):
                cells.append(_span(ratios, ".2f", "x"))
                cells.append(", ".join(_ratio(r) for r in ratios))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
