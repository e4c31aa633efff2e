"""The audit trail: structlog rendering, sinks, durability, failures, rotation, restarts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from popproxy.audit import (
    AuditConfig,
    AuditTrail,
    ChainHead,
    _sinks,
    _trail,
    open_audit,
    verify_files,
)
from popproxy.audit._chain import line, read_head, rotated_files
from popproxy.audit._sinks import FileSink
from popproxy.events import EndReason, SessionClosed, SessionOpened
from popproxy.metrics import Metrics

T0 = datetime(2026, 11, 27, 14, 24, 3, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        self.t += timedelta(milliseconds=1)
        return self.t


class Info:
    def __init__(self, id: str, client: str = "192.0.2.7:40000") -> None:
        self.id = id
        self.client = client


class MemorySink:
    """A sink in memory that can be told to fail like a full disk."""

    name = "memory"

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.writes = 0
        self.broken = False
        self.syncs = 0
        self.soon = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.broken:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.writes += 1
        self.lines += data.splitlines(keepends=True)

    def sync(self) -> None:
        self.syncs += 1

    def sync_soon(self) -> None:
        self.soon += 1

    def close(self) -> None:
        self.closed = True

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def data(self) -> bytes:
        return b"".join(self.lines)


class StuckFsync:
    """Stands in for the sink's fsync: notes ``note(fd)`` for each call and
    holds it "on the disk" until ``release`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, note: Callable[[int], int]) -> None:
        self.calls: list[int] = []
        self.running = threading.Event()
        self.release = threading.Event()
        real = _sinks._fsync_and_close

        def fsync(fd: int) -> OSError | None:
            self.calls.append(note(fd))
            self.running.set()
            assert self.release.wait(10)
            return real(fd)

        monkeypatch.setattr(_sinks, "_fsync_and_close", fsync)


class Counts:
    """Stands in for ``popproxy.metrics.Metrics``."""

    def __init__(self) -> None:
        self.records = 0
        self.errors = 0

    def audit_record(self, n: int = 1) -> None:
        self.records += n

    def audit_error(self) -> None:
        self.errors += 1


class _Broken:
    """Wraps an object; the method named ``name`` fails (or is ``fake``)."""

    def __init__(self, inner: object, name: str,
                 fake: Callable[..., Any] | None = None) -> None:
        self._inner, self._name = inner, name
        self._fake = fake if fake is not None else (lambda *args: 1 / 0)

    def __getattr__(self, attr: str) -> Any:
        if attr == self._name:
            return self._fake
        return getattr(self._inner, attr)


def trail_with(sink: MemorySink, metrics: object = None, **config: Any) -> AuditTrail:
    return AuditTrail(AuditConfig(enabled=True, **config), [sink], head=ChainHead(),
                      metrics=metrics, now=FakeClock())


def session(trail: AuditTrail, sid: str) -> None:
    """A session that opens and closes: two records."""
    info = Info(sid)
    trail.observe(info, SessionOpened(info.client, 0.0))
    trail.observe(info, SessionClosed(EndReason.QUIT, 1.5, 10, 20, 1))


def file_config(path: Path, **kw: Any) -> AuditConfig:
    return AuditConfig(enabled=True, sink="file", path=path, **kw)


def all_files(path: Path) -> list[Path]:
    return [*rotated_files(path), path]


def verify_paths(paths: list[Path]) -> Any:
    return verify_files([(str(p), p.read_bytes()) for p in paths])


class TestRendering:
    def test_json_lines_in_order_with_chain(self) -> None:
        """One canonical JSON object per line, in order, chained from the genesis hash."""
        sink = MemorySink()
        trail = trail_with(sink)
        session(trail, "a")
        session(trail, "b")
        records = sink.records()
        assert [(r["event"], r["session"], r["seq"]) for r in records] == [
            ("session.open", "a", 1), ("session.close", "a", 2),
            ("session.open", "b", 3), ("session.close", "b", 4),
        ]
        assert list(records[0]) == ["client", "event", "prev", "seq", "session", "ts", "hash"]
        assert all(x == line(json.loads(x)) + b"\n" for x in sink.lines)
        assert verify_files([("m", sink.data())]).ok

    def test_no_chain_fields_when_off(self) -> None:
        """``hash_chain = false``: no seq, prev or hash."""
        sink = MemorySink()
        session(trail_with(sink, hash_chain=False), "a")
        assert all({"seq", "prev", "hash"}.isdisjoint(r) for r in sink.records())

    def test_independent_of_global_structlog(self) -> None:
        """The audit's structlog chain is its own: global config neither changes nor sees it."""
        sink = MemorySink()
        trail = trail_with(sink)
        with structlog.testing.capture_logs() as captured:
            session(trail, "a")
        assert [r["event"] for r in sink.records()] == ["session.open", "session.close"]
        assert "level" not in sink.records()[0]
        assert captured == []
        assert verify_files([("m", sink.data())]).ok


class TestDurability:
    @pytest.mark.parametrize(
        ("fsync", "syncs", "soon"),
        [("always", 4 + 1, 0), ("session", 1, 2), ("never", 0, 0)],
    )
    def test_fsync_modes(self, fsync: str, syncs: int, soon: int) -> None:
        """always: every record (and close); session: each session.close (and close)."""
        sink = MemorySink()
        trail = trail_with(sink, fsync=fsync)
        session(trail, "a")
        session(trail, "b")
        trail.close()
        assert (sink.syncs, sink.soon) == (syncs, soon)
        assert sink.closed

    def test_close_is_idempotent_and_stops_recording(self) -> None:
        """After close, events are ignored and nothing is written."""
        sink = MemorySink()
        trail = trail_with(sink)
        trail.close()
        trail.close()
        session(trail, "a")
        assert sink.lines == []

    def test_close_ends_open_sessions(self) -> None:
        """A session still open at shutdown gets its session.close record."""
        sink = MemorySink()
        trail = trail_with(sink)
        trail.observe(Info("a"), SessionOpened("192.0.2.7:40000", 0.0))
        trail.close()
        assert [(r["event"], r.get("reason")) for r in sink.records()] == [
            ("session.open", None), ("session.close", "shutdown")]

    def test_file_fsync_runs_in_a_thread_and_coalesces(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``sync_soon`` never waits for the disk; requests made during an fsync share one."""
        stuck = StuckFsync(monkeypatch, lambda fd: threading.get_ident())
        sink = FileSink(tmp_path / "a.jsonl", now=FakeClock())
        sink.write(b'{"n":0}\n')
        sink.sync_soon()
        assert stuck.running.wait(10)  # the first fsync is stuck "on the disk" ...
        for i in range(1, 11):
            sink.write(b'{"n":%d}\n' % i)
            sink.sync_soon()  # ... and these return at once
        assert len(stuck.calls) == 1
        stuck.release.set()
        sink.close()  # finishes the waiting request
        assert len(stuck.calls) == 2  # ten requests, one fsync
        assert threading.get_ident() not in stuck.calls

    def test_a_waiting_fsync_follows_the_file_to_its_rotation(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A request for a new file (after rotation) replaces one for the old file."""
        stuck = StuckFsync(monkeypatch, lambda fd: os.fstat(fd).st_ino)
        path = tmp_path / "a.jsonl"
        sink = FileSink(path, rotate_size=20, now=FakeClock())
        sink.write(b'{"n":0}\n')
        sink.sync_soon()
        assert stuck.running.wait(10)
        sink.write(b'{"n":1}\n')
        sink.sync_soon()  # waits, for the first file
        sink.write(b'{"n":2,"pad":"xxxx"}\n')  # over 20 bytes: a new file
        assert sink.rotations == 1
        sink.sync_soon()  # must cover the new file
        stuck.release.set()
        sink.close()
        assert stuck.calls[-1] == path.stat().st_ino
        assert len(stuck.calls) == 2


@contextlib.asynccontextmanager
async def writing_behind(trail: AuditTrail) -> AsyncIterator[None]:
    """``trail.write_behind`` running, as ``app.run`` runs it; cancelled on the way out."""
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.write_behind)
        yield
        nursery.cancel_scope.cancel()


async def elapse(clock: trio.testing.MockClock, seconds: float) -> None:
    """Let every task run until it waits, move the mock clock on, and let
    every task it wakes run."""
    await trio.testing.wait_all_tasks_blocked()
    clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


class TestWriteBehind:
    """While ``write_behind`` runs, records wait up to ``BATCH_WAIT`` and go out together."""

    async def test_records_wait_then_go_out_together(
        self, mock_clock: trio.testing.MockClock
    ) -> None:
        """Nothing is written before ``BATCH_WAIT``; then one write, in order."""
        sink = MemorySink()
        trail = trail_with(sink)
        async with writing_behind(trail):
            for sid in "abc":
                trail.observe(Info(sid), SessionOpened("192.0.2.7:40000", 0.0))
            await elapse(mock_clock, _trail.BATCH_WAIT * 0.9)
            assert sink.writes == 0
            await elapse(mock_clock, _trail.BATCH_WAIT * 0.2)  # and past it
            assert sink.writes == 1
            assert [r["session"] for r in sink.records()] == ["a", "b", "c"]
        assert verify_files([("m", sink.data())]).ok

    async def test_no_record_waits_longer_than_batch_wait(
        self, mock_clock: trio.testing.MockClock
    ) -> None:
        """A record that joins a batch goes with it; one that starts a batch
        after a close wrote the last one is written ``BATCH_WAIT`` after the
        first, at the latest."""
        sink = MemorySink()
        trail = trail_with(sink)
        step = _trail.BATCH_WAIT / 5
        async with writing_behind(trail):
            trail.observe(Info("a"), SessionOpened("192.0.2.7:40000", 0.0))  # t = 0
            await elapse(mock_clock, step)
            trail.observe(Info("a"), SessionClosed(EndReason.QUIT, 1.0, 1, 1, 1))  # writes a
            assert sink.writes == 1
            await elapse(mock_clock, step)
            trail.observe(Info("b"), SessionOpened("192.0.2.7:40001", 0.0))  # t = 2 steps
            await elapse(mock_clock, step)
            trail.observe(Info("c"), SessionOpened("192.0.2.7:40002", 0.0))  # joins b
            await elapse(mock_clock, step * 2.5)  # t = 5.5 steps: the first timer ended
            assert sink.writes == 2
            assert [r["session"] for r in sink.records()][-2:] == ["b", "c"]
            await elapse(mock_clock, _trail.BATCH_WAIT)
            assert sink.writes == 2  # nothing waited: nothing to write

    async def test_session_close_writes_at_once(self) -> None:
        """A session's close writes what waits, without waiting for the timer."""
        sink = MemorySink()
        trail = trail_with(sink, fsync="session")
        async with writing_behind(trail):
            trail.observe(Info("b"), SessionOpened("192.0.2.7:40001", 0.0))
            trail.observe(Info("a"), SessionOpened("192.0.2.7:40000", 0.0))
            assert (sink.writes, sink.soon) == (0, 0)
            trail.observe(Info("a"), SessionClosed(EndReason.QUIT, 1.5, 10, 20, 1))
            assert (sink.writes, sink.soon) == (1, 1)
            assert [(r["event"], r["session"]) for r in sink.records()] == [
                ("session.open", "b"), ("session.open", "a"), ("session.close", "a")]
            trail.observe(Info("c"), SessionOpened("192.0.2.7:40002", 0.0))
        assert (sink.writes, sink.soon) == (2, 1)  # no close in it: no sync

    async def test_fsync_always_does_not_wait(self) -> None:
        """``fsync = "always"``: each record is written and synced as it is made."""
        sink = MemorySink()
        trail = trail_with(sink, fsync="always")
        async with writing_behind(trail):
            trail.observe(Info("a"), SessionOpened("192.0.2.7:40000", 0.0))
            assert (sink.writes, sink.syncs) == (1, 1)

    async def test_a_long_busy_spell_is_cut_into_batches(self) -> None:
        """At most ``BATCH_LIMIT`` records wait, however many come at once."""
        sink = MemorySink()
        trail = trail_with(sink)
        async with writing_behind(trail):
            for i in range(_trail.BATCH_LIMIT * 2 + 1):
                trail.observe(Info(f"s{i}"), SessionOpened("192.0.2.7:40000", 0.0))
            assert (sink.writes, len(sink.lines)) == (2, _trail.BATCH_LIMIT * 2)
        assert (sink.writes, len(sink.lines)) == (3, _trail.BATCH_LIMIT * 2 + 1)

    async def test_stopping_writes_what_waits_and_stops_waiting(self) -> None:
        """When the task ends the batch is written; after it records go out at once."""
        sink = MemorySink()
        trail = trail_with(sink)
        async with writing_behind(trail):
            trail.observe(Info("a"), SessionOpened("192.0.2.7:40000", 0.0))
            assert sink.writes == 0
        assert sink.writes == 1
        trail.observe(Info("b"), SessionOpened("192.0.2.7:40000", 0.0))
        assert sink.writes == 2

    async def test_a_failing_flush_is_reported_and_the_timer_goes_on(
        self, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bug while rendering is logged and counted; the next batch is still written."""
        sink = MemorySink()
        counts = Counts()
        trail = trail_with(sink, counts)
        assert trail.head is not None
        real = trail.head
        # A stand-in, not a patched method: the chain may be a compiled
        # class (mypyc), whose methods cannot be replaced.
        monkeypatch.setattr(trail, "head", _Broken(real, "link"))
        async with writing_behind(trail):
            trail.observe(Info("a"), SessionOpened("192.0.2.7:40000", 0.0))
            with structlog.testing.capture_logs() as logs:
                await elapse(mock_clock, _trail.BATCH_WAIT)
            assert logs == [{"event": "audit.flush_failed", "error_type": "ZeroDivisionError",
                             "log_level": "error"}]
            assert counts.errors == 1
            monkeypatch.setattr(trail, "head", real)
            trail.observe(Info("b"), SessionOpened("192.0.2.7:40000", 0.0))
            await elapse(mock_clock, _trail.BATCH_WAIT)
            assert [r["session"] for r in sink.records()] == ["b"]

    async def test_queue_limit_counts_the_lines_of_a_batch(
        self, mock_clock: trio.testing.MockClock
    ) -> None:
        """While a sink fails, a batch is cut at the queue limit: the rest is dropped."""
        sink = MemorySink()
        trail = AuditTrail(AuditConfig(enabled=True), [sink], head=ChainHead(),
                           now=FakeClock(), max_pending_lines=3)
        sink.broken = True
        trail.observe(Info("a"), SessionOpened("192.0.2.7:40000", 0.0))  # queued: 1
        async with writing_behind(trail):
            for sid in "bcde":
                trail.observe(Info(sid), SessionOpened("192.0.2.7:40000", 0.0))
            await elapse(mock_clock, _trail.BATCH_WAIT)  # b, c join the queue; d, e lost
        sink.broken = False
        trail.observe(Info("f"), SessionOpened("192.0.2.7:40000", 0.0))
        records = sink.records()
        assert [r["event"] for r in records] == [
            "session.open", "session.open", "session.open", "audit.lost", "session.open"]
        assert records[3]["records"] == 2
        assert verify_files([("m", sink.data())]).ok


class TestFailures:
    def test_failed_writes_queue_and_go_out_in_order(self) -> None:
        """Records the sink refused are written, in order, once it works again."""
        sink = MemorySink()
        counts = Counts()
        trail = trail_with(sink, counts)
        session(trail, "a")
        sink.broken = True
        session(trail, "b")
        assert trail.failing
        assert (counts.records, counts.errors) == (2, 2)
        sink.broken = False
        session(trail, "c")
        assert [r["session"] for r in sink.records()] == ["a", "a", "b", "b", "c", "c"]
        assert [r["seq"] for r in sink.records()] == [1, 2, 3, 4, 5, 6]
        assert (counts.records, counts.errors) == (6, 2)
        assert not trail.failing
        assert verify_files([("m", sink.data())]).ok

    def test_failure_and_recovery_are_logged(self) -> None:
        """A failing sink is said loudly, once, and so is its recovery."""
        sink = MemorySink()
        trail = trail_with(sink)
        sink.broken = True
        with structlog.testing.capture_logs() as logs:
            session(trail, "a")
            sink.broken = False
            session(trail, "b")
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("audit.sink_failed", "error"), ("audit.sink_recovered", "warning")]
        assert "No space left" in logs[0]["error"]

    def test_fail_closed_refuses_until_the_sink_works(self) -> None:
        """With fail_closed, refusal() gives a reason while failing; it retries, and recovers."""
        sink = MemorySink()
        trail = trail_with(sink, fail_closed=True)
        assert trail.refusal() is None
        sink.broken = True
        session(trail, "a")
        assert trail.refusal() == "audit trail unavailable"
        assert trail.refusal() == "audit trail unavailable"
        sink.broken = False
        assert trail.refusal() is None
        assert [r["session"] for r in sink.records()] == ["a", "a"]

    def test_fail_open_never_refuses(self) -> None:
        """Without fail_closed the proxy keeps serving (and the failure is counted)."""
        sink = MemorySink()
        trail = trail_with(sink)
        sink.broken = True
        session(trail, "a")
        assert trail.failing
        assert trail.refusal() is None

    def test_full_queue_drops_before_chaining_and_reports_the_loss(self) -> None:
        """Past the queue limit records are dropped unchained; audit.lost says how many."""
        sink = MemorySink()
        counts = Counts()
        trail = AuditTrail(AuditConfig(enabled=True), [sink], head=ChainHead(),
                           metrics=counts, now=FakeClock(), max_pending_lines=3)
        sink.broken = True
        for sid in "abc":
            session(trail, sid)  # 6 records: 3 queued, 3 dropped
        sink.broken = False
        session(trail, "d")
        records = sink.records()
        assert [(r["event"], r.get("session")) for r in records] == [
            ("session.open", "a"), ("session.close", "a"), ("session.open", "b"),
            ("audit.lost", None), ("session.open", "d"), ("session.close", "d"),
        ]
        assert records[3]["records"] == 3
        assert records[3]["since"] == "2026-11-27T14:24:03.004000Z"  # b's close: first lost
        assert counts.errors == 6
        assert verify_files([("m", sink.data())]).ok

    def test_observer_never_raises(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A bug while building a record is logged (without traceback) and counted."""
        sink = MemorySink()
        counts = Counts()
        trail = trail_with(sink, counts)

        def boom(*args: object) -> list[dict[str, Any]]:
            raise RuntimeError("secret-looking detail")

        monkeypatch.setattr(trail, "builder", _Broken(trail.builder, "observe", boom))
        with structlog.testing.capture_logs() as logs:
            trail.observe(Info("a"), SessionOpened("x", 0.0))
        assert logs == [{"event": "audit.record_failed", "error_type": "RuntimeError",
                         "audit_event": "SessionOpened", "log_level": "error"}]
        assert counts.errors == 1

    def test_counts_on_the_real_metrics(self) -> None:
        """``popproxy_audit_records_total`` and ``..._errors_total`` move."""
        registry = CollectorRegistry()
        sink = MemorySink()
        trail = trail_with(sink, Metrics(registry))
        session(trail, "a")
        sink.broken = True
        session(trail, "b")
        assert registry.get_sample_value("popproxy_audit_records_total") == 2
        assert registry.get_sample_value("popproxy_audit_errors_total") == 2


class TestFiles:
    def test_restart_continues_the_chain(self, tmp_path: Path) -> None:
        """A new trail on the same file reads the last record and continues after it."""
        path = tmp_path / "audit.jsonl"
        for sid in ("a", "b"):
            trail = open_audit(file_config(path), now=FakeClock())
            assert trail is not None
            session(trail, sid)
            trail.close()
        seqs = [json.loads(line)["seq"] for line in path.read_bytes().splitlines()]
        assert seqs == [1, 2, 3, 4]
        assert verify_paths([path]).ok

    def test_rotation_never_splits_a_record_and_carries_the_chain(self, tmp_path: Path) -> None:
        """Rotated files hold whole lines, stay under the size, and chain into each other."""
        path = tmp_path / "audit.jsonl"
        trail = open_audit(file_config(path, rotate_size=4096), now=FakeClock())
        assert trail is not None
        for i in range(40):
            session(trail, f"s{i:02d}")
        trail.close()
        files = all_files(path)
        assert len(files) >= 5
        for f in files:
            data = f.read_bytes()
            assert len(data) <= 4096
            assert data.endswith(b"\n")
            for raw in data.splitlines():
                json.loads(raw)
        shuffled = files[:]
        random.Random(1).shuffle(shuffled)
        result = verify_paths(shuffled)
        assert result.ok
        assert (result.records, result.files) == (80, len(files))
        previous = json.loads(files[0].read_bytes().splitlines()[-1])
        first_of_next = json.loads(files[1].read_bytes().splitlines()[0])
        assert first_of_next["prev"] == previous["hash"]

    def test_restart_after_rotation(self, tmp_path: Path) -> None:
        """The chain head is found in the newest rotated file when the live one is new."""
        path = tmp_path / "audit.jsonl"
        trail = open_audit(file_config(path, rotate_size=4096), now=FakeClock())
        assert trail is not None
        for i in range(20):
            session(trail, f"s{i:02d}")
        trail.close()
        last = json.loads(path.read_bytes().splitlines()[-1])
        path.rename(tmp_path / "audit.jsonl.29991231T000000000000Z")
        assert read_head(path) == ChainHead(last["seq"], last["hash"])

    def test_torn_last_line_is_ended_and_the_chain_goes_on(self, tmp_path: Path) -> None:
        """A crash mid-write leaves a partial line: it is ended, the chain continues over it."""
        path = tmp_path / "audit.jsonl"
        trail = open_audit(file_config(path), now=FakeClock())
        assert trail is not None
        session(trail, "a")
        trail.close()
        with open(path, "ab") as f:
            f.write(b'{"ts":"2026-11-27T14:24:03.5')
        with structlog.testing.capture_logs() as logs:
            trail = open_audit(file_config(path), now=FakeClock())
            assert trail is not None
            session(trail, "b")
            trail.close()
        assert "audit.torn_line" in [e["event"] for e in logs]
        result = verify_paths([path])
        assert result.ok
        assert result.records == 4
        assert result.problems is not None
        assert [p.line for p in result.problems] == [3]

    def test_unwritable_file_fails_closed_and_recovers(self, tmp_path: Path) -> None:
        """A real write error (ENOSPC from /dev/full) refuses sessions until writes work."""
        path = tmp_path / "audit.jsonl"
        path.symlink_to("/dev/full")
        counts = Counts()
        trail = open_audit(file_config(path, fail_closed=True), counts, now=FakeClock())
        assert trail is not None
        session(trail, "a")
        assert trail.refusal() == "audit trail unavailable"
        assert counts.errors == 2
        path.unlink()
        path.symlink_to(tmp_path / "real.jsonl")
        assert trail.refusal() is None
        session(trail, "b")
        trail.close()
        assert [json.loads(x)["session"] for x in (tmp_path / "real.jsonl").read_bytes()
                .splitlines()] == ["a", "a", "b", "b"]
        assert verify_paths([tmp_path / "real.jsonl"]).ok
        assert counts.records == 4

    def test_stdout_sink(self, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
        """``sink = "stdout"``: the same lines on standard output."""
        trail = open_audit(AuditConfig(enabled=True, sink="stdout"), now=FakeClock())
        assert trail is not None
        session(trail, "a")
        trail.close()
        out = capfdbinary.readouterr().out
        assert [json.loads(x)["event"] for x in out.splitlines()] == ["session.open",
                                                                      "session.close"]

    def test_both_sinks_get_the_same_lines(
        self, tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
    ) -> None:
        """``sink = "both"``: the file and stdout carry identical records."""
        path = tmp_path / "audit.jsonl"
        trail = open_audit(AuditConfig(enabled=True, sink="both", path=path), now=FakeClock())
        assert trail is not None
        session(trail, "a")
        trail.close()
        assert capfdbinary.readouterr().out == path.read_bytes()


@pytest.fixture(autouse=True)
def _no_leftover_fds() -> Iterator[None]:
    before = len(os.listdir("/proc/self/fd"))
    yield
    assert len(os.listdir("/proc/self/fd")) <= before + 1
