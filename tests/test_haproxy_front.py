"""``deploy/haproxy/haproxy.cfg`` as shipped, with Debian's haproxy in front
of two ``popproxy run`` processes (two workers each) and a real Dovecot.

The file takes its addresses from the environment (``presetenv`` defaults
for production): the test points them at the two popproxy processes,
which listen on ports they bound for port 0, and at a free port for the
front (found by binding 0 first: haproxy needs a number).  Checked:

* ``haproxy -c`` accepts the file as shipped and as the test sets it up;
* clients through HAProxy reach both popproxy instances, and each session
  is opened for the client's own address (PROXY v2), via HAProxy's;
* one instance drains (SIGTERM): its ``/readyz`` fails, and every new
  client is still served, by the other.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.clients import require_program
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import MailboxFactory
from tests.popproxy_process import Popproxy, http_get, pop3_session, running_popproxy

pytestmark = pytest.mark.dovecot

REPO = Path(__file__).resolve().parent.parent
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY_START_TIMEOUT = 10.0


@pytest.fixture
def haproxy_binary() -> str:
    """Path of haproxy (apt-get installs it as root); skips loudly, fails on CI."""
    return require_program("haproxy", "haproxy")


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (for haproxy's bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def popproxy_config(dovecot: Dovecot) -> str:
    return (
        '[listen]\naddress = "127.0.0.1:0"\nproxy_protocol = true\n'
        'trusted_proxies = ["127.0.0.0/8"]\n'
        f'[upstream]\naddress = "{dovecot.host}:{dovecot.port}"\n'
        '[metrics]\naddress = "127.0.0.1:0"\n'
        '[log]\nformat = "json"\n'
        "[server]\nworkers = 2\n"
    )


async def haproxy_check(binary: str, env: dict[str, str]) -> None:
    with trio.fail_after(HAPROXY_START_TIMEOUT):
        done = await trio.run_process(
            [binary, "-c", "-f", str(HAPROXY_CFG)], env=env, stdin=subprocess.DEVNULL,
            capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")


@contextlib.asynccontextmanager
async def running_haproxy(
    binary: str, env: dict[str, str], log: Path
) -> AsyncIterator[trio.Process]:
    await haproxy_check(binary, env)
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [binary, "-f", str(HAPROXY_CFG), "-db"], env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(5):
                await process.wait()
            if process.poll() is None:
                process.kill()
                await process.wait()


async def test_the_shipped_file_is_valid(haproxy_binary: str) -> None:
    await haproxy_check(haproxy_binary, dict(os.environ))


async def front_session(haproxy: trio.Process, front: int, dovecot: Dovecot, i: int) -> str:
    """One session through HAProxy; the client's address.  HAProxy may not
    listen yet right after it started, or have no server up yet: retried
    (bounded) while refused or closed at once."""
    user = ("alice", "bob", "carol")[i % 3]
    with trio.fail_after(HAPROXY_START_TIMEOUT):
        while True:
            assert haproxy.poll() is None, f"haproxy exited with {haproxy.returncode}"
            try:
                client, replies = await pop3_session(front, user, dovecot.users[user])
            except EOFError:
                # Accepted and closed at once: HAProxy had no server up yet
                # (its first health checks still running on a loaded host).
                await trio.sleep(0.05)
                continue
            except OSError as exc:
                if not refused(exc):
                    raise
                await trio.sleep(0.05)
                continue
            assert replies[0].startswith(b"+OK"), replies
            assert replies[3].startswith(b"+OK "), replies
            return client


def refused(exc: BaseException) -> bool:
    """A refused connection, as such or as the cause trio's open_tcp_stream gives."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return all(isinstance(e, ConnectionRefusedError) for e in cause.exceptions)
    return isinstance(exc, ConnectionRefusedError)


def served_by(instances: list[Popproxy], client: str) -> int:
    for n, proxy in enumerate(instances):
        if proxy.matching("session.open", client=client):
            return n
    return -1


async def which_served(instances: list[Popproxy], client: str) -> int:
    """The instance that logged a session for ``client`` (its log lines are
    read as they come: polled for a few seconds)."""
    with trio.fail_after(10):
        while True:
            n = served_by(instances, client)
            if n >= 0:
                return n
            await trio.sleep(0.02)


async def test_haproxy_spreads_clients_over_two_instances_and_skips_a_draining_one(
    tmp_path: Path, haproxy_binary: str, dovecot: Dovecot, fresh_mailbox: MailboxFactory,
) -> None:
    for user in ("alice", "bob", "carol"):
        fresh_mailbox(user)
    front = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_popproxy(popproxy_config(dovecot), tmp_path / "a") as a, \
            running_popproxy(popproxy_config(dovecot), tmp_path / "b") as b:
        instances = [a, b]
        for proxy in instances:
            for n in (1, 2):
                await proxy.wait_for("listening", worker=n)
        env = {**os.environ, "POP3_LISTEN": f"127.0.0.1:{front}"}
        for n, proxy in enumerate(instances, 1):
            env[f"POPPROXY_{n}"] = f"127.0.0.1:{proxy.port}"
            env[f"POPPROXY_{n}_METRICS_PORT"] = proxy.metrics.rsplit(":", 1)[1]
        log = tmp_path / "haproxy.log"
        async with running_haproxy(haproxy_binary, env, log) as haproxy:
            clients: list[str] = []
            served: set[int] = set()
            for i in range(40):
                client = await front_session(haproxy, front, dovecot, i)
                clients.append(client)
                served.add(await which_served(instances, client))
                if served == {0, 1}:
                    break
            # Both instances served, each seeing the client's own address,
            # via HAProxy's (another port on this host).
            assert served == {0, 1}
            for client in clients:
                proxy = instances[served_by(instances, client)]
                (opened,) = proxy.matching("session.open", client=client)
                assert opened["via"].startswith("127.0.0.1:")
                assert opened["via"] != client

            # Instance a drains and exits: HAProxy sends every new client to b.
            a.process.send_signal(signal.SIGTERM)
            assert await a.process.wait() == 0
            assert await pop3_refused(a.port)
            mark = len(b.records)
            for i in range(10):
                client = await front_session(haproxy, front, dovecot, i)
                await b.wait_for("session.close", client=client, since=mark)
            assert (await http_get(b.metrics, "/readyz"))[0] == 200
    text = log.read_text()
    assert "popproxy/popproxy1" in text
    assert "popproxy/popproxy2" in text


async def pop3_refused(port: int) -> bool:
    def attempt() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return False
        except ConnectionRefusedError:
            return True

    return await trio.to_thread.run_sync(attempt)
