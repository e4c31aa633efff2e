"""``popproxy audit verify --key [--checkpoints]`` against tampered trails.

Each case starts from a fresh signed trail of its own, written by
popproxy's trail (records, a checkpoint every 10, a copy of each in the
checkpoint file), and does to it what someone who can write the file could
do: the plain edits the hash chain alone catches, and the rewrites it does
not (an edit with the chain recomputed after it, checkpoints re-signed with
another key, moved, removed, the tail cut), which the signatures and the
shipped copy must catch.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from popproxy.audit import AuditConfig, AuditTrail, ChainHead, open_audit
from popproxy.audit._chain import GENESIS, line, record_hash
from popproxy.audit._checkpoint import checkpoint_text, parse_checkpoint_text
from popproxy.audit._note import Signer, parse_note, sign_note
from popproxy.audit.cli import main as audit_main
from popproxy.events import EndReason, SessionClosed, SessionOpened
from tests.test_audit_trail import FakeClock, Info

KEY = Signer("mx1.example.org/popproxy", bytes(range(32)))
MALLORY = Signer("mx1.example.org/popproxy", bytes(range(1, 33)))  # same name, other key


@dataclass
class Trail:
    path: Path
    copy: Path
    key: str  # the verifier key

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.path.read_bytes().splitlines()]

    def write(self, records: list[dict[str, Any]]) -> None:
        self.path.write_bytes(b"".join(line(r) + b"\n" for r in records))

    def verify(self, *extra: str, key: str | None = None, shipped: bool = False
               ) -> tuple[int, str]:
        argv = ["verify"]
        if key is not None:
            argv += ["--key", key]
        if shipped:
            argv += ["--checkpoints", str(self.copy)]
        out, err = io.StringIO(), io.StringIO()
        status = audit_main([*argv, *extra, str(self.path)], out, err)
        assert err.getvalue() == ""
        return status, out.getvalue()


def write_trail(path: Path, copy: Path, sessions: int = 24, worker: int | None = None) -> None:
    """``sessions`` sessions of two records, a checkpoint every 10 records;
    left as a running proxy leaves it: records after the last checkpoint."""
    trail = open_audit(AuditConfig(enabled=True, sink="file", path=path, fsync="never",
                                   signer=KEY, checkpoint_records=10, checkpoint_path=copy,
                                   origin="mx1.example.org/popproxy"),
                       now=FakeClock(), worker=worker)
    assert trail is not None
    for i in range(sessions):
        info = Info(f"s{i:02d}", f"192.0.2.{i + 1}:40000")
        trail.observe(info, SessionOpened(info.client, 0.0))
        trail.observe(info, SessionClosed(EndReason.QUIT, 0.5, 10, 20, 1))
    for w in trail._writers:  # as a crash leaves it: no closing checkpoint
        w.sink.close()


@pytest.fixture
def trail(tmp_path: Path) -> Trail:
    t = Trail(tmp_path / "audit.jsonl", tmp_path / "audit.checkpoints", str(KEY.verifier))
    write_trail(t.path, t.copy)
    return t


def rechain(records: list[dict[str, Any]], start: int = 0) -> None:
    """What a forger does: renumber and recompute seq, prev, hash from ``start`` on."""
    prev = records[start - 1]["hash"] if start else GENESIS
    for i in range(start, len(records)):
        r = records[i]
        r.pop("hash", None)
        r["seq"] = i + 1
        r["prev"] = prev
        r["hash"] = record_hash(r)
        prev = r["hash"]


def checkpoint_indexes(records: list[dict[str, Any]]) -> list[int]:
    return [i for i, r in enumerate(records) if r["event"] == "audit.checkpoint"]


def test_the_untouched_trail_verifies_and_says_how_far_it_is_signed(trail: Trail) -> None:
    records = trail.records()
    cps = checkpoint_indexes(records)
    assert len(cps) == 4
    last = records[cps[-1]]
    status, out = trail.verify(key=trail.key, shipped=True)
    assert status == 0, out
    assert f"OK: {len(records)} records" in out
    assert (f"signed: 4 checkpoints by {KEY.name}+{KEY.key_hash:08x} verify; the trail is "
            f"signed up to seq {last['seq'] - 1} (checkpoint at {trail.path}:{last['seq']}); "
            f"{len(records) - last['seq']} records after it, not signed yet") in out
    assert "shipped: 4 of 4 checkpoints in the copy are in the trail" in out


def test_without_key_it_says_signatures_were_not_checked(trail: Trail) -> None:
    status, out = trail.verify()
    assert status == 0
    assert "signatures NOT checked (no --key)" in out


def test_a_flipped_byte(trail: Trail) -> None:
    data = bytearray(trail.path.read_bytes())
    lines = bytes(data).split(b"\n")
    at = sum(len(x) + 1 for x in lines[:6]) + lines[6].index(b'"s03"') + 2  # in line 7
    data[at] ^= 0x01
    trail.path.write_bytes(bytes(data))
    status, out = trail.verify(key=trail.key)
    assert status == 1
    assert f"BROKEN: {trail.path}:7: record seq 7: the hash does not match (edited)" in out


def test_a_deleted_line(trail: Trail) -> None:
    lines = trail.path.read_bytes().splitlines(keepends=True)
    del lines[14]
    trail.path.write_bytes(b"".join(lines))
    status, out = trail.verify(key=trail.key)
    assert status == 1
    assert f"BROKEN: {trail.path}:15: record seq 16: follows seq 14" in out
    assert "seq 15 missing" in out


def test_two_lines_swapped(trail: Trail) -> None:
    lines = trail.path.read_bytes().splitlines(keepends=True)
    lines[3], lines[4] = lines[4], lines[3]
    trail.path.write_bytes(b"".join(lines))
    status, out = trail.verify(key=trail.key)
    assert status == 1
    assert f"BROKEN: {trail.path}:4: record seq 5: out of order" in out


def test_an_edit_with_the_chain_recomputed(trail: Trail) -> None:
    """Who read message 1 is changed, and the chain recomputed from there:
    the hash chain holds, the next checkpoint does not."""
    records = trail.records()
    records[12]["client"] = "198.51.100.66:40000"
    rechain(records, 12)
    trail.write(records)
    first_after = next(i for i in checkpoint_indexes(records) if i > 12)
    status, out = trail.verify(key=trail.key)
    assert status == 1
    assert (f"BROKEN: {trail.path}:{first_after + 1}: record seq {first_after + 1}: checkpoint "
            f"signs hash") in out
    assert "(the trail was rewritten)" in out
    assert f"signed up to seq {checkpoint_indexes(records)[0]}" in out  # the one before


def test_an_edit_with_the_chain_and_checkpoint_texts_recomputed(trail: Trail) -> None:
    """A forger who also rewrites what the checkpoints say (not the
    signatures: the key is not theirs) passes without --key, not with it."""
    records = trail.records()
    records[12]["client"] = "198.51.100.66:40000"
    for i in range(12, len(records)):
        records[i]["seq"] = i + 1
        records[i]["prev"] = records[i - 1]["hash"]
        r = records[i]
        if r["event"] == "audit.checkpoint":
            text, _ = parse_note(r["note"])
            origin, _, _ = parse_checkpoint_text(text)
            new_text = checkpoint_text(origin, r["seq"] - 1, r["prev"])
            r["note"] = new_text + "\n" + r["note"][len(text) + 1:]
        r.pop("hash")
        r["hash"] = record_hash(r)
    trail.write(records)
    assert trail.verify()[0] == 0  # the chain and the texts agree: why --key matters
    status, out = trail.verify(key=trail.key)
    assert status == 1
    first_after = next(i for i in checkpoint_indexes(records) if i > 12) + 1
    assert (f"BROKEN: {trail.path}:{first_after}: record seq {first_after}: checkpoint: "
            f"invalid signature for key {KEY.name}+{KEY.key_hash:08x} (forged or edited)") in out


def test_checkpoints_re_signed_with_another_key(trail: Trail) -> None:
    """The forger signs the rewritten trail with a key of their own, even
    one with the same name: it is not the key the auditor holds."""
    records = trail.records()
    records[12]["client"] = "198.51.100.66:40000"
    for i in range(12, len(records)):
        r = records[i]
        r["seq"], r["prev"] = i + 1, records[i - 1]["hash"]
        if r["event"] == "audit.checkpoint":
            r["note"] = sign_note(checkpoint_text(r["origin"], i, r["prev"]), MALLORY)
        r.pop("hash")
        r["hash"] = record_hash(r)
    trail.write(records)
    first_after = next(i for i in checkpoint_indexes(records) if i > 12) + 1
    status, out = trail.verify(key=trail.key)
    assert status == 1
    assert (f"BROKEN: {trail.path}:{first_after}: record seq {first_after}: checkpoint signed "
            f"by {MALLORY.name}+{MALLORY.key_hash:08x}, not by a key given with --key") in out
    # The forger's key does not help either: the checkpoints before the edit are not theirs.
    assert trail.verify(key=str(MALLORY.verifier))[0] == 1


def test_a_checkpoint_moved_to_another_place(trail: Trail) -> None:
    """Moved later (so that it seems to vouch for more) and the chain
    recomputed: it signs a seq that is not the one before it."""
    records = trail.records()
    i = checkpoint_indexes(records)[1]
    cp = records.pop(i)
    records.insert(i + 4, cp)
    rechain(records, i)
    trail.write(records)
    for key in (trail.key, None):
        status, out = trail.verify(key=key)
        assert status == 1
        assert (f"BROKEN: {trail.path}:{i + 5}: record seq {i + 5}: checkpoint signs seq {i} "
                f"but stands at seq {i + 5}") in out
        assert "(moved)" in out


def test_the_tail_cut_after_a_checkpoint(trail: Trail) -> None:
    """Cut after the second checkpoint: what is left is a consistent, signed
    trail; only the shipped copy shows that records were there."""
    lines = trail.path.read_bytes().splitlines(keepends=True)
    second = checkpoint_indexes(trail.records())[1]
    trail.path.write_bytes(b"".join(lines[:second + 1]))
    status, out = trail.verify(key=trail.key)
    assert status == 0
    assert f"signed up to seq {second}" in out
    status, out = trail.verify(key=trail.key, shipped=True)
    assert status == 1
    third_seq = json.loads(trail.copy.read_bytes().splitlines()[2])["seq"]
    assert (f"BROKEN: the trail ends at seq {second + 1}, but the shipped checkpoint "
            f"{trail.copy}:3 stands at seq {third_seq}: records after seq {second + 1} "
            "were cut off (truncated)") in out


def test_the_unsigned_tail_can_go_unnoticed(trail: Trail) -> None:
    """The records after the last checkpoint are signed by nothing yet: cut,
    they are not missed (a short checkpoint_interval keeps that window small)."""
    records = trail.records()
    last_cp = checkpoint_indexes(records)[-1]
    assert len(records) - last_cp - 1 == 8
    trail.write(records[:last_cp + 1])
    status, out = trail.verify(key=trail.key, shipped=True)
    assert status == 0
    assert "0 records after it, not signed yet" in out


def test_all_checkpoints_removed_and_the_chain_recomputed(trail: Trail) -> None:
    records = [r for r in trail.records() if r["event"] != "audit.checkpoint"]
    records[5]["client"] = "198.51.100.66:40000"
    rechain(records)
    trail.write(records)
    assert trail.verify()[0] == 0  # a chain like any other
    status, out = trail.verify(key=trail.key)
    assert status == 1
    assert "BROKEN: no checkpoint in these files: nothing is signed" in out
    status, out = trail.verify(key=trail.key, shipped=True)
    assert status == 1
    assert re.search(r"record seq \d+: not the checkpoint shipped as .*audit.checkpoints:1 "
                     r"for this seq \(the trail was rewritten\)", out)


def test_rewritten_after_a_checkpoint_with_the_later_ones_removed(trail: Trail) -> None:
    """An edit after the second checkpoint, the chain recomputed and the
    checkpoints that would betray it dropped: signed up to the second, and
    only the shipped copy tells."""
    records = trail.records()
    second = checkpoint_indexes(records)[1]
    tail = [r for r in records[second + 1:] if r["event"] != "audit.checkpoint"]
    records = records[:second + 1] + tail
    records[second + 3]["client"] = "198.51.100.66:40000"
    rechain(records, second + 1)
    trail.write(records)
    status, out = trail.verify(key=trail.key)
    assert status == 0
    assert f"signed up to seq {second}" in out
    status, out = trail.verify(key=trail.key, shipped=True)
    assert status == 1
    assert "not the checkpoint shipped as" in out


def test_a_forged_shipped_copy(trail: Trail) -> None:
    lines = trail.copy.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[1])
    record["note"] = record["note"].replace("\n— ", "\n— x", 1)
    lines[1] = line(record) + b"\n"
    trail.copy.write_bytes(b"".join(lines))
    status, out = trail.verify(key=trail.key, shipped=True)
    assert status == 1
    assert f"BROKEN: {trail.copy}:2: shipped checkpoint signed by x" in out


def test_rotated_files_in_any_order(tmp_path: Path) -> None:
    path, copy = tmp_path / "audit.jsonl", tmp_path / "audit.checkpoints"
    trail = open_audit(AuditConfig(enabled=True, sink="file", path=path, rotate_size=2000,
                                   signer=KEY, checkpoint_records=10, checkpoint_path=copy))
    assert trail is not None
    for i in range(30):
        info = Info(f"s{i:02d}", "192.0.2.1:40000")
        trail.observe(info, SessionOpened(info.client, 0.0))
        trail.observe(info, SessionClosed(EndReason.QUIT, 0.5, 10, 20, 1))
    trail.close()
    files = sorted(tmp_path.glob("audit.jsonl*"), key=lambda p: p.name[::-1])
    assert len(files) >= 3
    out = io.StringIO()
    status = audit_main(["verify", "--key", str(KEY.verifier), "--checkpoints", str(copy),
                         *map(str, files)], out, io.StringIO())
    assert status == 0, out.getvalue()
    assert f"in {len(files)} files" in out.getvalue()
    assert "0 records after it, not signed yet" in out.getvalue()


def test_per_worker_trails_verify_together_by_origin(tmp_path: Path) -> None:
    """Several chains (one per worker, each with its origin) in one call:
    each is checked and reported on its own."""
    paths = []
    for w in (1, 2):
        p = tmp_path / f"audit.w{w}.jsonl"
        write_trail(p, tmp_path / f"audit.w{w}.checkpoints", sessions=12, worker=w)
        paths.append(p)
    out = io.StringIO()
    status = audit_main(["verify", "--key", str(KEY.verifier), "--checkpoints",
                         str(tmp_path / "audit.w1.checkpoints"), "--checkpoints",
                         str(tmp_path / "audit.w2.checkpoints"), *map(str, paths)],
                        out, io.StringIO())
    assert status == 0, out.getvalue()
    assert out.getvalue().count("OK: 26 records, seq 1..26") == 2
    assert "trail mx1.example.org/popproxy/w1 (1 file):" in out.getvalue()
    assert "trail mx1.example.org/popproxy/w2 (1 file):" in out.getvalue()
    assert "shipped: 4 of 4 checkpoints" in out.getvalue()
    # Worker 2's trail cut: reported for that trail.
    lines = paths[1].read_bytes().splitlines(keepends=True)
    paths[1].write_bytes(b"".join(lines[:12]))
    out = io.StringIO()
    status = audit_main(["verify", "--key", str(KEY.verifier), "--checkpoints",
                         str(tmp_path / "audit.w2.checkpoints"), *map(str, paths)],
                        out, io.StringIO())
    assert status == 1
    w2 = out.getvalue().split("trail mx1.example.org/popproxy/w2")[1]
    assert "(truncated)" in w2


def test_a_trail_from_before_signing_then_signed(tmp_path: Path) -> None:
    """Signing switched on for an existing trail: the chain continues, and
    the first checkpoint vouches for everything before it too."""
    path = tmp_path / "audit.jsonl"
    plain = AuditTrail(AuditConfig(enabled=True), [], head=ChainHead())
    assert plain.signer is None
    before = open_audit(AuditConfig(enabled=True, sink="file", path=path))
    assert before is not None
    info = Info("old", "192.0.2.9:1")
    before.observe(info, SessionOpened(info.client, 0.0))
    before.close()
    after = open_audit(AuditConfig(enabled=True, sink="file", path=path, signer=KEY))
    assert after is not None
    after.observe(info, SessionClosed(EndReason.QUIT, 0.5, 1, 1, 1))
    after.close()
    out = io.StringIO()
    assert audit_main(["verify", "--key", str(KEY.verifier), str(path)], out) == 0
    assert "signed up to seq 3" in out.getvalue()


def test_unsigned_worker_trails_verify_together_by_file_name(tmp_path: Path) -> None:
    """Without checkpoints, each worker's files (``audit.wN.jsonl`` and its
    rotations) are one chain of their own."""
    for w in (1, 2):
        trail = open_audit(AuditConfig(enabled=True, sink="file",
                                       path=tmp_path / f"audit.w{w}.jsonl", rotate_size=2000))
        assert trail is not None
        for i in range(12 * w):
            info = Info(f"w{w}s{i:02d}", "192.0.2.1:40000")
            trail.observe(info, SessionOpened(info.client, 0.0))
            trail.observe(info, SessionClosed(EndReason.QUIT, 0.5, 10, 20, 1))
        trail.close()
    files = sorted(tmp_path.glob("audit.w*.jsonl*"))
    assert len(files) > 2  # rotated
    out = io.StringIO()
    assert audit_main(["verify", *map(str, files)], out, io.StringIO()) == 0, out.getvalue()
    assert out.getvalue().count("OK: ") == 2
    assert "OK: 24 records, seq 1..24" in out.getvalue()
    assert "OK: 48 records, seq 1..48" in out.getvalue()
    # A record removed from worker 1's files is reported for that chain.
    first = next(f for f in files if len(f.read_bytes().splitlines()) > 4)
    lines = first.read_bytes().splitlines(keepends=True)
    first.write_bytes(b"".join(lines[:3] + lines[4:]))
    out = io.StringIO()
    assert audit_main(["verify", *map(str, files)], out, io.StringIO()) == 1
