"""The hash chain and ``verify_files``: what counts as intact, what is named as broken."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.audit import ChainHead, verify_files
from popproxy.audit._chain import GENESIS, canonical, line, record_hash


def chain(n: int, head: ChainHead | None = None) -> list[dict[str, Any]]:
    head = head or ChainHead()
    records = []
    for i in range(n):
        rec: dict[str, Any] = {
            "ts": f"2026-11-27T14:00:{i % 60:02d}.000000Z", "event": "command",
            "session": "s1", "user": "jürgen", "client": "192.0.2.7:40000",
            "verb": "RETR", "args": [str(i + 1)], "latency": 0.001 * i,
        }
        head.link(rec)
        records.append(rec)
    return records


def text(records: list[dict[str, Any]]) -> bytes:
    return b"".join(line(r) + b"\n" for r in records)


def lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


class TestChain:
    def test_line_is_canonical_json_with_the_hash_last(self) -> None:
        """A line: the canonical JSON of the record without hash, then ``"hash"``."""
        (rec,) = chain(1)
        body = {k: v for k, v in rec.items() if k != "hash"}
        assert line(rec) == canonical(body)[:-1] + b',"hash":"' + rec["hash"].encode() + b'"}'
        assert json.loads(line(rec)) == rec
        assert line(body) == canonical(body)  # unchained records: canonical JSON

    def test_hash_is_sha256_of_canonical_json_without_hash(self) -> None:
        """hash = SHA-256(canonical JSON: sorted keys, compact, UTF-8, no hash key)."""
        (rec,) = chain(1)
        body = {k: v for k, v in rec.items() if k != "hash"}
        expected = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            .encode("utf-8")
        ).hexdigest()
        assert rec["hash"] == expected == record_hash(rec)
        assert "jürgen".encode() in canonical(body)

    def test_seq_consecutive_and_prev_links(self) -> None:
        """The first record follows the genesis hash; each next one its predecessor."""
        records = chain(3)
        assert [r["seq"] for r in records] == [1, 2, 3]
        assert records[0]["prev"] == GENESIS
        assert records[1]["prev"] == records[0]["hash"]
        assert records[2]["prev"] == records[1]["hash"]

    def test_head_continues(self) -> None:
        """A chain head read back continues the same chain."""
        first = chain(2)
        second = chain(2, ChainHead(first[-1]["seq"], first[-1]["hash"]))
        result = verify_files([("a", text(first)), ("b", text(second))])
        assert result.ok
        assert (result.records, result.first, result.last) == (4, 1, 4)


class TestVerify:
    def test_intact(self) -> None:
        """An untouched chain verifies, with no problems."""
        result = verify_files([("audit.jsonl", text(chain(50)))])
        assert result.ok
        assert result.problems == []
        assert (result.records, result.first, result.last, result.files) == (50, 1, 50, 1)

    @pytest.mark.parametrize("index", [0, 17, 49])
    def test_every_one_byte_value_edit_is_named(self, index: int) -> None:
        """Changing one digit of a value is caught at that record."""
        data = lines(text(chain(50)))
        data[index] = data[index].replace(b'"args":["', b'"args":["9', 1)
        broken = verify_files([("f", b"".join(data))]).broken
        assert broken is not None
        assert (broken.line, broken.seq) == (index + 1, index + 1)
        assert "hash does not match" in broken.message

    def test_whitespace_edit_is_caught(self) -> None:
        """An edit that leaves the JSON value equal still breaks the exact rendering."""
        data = lines(text(chain(5)))
        data[2] = data[2].replace(b'"verb":', b'"verb": ', 1)
        broken = verify_files([("f", b"".join(data))]).broken
        assert broken is not None
        assert broken.line == 3
        assert "not the record's canonical JSON" in broken.message

    def test_escape_edit_is_caught(self) -> None:
        """Writing a character as a JSON escape is an edit too."""
        data = lines(text(chain(5)))
        data[1] = data[1].replace("ü".encode(), b"\\u00fc", 1)
        broken = verify_files([("f", b"".join(data))]).broken
        assert broken is not None
        assert broken.line == 2

    def test_rehashed_edit_breaks_the_next_link(self) -> None:
        """Recomputing the edited record's hash does not help: the next prev differs."""
        records = chain(5)
        records[2]["user"] = "mallory"
        records[2]["hash"] = record_hash(records[2])
        broken = verify_files([("f", text(records))]).broken
        assert broken is not None
        assert (broken.line, broken.seq) == (4, 4)
        assert "prev does not match the hash of seq 3" in broken.message

    def test_deleted_line_is_named_missing(self) -> None:
        """A removed record is reported as missing at the record after the gap."""
        data = lines(text(chain(10)))
        del data[4]
        broken = verify_files([("f", b"".join(data))]).broken
        assert broken is not None
        assert (broken.line, broken.seq) == (5, 6)
        assert "seq 5 missing" in broken.message

    def test_deleted_lines_range(self) -> None:
        """Several removed records are reported as a range."""
        data = lines(text(chain(10)))
        del data[3:6]
        broken = verify_files([("f", b"".join(data))]).broken
        assert broken is not None
        assert "seqs 4..6 missing" in broken.message

    def test_swapped_pair_is_out_of_order(self) -> None:
        """Two records swapped: out of order, naming where the expected one is."""
        data = lines(text(chain(10)))
        data[3], data[4] = data[4], data[3]
        broken = verify_files([("f", b"".join(data))]).broken
        assert broken is not None
        assert (broken.line, broken.seq) == (4, 5)
        assert "out of order: seq 4 should come next, it is at f:5" in broken.message

    def test_damaged_json_is_named(self) -> None:
        """A record damaged into invalid JSON is named as the place the chain breaks."""
        data = lines(text(chain(6)))
        data[2] = data[2].replace(b'"', b"'", 1)
        broken = verify_files([("f", b"".join(data))]).broken
        assert broken is not None
        assert broken.line == 3
        assert "the chain breaks here (seq 3 expected)" in broken.message

    def test_truncated_last_line_is_a_warning(self) -> None:
        """A last line cut short (crash, or a write in progress) is not a broken chain."""
        data = text(chain(4))
        result = verify_files([("f", data[:-30])])
        assert result.ok
        assert result.records == 3
        assert result.problems is not None
        assert "incomplete last line" in result.problems[0].message

    def test_torn_line_jumped_over_is_a_warning(self) -> None:
        """A torn write that the chain continues over (after a restart) is a warning."""
        records = chain(4)
        data = lines(text(records))
        data.insert(2, data[2][:25] + b"\n")  # the torn first try of record 3
        result = verify_files([("f", b"".join(data))])
        assert result.ok
        assert result.records == 4
        assert result.problems is not None
        assert result.problems[0].line == 3
        assert not result.problems[0].fatal

    def test_garbage_after_the_last_record_is_broken(self) -> None:
        """A last record overwritten with junk is not excused as a torn write."""
        data = lines(text(chain(4)))
        data[3] = b"junk\n"
        broken = verify_files([("f", b"".join(data))]).broken
        assert broken is not None
        assert broken.line == 4

    def test_unchained_records_are_broken(self) -> None:
        """Records without seq/prev/hash cannot be verified."""
        broken = verify_files([("f", b'{"ts":"x","event":"session.open"}\n')]).broken
        assert broken is not None
        assert "no hash chain" in broken.message

    def test_files_in_any_order(self) -> None:
        """Rotated files are put in chain order by their first seq."""
        data = lines(text(chain(30)))
        parts = [("a", b"".join(data[:10])), ("b", b"".join(data[10:20])),
                 ("c", b"".join(data[20:]))]
        random.Random(4).shuffle(parts)
        assert verify_files(parts).ok

    def test_missing_middle_file_is_broken(self) -> None:
        """A rotated file that is not there shows up as missing records."""
        data = lines(text(chain(30)))
        broken = verify_files([("a", b"".join(data[:10])), ("c", b"".join(data[20:]))]).broken
        assert broken is not None
        assert (broken.file, broken.line) == ("c", 1)
        assert "seqs 11..20 missing" in broken.message

    def test_chain_not_from_the_start(self) -> None:
        """Older files pruned: a note by default, an error with from_start."""
        data = lines(text(chain(30)))
        later = [("c", b"".join(data[20:]))]
        result = verify_files(later)
        assert result.ok
        assert result.notes == ["the chain starts at seq 21 (c:1): records 1..20 are not in "
                                "the files given"]
        assert not verify_files(later, from_start=True).ok


