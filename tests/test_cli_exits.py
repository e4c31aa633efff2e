"""The command line's endings that are not popproxy's bugs (``popproxy.exits``).

* ``popproxy run`` with a listen or metrics address it cannot bind (in use,
  port 1 without the right to bind it, not an address of this host),
  single process and with workers: exit
  status 1 and one line on stderr naming the address and the reason.
* ``popproxy audit search|verify`` writing to a pipe whose reader has gone
  (``| head``): exit status 141, nothing on stderr about it, no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from popproxy.audit import AuditConfig, open_audit
from popproxy.events import EndReason, SessionClosed, SessionOpened
from popproxy.exits import CLOSED_PIPE

RUN_TIMEOUT = 60


@pytest.fixture
def taken() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def run_popproxy(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "popproxy.toml"
    config.write_text(text + '[log]\nformat = "json"\n')
    return subprocess.run([sys.executable, "-m", "popproxy", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("where", ["listen", "metrics"])
def test_an_address_in_use_ends_run_with_one_line(
    tmp_path: Path, taken: int, workers: int, where: str
) -> None:
    listen = f"127.0.0.1:{taken}" if where == "listen" else "127.0.0.1:0"
    text = (f'[listen]\naddress = "{listen}"\n[upstream]\naddress = "127.0.0.1:9"\n'
            f"[server]\nworkers = {workers}\n")
    if where == "metrics":
        text += f'[metrics]\naddress = "127.0.0.1:{taken}"\n'
    done = run_popproxy(tmp_path, text)
    assert done.returncode == 1, done.stderr
    what = "listen" if where == "listen" else "serve metrics"
    assert done.stderr.splitlines() == [
        f"popproxy: cannot {what} on 127.0.0.1:{taken}: Address already in use"]
    assert "Traceback" not in done.stdout


def test_a_privileged_port_without_the_right_ends_run_with_one_line(tmp_path: Path) -> None:
    """Port 1 without CAP_NET_BIND_SERVICE (dropped with setpriv, so this
    runs as root too): EACCES, named."""
    setpriv = shutil.which("setpriv")  # util-linux: on every Debian
    if setpriv is None:
        message = "setpriv (util-linux) is missing: the privileged-port case is NOT tested"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    config = tmp_path / "popproxy.toml"
    config.write_text('[listen]\naddress = "127.0.0.1:1"\n[upstream]\naddress = "127.0.0.1:9"\n')
    done = subprocess.run([setpriv, "--bounding-set", "-net_bind_service", sys.executable,
                           "-m", "popproxy", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "popproxy: cannot listen on 127.0.0.1:1: Permission denied"]


def test_an_address_this_host_lacks_ends_run_with_one_line(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): no host has it configured.
    done = run_popproxy(tmp_path, '[listen]\naddress = "192.0.2.1:1110"\n'
                                  '[upstream]\naddress = "127.0.0.1:9"\n')
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "popproxy: cannot listen on 192.0.2.1:1110: Cannot assign requested address"]


class Info:
    def __init__(self, sid: str) -> None:
        self.id = sid
        self.client = "192.0.2.9:5000"


@pytest.fixture(scope="module")
def big_trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trail of about 2 MiB: far more than a pipe holds."""
    path = tmp_path_factory.mktemp("pipe") / "audit.jsonl"
    trail = open_audit(AuditConfig(enabled=True, sink="file", path=path, fsync="never"))
    assert trail is not None
    for i in range(4000):
        info = Info(f"s{i:05d}")
        trail.observe(info, SessionOpened(info.client, 0.0))
        trail.observe(info, SessionClosed(EndReason.QUIT, 0.5, 10, 20, 1))
    trail.close()
    assert path.stat().st_size > 1 << 20
    return path


AUDIT_COMMANDS = [
    ["popproxy", "audit", "search", "--json"],
    ["popproxy", "audit", "search"],
    ["popproxy", "audit", "verify"],
    ["popproxy.audit", "search", "--json"],
    ["popproxy.audit", "verify"],
]


@pytest.mark.parametrize("command", AUDIT_COMMANDS, ids=" ".join)
def test_a_closed_pipe_ends_an_audit_command_quietly(big_trail: Path, command: list[str]) -> None:
    """Like ``... | true``: the reader is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", *command, str(big_trail)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=RUN_TIMEOUT)
    finally:
        os.close(write_end)
    assert done.returncode == CLOSED_PIPE, done.stderr
    assert "Traceback" not in done.stderr
    assert "BrokenPipe" not in done.stderr
    assert "Exception ignored" not in done.stderr


def test_search_piped_into_head_stops_quietly(big_trail: Path) -> None:
    """Like ``popproxy audit search --json FILE | head -n 3``."""
    proc = subprocess.Popen([sys.executable, "-m", "popproxy", "audit", "search", "--json",
                             str(big_trail)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    head = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()  # head has what it wants
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=RUN_TIMEOUT) == CLOSED_PIPE, err
    assert [json.loads(line)["event"] for line in head] == [
        "session.open", "session.close", "session.open"]
    assert err == ""
