"""``popproxy audit verify|search``: output, filters and exit status."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from popproxy.audit import AuditConfig, AuditTrail, ChainHead
from popproxy.audit.cli import add_parser, main
from popproxy.events import (
    AuthResult,
    Deletions,
    EndReason,
    MessageComplete,
    Outcome,
    Response,
    SessionClosed,
    SessionOpened,
    State,
    StateChanged,
)
from popproxy.pop3 import Command

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.t += timedelta(minutes=10)
        return self.t


class Info:
    def __init__(self, id: str, client: str) -> None:
        self.id = id
        self.client = client


class FileLike:
    name = "file"

    def __init__(self, path: Path) -> None:
        self.f = open(path, "ab")  # noqa: SIM115 - closed by close()

    def write(self, data: bytes) -> None:
        self.f.write(data)

    def sync(self) -> None:
        self.f.flush()

    def sync_soon(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def write_log(path: Path) -> None:
    """Two users' sessions, 13 records 10 minutes apart from 09:10 UTC: alice reads and
    deletes message 1, bob reads his."""
    trail = AuditTrail(AuditConfig(enabled=True), [FileLike(path)], head=ChainHead(),
                       now=Clock())
    for sid, user, client, mid in (("s-a", "alice", "192.0.2.7:4000", "<a1@example.org>"),
                                   ("s-b", "bob", "198.51.100.9:5000", "<b1@example.org>")):
        info = Info(sid, client)
        trail.observe(info, SessionOpened(client, 0.0))
        trail.observe(info, AuthResult("USER", user, True, None))
        retr = Command("RETR", ("1",))
        trail.observe(info, MessageComplete(retr, 1, 10, "00" * 32, mid, True))
        trail.observe(info, Response(retr, True, None, "", 20, False, 1.0, 1.25, Outcome.OK))
        if user == "alice":
            dele = Command("DELE", ("1",))
            trail.observe(info, Response(dele, True, None, "", 5, False, 2.0, 2.5, Outcome.OK))
            trail.observe(info, Deletions("marked", (1,)))
            trail.observe(info, StateChanged(State.TRANSACTION, State.UPDATE))
            trail.observe(info, Deletions("committed", (1,)))
        trail.observe(info, SessionClosed(EndReason.QUIT, 3.0, 10, 20, 3))
    trail.close()


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    return path


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def found(*argv: str) -> list[dict[str, Any]]:
    status, out, _ = run("search", *argv, "--json")
    assert status == 0
    return [json.loads(line) for line in out.splitlines()]


class TestVerify:
    def test_intact(self, log: Path) -> None:
        """An intact log: exit 0 and a summary."""
        assert run("verify", str(log)) == (
            0, "OK: 13 records, seq 1..13, in 1 file; the hash chain is intact\n", "")

    def test_broken_exit_1_names_record(self, log: Path, tmp_path: Path) -> None:
        """A tampered log: exit 1, the first broken record, and how much before it is intact."""
        lines = log.read_bytes().splitlines(keepends=True)
        lines[6] = lines[6].replace(b'"alice"', b'"alicf"')
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(b"".join(lines))
        status, out, _ = run("verify", str(bad))
        assert status == 1
        assert out == (f"BROKEN: {bad}:7: record seq 7: the hash does not match (edited)\n"
                       "(6 records before it are intact, seq 1..6)\n")

    def test_unreadable_file_exit_2(self, tmp_path: Path) -> None:
        """A missing file is not a verdict on the chain: exit 2."""
        status, _, err = run("verify", str(tmp_path / "nope.jsonl"))
        assert status == 2
        assert "nope.jsonl: No such file or directory" in err

    def test_empty_file_is_not_ok(self, tmp_path: Path) -> None:
        """Nothing to verify is not "intact"."""
        empty = tmp_path / "empty.jsonl"
        empty.write_bytes(b"")
        status, out, _ = run("verify", str(empty))
        assert status == 1
        assert "no chained audit records" in out

    def test_rotated_files_any_order_and_notes(self, log: Path, tmp_path: Path) -> None:
        """Several files in any order; a chain that starts later gets a note, --from-start fails."""
        lines = log.read_bytes().splitlines(keepends=True)
        parts = [tmp_path / "p1", tmp_path / "p2", tmp_path / "p3"]
        for p, chunk in zip(parts, (lines[:5], lines[5:10], lines[10:]), strict=True):
            p.write_bytes(b"".join(chunk))
        status, out, _ = run("verify", str(parts[2]), str(parts[0]), str(parts[1]))
        assert (status, out) == (0, "OK: 13 records, seq 1..13, in 3 files; "
                                    "the hash chain is intact\n")
        status, out, _ = run("verify", str(parts[1]), str(parts[2]))
        assert status == 0
        assert out.startswith(f"note: the chain starts at seq 6 ({parts[1]}:1)")
        assert run("verify", "--from-start", str(parts[1]), str(parts[2]))[0] == 1

    def test_process_exit_status(self, log: Path, tmp_path: Path) -> None:
        """``python -m popproxy.audit verify`` exits 0 when intact and 1 when broken."""
        ok = subprocess.run([sys.executable, "-m", "popproxy.audit", "verify", str(log)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (ok.returncode, ok.stdout.startswith("OK: ")) == (0, True)
        lines = log.read_bytes().splitlines(keepends=True)
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(b"".join(lines[:3] + lines[4:]))
        broken = subprocess.run([sys.executable, "-m", "popproxy.audit", "verify", str(bad)],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert broken.returncode == 1
        assert f"BROKEN: {bad}:4: record seq 5: follows seq 3" in broken.stdout


class TestSearch:
    def test_by_user(self, log: Path) -> None:
        """--user matches exactly or by shell pattern."""
        assert {r["user"] for r in found(str(log), "--user", "bob")} == {"bob"}
        assert {r["user"] for r in found(str(log), "--user", "a*")} == {"alice"}

    def test_by_event_prefix_and_pattern(self, log: Path) -> None:
        """--event takes a name, a dotted prefix or a pattern; repeatable."""
        assert [r["event"] for r in found(str(log), "--event", "message.delete")] == [
            "message.delete.marked", "message.delete.committed"]
        names = [r["event"] for r in found(str(log), "-e", "message.retrieve", "-e", "auth")]
        assert names == ["auth", "message.retrieve", "auth", "message.retrieve"]
        assert len(found(str(log), "--event", "session.*")) == 4

    def test_by_time_range(self, log: Path) -> None:
        """--since is inclusive, --until exclusive; a time without zone is UTC."""
        recs = found(str(log), "--since", "2026-11-27T10:00:00Z", "--until", "2026-11-27T10:30")
        assert [r["ts"] for r in recs] == ["2026-11-27T10:00:00.000000Z",
                                           "2026-11-27T10:10:00.000000Z",
                                           "2026-11-27T10:20:00.000000Z"]
        assert found(str(log), "--since", "2026-11-28") == []

    def test_by_message_id(self, log: Path) -> None:
        """--message-id with or without angle brackets."""
        recs = found(str(log), "--message-id", "a1@example.org")
        assert [(r["event"], r["user"]) for r in recs] == [
            ("message.retrieve", "alice"), ("message.delete.marked", "alice"),
            ("message.delete.committed", "alice")]
        assert found(str(log), "-m", "<a1@example.org>") == recs

    def test_by_session_and_client(self, log: Path) -> None:
        """--session and --client (an address or its start)."""
        assert {r["session"] for r in found(str(log), "--client", "198.51.100.9")} == {"s-b"}
        assert len(found(str(log), "--session", "s-a")) == 8

    def test_filters_combine(self, log: Path) -> None:
        """All the filters given must match."""
        assert found(str(log), "--user", "bob", "--event", "message.delete") == []

    def test_table(self, log: Path) -> None:
        """The table has a header, one row per record, details as key=value."""
        status, out, err = run("search", str(log), "--user", "alice", "--event", "command")
        assert status == 0
        rows = out.splitlines()
        assert rows[0].split() == ["TIME", "EVENT", "USER", "CLIENT", "SESSION", "DETAILS"]
        assert rows[1].split() == [
            "2026-11-27T09:40:00.000000Z", "command", "alice", "192.0.2.7:4000", "s-a",
            "verb=RETR", 'args=["1"]', "outcome=ok", "latency=0.25"]
        assert err == "(2 records)\n"

    def test_non_records_are_skipped_with_a_message(self, log: Path, tmp_path: Path) -> None:
        """Lines that are not records are reported on stderr, not fatal."""
        mixed = tmp_path / "mixed.jsonl"
        mixed.write_bytes(b"garbage\n" + log.read_bytes())
        status, out, err = run("search", str(mixed), "--json")
        assert status == 0
        assert len(out.splitlines()) == 13
        assert f"{mixed}:1: not an audit record, skipped" in err

    def test_bad_time_is_a_usage_error(self, log: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
        """A time that does not parse is rejected by argparse (exit 2)."""
        with pytest.raises(SystemExit) as exc:
            main(["search", str(log), "--since", "yesterday"])
        assert exc.value.code == 2
        assert "not a time: 'yesterday'" in capsys.readouterr().err


def test_add_parser_fits_the_popproxy_command_line() -> None:
    """``add_parser`` adds ``audit verify|search`` to a ``popproxy`` subparser set."""
    parser = argparse.ArgumentParser(prog="popproxy")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["audit", "verify", "a.jsonl", "b.jsonl"])
    assert (args.command, args.audit_command, args.files) == ("audit", "verify",
                                                              ["a.jsonl", "b.jsonl"])
