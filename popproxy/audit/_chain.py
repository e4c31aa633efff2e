"""The hash chain: canonical JSON, record hashes, and checking a chain.

Each chained record carries ``seq`` (1, 2, 3, ...), ``prev`` (the hash of
the record before it; 64 zeros for the first) and ``hash``: the SHA-256 of
the canonical JSON of the record without ``hash`` (keys sorted, compact
separators, non-ASCII kept, UTF-8).  Since ``prev`` is inside what is
hashed, every record's hash covers the whole history before it.

A line of the file is that canonical JSON with ``"hash":"..."`` appended
as the last member, so one serialisation serves both.  ``verify`` checks
that a line is byte for byte what its record gives, so even an edit that
leaves the JSON value unchanged (a space, an escape) is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..jsonl import one_line

__all__ = [
    "GENESIS",
    "ChainHead",
    "Problem",
    "VerifyResult",
    "canonical",
    "line",
    "read_head",
    "record_hash",
    "verify_files",
]

GENESIS = "0" * 64
_TAIL_LIMIT = 1 << 20  # how far back from the end of a file to look for a record


_SHA256 = hashlib.sha256()
_orjson_dumps = orjson.dumps
_SORT_KEYS = orjson.OPT_SORT_KEYS
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical_json(record: Mapping[str, Any]) -> bytes:
    """The definition of the canonical form, with the standard library (the
    fast path below leaves it one record in 4,000 in the audit bench)."""
    return _CANONICAL.encode(record).encode("utf-8")


# orjson writes the same bytes as json.dumps with these settings (sorted
# keys, compact, non-ASCII as UTF-8, the same escapes and the same shortest
# round-trip digits) at about a tenth of the cost, except for the numbers
# that repr() writes with an exponent: below 1e-4 it writes "0.00005" or
# "1e-7" where repr() has "5e-05" or "1e-07" (from 1e16 up both write
# "1e+16"; checked all the same).  An output with "e-", "e+" or "0.0000"
# goes the standard way (a string that holds one costs only that); so does
# anything orjson refuses (an int over 64 bits, a key that is not a str, a
# lone surrogate).  Records never hold NaN or infinities (orjson would
# write null): the builder rounds every float and `round` raises on those,
# and verify reads lines without them.


def canonical(record: Mapping[str, Any]) -> bytes:
    """The canonical JSON of ``record``: what its hash is computed over.

    ``json.dumps(record, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False).encode("utf-8")``, byte for byte (a property test
    holds the fast path to that).
    """
    try:
        body = _orjson_dumps(record, option=_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError
        return _canonical_json(record)
    if b"e-" in body or b"e+" in body or b"0.0000" in body:
        return _canonical_json(record)
    return body


def _not_json(name: str) -> Any:
    """``json.loads`` takes NaN and Infinity; JSON, and so the audit, has no such thing."""
    raise ValueError(f"{name} is not JSON")


def _with_hash(body: bytes, digest: str, *, escaped: bool = True) -> bytes:
    # The hash is over ``body`` as json.dumps writes it; the line writes the
    # characters some readers take for line ends as escapes (``jsonl``).
    if escaped:
        body = one_line(body)
    return body[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}'


def line(record: Mapping[str, Any]) -> bytes:
    """The line of the audit file for ``record`` (without the newline)."""
    digest = record.get("hash")
    if not isinstance(digest, str):
        return one_line(canonical(record))
    return _with_hash(canonical({k: v for k, v in record.items() if k != "hash"}), digest)


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``record`` minus its ``hash``."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


@dataclass
class ChainHead:
    """The last record of a chain: the next one gets ``seq + 1`` and ``prev = hash``."""

    seq: int = 0
    hash: str = GENESIS

    def link(self, record: MutableMapping[str, Any]) -> bytes:
        """Add ``seq``, ``prev`` and ``hash`` to ``record``, advance the head;
        return the record's line."""
        record["seq"] = self.seq + 1
        record["prev"] = self.hash
        body = canonical(record)
        h = _SHA256.copy()  # cheaper than a new hashlib.sha256() (an OpenSSL fetch)
        h.update(body)
        digest = h.hexdigest()
        record["hash"] = digest
        self.seq += 1
        self.hash = digest
        return _with_hash(body, digest)


