"""Signed checkpoints in the trail: when they are written, what they sign,
where signing runs, their copies, failures, configuration and ``audit keygen``."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from popproxy.audit import AuditConfig, AuditTrail, ChainHead, _trail, open_audit
from popproxy.audit._chain import read_head, rotated_files
from popproxy.audit._checkpoint import parse_checkpoint_text
from popproxy.audit._note import Signer, Verifier, open_note
from popproxy.audit._verify import verify_trail
from popproxy.audit.cli import main as audit_main
from popproxy.audit.config import default_origin, load_sign_key
from popproxy.config import ConfigError, parse_config
from popproxy.events import SessionOpened
from tests.test_audit_trail import (
    Counts,
    FakeClock,
    Info,
    MemorySink,
    elapse,
    session,
    writing_behind,
)

SEED = bytes(range(32))


class CountingSigner(Signer):
    """A real key that notes which trio task (if any) each signature ran
    in, and can be told to fail."""

    __slots__ = ("broken", "calls")

    def __init__(self, name: str = "test/popproxy", seed: bytes = SEED) -> None:
        super().__init__(name, seed)
        self.calls: list[str] = []
        self.broken = False

    def sign(self, message: bytes) -> bytes:
        try:
            task = trio.lowlevel.current_task().name
        except RuntimeError:
            task = "(no trio)"
        self.calls.append(task)
        if self.broken:
            raise RuntimeError("the HSM is gone")
        return super().sign(message)


def signed_trail(sink: MemorySink, signer: Signer | None = None, metrics: object = None,
                 **config: Any) -> AuditTrail:
    config.setdefault("origin", "test/popproxy")
    return AuditTrail(AuditConfig(enabled=True, signer=signer or CountingSigner(), **config),
                      [sink], head=ChainHead(), metrics=metrics, now=FakeClock())


def checkpoints(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == "audit.checkpoint"]


def assert_signs_the_record_before(cp: dict[str, Any], verifier: Verifier) -> None:
    note = open_note(cp["note"], [verifier])
    assert parse_checkpoint_text(note.text) == (cp["origin"], cp["seq"] - 1, cp["prev"])


class TestWhatAndWhen:
    def test_every_n_records_a_checkpoint_signs_the_record_before_it(self) -> None:
        """Outside write_behind: a checkpoint at the end of the batch that
        reaches ``checkpoint_records``; it is chained, and signs its ``prev``."""
        sink = MemorySink()
        signer = CountingSigner()
        trail = signed_trail(sink, signer, checkpoint_records=4)
        for sid in "abcde":
            session(trail, sid)  # two records each, each written at once
        records = sink.records()
        assert [r["seq"] for r in checkpoints(records)] == [5, 10]
        for cp in checkpoints(records):
            assert_signs_the_record_before(cp, signer.verifier)
            assert set(cp) == {"ts", "event", "origin", "note", "seq", "prev", "hash"}
        assert [r["seq"] for r in records] == list(range(1, 13))
        report = verify_trail([("m", sink.data())], verifiers=[signer.verifier])
        assert report.ok
        assert (report.chains[0].signed_seq, report.chains[0].tail) == (9, 2)

    def test_note_is_the_c2sp_text(self) -> None:
        """origin, size, base64 hash; a blank line; one signature line by the key."""
        sink = MemorySink()
        signer = CountingSigner()
        trail = signed_trail(sink, signer, checkpoint_records=2)
        session(trail, "a")
        (cp,) = checkpoints(sink.records())
        origin, size, b64, blank, sig, end = cp["note"].split("\n")
        assert (origin, size, blank, end) == ("test/popproxy", "2", "", "")
        assert bytes.fromhex(cp["prev"]) == base64.b64decode(b64)
        assert sig.startswith("— test/popproxy ")
        assert len(base64.b64decode(sig.split(" ")[2])) == 4 + 64

    def test_close_signs_what_is_left_once(self) -> None:
        sink = MemorySink()
        trail = signed_trail(sink, checkpoint_records=1000)
        session(trail, "a")
        trail.close()
        trail.close()
        records = sink.records()
        assert [r["event"] for r in records][-1] == "audit.checkpoint"
        assert len(checkpoints(records)) == 1

    def test_close_after_a_checkpoint_adds_none(self) -> None:
        """Nothing written since the last checkpoint: nothing new to sign."""
        sink = MemorySink()
        trail = signed_trail(sink, checkpoint_records=2)
        session(trail, "a")
        trail.close()
        assert [r["event"] for r in sink.records()] == [
            "session.open", "session.close", "audit.checkpoint"]

    def test_origin_default_worker_and_configured(self) -> None:
        sink = MemorySink()
        signer = CountingSigner()
        assert AuditTrail(AuditConfig(enabled=True, signer=signer), [sink]).origin == \
            default_origin()
        assert default_origin().endswith("/popproxy")
        assert AuditTrail(AuditConfig(enabled=True, signer=signer), [sink],
                          worker=3).origin == default_origin() + "/w3"
        assert AuditTrail(AuditConfig(enabled=True, signer=signer, origin="mx1/pop"), [sink],
                          worker=3).origin == "mx1/pop/w3"
        assert default_origin(3) == default_origin() + "/w3"

    def test_no_checkpoints_without_a_key(self) -> None:
        sink = MemorySink()
        trail = AuditTrail(AuditConfig(enabled=True, checkpoint_records=1), [sink],
                           head=ChainHead(), now=FakeClock())
        session(trail, "a")
        trail.close()
        assert checkpoints(sink.records()) == []

    def test_copies_in_checkpoint_path_are_the_trail_s_lines(self, tmp_path: Path) -> None:
        path, copy = tmp_path / "audit.jsonl", tmp_path / "audit.checkpoints"
        trail = open_audit(AuditConfig(enabled=True, sink="file", path=path,
                                       signer=CountingSigner(), checkpoint_records=3,
                                       checkpoint_path=copy))
        assert trail is not None
        for sid in "abcd":
            session(trail, sid)
        trail.close()
        lines = path.read_bytes().splitlines(keepends=True)
        assert copy.read_bytes() == b"".join(
            line for line in lines if b'"event":"audit.checkpoint"' in line)
        assert len(copy.read_bytes().splitlines()) == 3  # two by count, one at close
        assert stat.S_IMODE(copy.stat().st_mode) & 0o007 == 0

    def test_each_rotated_file_ends_with_its_checkpoint(self, tmp_path: Path) -> None:
        """With checkpoints the trail rotates: sign the file's end, then rotate."""
        path = tmp_path / "audit.jsonl"
        signer = CountingSigner()
        trail = open_audit(AuditConfig(enabled=True, sink="file", path=path, rotate_size=1000,
                                       signer=signer, origin="test/popproxy"))
        assert trail is not None
        for i in range(20):
            session(trail, f"s{i}")
        trail.close()
        rotated = rotated_files(path)
        assert len(rotated) >= 3
        for f in rotated:
            last = json.loads(f.read_bytes().splitlines()[-1])
            assert last["event"] == "audit.checkpoint"
            assert_signs_the_record_before(last, signer.verifier)
        files = [*rotated, path]
        report = verify_trail([(str(f), f.read_bytes()) for f in files],
                              verifiers=[signer.verifier])
        assert report.ok
        assert report.chains[0].tail == 0


