"""Optional sampling profile of the proxy process with py-spy (``--profile DIR``).

py-spy (``pip install py-spy``) attaches to the running proxy by pid and
writes folded stacks (``--format raw``); ``summarize`` turns them into the
functions with the most self and inclusive samples.  Sampling costs the
proxy a little CPU, so the figures of a profiled run are not the ones to
report.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

__all__ = ["find_py_spy", "record", "summarize"]


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


@contextlib.contextmanager
def record(pid: int, output: Path, rate: int = 250) -> Iterator[None]:
    """Sample ``pid`` while the block runs; folded stacks go to ``output``."""
    binary = find_py_spy()
    if binary is None:
        raise RuntimeError("--profile needs py-spy: pip install py-spy")
    proc = subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--output", str(output), "--format", "raw",
         "--rate", str(rate), "--function", "--nonblocking"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout=30.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
        if proc.stderr is not None:
            proc.stderr.close()


def summarize(folded: Path, top: int = 25) -> str:
    """Top functions by self samples and by inclusive samples."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    try:
        text = folded.read_text(errors="replace")
    except OSError as exc:
        return f"(no profile: {exc})"
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    if not total:
        return "(no samples)"
    out = [f"{total} samples", "", "self%  function"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in self_counts.most_common(top)]
    out += ["", "incl%  function"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in incl_counts.most_common(top)]
    return "\n".join(out)
