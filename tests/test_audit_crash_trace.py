"""The crash trace: after ``kill -9`` the next start closes, in the trail,
what the dead process left open (``popproxy.audit._recovery``).

* ``popproxy run`` as a process, in front of the demo mailbox server with a
  message of 8 MiB: two sessions with deletion marks, one of them with a
  RETR of that message in flight (the client stops reading mid-body),
  ``kill -9``, a restart: ``proxy.start`` with ``unclean: true`` and the
  seq the chain resumed from, ``message.retrieve`` ``complete: false`` for
  the RETR, ``message.delete.uncommitted`` for the marks still open,
  ``session.close`` "proxy crashed" for both; the signed trail verifies;
  a clean stop then a start says ``unclean: false``.
* ``look_back`` on files written by the trail: rotated files, a torn last
  line, the stops (clean stop, quiet point, proxy.start, the window).
"""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.audit import AuditConfig, AuditTrail, open_audit, previous_run
from popproxy.audit._note import Signer
from popproxy.audit._recovery import look_back
from popproxy.audit.cli import main as audit_main
from popproxy.config import HostPort
from popproxy.demo import DEMO_USERS, MailStore, serve_demo
from popproxy.demo.store import Mailbox, Message
from popproxy.events import (
    Deletions,
    EndReason,
    MessageComplete,
    MessageStarted,
    SessionClosed,
    SessionOpened,
)
from popproxy.pop3 import parse_command
from tests.popproxy_process import LineReader, running_popproxy

KEY = Signer("crash-test/popproxy", bytes(range(3, 35)))
BIG = 8 << 20  # the message in flight at the kill


