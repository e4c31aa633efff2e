"""The bars ``python -m benchmarks.run`` judges, the rows of its table, and
the tally of each bar over repeated runs.

Issue 16 set the bars against trio's own floor (the ``trio-sockio`` relay of
``benchmarks.floor``, measured in the same run): proxy CPU per NOOP round
trip and per full session, NOOP p50 over the relay's, 1,000 pipelined
commands and the 50-client session rate against direct.  It replaced issue
2's NOOP bar (p50 ≤ direct + 100 µs, below what any trio relay reaches on
the development machine) and kept the others, with the limits it states:
RETR ≥ 0.9x direct with RSS flat while streaming, zero 40 ms stalls, and
≤ 32 KiB of RSS per idle session.

Everything here is pure: numbers in, verdicts and text out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "IDLE_KIB",
    "NOOP_CPU",
    "NOOP_P50",
    "PIPELINE",
    "RETR",
    "RSS_STREAMING",
    "SESSION_CPU",
    "SESSION_RATE",
    "STALLS",
    "Bar",
    "Row",
    "ratio",
    "render_bars_over_runs",
    "render_table",
    "verdict",
]


@dataclass(frozen=True)
class Bar:
    """A limit on one figure: at most (``upper``) or at least ``limit``.

    ``text`` is the bar as the table prints it.  A figure that was not
    measured (NaN) gets no verdict rather than a false one.
    """

    text: str
    limit: float
    upper: bool

    def judge(self, value: float) -> bool | None:
        """True: met; False: missed; None: nothing to judge (NaN)."""
        if math.isnan(value):
            return None
        return value <= self.limit if self.upper else value >= self.limit


# Issue 16's bars.
#: Proxy CPU (user + system, all threads) per NOOP round trip, in µs.
NOOP_CPU = Bar("≤ 90 µs", 90.0, upper=True)
#: Proxy CPU per full session (USER PASS STAT UIDL RETR QUIT), in ms.
SESSION_CPU = Bar("≤ 1.0 ms", 1.0, upper=True)
#: NOOP p50 through the proxy minus the trio-sockio relay's, in µs.
NOOP_P50 = Bar("≤ relay + 25 µs", 25.0, upper=True)
#: 1,000 pipelined commands, write → last reply, proxy / direct.
PIPELINE = Bar("≤ 3.00x direct", 3.0, upper=True)
#: Full sessions per second with 50 clients, proxy / direct.
SESSION_RATE = Bar("≥ 0.60x direct", 0.6, upper=False)
# Kept by issue 16 from earlier issues.
#: RETR throughput, proxy / direct.
RETR = Bar("≥ 0.90x direct", 0.9, upper=False)
#: Proxy RSS growth while streaming the largest message, in MiB.
RSS_STREAMING = Bar("≤ +10 MiB", 10.0, upper=True)
#: Session steps slower than 35 ms (a 40 ms Nagle / delayed-ACK stall), count.
STALLS = Bar("proxy = 0", 0.0, upper=True)
#: Proxy RSS per idle logged-in session, in KiB.
IDLE_KIB = Bar("≤ 32 KiB", 32.0, upper=True)


def ratio(value: float, base: float) -> float:
    """``value / base``; NaN when either is NaN or ``base`` is 0."""
    if math.isnan(value) or math.isnan(base) or base == 0:
        return math.nan
    return value / base


def verdict(ok: bool | None) -> str:
    """How the table prints a bar's outcome."""
    return "—" if ok is None else ("met" if ok else "MISSED")


@dataclass
class Row:
    """One line of the figures table.

    ``direct``, ``floor`` (the trio-sockio relay) and ``proxy`` are the
    figure per target, ``compare`` and ``vs_floor`` the proxy against
    direct and against the relay, all as printed ("—": not measured or not
    applicable).  ``ok`` is the bar's verdict (None: no bar, or nothing to
    judge it on).  ``key`` names the row across repeated runs and
    ``judged`` is the number the bar was judged on, for the tally.
    """

    figure: str
    direct: str
    proxy: str
    compare: str
    bar: str
    ok: bool | None
    floor: str = "—"
    vs_floor: str = "—"
    key: str = ""
    judged: str = ""

    @property
    def verdict(self) -> str:
        return verdict(self.ok)


def render_table(rows: Sequence[Row], proxy: str = "Proxy", floor: str | None = None) -> str:
    """The figures table; with ``floor`` (the relay's column title), its
    column and the proxy against it."""
    head = ["Figure", "Direct", proxy]
    if floor is not None:
        head.append(floor)
    head.append(f"{proxy} vs direct")
    if floor is not None:
        head.append(f"{proxy} vs relay")
    head += ["Bar", "Result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        cells = [r.figure, r.direct, r.proxy]
        if floor is not None:
            cells.append(r.floor)
        cells.append(r.compare)
        if floor is not None:
            cells.append(r.vs_floor)
        cells += [r.bar, r.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_bars_over_runs(runs: Sequence[Sequence[Row]]) -> str:
    """Each bar's verdict in every run: met in k of n, and what each run judged.

    Rows are matched by ``key``; a row without a key or without a bar is
    left out.  '' when no run has a bar.
    """
    order: list[str] = []
    found: dict[str, list[Row | None]] = {}
    for i, rows in enumerate(runs):
        for r in rows:
            if not r.key or r.bar in ("", "—"):
                continue
            if r.key not in found:
                order.append(r.key)
                found[r.key] = [None] * len(runs)
            found[r.key][i] = r
    if not order:
        return ""
    lines = ["| Bar (over runs) | Figure | Met | Each run |", "|---|---|---|---|"]
    for key in order:
        per_run = found[key]
        first = next(r for r in per_run if r is not None)
        judged = [r for r in per_run if r is not None and r.ok is not None]
        met = sum(1 for r in judged if r.ok)
        each = ", ".join(
            "—" if r is None else f"{r.judged or r.proxy} {r.verdict}" for r in per_run)
        lines.append(f"| {first.bar} | {first.figure} | {met} of {len(judged)} | {each} |")
    return "\n".join(lines)