@pytest.mark.parametrize("record", [
    {"b": 1, "a": "x", "ts": "2026-11-27T00:00:00.000001Z"},
    {"user": "jürgen", "args": ["1", "<redacted>"], "latency": 0.000123, "code": None,
     "ok": True, "n": -5, "big": 1e300, "tiny": 1e-07},
    {"headers": {"Subject": "h\u00e9llo \u2028 \"q\" \\ \t", "From": None}, "z": [], "y": {}},
    {"ctrl": "\x00\x1f\x7f", "emoji": "\U0001f600"},
])
def test_canonical_is_json_dumps(record: dict[str, object]) -> None:
    # The published definition (docs/audit.md), byte for byte.
    assert canonical(record) == json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


# What a record can hold: JSON values, any text but lone surrogates (the
# builder cleans those), any finite float (the builder rounds them to the
# microsecond; round() refuses NaN and infinities).
_text = st.text(st.characters(exclude_categories=["Cs"]))
_json_values = st.recursive(
    st.none() | st.booleans() | _text
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=-1e-3, max_value=1e-3, allow_nan=False)
    | st.integers(0, 10**12).map(lambda us: round(us * 1e-6 * 1e6) / 1e6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_text, _json_values, max_size=14))
def test_fast_canonical_is_json_dumps(record: dict[str, object]) -> None:
    # canonical() takes orjson's output where it is the same bytes and the
    # standard library's elsewhere: the two must never be told apart.
    assert canonical(record) == json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_verify_refuses_nan_and_infinity(value: str) -> None:
    # json.loads would take them (and orjson would write null for them):
    # a line that holds one is not a record.
    data = lines(text(chain(3)))
    data[1] = data[1].replace(b'"latency":0.001', b'"latency":' + value.encode())
    result = verify_files([("a", b"".join(data))])
    assert not result.ok
    assert result.problems
    first = result.problems[0]
    assert (first.file, first.line) == ("a", 2)
    assert first.message.startswith("not a JSON record")
