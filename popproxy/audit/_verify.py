"""Checking a trail with its signed checkpoints (``popproxy audit verify --key``).

``verify_trail`` groups the files given into chains (one per origin: the
files of one proxy, live and rotated; later one per worker), walks each
chain as ``verify_files`` does and, at every ``audit.checkpoint`` record,
checks that

- its note is a well-formed checkpoint for the record's ``origin``;
- it signs the record right before it: size = its ``seq`` - 1 and hash =
  its ``prev`` (a checkpoint moved elsewhere, or a chain recomputed after
  an edit, fails here);
- with verifier keys, a signature by one of them verifies.

A shipped copy of the checkpoints (``checkpoint_path``, brought back from
off the host) is compared line for line with the trail: every checkpoint in
it must be in the trail, byte for byte, at its ``seq``.  One for a ``seq``
past the end of the trail means the trail was cut.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._chain import VerifyResult, verify_files
from ._checkpoint import CHECKPOINT_EVENT, loads_record, parse_checkpoint_text
from ._note import NoteError, Verifier, open_note, parse_note

__all__ = ["ChainReport", "Shipped", "TrailReport", "verify_trail"]

_MARK = b'"event":"audit.checkpoint"'


@dataclass
class Shipped:
    """One checkpoint line of a shipped copy."""

    file: str
    line: int
    seq: int
    origin: str
    raw: bytes

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class ChainReport:
    """One chain: the walk's result and what the checkpoints in it showed."""

    files: list[str]
    origins: list[str] = field(default_factory=list)
    result: VerifyResult = field(default_factory=VerifyResult)
    checkpoints: int = 0  # checkpoint records that checked out
    signed_seq: int | None = None  # the size the last of them signs
    checkpoint_seq: int | None = None  # where the last of them stands
    checkpoint_where: str | None = None
    keys: set[str] = field(default_factory=set)  # name+hash of the keys that verified
    shipped: int = 0  # shipped checkpoints found in the trail
    shipped_before: int = 0  # shipped checkpoints for records not in the files given
    failure: str | None = None  # after the walk (truncation, nothing signed)

    @property
    def tail(self) -> int:
        """Records after the last checkpoint (all of them without one)."""
        if self.result.last is None:
            return 0
        if self.checkpoint_seq is None:
            return self.result.records
        return self.result.last - self.checkpoint_seq

    @property
    def ok(self) -> bool:
        """Intact, not empty, and nothing found against it after the walk."""
        return self.result.ok and self.result.records > 0 and self.failure is None


@dataclass
class TrailReport:
    chains: list[ChainReport]
    problems: list[str]  # in the shipped copy, or shipped checkpoints no trail matches
    signatures_checked: bool
    shipped_files: int = 0
    shipped_total: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.chains)


def _chain_link(raw: bytes, key: str) -> tuple[int, str] | None:
    record = loads_record(raw) if raw else None
    if record is None:
        return None
    seq, value = record.get("seq"), record.get(key)
    if isinstance(seq, int) and isinstance(value, str) and isinstance(record.get("hash"), str):
        return seq, value
    return None


def _scan(data: bytes) -> tuple[set[str], tuple[int, str] | None, tuple[int, str] | None]:
    """A file's checkpoint origins, its first (seq, prev) and last (seq, hash).

    Reads only what it needs: the lines with a checkpoint in them, and
    lines from each end up to the first record there.
    """
    origins: set[str] = set()
    pos = data.find(_MARK)
    while pos >= 0:
        start = data.rfind(b"\n", 0, pos) + 1
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        record = loads_record(data[start:end])
        if record is not None and isinstance(record.get("origin"), str):
            origins.add(record["origin"])
        pos = data.find(_MARK, end)
    first = last = None
    for raw in data.split(b"\n", 64):  # the first record is near the top
        if (first := _chain_link(raw, "prev")) is not None:
            break
    end = len(data)
    while end > 0 and last is None:
        start = data.rfind(b"\n", 0, end - 1) + 1
        last = _chain_link(data[start:end].rstrip(b"\n"), "hash")
        end = start
    return origins, first, last


