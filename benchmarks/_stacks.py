"""Sort py-spy's folded stacks of the proxy into the categories of issue 16.

A sample is one stack, outermost frame first, as py-spy's ``--format raw``
writes it (``name (file:line);name (file:line);... COUNT``).  It is
charged to one category, decided by its innermost frame that belongs to
popproxy or to a library; frames of the standard library and generated
code decide nothing and pass the question to their caller.  So time in a
``prometheus_client`` function called from ``metrics.py`` is "metrics",
time in trio called from ``sockio.py`` is "trio", and time in
``json.dumps`` called from the audit is "audit".  Two refinements:

- structlog serves both the audit and the operational logs: its frames
  are the audit's when the nearest popproxy frame outside them is in
  ``popproxy/audit/``, else logging;
- a dataclass's generated ``__init__`` (file ``<string>``) is event
  construction when the line that called it names an event class
  (``Response(...)`` in ``session.py``), else its caller's.

``shares`` and ``allocate`` turn the sample counts into fractions and into
CPU time: kernel time is not sampled (py-spy samples only while the
process holds the GIL, which it drops around every blocking system call)
but measured, as the process's ``stime``; the Python categories share its
``utime`` by their samples.  Pure: no I/O but the optional source lookup
the caller passes in.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CATEGORIES",
    "KERNEL",
    "OTHER",
    "RUN_LOOP",
    "SAMPLED",
    "Breakdown",
    "Categorizer",
    "Frame",
    "allocate",
    "parse_folded",
    "parse_frame",
    "shares",
]

KERNEL = "kernel"
OTHER = "other"

#: (key, label) in table order.  ``kernel`` is measured, not sampled.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("trio", "trio I/O and scheduling (trio, outcome, sockio.py)"),
    (KERNEL, "kernel: system calls, process stime"),
    ("framing", "framing and parsing (pop3/)"),
    ("session", "session dispatch (session*.py, routed.py, front.py)"),
    ("policy", "policy (policy/)"),
    ("events", "event construction and routing (events.py, observe.py, emit)"),
    ("audit", "audit (audit/, its structlog calls)"),
    ("metrics", "metrics (metrics.py, prometheus_client)"),
    ("logging", "logging (logs.py, other structlog calls)"),
    ("shell", "relay/server shell (relay.py, server.py, upstream.py)"),
    (OTHER, "other"),
)
SAMPLED = tuple(key for key, _ in CATEGORIES if key != KERNEL)

# Libraries whose every frame decides (the first path part of the file).
_LIBRARIES = {
    "trio": "trio", "outcome": "trio", "sniffio": "trio", "sortedcontainers": "trio",
    "prometheus_client": "metrics",
}
_POPPROXY_FILES = {
    "sockio.py": "trio",
    "session.py": "session", "session_state.py": "session", "session_policy.py": "session",
    "routed.py": "session", "front.py": "session",
    "events.py": "events", "observe.py": "events",
    "metrics.py": "metrics",
    "logs.py": "logging",
    "relay.py": "shell", "server.py": "shell", "upstream.py": "shell",
}
_POPPROXY_PACKAGES = {"pop3": "framing", "policy": "policy", "audit": "audit"}
# The shell's functions that hand events to the observers.
_EMIT_FILES = ("relay.py", "server.py")
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_CALL = re.compile(r"\b([A-Z]\w*)\(")
_STDLIB = frozenset(sys.stdlib_module_names)


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a sample: function (py-spy's qualified name), file, line (0: none)."""

    name: str
    file: str
    line: int = 0

    def label(self) -> str:
        return f"{self.name} ({self.file})"


def parse_frame(text: str) -> Frame:
    """``Relay._pump (popproxy/relay.py:163)`` -> Frame; unparseable text is kept as a name."""
    m = _FRAME.match(text)
    if m is None:
        return Frame(text, "")
    return Frame(m["name"], m["file"], int(m["line"] or 0))


