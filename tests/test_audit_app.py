"""The audit trail as ``popproxy run`` runs it: writing behind, first among the observers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy import logs
from popproxy.app import run
from popproxy.config import HostPort, parse_config
from popproxy.events import SessionClosed
from popproxy.observe import SessionInfo


async def test_a_session_is_on_file_before_it_is_logged_closed(
    nursery: trio.Nursery, demo_upstream: HostPort, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the log line for a session's end is made, all its records are written."""
    path = tmp_path / "audit.jsonl"
    config = parse_config({
        "listen": {"address": "127.0.0.1:0"},
        "upstream": {"address": f"{demo_upstream.host}:{demo_upstream.port}"},
        "audit": {"sink": "file", "path": str(path)},
    })
    on_file: list[list[dict[str, Any]]] = []
    logged = trio.Event()

    def closed(info: SessionInfo, event: Any) -> None:  # stands in for the log line
        on_file.append([json.loads(line) for line in path.read_bytes().splitlines()])
        logged.set()

    monkeypatch.setitem(logs._HANDLERS, SessionClosed, closed)
    listeners = await nursery.start(run, config)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"USER alice\r\nPASS wonderland\r\nSTAT\r\nQUIT\r\n")
        received = b""
        while received.count(b"\r\n") < 5:  # greeting and four replies
            chunk = await stream.receive_some(4096)
            assert chunk, received
            received += chunk
        await logged.wait()
    (records,) = on_file
    assert [(r["event"], r.get("verb")) for r in records] == [
        ("proxy.start", None), ("session.open", None), ("command", "USER"),
        ("command", "PASS"), ("auth", None), ("command", "STAT"), ("command", "QUIT"),
        ("session.close", None)]