# A worker's file, ``audit.w2.jsonl`` or a rotation of it (``_trail.worker_path``).
_WORKER_FILE = re.compile(r"\.w(\d+)(?:\.|$)")


def group_chains(files: Sequence[tuple[str, bytes]],
                 scans: Sequence[tuple[set[str], tuple[int, str] | None,
                                       tuple[int, str] | None]] | None = None,
                 ) -> list[list[int]]:
    """The files, grouped into chains (as indexes into ``files``).

    Files whose checkpoints name the same origin, files of the same worker
    (``audit.w2.jsonl`` and its rotations, ``_trail.worker_path``), and a
    file whose first record continues another's last, are one chain.  With
    at most one origin or worker among them (one proxy, today's case) all
    files are one chain, so a break between them is reported as a break,
    not as two chains.
    """
    if scans is None:
        scans = [_scan(data) for _, data in files]
    parent = list(range(len(files)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    by_origin: dict[str, int] = {}
    by_end: dict[tuple[int, str], int] = {}
    for i, (origins, _, last) in enumerate(scans):
        worker = _WORKER_FILE.search(Path(files[i][0]).name)
        keys = [*origins, *([f"worker file {worker[1]}"] if worker else [])]
        for key in keys:
            if key in by_origin:
                union(i, by_origin[key])
            else:
                by_origin[key] = i
        if last is not None:
            by_end[last] = i
    for i, (_, first, _) in enumerate(scans):
        if first is not None and (j := by_end.get((first[0] - 1, first[1]))) is not None:
            union(i, j)
    if len({find(i) for i in by_origin.values()}) <= 1:
        return [list(range(len(files)))] if files else []
    groups: dict[int, list[int]] = {}
    for i in range(len(files)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def read_shipped(files: Sequence[tuple[str, bytes]]) -> tuple[list[Shipped], list[str]]:
    """The checkpoint lines of shipped copies, and what is wrong in them."""
    entries: list[Shipped] = []
    problems: list[str] = []
    for name, data in files:
        lines = data.split(b"\n")
        torn = bool(lines) and lines[-1] != b""
        for number, raw in enumerate(lines, 1):
            if not raw:
                continue
            record = loads_record(raw)
            seq = record.get("seq") if record is not None else None
            origin = record.get("origin") if record is not None else None
            if (record is None or record.get("event") != CHECKPOINT_EVENT
                    or not isinstance(seq, int) or not isinstance(origin, str)):
                if torn and number == len(lines):
                    continue  # a copy in progress, or torn by a crash
                problems.append(f"{name}:{number}: not an audit.checkpoint record")
                continue
            entries.append(Shipped(name, number, seq, origin, raw))
    return entries, problems


def _check_note(record: dict[str, Any], seq: int,
                verifiers: Sequence[Verifier] | None) -> tuple[str | None, str | None]:
    """(what is wrong with checkpoint ``record`` at ``seq``, the key that verified it)."""
    note, origin, prev = record.get("note"), record.get("origin"), record.get("prev")
    if not isinstance(note, str) or not isinstance(origin, str):
        return "checkpoint without origin or note", None
    try:
        text, signatures = parse_note(note)
        signed_origin, size, digest = parse_checkpoint_text(text)
    except NoteError as exc:
        return f"checkpoint: {exc}", None
    if signed_origin != origin:
        return f"checkpoint: it signs origin {signed_origin!r}, the record says {origin!r}", None
    if size != seq - 1:
        return (f"checkpoint signs seq {size} but stands at seq {seq}: a checkpoint signs "
                "the record right before it (moved)"), None
    if digest != prev:
        return (f"checkpoint signs hash {digest[:16]}... for seq {size}, but the chain has "
                f"{str(prev)[:16]}... there (the trail was rewritten)"), None
    if verifiers is None:
        return None, None
    try:
        opened = open_note(note, verifiers)
    except NoteError as exc:
        if "no signature by a known key" in str(exc):
            names = ", ".join(f"{s.name}+{s.key_hash:08x}" for s, _ in signatures)
            return (f"checkpoint signed by {names}, not by a key given with --key "
                    "(forged, or the wrong key)"), None
        return f"checkpoint: {exc} (forged or edited)", None
    sig = opened.signatures[0]
    return None, f"{sig.name}+{sig.key_hash:08x}"


def verify_trail(
    files: Sequence[tuple[str, bytes]],
    *,
    verifiers: Sequence[Verifier] | None = None,
    shipped: Sequence[tuple[str, bytes]] | None = None,
    from_start: bool = False,
) -> TrailReport:
    """Check the chains and checkpoints of ``files`` (name, content).

    ``verifiers``: the keys whose signatures count (None: signatures are
    not checked, only that each checkpoint matches the chain).
    ``shipped``: copies of the checkpoints kept elsewhere.
    """
    report = TrailReport([], [], signatures_checked=verifiers is not None)
    entries: list[Shipped] = []
    if shipped is not None:
        entries, report.problems = read_shipped(shipped)
        report.shipped_files = len(shipped)
        report.shipped_total = len(entries)
        for e in entries:
            record = loads_record(e.raw)
            assert record is not None
            message, _ = _check_note(record, e.seq, verifiers)
            if message is not None:
                report.problems.append(f"{e.where}: shipped {message}")
    scans = [_scan(data) for _, data in files]
    grouped = group_chains(files, scans)
    groups = [[files[i] for i in indexes] for indexes in grouped]
    chains = report.chains = [ChainReport([name for name, _ in group]) for group in groups]
    for chain, indexes in zip(chains, grouped, strict=True):
        chain.origins = sorted(set().union(*(scans[i][0] for i in indexes)))
    # Shipped checkpoints go to the chain of their origin.
    assigned: list[list[Shipped]] = [[] for _ in chains]
    for e in entries:
        homes = [i for i, c in enumerate(chains) if e.origin in c.origins]
        if not homes and len(chains) == 1 and not chains[0].origins:
            homes = [0]  # a trail with no checkpoint left in it: compare anyway
        if not homes:
            report.problems.append(f"{e.where}: a shipped checkpoint of {e.origin!r}, "
                                   "which no file given has a checkpoint of")
            continue
        assigned[homes[0]].append(e)
    for chain, group, mine in zip(chains, groups, assigned, strict=True):
        _walk(chain, group, mine, verifiers, from_start)
    return report


def _walk(chain: ChainReport, group: list[tuple[str, bytes]], shipped: list[Shipped],
          verifiers: Sequence[Verifier] | None, from_start: bool) -> None:
    pending: dict[int, list[Shipped]] = {}
    for e in shipped:
        pending.setdefault(e.seq, []).append(e)

    def check(name: str, number: int, record: dict[str, Any], raw: bytes) -> str | None:
        seq = record["seq"]
        if pending:
            for e in pending.pop(seq, ()):
                if e.raw != raw:
                    return (f"not the checkpoint shipped as {e.where} for this seq "
                            "(the trail was rewritten)")
                chain.shipped += 1
        if record.get("event") != CHECKPOINT_EVENT:
            return None
        message, key = _check_note(record, seq, verifiers)
        if message is not None:
            return message
        if key is not None:
            chain.keys.add(key)
        chain.checkpoints += 1
        chain.signed_seq = seq - 1
        chain.checkpoint_seq = seq
        chain.checkpoint_where = f"{name}:{number}"
        return None

    chain.result = verify_files(group, from_start=from_start, check=check)
    result = chain.result
    if not result.ok or result.last is None:
        return
    first = result.first if result.first is not None else 1
    for seq in sorted(pending):
        for e in pending[seq]:
            if seq < first:
                chain.shipped_before += 1
            elif chain.failure is None:
                chain.failure = (
                    f"the trail ends at seq {result.last}, but the shipped checkpoint "
                    f"{e.where} stands at seq {seq}: records after seq {result.last} "
                    "were cut off (truncated)")
    if chain.failure is None and verifiers is not None and not chain.checkpoints:
        chain.failure = ("no checkpoint in these files: nothing is signed (checkpoints "
                         "removed, or written without sign_key)")