def _chained(record: object) -> ChainHead | None:
    if not isinstance(record, dict):
        return None
    seq, digest = record.get("seq"), record.get("hash")
    if isinstance(seq, int) and not isinstance(seq, bool) and isinstance(digest, str):
        return ChainHead(seq, digest)
    return None


def _last_lines(path: Path) -> list[bytes]:
    """Complete lines near the end of ``path``, last first (up to 1 MiB back)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        start = max(0, size - _TAIL_LIMIT)
        f.seek(start)
        data = f.read(size - start)
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines.pop()  # a torn last line: not a record
    else:
        lines.pop()  # the empty string after the final newline
    if start > 0 and lines:
        lines.pop(0)  # probably cut at the front
    return lines[::-1]


def head_of_file(path: Path) -> ChainHead | None:
    """The last chained record in ``path``, None if it has none."""
    if not path.is_file():  # missing, or a device such as /dev/null
        return None
    lines = _last_lines(path)
    for line in lines:
        try:
            head = _chained(json.loads(line))
        except ValueError:
            continue
        if head is not None:
            return head
    return None


# What FileSink adds to a rotated file's name: ".<UTC time>", maybe "-<n>".
_ROTATED = re.compile(r"\.\d{8}T\d{12}Z(?:-\d+)?")


def rotated_files(path: Path) -> list[Path]:
    """Files rotated away from ``path``, oldest first (their names sort by time).

    Only names as rotation makes them count: ``audit.jsonl.checkpoints``
    next to ``audit.jsonl`` is not one of its rotated files.
    """
    prefix = path.name
    try:
        names = sorted(p.name for p in path.parent.iterdir()
                       if p.name.startswith(prefix) and _ROTATED.fullmatch(p.name[len(prefix):]))
    except FileNotFoundError:
        return []
    return [path.parent / n for n in names]


def read_head(path: Path) -> ChainHead:
    """Where a chain written to ``path`` continues, across restarts and rotations."""
    head = head_of_file(path)
    if head is not None:
        return head
    for older in reversed(rotated_files(path)):
        head = head_of_file(older)
        if head is not None:
            return head
    return ChainHead()


# --------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class Problem:
    """Something wrong at ``file:line`` (record ``seq`` when known)."""

    file: str
    line: int
    seq: int | None
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        what = f"record seq {self.seq}" if self.seq is not None else "record"
        return f"{where}: {what}: {self.message}"


@dataclass
class VerifyResult:
    records: int = 0
    first: int | None = None
    last: int | None = None
    files: int = 0
    problems: list[Problem] | None = None
    notes: list[str] | None = None

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems or ())

    @property
    def broken(self) -> Problem | None:
        return next((p for p in self.problems or () if p.fatal), None)


@dataclass
class _Line:
    number: int
    raw: bytes
    terminated: bool


def _lines(data: bytes) -> Iterator[_Line]:
    pos = 0
    number = 0
    while pos < len(data):
        number += 1
        nl = data.find(b"\n", pos)
        if nl < 0:
            yield _Line(number, data[pos:], False)
            return
        yield _Line(number, data[pos:nl], True)
        pos = nl + 1


def _first_seq(data: bytes) -> int | None:
    for line in _lines(data):
        try:
            head = _chained(json.loads(line.raw))
        except ValueError:
            continue
        if head is not None:
            return head.seq
    return None


# Called for each record that chains: (file, line number, record, line);
# a message fails the walk there.
RecordCheck = Callable[[str, int, dict[str, Any], bytes], "str | None"]


def verify_files(files: Iterable[tuple[str, bytes]], *, from_start: bool = False,
                 check: RecordCheck | None = None) -> VerifyResult:
    """Check the hash chain through ``files`` (name, content).

    The files are put in chain order by their first record's ``seq``, so
    ``audit.jsonl*`` in any order works.  The first fatal problem stops the
    walk: after an edit or a gap, later records cannot vouch for earlier
    ones.  A line that is not a record but is jumped over by an intact chain
    (a write torn by a crash) is only a warning.  ``check``, if given, sees
    every record that chains and may fail the walk at it (the signed
    checkpoints are checked so).
    """
    result = VerifyResult(problems=[], notes=[])
    assert result.problems is not None
    assert result.notes is not None
    ordered = sorted(
        ((name, data) for name, data in files),
        key=lambda f: (s if (s := _first_seq(f[1])) is not None else -1),
    )
    head: ChainHead | None = None
    prev_where = ""
    junk: Problem | None = None  # a non-record line since the last record

    def fail(name: str, line: int, seq: int | None, message: str) -> VerifyResult:
        assert result.problems is not None
        if junk is not None and head is not None:
            # The chain breaks right after a line that is not a record: that
            # line is where a record was damaged.
            message = f"{junk.message}; the chain breaks here (seq {head.seq + 1} expected)"
            result.problems.append(Problem(junk.file, junk.line, None, message))
        else:
            result.problems.append(Problem(name, line, seq, message))
        return result

    for name, data in ordered:
        result.files += 1
        for line in _lines(data):
            where = f"{name}:{line.number}"
            try:
                record = json.loads(line.raw, parse_constant=_not_json)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                if not line.terminated:
                    message = "incomplete last line (a write in progress, or torn by a crash)"
                else:
                    message = "not a JSON record (edited, or a write torn by a crash)"
                junk = Problem(name, line.number, None, message, fatal=False)
                continue
            link = _chained(record)
            seq = link.seq if link is not None else None
            if link is None or not isinstance(record.get("prev"), str):
                return fail(name, line.number, seq, "has no hash chain (seq/prev/hash)")
            body = canonical({k: v for k, v in record.items() if k != "hash"})
            if hashlib.sha256(body).hexdigest() != link.hash:
                return fail(name, line.number, seq, "the hash does not match (edited)")
            if _with_hash(body, link.hash) != line.raw and (
                    # Written before U+2028 and the like were escaped.
                    _with_hash(body, link.hash, escaped=False) != line.raw):
                return fail(name, line.number, seq,
                            "the line is not the record's canonical JSON (edited)")
            if head is None:
                result.first = link.seq
                if link.seq != 1 or record["prev"] != GENESIS:
                    gap = f"records 1..{link.seq - 1} are not in the files given"
                    if from_start:
                        return fail(name, line.number, seq, f"the chain does not start here: {gap}")
                    result.notes.append(f"the chain starts at seq {link.seq} ({where}): {gap}")
            elif link.seq != head.seq + 1:
                expected = head.seq + 1
                found = _find_seq(ordered, expected)
                if found is not None:
                    message = f"out of order: seq {expected} should come next, it is at {found}"
                elif link.seq > expected:
                    missing = (f"seq {expected}" if link.seq == expected + 1
                               else f"seqs {expected}..{link.seq - 1}")
                    message = f"follows seq {head.seq} ({prev_where}): {missing} missing"
                else:
                    message = f"follows seq {head.seq} ({prev_where}): out of order"
                return fail(name, line.number, seq, message)
            elif record["prev"] != head.hash:
                return fail(name, line.number, seq,
                            f"prev does not match the hash of seq {head.seq} ({prev_where})")
            if check is not None and (complaint := check(name, line.number, record,
                                                         line.raw)) is not None:
                # The chain holds here: the record itself is what is wrong.
                if junk is not None:
                    result.problems.append(junk)
                result.problems.append(Problem(name, line.number, seq, complaint))
                return result
            if junk is not None:
                result.problems.append(junk)
                junk = None
            head = link
            prev_where = where
            result.records += 1
            result.last = link.seq
    if junk is not None:
        if junk.message.startswith("incomplete"):
            result.problems.append(junk)
        else:
            # Nothing chains over it: a record may have been overwritten.
            result.problems.append(Problem(junk.file, junk.line, None,
                                           "not a JSON record after the last record (edited?)"))
    return result


def _find_seq(files: list[tuple[str, bytes]], seq: int) -> str | None:
    """Where the record with ``seq`` is, if anywhere (for "out of order" reports)."""
    for name, data in files:
        for line in _lines(data):
            try:
                link = _chained(json.loads(line.raw))
            except ValueError:
                continue
            if link is not None and link.seq == seq:
                return f"{name}:{line.number}"
    return None