def parse_folded(text: str) -> Counter[tuple[Frame, ...]]:
    """Folded stacks (``frame;frame;... COUNT`` lines) -> samples per stack.

    Lines that are not of that form are skipped.
    """
    out: Counter[tuple[Frame, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        out[tuple(parse_frame(f) for f in stack.split(";"))] += int(count)
    return out


def _module_path(file: str) -> tuple[str, ...]:
    """A frame's file as package path parts: ``trio/_core/_run.py`` -> ("trio", ...).

    py-spy shortens a file to its path below the ``sys.path`` entry it was
    found in; a full path is cut after ``site-packages`` or at ``popproxy``.
    """
    parts = tuple(p for p in file.replace("\\", "/").split("/") if p)
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return parts[len(parts) - parts[::-1].index(anchor):]
    if "popproxy" in parts and parts[0] != "popproxy":
        return parts[len(parts) - 1 - parts[::-1].index("popproxy"):]
    return parts


@dataclass
class Categorizer:
    """Decides each sample's category (see the module docstring).

    ``event_classes``: the names of the event types (``popproxy.events``);
    ``source_line(file, line)``: the text of a source line, to tell what a
    generated ``__init__`` was constructing ('' when unknown).
    """

    event_classes: frozenset[str] = frozenset()
    source_line: Callable[[str, int], str] = field(default=lambda file, line: "")

    def frame_category(self, frame: Frame) -> str | None:
        """The category a frame decides on its own; None when it passes to its caller.

        structlog is "structlog" here: resolved by ``category``.
        """
        file = frame.file
        if file.startswith("<attrs generated"):  # attrs-made methods name their class
            owner = file.rsplit(" ", 1)[-1].rstrip(">").split(".", 1)[0]
            return _LIBRARIES.get(owner)
        if file.startswith("<") or not file:
            return None  # <string>, <frozen ...>, native frames without a file
        parts = _module_path(file)
        if not parts:
            return None
        top = parts[0].removesuffix(".py")
        if top == "popproxy":
            if len(parts) == 2:
                name = parts[1]
                if name in _EMIT_FILES and "emit" in frame.name.rsplit(".", 1)[-1]:
                    return "events"
                return _POPPROXY_FILES.get(name, OTHER)
            return _POPPROXY_PACKAGES.get(parts[1], OTHER)
        if top == "structlog":
            return "structlog"
        if top in _LIBRARIES:
            return _LIBRARIES[top]
        if top in _STDLIB:
            return None
        return OTHER  # another library (py-spy writes them from site-packages)

    def category(self, stack: Sequence[Frame]) -> tuple[str, Frame | None]:
        """A sample's category and the frame that decided it (None: nothing did)."""
        for i in range(len(stack) - 1, -1, -1):
            frame = stack[i]
            if frame.file == "<string>" and frame.name.endswith("__init__") and i > 0:
                caller = stack[i - 1]
                made = self._constructed_event(caller)
                if made is not None:
                    return "events", Frame(f"{made}.__init__ (from {caller.name})", frame.file)
                continue
            cat = self.frame_category(frame)
            if cat is None:
                continue
            if cat == "structlog":
                return self._structlog_caller(stack[:i]), frame
            return cat, frame
        return OTHER, None

    def _constructed_event(self, caller: Frame) -> str | None:
        """The event class the caller's line constructs, if it names one."""
        if not self.event_classes or not caller.line:
            return None
        text = self.source_line(caller.file, caller.line)
        return next((n for n in _CALL.findall(text) if n in self.event_classes), None)

    def _structlog_caller(self, outer: Sequence[Frame]) -> str:
        for frame in reversed(outer):
            parts = _module_path(frame.file)
            if parts[:1] == ("popproxy",):
                return "audit" if parts[1:2] == ("audit",) else "logging"
        return "logging"


#: ``Breakdown.trio_for``'s name for trio time with no popproxy task below the run loop.
RUN_LOOP = "(the run loop itself)"
# popproxy frames that only start the run loop.
_ENTRY_FILES = frozenset({"popproxy/cli.py", "popproxy/__main__.py", "popproxy/app.py"})


@dataclass
class Breakdown:
    """Samples per category, per deciding frame (``category``, label), and
    trio's samples by the popproxy frame they run for (``trio_for``)."""

    samples: Counter[str] = field(default_factory=Counter)
    frames: Counter[tuple[str, str]] = field(default_factory=Counter)
    trio_for: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, stacks: Mapping[tuple[Frame, ...], int], categorizer: Categorizer) -> Breakdown:
        out = cls()
        for stack, count in stacks.items():
            cat, frame = categorizer.category(stack)
            out.samples[cat] += count
            if frame is None:
                label = f"(none; innermost: {stack[-1].label()})" if stack else "(empty)"
            else:
                label = frame.label()
            out.frames[(cat, label)] += count
            if cat == "trio":
                out.trio_for[_trio_caller(stack)] += count
        return out

    @property
    def total(self) -> int:
        return sum(self.samples.values())


def _trio_caller(stack: Sequence[Frame]) -> str:
    """The innermost popproxy frame of a trio sample, sockio.py aside: the
    task (or the call) trio was working for."""
    for frame in reversed(stack):
        parts = _module_path(frame.file)
        if parts[:1] != ("popproxy",) or parts[1:] == ("sockio.py",):
            continue
        if "/".join(parts) in _ENTRY_FILES:
            return RUN_LOOP
        return frame.label()
    return RUN_LOOP


def shares(samples: Mapping[str, int], keys: Iterable[str] = SAMPLED) -> dict[str, float]:
    """Each key's fraction of all samples (0.0 for none); they add up to 1."""
    keys = list(keys)
    total = sum(samples.get(k, 0) for k in keys)
    unknown = set(samples) - set(keys)
    if unknown:
        raise ValueError(f"samples of unknown categories: {sorted(unknown)}")
    return {k: (samples.get(k, 0) / total if total else 0.0) for k in keys}


def allocate(share: Mapping[str, float], user: float, system: float) -> dict[str, float]:
    """CPU per category: ``system`` to the kernel, ``user`` split by ``share``.

    The values add up to ``user + system`` (when the shares add up to 1).
    """
    out = {key: 0.0 for key, _ in CATEGORIES}
    for key, fraction in share.items():
        out[key] += fraction * user
    out[KERNEL] += system
    return out
