"""The installed entry points as processes: ``popproxy run`` and ``popproxy demo``."""

from __future__ import annotations

import json
import os
import poplib
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox


async def read_line_matching(stream: trio.abc.ReceiveStream, pattern: str) -> re.Match[str]:
    buf = ""
    with trio.fail_after(20):
        while True:
            chunk = await stream.receive_some(4096)
            assert chunk, f"process ended before printing {pattern!r}:\n{buf}"
            buf += chunk.decode()
            for line in buf.splitlines():
                if m := re.search(pattern, line):
                    return m


async def stop(proc: trio.Process, signum: int) -> int:
    proc.send_signal(signum)
    with trio.fail_after(20):
        return await proc.wait()


@pytest.mark.dovecot
async def test_run_serves_dovecot_and_drains_on_sigterm(
    tmp_path: Path, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, messages = mailbox
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[listen]\naddress = "127.0.0.1:0"\n'
        f'[upstream]\naddress = "{dovecot.host}:{dovecot.port}"\n'
        f'[log]\nformat = "json"\n'
        '[[policy.rules]]\nname = "ro"\naction = "deny"\nmatch = { commands = ["DELE"] }\n'
        'message = "read-only"\n'
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "popproxy", "run", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        m = await read_line_matching(proc.stdout, r'^\{.*"event": ?"listening".*\}$')
        port = int(json.loads(m.group(0))["address"].rsplit(":", 1)[1])

        def client(verb: str) -> tuple[int, bytes]:
            p = poplib.POP3("127.0.0.1", port, timeout=20)
            p.user(user)
            p.pass_(dovecot.users[user])
            count = p.stat()[0]
            try:
                reply = p.dele(1) if verb == "DELE" else p.noop()
            except poplib.error_proto as exc:
                reply = exc.args[0]
            p.rset()
            p.quit()
            return int(count), reply

        # The policy in the file applies to `popproxy run`.
        count, reply = await trio.to_thread.run_sync(client, "DELE")
        assert count == len(messages)
        assert reply == b"-ERR [SYS/PERM] read-only"
        # SIGHUP reloads the file: the rule is gone.
        config.write_text(config.read_text().split("[[policy.rules]]")[0])
        proc.send_signal(signal.SIGHUP)
        await read_line_matching(proc.stdout, r'"event": ?"config.reloaded"')
        assert (await trio.to_thread.run_sync(client, "DELE"))[1].startswith(b"+OK")
        assert await stop(proc, signal.SIGTERM) == 0
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_demo_prints_how_to_try_it_and_works() -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "popproxy", "demo", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        m = await read_line_matching(proc.stdout, r"curl -s pop3://(\w+):(\w+)@127\.0\.0\.1:(\d+)/")
        user, password, port = m.group(1), m.group(2), int(m.group(3))

        def client() -> bytes:
            p = poplib.POP3("127.0.0.1", port, timeout=20)
            p.user(user)
            p.pass_(password)
            lines = p.retr(1)[1]
            p.quit()
            return b"\r\n".join(lines)

        assert b"Subject:" in await trio.to_thread.run_sync(client)
        assert await stop(proc, signal.SIGINT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
