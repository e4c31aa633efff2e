"""``popproxy run`` as a child process, watched through its JSON log lines.

* ``running_popproxy(config_text, directory)``: an async context manager that
  writes the configuration, starts ``python -m popproxy run -c FILE``,
  reads its stdout (the supervisor's and every worker's log lines) into
  ``Popproxy.records`` as it comes, and yields once the proxy listens (the
  port and, when configured, the metrics address are taken from the log).
  On exit: SIGINT, then SIGKILL for the process and any worker it logged
  if they linger.
* ``Popproxy.wait_for(...)``: the first record (from a given index on) that
  matches, waiting for new lines up to a deadline, never by sleeping.
* ``pop3_session(port, user, password, commands)``: one POP3 session, every
  reply returned; bounded in time.
* ``scrape(address)``: ``/metrics`` as a dict of (sample name, labels) ->
  value; ``http_get(address, path)``: status and body.

Everything is on 127.0.0.1; the ports are the ones popproxy bound for
port 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "LineReader",
    "Popproxy",
    "Record",
    "http_get",
    "pid_gone",
    "pop3_session",
    "refused",
    "running_popproxy",
    "sample",
    "scrape",
]

Record = dict[str, Any]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


@dataclass
class Popproxy:
    process: trio.Process
    config: Path
    records: list[Record] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  # lines that are not JSON
    port: int = 0
    metrics: str = ""  # "host:port" of /metrics, when configured
    ended: bool = False  # its output ended (the process is exiting)
    _changed: trio.Event = field(default_factory=trio.Event)

    def _add(self, line: str) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            self.records.append(record)
        else:
            self.raw.append(line)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(
        self, event: str, *, since: int = 0, seconds: float = 20.0,
        where: Callable[[Record], bool] = lambda r: True, **fields: Any,
    ) -> Record:
        """The first record from index ``since`` with this ``event`` and
        ``fields`` (and ``where``), waiting up to ``seconds`` for it."""
        seen = since
        with trio.move_on_after(seconds):
            while True:
                for record in self.records[seen:]:
                    if (record.get("event") == event and where(record)
                            and all(record.get(k) == v for k, v in fields.items())):
                        return record
                seen = len(self.records)
                if self.ended:
                    break  # no more lines will come
                await self._changed.wait()
        raise AssertionError(
            f"no {event!r} {fields} within {seconds}s; the output was:\n{self.output()}")

    def matching(self, event: str, *, since: int = 0, **fields: Any) -> list[Record]:
        return [r for r in self.records[since:] if r.get("event") == event
                and all(r.get(k) == v for k, v in fields.items())]

    def worker_pids(self) -> dict[int, int]:
        """Worker number -> pid of its current process (from ``worker.started``)."""
        return {r["worker"]: r["pid"] for r in self.matching("worker.started")}

    def output(self, last: int = 80) -> str:
        lines = [json.dumps(r) for r in self.records] + self.raw
        return "\n".join(lines[-last:])


async def _read(proxy: Popproxy, stream: trio.abc.ReceiveStream) -> None:
    buf = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            proxy._add(line.decode(errors="replace"))
    if buf:
        proxy._add(buf.decode(errors="replace"))
    proxy.ended = True
    proxy._changed.set()


@contextlib.asynccontextmanager
async def running_popproxy(
    config_text: str, directory: Path, *, name: str = "popproxy.toml",
    wait_listening: bool = True,
) -> AsyncIterator[Popproxy]:
    """``popproxy run -c`` on ``config_text``; yields once it listens."""
    path = directory / name
    path.write_text(config_text)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "popproxy", "run", "-c", str(path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    proxy = Popproxy(process, path)
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            nursery.start_soon(_read, proxy, process.stdout)
            if wait_listening:
                listening = await proxy.wait_for("listening", seconds=START_TIMEOUT)
                proxy.port = int(listening["address"].rsplit(":", 1)[1])
                if "[metrics]" in config_text:
                    bound = await proxy.wait_for("metrics.listening", seconds=START_TIMEOUT)
                    proxy.metrics = bound["address"]
            try:
                yield proxy
            finally:
                with trio.CancelScope(shield=True):
                    await _stop(proxy)
    finally:
        if process.poll() is None:
            process.kill()


async def _stop(proxy: Popproxy) -> None:
    process = proxy.process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
    if process.poll() is None:
        process.kill()
        await process.wait()
    # Workers outlive a killed supervisor only until they notice (end of
    # file on their channel); do not leave any behind a failed test.
    for record in proxy.matching("worker.started"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if not pid_gone(record["pid"]):
                os.kill(record["pid"], signal.SIGKILL)


def pid_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in (b"Z", b"X")


class LineReader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(f"connection closed; got {self.buf!r}")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line


async def pop3_session(
    port: int, user: str, password: str, commands: Sequence[str] = ("STAT",),
) -> tuple[str, list[bytes]]:
    """Greeting, USER, PASS, ``commands`` (single-line replies), QUIT: the
    client's own address and every reply line (within 20 s)."""
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            host, local_port = stream.socket.getsockname()[:2]
            reader = LineReader(stream)
            replies = [await reader.line()]
            for command in [f"USER {user}", f"PASS {password}", *commands, "QUIT"]:
                await stream.send_all(command.encode() + b"\r\n")
                replies.append(await reader.line())
    return f"{host}:{local_port}", replies


def refused(port: int) -> bool:
    """True when nothing accepts on 127.0.0.1:``port`` (blocking, bounded)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False  # a listener closing while we connected: ask again


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


async def http_get(address: str, path: str) -> tuple[int, str]:
    return await trio.to_thread.run_sync(_get, f"http://{address}{path}")


async def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = await http_get(address, "/metrics")
    assert status == 200, text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def sample(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return values[name, tuple(sorted(labels.items()))]