def big_message() -> Message:
    line = b"x" * 998 + b"\r\n"
    body = line * (BIG // len(line))
    return Message(b"Subject: big\r\nMessage-ID: <big@example.test>\r\n\r\n" + body, "big-1")


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def config_text(tmp_path: Path, upstream_port: int) -> str:
    key = tmp_path / "audit.key"
    if not key.exists():
        key.write_text(KEY.private_text() + "\n")
        key.chmod(0o600)
    return (
        '[listen]\naddress = "127.0.0.1:0"\n'
        f'[upstream]\naddress = "127.0.0.1:{upstream_port}"\n'
        '[log]\nformat = "json"\nlevel = "info"\n'
        "[audit]\n"
        'sink = "file"\n'
        f'path = "{tmp_path / "audit.jsonl"}"\n'
        f'sign_key = "{key}"\n'
        f'checkpoint_path = "{tmp_path / "audit.checkpoints"}"\n'
        'origin = "crash-test/popproxy"\n'
        'checkpoint_records = 5\n'
    )


async def login(port: int, user: str, password: str) -> tuple[trio.SocketStream, LineReader]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reader = LineReader(stream)
    assert (await reader.line()).startswith(b"+OK")
    for line in (f"USER {user}", f"PASS {password}"):
        await stream.send_all(line.encode() + b"\r\n")
        assert (await reader.line()).startswith(b"+OK")
    return stream, reader


async def ask(stream: trio.SocketStream, reader: LineReader, command: str) -> bytes:
    await stream.send_all(command.encode() + b"\r\n")
    return await reader.line()


def verify(tmp_path: Path) -> tuple[int, str]:
    out = io.StringIO()
    status = audit_main(["verify", "--key", str(KEY.verifier), "--checkpoints",
                         str(tmp_path / "audit.checkpoints"), str(tmp_path / "audit.jsonl")],
                        out, io.StringIO())
    return status, out.getvalue()


async def test_kill_9_leaves_a_trace_of_every_open_session(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    store = MailStore.load_samples()
    store.add(Mailbox("carol", "secret", [
        Message(b"Subject: one\r\n\r\nfirst\r\n", "c-1"),
        Message(b"Subject: two\r\n\r\nsecond\r\n", "c-2"),
        big_message(),
    ]))
    upstream = await nursery.start(serve_demo, store, "127.0.0.1", 0)
    text = config_text(tmp_path, upstream[0].socket.getsockname()[1])
    path = tmp_path / "audit.jsonl"
    held: list[trio.SocketStream] = []
    body_seen = 0
    try:
        async with running_popproxy(text, tmp_path) as proxy:
            with trio.fail_after(30):
                # alice: marks 1 and 3, left open.
                a, ar = await login(proxy.port, "alice", DEMO_USERS["alice"])
                held.append(a)
                assert (await ask(a, ar, "DELE 1")).startswith(b"+OK")
                assert (await ask(a, ar, "DELE 3")).startswith(b"+OK")
                # carol: UIDL, marks 1, RSET, marks 2, then RETR 3 (8 MiB),
                # of which the client reads a little and then nothing.
                c, cr = await login(proxy.port, "carol", "secret")
                held.append(c)
                await c.send_all(b"UIDL\r\n")
                while await cr.line() != b".":
                    pass
                assert (await ask(c, cr, "DELE 1")).startswith(b"+OK")
                assert (await ask(c, cr, "RSET")).startswith(b"+OK")
                assert (await ask(c, cr, "DELE 2")).startswith(b"+OK")
                assert (await ask(c, cr, "RETR 3")).startswith(b"+OK")
                while len(cr.buf) < 256 << 10:  # a quarter MiB of the body delivered
                    data = await c.receive_some(65536)
                    assert data
                    cr.buf += data
                body_seen = len(cr.buf)
                # bob comes and goes: his session.close writes what waits
                # before it (the records are written in order) and is
                # logged after, so both sessions' records are on file.
                b, br = await login(proxy.port, "bob", DEMO_USERS["bob"])
                assert (await ask(b, br, "QUIT")).startswith(b"+OK")
                await b.aclose()
                await proxy.wait_for("session.close", user="bob")
            proxy.process.kill()  # SIGKILL: no close, no proxy.stop
            with trio.fail_after(20):
                await proxy.process.wait()
    finally:
        for s in held:
            await s.aclose()
    assert body_seen > 0

    # The restart writes the crash trace before it serves anyone.
    async with running_popproxy(text, tmp_path) as proxy:
        proxy.process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proxy.process.wait() == 0
    written = read(path)
    second = [i for i, r in enumerate(written) if r["event"] == "proxy.start"][1]
    before, after = written[:second], written[second:]
    assert before[-1]["event"] != "proxy.stop"
    assert [r["event"] for r in before if r["event"].startswith("proxy.")] == ["proxy.start"]
    starts = [r for r in before if r["event"] == "message.retrieving"]
    assert [(r["user"], r["msg"], r["uidl"], r["announced"]) for r in starts] == [
        ("carol", 3, "big-1", big_message().size)]
    last_seq = before[-1]["seq"]
    start = after[0]
    assert start["event"] == "proxy.start"
    assert start["unclean"] is True
    assert start["resumed"] == last_seq
    assert start["seq"] == last_seq + 1
    assert start["sessions"] == 2
    assert start["look_back"]["stopped_at"] == "proxy.start"
    recovered = [r for r in after if r.get("recovered")]
    by_user: dict[str, list[tuple[Any, ...]]] = {}
    for r in recovered:
        by_user.setdefault(r["user"], []).append(
            (r["event"], r.get("msg"), r.get("reason"), r.get("outcome"), r.get("complete")))
    assert by_user == {
        "alice": [("message.delete.uncommitted", 1, None, None, None),
                  ("message.delete.uncommitted", 3, None, None, None),
                  ("session.close", None, "proxy crashed", "error", None)],
        "carol": [("message.retrieve", 3, None, None, False),
                  ("message.delete.uncommitted", 2, None, None, None),
                  ("session.close", None, "proxy crashed", "error", None)],
    }
    retr = next(r for r in recovered if r["event"] == "message.retrieve")
    assert retr["octets"] is None
    assert retr["sha256"] is None
    assert retr["uidl"] == "big-1"
    closes = {r["session"] for r in recovered if r["event"] == "session.close"}
    assert closes == {r["session"] for r in before if r.get("user") in ("alice", "carol")}
    # The trail ends cleanly this time, and the whole of it verifies.
    assert [r["event"] for r in written[-2:]] == ["proxy.stop", "audit.checkpoint"]
    status, out = verify(tmp_path)
    assert status == 0, out
    assert "0 records after it, not signed yet" in out

    # A start after that clean stop is clean: no trace to write.
    async with running_popproxy(text, tmp_path):
        again = read(path)[len(written):]
    assert again[0]["event"] == "proxy.start"
    assert again[0]["unclean"] is False
    assert "look_back" not in again[0]
    assert not [r for r in again if r.get("recovered")]
    status, out = verify(tmp_path)
    assert status == 0, out


# ---------------------------------------------------------------- look_back


class Info:
    def __init__(self, sid: str, client: str = "192.0.2.7:4000") -> None:
        self.id = sid
        self.client = client


def trail(path: Path, **settings: Any) -> AuditTrail:
    t = open_audit(AuditConfig(enabled=True, sink="file", path=path, fsync="never",
                               **settings))
    assert t is not None
    return t


def crashed_run(path: Path, **settings: Any) -> list[str]:
    """A run that writes sessions and dies (no close): the ids left open."""
    t = trail(path, **settings)
    t.start(previous_run(t.config))
    left = []
    for sid, marks in (("open-a", (2, 5)), ("open-b", (7,))):
        info = Info(sid)
        t.observe(info, SessionOpened(info.client, 0.0))
        t.observe(info, Deletions("marked", marks))
        left.append(sid)
        # Sessions that come and go meanwhile (several rotations' worth
        # with rotate_size): none is a point with no session open.
        for i in range(15):
            info = Info(f"{sid}-other{i:02d}")
            t.observe(info, SessionOpened(info.client, 0.0))
            t.observe(info, SessionClosed(EndReason.QUIT, 0.5, 10, 20, 1))
    info = Info("open-b")
    retr = parse_command(b"RETR 9")
    t.observe(info, MessageStarted(retr, 9, 1234))
    t.observe(info, MessageStarted(parse_command(b"RETR 4"), 4, 10))
    t.observe(info, MessageComplete(parse_command(b"RETR 4"), 4, 10, "0" * 64, None, True))
    t.flush()
    return left  # and no close(): the process died here


def test_look_back_finds_the_open_sessions_across_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.w3.jsonl"  # a worker's file: its own chain
    left = crashed_run(path, rotate_size=1500)
    assert len(list(tmp_path.glob("audit.w3.jsonl.*"))) > 2  # rotated
    with path.open("ab") as f:
        f.write(b'{"ts":"2026-12-06T00:00:00Z","event":"sess')  # torn by the kill
    found = look_back(path)
    assert not found.clean
    assert [s.id for s in found.sessions] == left
    # Back to the proxy.start of the run, through the rotated files.
    assert found.stopped_at == "proxy.start"

    t = trail(path, rotate_size=1500)
    t.start(previous_run(t.config))
    t.close()
    files = [*sorted(tmp_path.glob("audit.w3.jsonl.*")), path]
    records = [r for f in files for r in read_lenient(f)]
    recovered = [(r["session"], r["event"], r.get("msg"), r.get("complete"))
                 for r in records if r.get("recovered")]
    assert recovered == [
        ("open-a", "message.delete.uncommitted", 2, None),
        ("open-a", "message.delete.uncommitted", 5, None),
        ("open-a", "session.close", None, None),
        ("open-b", "message.retrieve", 9, False),
        ("open-b", "message.delete.uncommitted", 7, None),
        ("open-b", "session.close", None, None),
    ]
    out = io.StringIO()
    assert audit_main(["verify", *map(str, files)], out, io.StringIO()) == 0, out.getvalue()
    assert "warning" in out.getvalue()  # the torn line, jumped over by the chain
    # That start closed them: the next look back finds a clean stop.
    assert look_back(path).clean


def read_lenient(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_look_back_stops_at_the_last_point_no_session_was_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    t = trail(path)
    t.start(None)  # no proxy.start barrier would help: stop at a quiet point
    for sid in ("one", "two"):
        info = Info(sid)
        t.observe(info, SessionOpened(info.client, 0.0))
    for sid in ("one", "two"):  # "two" closes last, with no session open
        t.observe(Info(sid), SessionClosed(EndReason.QUIT, 0.5, 10, 20, 1))
    quiet = path.stat().st_size
    info = Info("three")
    t.observe(info, SessionOpened(info.client, 0.0))
    t.flush()
    found = look_back(path)
    assert found.stopped_at == "quiet point"
    assert [s.id for s in found.sessions] == ["three"]
    assert found.bytes == path.stat().st_size  # one block: the file is small
    assert len(found.sessions[0].records) == 1  # nothing of "one" and "two"
    assert quiet < found.bytes


def test_look_back_reads_no_more_than_its_window(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    t = trail(path)
    info = Info("long")
    t.observe(info, SessionOpened(info.client, 0.0))  # opened long ago
    for i in range(200):
        other = Info(f"s{i}")
        t.observe(other, SessionOpened(other.client, 0.0))  # never closed either
    t.flush()
    size = path.stat().st_size
    found = look_back(path, window=size // 2)
    assert found.stopped_at == "window"
    assert found.bytes == size // 2
    ids = [s.id for s in found.sessions]
    assert "long" not in ids  # before the window: not closed (proxy.start says so)
    assert 50 < len(ids) < 150
    assert all(s.opened for s in found.sessions)


def test_a_clean_stop_needs_no_trace_and_an_empty_trail_is_clean(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    assert look_back(path).clean
    assert not look_back(path).records
    t = trail(path, signer=KEY, checkpoint_records=1000)
    t.start(previous_run(t.config))
    info = Info("x")
    t.observe(info, SessionOpened(info.client, 0.0))
    t.observe(info, Deletions("marked", (1,)))
    t.close()  # closes "x" (shutdown), then proxy.stop, then a checkpoint
    records = read(path)
    assert [r["event"] for r in records[-4:]] == [
        "message.delete.uncommitted", "session.close", "proxy.stop", "audit.checkpoint"]
    found = look_back(path)
    assert found.clean
    assert found.records
    assert found.stopped_at == "clean stop"
    assert found.sessions == []


def test_a_retrieve_start_is_dropped_when_its_completion_joins_the_batch(
    tmp_path: Path,
) -> None:
    """Written together, the start adds nothing: it is left out."""
    path = tmp_path / "audit.jsonl"
    t = trail(path)
    t._deferred = True  # as while write_behind runs: records wait in the batch
    info = Info("s")
    retr = parse_command(b"RETR 1")
    t.observe(info, SessionOpened(info.client, 0.0))
    t.observe(info, MessageStarted(retr, 1, 10))
    t.observe(info, MessageComplete(retr, 1, 10, "0" * 64, None, True))
    t.flush()
    t.observe(info, MessageStarted(retr, 1, 10))
    t.flush()  # written alone: it stays
    t.observe(info, MessageComplete(retr, 1, 10, "0" * 64, None, False))
    t.flush()
    assert [r["event"] for r in read(path)] == [
        "session.open", "message.retrieve", "message.retrieving", "message.retrieve"]


@pytest.mark.parametrize("size", [0, 1, 100])
def test_look_back_of_odd_files(tmp_path: Path, size: int) -> None:
    """A file of only a torn line, or of garbage, has no records and no sessions."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(os.urandom(size).replace(b"\n", b" "))
    found = look_back(path)
    assert found.sessions == []
    assert not found.records


async def test_a_worker_killed_leaves_its_trace_in_its_own_file(
    tmp_path: Path, demo_upstream: HostPort
) -> None:
    """With workers, the worker the supervisor restarts after ``kill -9``
    closes, in its own file, the session it had open."""
    text = (
        '[listen]\naddress = "127.0.0.1:0"\n'
        f'[upstream]\naddress = "{demo_upstream}"\n'
        "[server]\nworkers = 2\n"
        '[log]\nformat = "json"\nlevel = "debug"\n'
        # "always": each record is written before the next event is seen,
        # so the NOOP's log line says the DELE's mark is on file.
        f'[audit]\nsink = "file"\npath = "{tmp_path / "audit.jsonl"}"\nfsync = "always"\n'
    )
    async with running_popproxy(text, tmp_path) as proxy:
        with trio.fail_after(30):
            stream, reader = await login(proxy.port, "alice", DEMO_USERS["alice"])
            async with stream:
                assert (await ask(stream, reader, "DELE 2")).startswith(b"+OK")
                assert (await ask(stream, reader, "NOOP")).startswith(b"+OK")
                n = (await proxy.wait_for("auth", user="alice"))["worker"]
                await proxy.wait_for("command", verb="NOOP", worker=n)
                pid = proxy.worker_pids()[n]
                mark = len(proxy.records)
                os.kill(pid, signal.SIGKILL)
                # The supervisor starts another; it recovers its file first.
                await proxy.wait_for("worker.ready", worker=n, since=mark)
    written = read(tmp_path / f"audit.w{n}.jsonl")
    starts = [r for r in written if r["event"] == "proxy.start"]
    assert [(r["unclean"], r["worker"]) for r in starts] == [(False, n), (True, n)]
    recovered = [(r["event"], r.get("user"), r.get("msg"), r.get("reason"))
                 for r in written if r.get("recovered")]
    assert recovered == [("message.delete.uncommitted", "alice", 2, None),
                         ("session.close", "alice", None, "proxy crashed")]
    assert written[-1]["event"] == "proxy.stop"  # the restarted worker stopped cleanly


def test_look_back_of_a_fifo_or_device_reads_nothing(tmp_path: Path) -> None:
    """A trail path that is a FIFO (opening it would block) or /dev/null."""
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    assert look_back(fifo).records is False
    assert look_back(Path("/dev/null")).records is False