def test_a_copy_named_like_the_trail_is_not_a_rotated_file(tmp_path: Path) -> None:
    """``audit.jsonl.checkpoints`` beside ``audit.jsonl``: never taken for
    a rotated file, where the chain would resume from at start."""
    path = tmp_path / "audit.jsonl"
    copy = tmp_path / "audit.jsonl.checkpoints"
    trail = open_audit(AuditConfig(enabled=True, sink="file", path=path, rotate_size=600,
                                   signer=CountingSigner(), checkpoint_path=copy))
    assert trail is not None
    for i in range(4):
        session(trail, f"s{i}")
    trail.close()
    assert copy not in rotated_files(path)
    assert len(rotated_files(path)) >= 1
    path.unlink()  # rotated just before a restart: the chain goes on from the newest
    newest = rotated_files(path)[-1].read_bytes().splitlines()[-1]
    assert read_head(path).hash == json.loads(newest)["hash"]


class TestWriteBehind:
    async def test_signing_runs_only_in_the_checkpoint_task(
        self, mock_clock: trio.testing.MockClock
    ) -> None:
        """While write_behind runs, the records' paths (each event, each
        session's close, each batch) never sign: they set an event for the
        trail's own task, which signs once for all that was written."""
        sink = MemorySink()
        signer = CountingSigner()
        trail = signed_trail(sink, signer, checkpoint_records=5)
        async with writing_behind(trail):
            for i in range(10):
                session(trail, f"s{i}")  # each close writes its batch at once
            assert signer.calls == []
            await trio.testing.wait_all_tasks_blocked()
            assert signer.calls == ["popproxy.audit._trail.AuditTrail._checkpointer"]
        assert [r["seq"] for r in checkpoints(sink.records())] == [21]

    async def test_every_interval_when_there_is_something_new(
        self, mock_clock: trio.testing.MockClock
    ) -> None:
        sink = MemorySink()
        trail = signed_trail(sink, checkpoint_interval=60.0)
        async with writing_behind(trail):
            session(trail, "a")
            await elapse(mock_clock, 59.0)
            assert checkpoints(sink.records()) == []
            await elapse(mock_clock, 1.5)
            assert len(checkpoints(sink.records())) == 1
            await elapse(mock_clock, 120.0)  # nothing new: nothing signed
            assert len(checkpoints(sink.records())) == 1
            trail.observe(Info("b"), SessionOpened("192.0.2.7:40000", 0.0))
            await elapse(mock_clock, 61.0)
            assert len(checkpoints(sink.records())) == 2
            assert sink.records()[-2]["session"] == "b"  # written first, then signed

    async def test_rotation_is_done_by_the_task(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock
    ) -> None:
        path = tmp_path / "audit.jsonl"
        signer = CountingSigner()
        trail = open_audit(AuditConfig(enabled=True, sink="file", path=path, rotate_size=600,
                                       signer=signer))
        assert trail is not None
        async with writing_behind(trail):
            for i in range(3):
                session(trail, f"s{i}")
            assert rotated_files(path) == []  # the record path does not rotate ...
            await trio.testing.wait_all_tasks_blocked()
            (rotated,) = rotated_files(path)  # ... the task does, after a checkpoint
            assert b"audit.checkpoint" in rotated.read_bytes().splitlines()[-1]
            assert signer.calls == ["popproxy.audit._trail.AuditTrail._checkpointer"]
        trail.close()

    async def test_a_failing_rotation_is_tried_once_an_interval(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A rename that fails is logged and counted once; the file goes on
        and the task tries again each interval, not each batch (which would
        sign a checkpoint per batch)."""

        path = tmp_path / "audit.jsonl"
        signer = CountingSigner()
        counts = Counts()
        trail = open_audit(AuditConfig(enabled=True, sink="file", path=path, rotate_size=600,
                                       signer=signer, checkpoint_interval=60.0), counts)
        assert trail is not None
        real_rename = os.rename

        def no_rename(src: Any, dst: Any) -> None:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "rename", no_rename)
        async with writing_behind(trail):
            for i in range(10):
                session(trail, f"s{i}")
                await trio.testing.wait_all_tasks_blocked()
            assert rotated_files(path) == []
            assert len(signer.calls) == 1  # the first attempt signed the file's end
            assert counts.errors == 1
            monkeypatch.setattr(os, "rename", real_rename)
            await elapse(mock_clock, 61.0)
            assert len(rotated_files(path)) == 1
            assert len(signer.calls) == 2
        trail.close()
        files = [*rotated_files(path), path]
        assert verify_trail([(str(f), f.read_bytes()) for f in files],
                            verifiers=[signer.verifier]).ok

    async def test_the_copy_follows_a_sync_of_the_trail(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The trail's file is synced before its checkpoint's copy is
        written, in a worker thread: the copy is never ahead on disk."""
        path, copy = tmp_path / "audit.jsonl", tmp_path / "audit.checkpoints"
        events: list[str] = []
        from popproxy.audit import _checkpoint
        real_sync = _checkpoint._datasync
        real_append = _checkpoint.CheckpointFile.append

        def sync(fd: int) -> None:
            events.append(f"sync {os.fstat(fd).st_ino == path.stat().st_ino}")
            real_sync(fd)

        def append(self: _checkpoint.CheckpointFile, data: bytes) -> None:
            events.append(f"append in trio: {_in_trio()}")
            real_append(self, data)

        monkeypatch.setattr(_checkpoint, "_datasync", sync)
        monkeypatch.setattr(_checkpoint.CheckpointFile, "append", append)
        trail = open_audit(AuditConfig(enabled=True, sink="file", path=path, fsync="never",
                                       signer=CountingSigner(), checkpoint_records=2,
                                       checkpoint_path=copy))
        assert trail is not None
        async with writing_behind(trail):
            session(trail, "a")
            await trio.testing.wait_all_tasks_blocked()
        # The trail's file, then the copy appended, then the copy's own sync.
        assert events == ["sync True", "append in trio: False", "sync False"]
        assert len(copy.read_bytes().splitlines()) == 1
        trail.close()


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


class TestFailures:
    def test_a_failed_signature_is_loud_and_fail_closed_refuses(self) -> None:
        sink = MemorySink()
        counts = Counts()
        signer = CountingSigner()
        signer.broken = True
        trail = signed_trail(sink, signer, counts, checkpoint_records=2, fail_closed=True)
        with structlog.testing.capture_logs() as logs:
            session(trail, "a")
        assert [(e["event"], e["log_level"]) for e in logs] == [("audit.sign_failed", "error")]
        assert "HSM" in logs[0]["error"]
        assert counts.errors == 1
        assert trail.refusal() == "audit trail unavailable"
        assert checkpoints(sink.records()) == []  # no broken checkpoint written
        signer.broken = False
        with structlog.testing.capture_logs() as logs:
            session(trail, "b")
        assert [e["event"] for e in logs if e["log_level"] != "debug"] == [
            "audit.sign_recovered"]
        assert trail.refusal() is None
        (cp,) = checkpoints(sink.records())
        assert cp["seq"] == 4  # covers a and the first record of b
        assert verify_trail([("m", sink.data())], verifiers=[signer.verifier]).ok

    def test_fail_open_keeps_serving(self) -> None:
        sink = MemorySink()
        signer = CountingSigner()
        signer.broken = True
        trail = signed_trail(sink, signer, checkpoint_records=2)
        session(trail, "a")
        assert trail.refusal() is None

    async def test_a_failed_signature_is_tried_again_soon(
        self, mock_clock: trio.testing.MockClock
    ) -> None:
        sink = MemorySink()
        signer = CountingSigner()
        signer.broken = True
        trail = signed_trail(sink, signer, checkpoint_records=2, fail_closed=True)
        async with writing_behind(trail):
            session(trail, "a")
            await trio.testing.wait_all_tasks_blocked()
            assert len(signer.calls) == 1
            signer.broken = False
            await elapse(mock_clock, _trail.CHECKPOINT_RETRY)
            assert len(signer.calls) == 2
            assert trail.refusal() is None
            assert len(checkpoints(sink.records())) == 1

    def test_an_unwritable_copy_is_loud_and_catches_up_in_order(self, tmp_path: Path) -> None:
        copy = tmp_path / "later" / "audit.checkpoints"
        counts = Counts()
        path = tmp_path / "audit.jsonl"
        trail = open_audit(AuditConfig(enabled=True, sink="file", path=path,
                                       signer=CountingSigner(), checkpoint_records=2,
                                       checkpoint_path=copy, fail_closed=True), counts)
        assert trail is not None
        with structlog.testing.capture_logs() as logs:
            session(trail, "a")
        assert [e["event"] for e in logs if e["log_level"] != "debug"] == [
            "audit.checkpoint_copy_failed"]
        assert counts.errors == 1
        assert trail.refusal() == "audit trail unavailable"
        copy.parent.mkdir()
        session(trail, "b")
        trail.close()
        lines = path.read_bytes().splitlines(keepends=True)
        assert copy.read_bytes() == b"".join(
            line for line in lines if b'"event":"audit.checkpoint"' in line)
        assert len(copy.read_bytes().splitlines()) == 2
        assert trail.refusal() is None

    def test_no_copy_while_the_trail_cannot_be_written(self, tmp_path: Path) -> None:
        """A copy ahead of the trail would look like a cut trail: it waits."""
        sink = MemorySink()
        copy = tmp_path / "audit.checkpoints"
        trail = signed_trail(sink, checkpoint_records=2, checkpoint_path=copy)
        sink.broken = True
        session(trail, "a")
        assert not copy.exists()
        sink.broken = False
        session(trail, "b")  # the queue drains, then the copy goes out
        assert len(copy.read_bytes().splitlines()) == 2


# --------------------------------------------------------------------------
# Configuration


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit-signing.key"
    path.write_text(Signer("test/popproxy", SEED).private_text() + "\n")
    path.chmod(0o600)
    return path


def config(**audit: Any) -> AuditConfig:
    return parse_config({"upstream": {"address": "127.0.0.1:110"}, "audit": audit}).audit


class TestConfig:
    def test_keys_and_defaults(self, key_file: Path, tmp_path: Path) -> None:
        cfg = config(sign_key=str(key_file))
        assert cfg.signer == Signer("test/popproxy", SEED)
        assert (cfg.sign_key, cfg.checkpoint_interval, cfg.checkpoint_records,
                cfg.checkpoint_path, cfg.origin) == (key_file, 60.0, 1000, None, None)
        cfg = config(sign_key=str(key_file), checkpoint_interval="5m", checkpoint_records=50,
                     checkpoint_path=str(tmp_path / "c"), origin="mx1.example.org/popproxy")
        assert (cfg.checkpoint_interval, cfg.checkpoint_records, cfg.checkpoint_path,
                cfg.origin) == (300.0, 50, tmp_path / "c", "mx1.example.org/popproxy")

    def test_the_key_never_shows(self, key_file: Path) -> None:
        secret = key_file.read_text().split("+")[-1].strip()
        assert secret not in repr(config(sign_key=str(key_file)))

    @pytest.mark.parametrize(("audit", "message"), [
        ({"checkpoint_interval": "60s"}, "audit.checkpoint_interval: only used with sign_key"),
        ({"checkpoint_records": 10}, "audit.checkpoint_records: only used with sign_key"),
        ({"checkpoint_path": "/tmp/c"}, "audit.checkpoint_path: only used with sign_key"),
        ({"origin": "x"}, "audit.origin: only used with sign_key"),
        ({"sign_key": 5}, "audit.sign_key: expected a file name"),
        ({"sign_key": "KEY", "hash_chain": False}, "audit.sign_key: .* needs hash_chain"),
        ({"sign_key": "KEY", "checkpoint_interval": "500ms"},
         "audit.checkpoint_interval: must be at least 1s"),
        ({"sign_key": "KEY", "checkpoint_records": 0}, "audit.checkpoint_records: expected 1.."),
        ({"sign_key": "KEY", "origin": "two words"}, "audit.origin: expected a name"),
        ({"sign_key": "KEY", "origin": "a+b"}, "audit.origin: expected a name"),
        ({"sign_key": "KEY", "sink": "file", "path": "/tmp/a", "checkpoint_path": "/tmp/a"},
         "audit.checkpoint_path: must not be the audit file"),
        ({"sign_key": "KEY", "checkpoint_sometimes": 1}, "audit.checkpoint_sometimes: unknown"),
    ])
    def test_errors_name_the_key(self, key_file: Path, audit: dict[str, Any],
                                 message: str) -> None:
        if audit.get("sign_key") == "KEY":
            audit["sign_key"] = str(key_file)
        with pytest.raises(ConfigError, match=message):
            config(**audit)

    def test_a_missing_key(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"audit\.sign_key: cannot read .*nope"):
            config(sign_key=str(tmp_path / "nope"))

    def test_a_directory_is_no_key(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"audit\.sign_key: .* is not a regular file"):
            config(sign_key=str(tmp_path))

    def test_a_key_anyone_can_read_is_refused(self, key_file: Path) -> None:
        key_file.chmod(0o644)
        with pytest.raises(ConfigError, match=r"audit\.sign_key: .*any user .*0644.*chmod o-rwx"):
            config(sign_key=str(key_file))
        key_file.chmod(0o640)  # the group (e.g. popproxy's) is fine
        assert config(sign_key=str(key_file)).signer is not None

    def test_not_a_key_says_so_without_quoting_it(self, key_file: Path) -> None:
        text = key_file.read_text()
        mangled = text.replace("+test/popproxy+", "+other/name+")  # the hash no longer fits
        key_file.write_text(mangled)
        with pytest.raises(ConfigError, match="is not a signing key made by") as caught:
            config(sign_key=str(key_file))
        assert text.split("+")[-1].strip()[:10] not in str(caught.value)
        key_file.write_text(str(Signer("x", SEED).verifier))  # the public key by mistake
        with pytest.raises(ConfigError, match=r"audit\.sign_key: .* is not a signing key"):
            config(sign_key=str(key_file))

    def test_check_config_names_the_key(self, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
        from popproxy.cli import main

        conf = tmp_path / "popproxy.toml"
        conf.write_text('[upstream]\naddress = "127.0.0.1:110"\n[audit]\n'
                        f'sign_key = "{tmp_path / "missing.key"}"\n')
        assert main(["check-config", str(conf)]) == 1
        assert "audit.sign_key: cannot read" in capsys.readouterr().err


# --------------------------------------------------------------------------
# audit keygen


def keygen(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = audit_main(["keygen", *argv], out, err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def no_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


class TestKeygen:
    def test_writes_a_private_key_and_prints_the_verifier(self, tmp_path: Path,
                                                          no_umask: None) -> None:
        key = tmp_path / "audit-signing.key"
        status, out, _ = keygen("--out", str(key), "--name", "mx1/popproxy")
        assert status == 0
        assert stat.S_IMODE(key.stat().st_mode) == 0o600  # even with umask 0
        signer = load_sign_key(key)
        assert out == f"{signer.verifier}\n"
        assert (tmp_path / "audit-signing.key.pub").read_text() == out
        assert Verifier.parse(out).name == "mx1/popproxy"
        assert key.read_text().startswith("PRIVATE+KEY+mx1/popproxy+")

    def test_the_key_file_is_created_private(self, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """Created with mode 0600 in the same call that makes it (O_CREAT |
        O_EXCL): there is no moment when it exists with wider rights."""
        calls: list[tuple[str, int, int]] = []
        real_open = os.open

        def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
            calls.append((str(path), flags, mode))
            return real_open(path, flags, mode, **kw)

        monkeypatch.setattr(os, "open", spy)
        key = tmp_path / "k"
        assert keygen("--out", str(key))[0] == 0
        ((_, flags, mode),) = [c for c in calls if c[0] == str(key)]
        assert flags & os.O_CREAT
        assert flags & os.O_EXCL
        assert mode == 0o600

    def test_never_overwrites_a_key(self, tmp_path: Path) -> None:
        key = tmp_path / "k"
        key.write_text("precious")
        status, out, err = keygen("--out", str(key))
        assert (status, out) == (1, "")
        assert "not overwriting" in err
        assert key.read_text() == "precious"

    def test_the_default_name(self, tmp_path: Path) -> None:
        status, out, _ = keygen("--out", str(tmp_path / "k"))
        assert status == 0
        assert Verifier.parse(out).name == default_origin()

    @pytest.mark.parametrize("name", ["two words", "a+b", ""])
    def test_a_bad_name(self, tmp_path: Path, name: str) -> None:
        status, _, err = keygen("--out", str(tmp_path / "k"), "--name", name)
        assert status == 2
        assert "a key name has no spaces" in err
        assert not (tmp_path / "k").exists()
