"""``/readyz`` is 503 while the proxy refuses every new session, and says why.

* ``popproxy run`` as a process (one process, and two workers) with
  ``fail_closed = true`` and an audit file that cannot be written (a
  symbolic link to ``/dev/full``: every write fails with ENOSPC, also for
  root): ``/readyz`` 503 "refusing new sessions: audit trail unavailable",
  a client is refused; the link pointed at a real file, the trail writes
  what it held (``audit.sink_recovered``, without any session coming) and
  ``/readyz`` is 200 again, and a client is served.
* ``Health.ready`` with ``limits.max_sessions`` sessions open: 503.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.config import Config, HostPort, LimitsConfig
from popproxy.demo import DEMO_USERS
from popproxy.health import Health
from tests.popproxy_process import Popproxy, http_get, pop3_session, running_popproxy


def audit_files(tmp_path: Path, workers: int) -> list[Path]:
    if workers == 1:
        return [tmp_path / "audit.jsonl"]
    return [tmp_path / f"audit.w{n}.jsonl" for n in range(1, workers + 1)]


async def all_listening(proxy: Popproxy, workers: int) -> None:
    if workers > 1:
        for n in range(1, workers + 1):  # what /readyz asks the supervisor about
            await proxy.wait_for("worker.ready", worker=n)


@pytest.mark.parametrize("workers", [1, 2])
async def test_readyz_fails_while_fail_closed_refuses_and_recovers(
    tmp_path: Path, demo_upstream: HostPort, workers: int
) -> None:
    files = audit_files(tmp_path, workers)
    for f in files:
        f.symlink_to("/dev/full")
    text = (
        '[listen]\naddress = "127.0.0.1:0"\n'
        f'[upstream]\naddress = "{demo_upstream}"\n'
        '[metrics]\naddress = "127.0.0.1:0"\n'
        f"[server]\nworkers = {workers}\n"
        '[log]\nformat = "json"\n'
        f'[audit]\nsink = "file"\npath = "{tmp_path / "audit.jsonl"}"\nfail_closed = true\n'
    )
    user, password = "alice", DEMO_USERS["alice"]
    async with running_popproxy(text, tmp_path) as proxy:
        await all_listening(proxy, workers)
        status, body = await http_get(proxy.metrics, "/readyz")
        assert status == 503, body
        assert "refusing new sessions: audit trail unavailable" in body
        if workers > 1:
            assert body.startswith("worker ")
        with trio.fail_after(20):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            async with stream:
                greeting = await stream.receive_some(4096)
        assert greeting.startswith(b"-ERR [SYS/TEMP] audit trail unavailable"), greeting

        since = len(proxy.records)
        for f in files:
            f.unlink()
            f.touch()  # writable now: the queued records go there
        for n in range(1, workers + 1):
            # The trail tries again by itself, with no session to prompt it.
            def of_worker(record: dict[str, Any], n: int = n) -> bool:
                return workers == 1 or record.get("worker") == n

            await proxy.wait_for("audit.sink_recovered", since=since, where=of_worker)
        status, body = await http_get(proxy.metrics, "/readyz")
        assert (status, body.strip()) == (200, "ready")
        _, replies = await pop3_session(proxy.port, user, password)
        assert all(r.startswith(b"+OK") for r in replies), replies
        await proxy.wait_for("session.close", user=user)
    written = [json.loads(line) for f in files for line in f.read_bytes().splitlines()]
    events = [r["event"] for r in written]
    # Held while the file failed, then written: the start, the refused
    # session, the served one, the stop.
    assert events.count("proxy.start") == workers
    assert events.count("proxy.stop") == workers
    # (with workers, in whichever files the two sessions went to)
    assert sorted(r["reason"] for r in written if r["event"] == "session.close") == [
        "quit", "refused"]


@dataclass
class FakeProxy:
    config: Config = field(default_factory=lambda: Config(limits=LimitsConfig(max_sessions=2)))
    listening: bool = True
    pools: None = None
    active: int = 0
    refusals: list[object] = field(default_factory=list)


def test_readyz_fails_at_max_sessions_and_names_a_refusal() -> None:
    proxy = FakeProxy()
    health = Health(proxy, probe=lambda host, port, timeout: None)
    assert health.ready() == (True, "ready")
    proxy.active = 2
    assert health.ready() == (
        False, "refusing new sessions: 2 open, limits.max_sessions is 2")
    proxy.active = 1
    reason: list[str | None] = ["audit trail unavailable"]
    proxy.refusals.append(lambda: reason[0])
    assert health.ready() == (False, "refusing new sessions: audit trail unavailable")
    reason[0] = None
    assert health.ready() == (True, "ready")
    proxy.listening = False  # draining
    assert health.ready() == (False, "not listening")
