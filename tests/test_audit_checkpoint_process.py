"""Signed checkpoints in ``popproxy run`` as a process: killed, and stopped.

* ``kill -9`` mid-session: nothing closes the trail, yet it verifies with
  the key up to its last checkpoint, and verify reports the records after
  it as not signed yet; a restart continues the chain and its closing
  checkpoint signs them.
* Through the proxy against a real Dovecot, stopped by SIGTERM or SIGINT:
  the checkpoint written at shutdown covers every record of the session.

The tests wait for the proxy's own log lines (JSON, level debug):
``listening``, ``session.close`` (logged after the trail wrote the
session's records) and ``audit.checkpoint`` (logged once the checkpoint
is written), never for time to pass.
"""

from __future__ import annotations

import io
import json
import poplib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.audit._note import Signer
from popproxy.audit.cli import main as audit_main
from popproxy.config import HostPort
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox

KEY = Signer("proc-test/popproxy", bytes(range(7, 39)))


class Logs:
    """The proxy's JSON log lines, read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = b""
        self.seen: list[dict[str, Any]] = []

    async def wait_for(self, event: str, count: int = 1, **fields: Any) -> dict[str, Any]:
        """The ``count``-th line (since start) with this event and fields."""
        def matches() -> list[dict[str, Any]]:
            return [e for e in self.seen if e.get("event") == event
                    and all(e.get(k) == v for k, v in fields.items())]

        with trio.fail_after(20):
            while len(matches()) < count:
                chunk = await self.stream.receive_some(65536)
                assert chunk, f"popproxy ended before logging {event}: {self.seen[-5:]}"
                self.buf += chunk
                *lines, self.buf = self.buf.split(b"\n")
                for raw in lines:
                    try:
                        self.seen.append(json.loads(raw))
                    except ValueError:
                        self.seen.append({"text": raw.decode(errors="replace")})
        return matches()[count - 1]


def write_config(tmp_path: Path, upstream: HostPort, **audit: object) -> Path:
    key = tmp_path / "audit-signing.key"
    if not key.exists():
        key.write_text(KEY.private_text() + "\n")
        key.chmod(0o600)
    settings = {"sink": "file", "path": str(tmp_path / "audit.jsonl"), "sign_key": str(key),
                "checkpoint_path": str(tmp_path / "audit.checkpoints"),
                "origin": "proc-test/popproxy", **audit}
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    config = tmp_path / "popproxy.toml"
    config.write_text(
        '[listen]\naddress = "127.0.0.1:0"\n'
        f'[upstream]\naddress = "{upstream}"\n'
        '[log]\nformat = "json"\nlevel = "debug"\n'
        "[audit]\n" + "\n".join(lines) + "\n")
    return config


async def start(config: Path) -> tuple[trio.Process, Logs, int]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "popproxy", "run", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    logs = Logs(proc.stdout)
    listening = await logs.wait_for("listening")
    return proc, logs, int(listening["address"].rsplit(":", 1)[1])


def verify(tmp_path: Path) -> tuple[int, str]:
    out = io.StringIO()
    status = audit_main(["verify", "--key", str(KEY.verifier), "--checkpoints",
                         str(tmp_path / "audit.checkpoints"), str(tmp_path / "audit.jsonl")],
                        out, io.StringIO())
    return status, out.getvalue()


def records(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "audit.jsonl").read_bytes().splitlines()]


def login(port: int, user: str, password: str) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", port, timeout=20)
    p.user(user)
    p.pass_(password)
    return p


async def test_kill_9_mid_session_leaves_a_trail_signed_up_to_its_last_checkpoint(
    tmp_path: Path, demo_upstream: HostPort
) -> None:
    from popproxy.demo import DEMO_USERS

    user, password = next(iter(DEMO_USERS.items()))
    # A checkpoint by count in the first session, none after it: what
    # follows it before the kill (at most 12 records) stays under 20.
    config = write_config(tmp_path, demo_upstream, checkpoint_records=20,
                          checkpoint_interval="1h")
    proc, logs, port = await start(config)
    held: poplib.POP3 | None = None
    try:
        def first() -> None:  # 22 records: over checkpoint_records
            p = login(port, user, password)
            for _ in range(16):
                p.noop()
            p.quit()

        await trio.to_thread.run_sync(first)
        await logs.wait_for("session.close", 1)
        checkpoint = await logs.wait_for("audit.checkpoint", 1)
        # Its copy goes to checkpoint_path after the line, from a worker
        # thread: killed before it, the copy would be missing.
        await logs.wait_for("audit.checkpoint_copied", 1)

        def second() -> None:  # three records after the checkpoint
            p = poplib.POP3("127.0.0.1", port, timeout=20)
            p.quit()

        await trio.to_thread.run_sync(second)
        await logs.wait_for("session.close", 2)

        def third() -> poplib.POP3:  # left open: popproxy dies mid-session
            p = login(port, user, password)
            p.stat()
            return p

        held = await trio.to_thread.run_sync(third)
        proc.kill()  # SIGKILL: no close(), no closing checkpoint
        with trio.fail_after(20):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        if held is not None:
            held.close()

    written = records(tmp_path)
    cps = [r for r in written if r["event"] == "audit.checkpoint"]
    assert [r["seq"] for r in cps] == [checkpoint["seq"]]
    tail = written[-1]["seq"] - checkpoint["seq"]
    assert tail >= 3  # the second session at least
    status, out = verify(tmp_path)
    assert status == 0, out
    assert (f"signed up to seq {checkpoint['signed']} (checkpoint at "
            f"{tmp_path / 'audit.jsonl'}:{checkpoint['seq']}); {tail} records after it, "
            "not signed yet") in out
    assert "shipped: 1 of 1 checkpoints" in out

    # Restarted, the chain continues; the closing checkpoint signs all of it.
    proc, logs, port = await start(config)
    try:
        await trio.to_thread.run_sync(lambda: poplib.POP3("127.0.0.1", port, timeout=20).quit())
        await logs.wait_for("session.close")
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    status, out = verify(tmp_path)
    assert status == 0, out
    assert "0 records after it, not signed yet" in out


@pytest.mark.dovecot
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_the_checkpoint_at_shutdown_covers_the_session(
    tmp_path: Path, dovecot: Dovecot, mailbox: Mailbox, signum: int
) -> None:
    user, messages = mailbox
    config = write_config(tmp_path, HostPort(dovecot.host, dovecot.port))
    proc, logs, port = await start(config)
    try:
        def client() -> None:
            p = login(port, user, dovecot.users[user])
            p.uidl()
            for i in range(1, len(messages) + 1):
                p.retr(i)
            p.dele(1)
            p.quit()

        await trio.to_thread.run_sync(client)
        closed = await logs.wait_for("session.close")
        assert closed["reason"] == "quit"
        proc.send_signal(signum)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()

    written = records(tmp_path)
    last = written[-1]
    assert last["event"] == "audit.checkpoint"
    session_records = [r for r in written if r.get("user") == user]
    assert {r["event"] for r in session_records} >= {
        "auth", "command", "message.retrieve", "message.delete.committed", "session.close"}
    assert max(r["seq"] for r in written if r["event"] != "audit.checkpoint") == last["seq"] - 1
    status, out = verify(tmp_path)
    assert status == 0, out
    assert f"signed up to seq {last['seq'] - 1}" in out
    assert "0 records after it, not signed yet" in out
    copies = (tmp_path / "audit.checkpoints").read_bytes().splitlines()
    assert copies[-1] == (tmp_path / "audit.jsonl").read_bytes().splitlines()[-1]
