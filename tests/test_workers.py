"""``popproxy run`` with ``[server] workers = 2``: real processes, real Dovecot.

The supervisor binds port 0 on 127.0.0.1; the tests learn the port, the
metrics address, the workers' numbers and pids, and what each worker did
from the JSON log lines every process writes to the one stdout (each line
of a worker carries ``worker`` and ``pid``).  Every wait is for a log line,
an answer or an exit, with a deadline; no test sleeps to let time pass.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from popproxy.workers import Supervised, read_config, supervise
from tests.clients import ensure_program, unavailable
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import MailboxFactory
from tests.popproxy_process import (
    LineReader,
    Popproxy,
    http_get,
    pid_gone,
    pop3_session,
    refused,
    running_popproxy,
    sample,
    scrape,
)
from tests.redis_server import RedisServer

pytestmark = pytest.mark.dovecot

USERS = ("alice", "bob", "carol")
NOOP_DENIED = ('[[policy.rules]]\nname = "no-noop"\naction = "deny"\n'
               'match = { commands = ["NOOP"] }\nmessage = "not today"\n')


def config_text(dovecot: Dovecot, extra: str = "", workers: int | str = 2) -> str:
    return (
        '[listen]\naddress = "127.0.0.1:0"\n'
        f'[upstream]\naddress = "{dovecot.host}:{dovecot.port}"\n'
        '[metrics]\naddress = "127.0.0.1:0"\n'
        '[log]\nformat = "json"\n'
        f"[server]\nworkers = {workers if isinstance(workers, int) else repr(workers)}\n"
        + extra
    )


@pytest.fixture
def mailboxes(fresh_mailbox: MailboxFactory) -> None:
    """alice, bob and carol with the sample messages."""
    for user in USERS:
        fresh_mailbox(user)


@pytest.fixture
async def proxy(tmp_path: Path, dovecot: Dovecot, mailboxes: None) -> AsyncIterator[Popproxy]:
    async with running_popproxy(config_text(dovecot), tmp_path) as running:
        await both_workers_listening(running)
        yield running


async def both_workers_listening(running: Popproxy) -> dict[int, int]:
    """Worker number -> pid, once both workers accept and the supervisor
    knows it (``worker.ready``: it asks, and passes SIGHUP, only then)."""
    for n in (1, 2):
        await running.wait_for("listening", worker=n)
        await running.wait_for("worker.ready", worker=n)
    pids = running.worker_pids()
    assert sorted(pids) == [1, 2]
    assert len(set(pids.values())) == 2
    return pids


async def session(running: Popproxy, dovecot: Dovecot, i: int,
                  commands: tuple[str, ...] = ("STAT",)) -> tuple[str, list[bytes]]:
    user = USERS[i % len(USERS)]
    return await pop3_session(running.port, user, dovecot.users[user], commands)


async def scrape_until(
    running: Popproxy, name: str, at_least: float, **labels: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` once ``name`` has reached ``at_least`` (a session is
    logged just before it is counted), polled for up to 20 s."""
    with trio.fail_after(20):
        while True:
            values = await scrape(running.metrics)
            if sample(values, name, **labels) >= at_least:
                return values
            await trio.sleep(0.05)


async def sessions_until_both_served(
    running: Popproxy, dovecot: Dovecot, commands: tuple[str, ...] = ("STAT",),
    limit: int = 200,
) -> list[tuple[str, list[bytes], int]]:
    """Sessions one after another until both workers served one: (client,
    replies, pid of the worker that served it)."""
    done = []
    for i in range(limit):
        client, replies = await session(running, dovecot, i, commands)
        closed = await running.wait_for("session.close", client=client)
        done.append((client, replies, closed["pid"]))
        if len({pid for _, _, pid in done}) == 2:
            return done
    raise AssertionError(f"{limit} sessions were all served by one worker")


async def test_two_workers_serve_500_sessions_and_metrics_add_up(
    proxy: Popproxy, dovecot: Dovecot
) -> None:
    pids = proxy.worker_pids()
    results: list[list[bytes]] = []

    async def client(first: int) -> None:
        for i in range(first, 500, 20):
            results.append((await session(proxy, dovecot, i))[1])

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for first in range(20):
                nursery.start_soon(client, first)
    assert len(results) == 500
    assert all(r[0].startswith(b"+OK") and r[3].startswith(b"+OK ") and r[4].startswith(b"+OK")
               for r in results), [r for r in results if not r[3].startswith(b"+OK")][:3]

    # Every session was served by one of the two workers, and both served.
    await proxy.wait_for("session.close", where=lambda r: len(
        proxy.matching("session.close")) >= 500)
    closed = proxy.matching("session.close")
    assert len(closed) == 500
    served = {r["pid"] for r in closed}
    assert served == set(pids.values())
    assert {r["worker"] for r in closed} == {1, 2}

    # One /metrics for both: the totals are the sessions made.
    values = await scrape_until(proxy, "popproxy_sessions_total", 500, outcome="ok")
    assert sample(values, "popproxy_sessions_total", outcome="ok") == 500
    assert sum(v for (name, _), v in values.items() if name == "popproxy_sessions_total") == 500
    assert sample(values, "popproxy_commands_total", command="STAT", outcome="ok") == 500
    assert sample(values, "popproxy_auth_total", mechanism="USER", outcome="ok") == 500
    assert sample(values, "popproxy_session_duration_seconds_count") == 500
    assert sample(values, "popproxy_sessions_active") == 0
    assert sample(values, "popproxy_upstream_up", upstream="default",
                  address=f"{dovecot.host}:{dovecot.port}") == 1
    for n in ("1", "2"):
        assert sample(values, "popproxy_worker_up", worker=n) == 1
        assert sample(values, "popproxy_worker_restarts_total", worker=n) == 0
    assert sample(values, "popproxy_build_info",
                  version=__import__("popproxy").__version__) == 1
    assert await http_get(proxy.metrics, "/healthz") == (200, "ok\n")
    assert await http_get(proxy.metrics, "/readyz") == (200, "ready\n")


@pytest.fixture(scope="session")
def promtool() -> str:
    reason = ensure_program("promtool", "prometheus")
    if reason is not None:
        unavailable(reason)
    return "promtool"


async def test_the_merged_exposition_passes_promtool(
    proxy: Popproxy, dovecot: Dovecot, promtool: str
) -> None:
    """The merged view is well-formed: promtool's linter on the text format
    (as on a single process's, in test_prometheus), and client_python's
    strict parser on OpenMetrics (which promtool does not read)."""
    await sessions_until_both_served(proxy, dovecot)
    text = await trio.to_thread.run_sync(get_metrics, proxy.metrics, "text/plain")
    done = await trio.run_process([promtool, "check", "metrics"], stdin=text,
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert (done.stdout + done.stderr) == b""
    om = await trio.to_thread.run_sync(
        get_metrics, proxy.metrics, "application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in openmetrics_families(om.decode())}  # type: ignore[no-untyped-call]
    assert families["popproxy_build"].type == "info"
    assert families["popproxy_session_duration_seconds"].type == "histogram"


def get_metrics(address: str, accept: str) -> bytes:
    request = urllib.request.Request(f"http://{address}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


async def test_sighup_reaches_both_and_a_bad_file_is_rejected_once(
    proxy: Popproxy, dovecot: Dovecot
) -> None:
    good = proxy.config.read_text()
    proxy.config.write_text(good + NOOP_DENIED)
    mark = len(proxy.records)
    proxy.process.send_signal(signal.SIGHUP)
    await proxy.wait_for("config.passed_on", since=mark, workers=2)
    for n in (1, 2):
        await proxy.wait_for("config.reloaded", since=mark, worker=n, rules=1)
    # Both workers apply the new rule.
    served = await sessions_until_both_served(proxy, dovecot, commands=("NOOP",))
    assert all(replies[3] == b"-ERR [SYS/PERM] not today" for _, replies, _ in served)

    # A bad file: rejected once, by the supervisor; no worker hears of it.
    proxy.config.write_text(good + "[limits]\nidle_timeout = \"soon\"\n")
    bad_mark = len(proxy.records)
    proxy.process.send_signal(signal.SIGHUP)
    failed = await proxy.wait_for("config.reload_failed", since=bad_mark)
    assert "limits.idle_timeout" in failed["error"]
    assert "worker" not in failed
    # The old configuration is kept in both workers.
    served = await sessions_until_both_served(proxy, dovecot, commands=("NOOP",))
    assert all(replies[3] == b"-ERR [SYS/PERM] not today" for _, replies, _ in served)

    # A good file again: passed on, and the rule is gone.
    proxy.config.write_text(good)
    last_mark = len(proxy.records)
    proxy.process.send_signal(signal.SIGHUP)
    await proxy.wait_for("config.passed_on", since=last_mark, workers=2)
    for n in (1, 2):
        await proxy.wait_for("config.reloaded", since=last_mark, worker=n, rules=0)
    served = await sessions_until_both_served(proxy, dovecot, commands=("NOOP",))
    assert all(replies[3].startswith(b"+OK") for _, replies, _ in served)

    assert len(proxy.matching("config.reload_failed")) == 1
    assert len(proxy.matching("config.reloaded", since=bad_mark)) == 2  # the last good one
    values = await scrape(proxy.metrics)
    assert sample(values, "popproxy_config_reload_total", outcome="ok") == 2
    assert sample(values, "popproxy_config_reload_total", outcome="fail") == 1
    assert sample(values, "popproxy_config_last_reload_successful") == 1


async def test_sighup_while_the_workers_start_reaches_each_once(
    tmp_path: Path, dovecot: Dovecot, mailboxes: None
) -> None:
    """A worker takes SIGHUP only once it serves (before that, the signal's
    default action would end it): the supervisor holds it back until then."""
    async with running_popproxy(config_text(dovecot), tmp_path,
                                wait_listening=False) as running:
        for n in (1, 2):
            await running.wait_for("worker.started", worker=n)
        running.process.send_signal(signal.SIGHUP)
        passed = await running.wait_for("config.passed_on")
        assert passed["workers"] + passed["starting"] == 2
        for n in (1, 2):
            await running.wait_for("listening", worker=n)
            await running.wait_for("config.reloaded", worker=n)
        for n in (1, 2):
            assert len(running.matching("config.reloaded", worker=n)) == 1
        assert running.matching("worker.exited") == []


async def test_a_worker_restarted_after_a_rejected_reload_runs_the_last_good_one(
    proxy: Popproxy, dovecot: Dovecot
) -> None:
    good = proxy.config.read_text()
    proxy.config.write_text(good + NOOP_DENIED + "[limits]\nidle_timeout = 0\n")
    mark = len(proxy.records)
    proxy.process.send_signal(signal.SIGHUP)
    await proxy.wait_for("config.reload_failed", since=mark)
    os.kill(proxy.worker_pids()[2], signal.SIGKILL)
    started = await proxy.wait_for("worker.started", since=mark, worker=2)
    await proxy.wait_for("listening", since=mark, pid=started["pid"])
    served = await sessions_until_both_served(proxy, dovecot, commands=("NOOP",))
    assert all(replies[3].startswith(b"+OK") for _, replies, _ in served)
    assert proxy.matching("worker.start_failed", since=mark) == []


async def test_sigterm_drains_both_workers(proxy: Popproxy, dovecot: Dovecot) -> None:
    pids = set(proxy.worker_pids().values())
    opened: list[tuple[trio.SocketStream, LineReader, int]] = []
    clients: set[str] = set()

    async def open_one(i: int) -> int:
        user = USERS[i % len(USERS)]
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        host, port = stream.socket.getsockname()[:2]
        reader = LineReader(stream)
        assert (await reader.line()).startswith(b"+OK")
        for line in (f"USER {user}", f"PASS {dovecot.users[user]}"):
            await stream.send_all(line.encode() + b"\r\n")
            assert (await reader.line()).startswith(b"+OK")
        clients.add(f"{host}:{port}")
        record = await proxy.wait_for("session.open", client=f"{host}:{port}")
        opened.append((stream, reader, record["pid"]))
        return int(record["pid"])

    try:
        with trio.fail_after(60):
            for i in range(24):  # 8 a user: under the per-worker cap of 10
                await open_one(i)
                if {pid for _, _, pid in opened} == pids:
                    break
            assert {pid for _, _, pid in opened} == pids, "one worker took every session"

            mark = len(proxy.records)
            proxy.process.send_signal(signal.SIGTERM)
            for n in (1, 2):
                await proxy.wait_for("shutdown.drain", since=mark, worker=n)
            # Nobody accepts any more (the supervisor closed its copies too;
            # a worker closes its own as it starts draining).
            while True:
                if await trio.to_thread.run_sync(refused, proxy.port):
                    break
                await trio.sleep(0.05)
            # The sessions in progress finish; the supervisor waits for them.
            for stream, reader, _ in opened:
                assert proxy.process.poll() is None
                await stream.send_all(b"STAT\r\n")
                assert (await reader.line()).startswith(b"+OK ")
                await stream.send_all(b"QUIT\r\n")
                assert (await reader.line()).startswith(b"+OK")
                await stream.aclose()
            assert await proxy.process.wait() == 0
    finally:
        for stream, _, _ in opened:
            await stream.aclose()
    exited = proxy.matching("worker.exited", since=mark)
    assert sorted((r["worker"], r["status"]) for r in exited) == [
        (1, "exit status 0"), (2, "exit status 0")]
    closes = [r for r in proxy.matching("session.close", since=mark) if r["client"] in clients]
    assert len(closes) == len(opened)
    assert all(r["reason"] == "quit" for r in closes)
    assert proxy.matching("shutdown.done")[-1].get("worker") is None  # the supervisor, last


async def test_kill_9_of_one_worker_is_followed_by_a_restart(
    proxy: Popproxy, dovecot: Dovecot
) -> None:
    for i in range(10):
        assert (await session(proxy, dovecot, i))[1][3].startswith(b"+OK")
    await scrape_until(proxy, "popproxy_sessions_total", 10, outcome="ok")
    victim = proxy.worker_pids()[1]
    mark = len(proxy.records)
    os.kill(victim, signal.SIGKILL)
    exited = await proxy.wait_for("worker.exited", since=mark, worker=1)
    assert exited["status"] == "killed by SIGKILL"
    assert exited["pid"] == victim
    # The other keeps serving while worker 1 is away.
    for i in range(20):
        assert (await session(proxy, dovecot, i))[1][3].startswith(b"+OK")
    restart = await proxy.wait_for("worker.restart", since=mark, worker=1)
    assert restart["delay"] > 0
    started = await proxy.wait_for("worker.started", since=mark, worker=1)
    assert started["pid"] != victim
    await proxy.wait_for("worker.ready", since=mark, worker=1, pid=started["pid"])
    # The new worker 1 serves too.
    await sessions_until_both_served(proxy, dovecot)

    # What the killed worker had counted (scraped before it died) is still
    # in the totals: nothing went down, nothing is counted twice.
    made = 10 + len(proxy.matching("session.close", since=mark))
    values = await scrape_until(proxy, "popproxy_sessions_total", made, outcome="ok")
    assert sample(values, "popproxy_sessions_total", outcome="ok") == made
    assert sample(values, "popproxy_worker_restarts_total", worker="1") == 1
    assert sample(values, "popproxy_worker_restarts_total", worker="2") == 0
    assert sample(values, "popproxy_worker_up", worker="1") == 1
    assert await http_get(proxy.metrics, "/healthz") == (200, "ok\n")


async def test_a_stuck_worker_fails_healthz_and_readyz(proxy: Popproxy) -> None:
    stuck = proxy.worker_pids()[2]
    os.kill(stuck, signal.SIGSTOP)
    try:
        status, body = await http_get(proxy.metrics, "/healthz")
        assert (status, body) == (503, f"worker 2 (pid {stuck}) does not answer\n")
        status, body = await http_get(proxy.metrics, "/readyz")
        assert status == 503
        # /metrics still answers, with worker 2's last known values.
        assert sample(await scrape(proxy.metrics), "popproxy_worker_up", worker="2") == 1
    finally:
        os.kill(stuck, signal.SIGCONT)
    with trio.fail_after(20):
        while True:
            if (await http_get(proxy.metrics, "/healthz"))[0] == 200:
                break
            await trio.sleep(0.05)


async def test_workers_drain_when_the_supervisor_is_killed(
    proxy: Popproxy, dovecot: Dovecot
) -> None:
    pids = proxy.worker_pids()
    proxy.process.kill()
    for n in (1, 2):
        await proxy.wait_for("worker.orphaned", worker=n)
    with trio.fail_after(20):
        while True:
            if all(pid_gone(pid) for pid in pids.values()):
                break
            await trio.sleep(0.05)
    assert await trio.to_thread.run_sync(refused, proxy.port)


async def test_each_worker_writes_its_own_audit_chain(
    tmp_path: Path, dovecot: Dovecot, mailboxes: None
) -> None:
    audit = tmp_path / "audit.jsonl"
    extra = f'[audit]\nsink = "file"\npath = "{audit}"\nfsync = "never"\n'
    async with running_popproxy(config_text(dovecot, extra), tmp_path) as running:
        await both_workers_listening(running)
        served = await sessions_until_both_served(running, dovecot)
    files = sorted(n for n in os.listdir(tmp_path) if n.startswith("audit"))
    assert files == ["audit.w1.jsonl", "audit.w2.jsonl"]
    # Each file is a chain of its own: verify checks them one by one.
    for name in files:
        done = await audit_verify(tmp_path / name)
        assert done.returncode == 0, (done.stdout + done.stderr).decode()
    # Each session is recorded by the worker that served it.
    w1 = await trio.Path(tmp_path / "audit.w1.jsonl").read_text()
    pids = running.worker_pids()
    for client, _, pid in served:
        assert (f'"client":"{client}"' in w1) == (pid == pids[1])


async def audit_verify(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "popproxy", "audit", "verify", *map(str, args)],
            capture_stdout=True, capture_stderr=True, check=False)
    return done


async def test_signed_worker_trails_verify_together(
    tmp_path: Path, dovecot: Dovecot, mailboxes: None
) -> None:
    """With signed checkpoints each worker's trail names its origin
    (``.../w1``, ``.../w2``), so verify takes all the files at once."""
    key = tmp_path / "audit.key"
    with trio.fail_after(60):
        made = await trio.run_process(
            [sys.executable, "-m", "popproxy", "audit", "keygen", "--out", str(key)],
            capture_stdout=True, capture_stderr=True, check=False)
    assert made.returncode == 0, made.stderr
    audit = tmp_path / "audit.jsonl"
    copies = tmp_path / "audit.checkpoints"
    extra = (f'[audit]\nsink = "file"\npath = "{audit}"\nfsync = "never"\n'
             f'sign_key = "{key}"\ncheckpoint_records = 1\ncheckpoint_path = "{copies}"\n')
    async with running_popproxy(config_text(dovecot, extra), tmp_path) as running:
        await both_workers_listening(running)
        await sessions_until_both_served(running, dovecot)
    names = sorted(n for n in os.listdir(tmp_path) if n.startswith("audit.w"))
    assert names == ["audit.w1.checkpoints", "audit.w1.jsonl",
                     "audit.w2.checkpoints", "audit.w2.jsonl"]
    files = [tmp_path / n for n in names if n.endswith(".jsonl")]
    done = await audit_verify("--key", f"{key}.pub",
                              "--checkpoints", tmp_path / "audit.w1.checkpoints",
                              "--checkpoints", tmp_path / "audit.w2.checkpoints", *files)
    text = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, text
    assert "/w1" in text
    assert "/w2" in text


async def test_one_worker_is_one_process_as_before(
    tmp_path: Path, dovecot: Dovecot, mailboxes: None
) -> None:
    async with running_popproxy(config_text(dovecot, workers=1), tmp_path) as running:
        client, replies = await session(running, dovecot, 0)
        assert replies[3].startswith(b"+OK ")
        closed = await running.wait_for("session.close", client=client)
    assert "worker" not in closed
    assert running.matching("worker.started") == []
    assert running.matching("workers.starting") == []


async def test_a_worker_stuck_for_long_is_killed_and_restarted(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """gunicorn's worker timeout: the supervisor (run in this process, with
    short timings) kills a worker that stops answering, and restarts it."""
    path = tmp_path / "popproxy.toml"
    path.write_text('[listen]\naddress = "127.0.0.1:0"\n[upstream]\naddress = "127.0.0.1:9"\n'
                    '[log]\nlevel = "warning"\nformat = "json"\n[server]\nworkers = 2\n')
    config, text = read_config(path)
    supervised: Supervised = await nursery.start(partial(
        supervise, config, path, text, watch_every=0.1, stuck_after=1.0))
    supervisor = supervised.supervisor
    restarts = partial(supervisor.metrics.registry.get_sample_value,
                       "popproxy_worker_restarts_total")
    with trio.fail_after(30):
        while True:
            if all(slot.ready for slot in supervisor.slots):
                break
            await trio.sleep(0.05)
    first, second = (slot.process for slot in supervisor.slots)
    assert first is not None
    assert second is not None
    os.kill(second.pid, signal.SIGSTOP)
    try:
        with trio.fail_after(30):
            while True:
                slot = supervisor.slots[1]
                if slot.ready and slot.process is not None and slot.process.pid != second.pid:
                    break
                await trio.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(second.pid, signal.SIGCONT)
    assert second.returncode == -signal.SIGKILL
    assert restarts({"worker": "2"}) == 1
    assert restarts({"worker": "1"}) == 0
    assert supervisor.slots[0].process is first  # the other one was left alone
    supervisor.stop(signal.SIGINT)


async def retr_session(port: int, user: str, password: str) -> tuple[str, bytes]:
    """Log in, RETR 1 (its body read to the end when it comes), QUIT: the
    client's address and the RETR reply's first line."""
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            host, local_port = stream.socket.getsockname()[:2]
            reader = LineReader(stream)
            assert (await reader.line()).startswith(b"+OK")
            for command in (f"USER {user}", f"PASS {password}"):
                await stream.send_all(command.encode() + b"\r\n")
                assert (await reader.line()).startswith(b"+OK")
            await stream.send_all(b"RETR 1\r\n")
            reply = await reader.line()
            if reply.startswith(b"+OK"):
                while await reader.line() != b".":
                    pass
            await stream.send_all(b"QUIT\r\n")
            assert (await reader.line()).startswith(b"+OK")
    return f"{host}:{local_port}", reply


async def test_a_per_user_limit_holds_across_both_workers_with_redis(
    tmp_path: Path, dovecot: Dovecot, mailboxes: None, redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    """[state] backend = "redis": "5/minute" per user admits five RETRs
    whichever worker serves them, where in memory each worker would admit
    five."""
    extra = (
        f'[state]\nbackend = "redis"\nurl = "{redis_server.url}"\n'
        f'key_prefix = "{redis_prefix}"\n'
        '[[policy.rules]]\nname = "retr-5"\naction = "rate_limit"\nlimit = "5/minute"\n'
        'per = "user"\nmatch = { commands = ["RETR"] }\n'
    )
    async with running_popproxy(config_text(dovecot, extra), tmp_path) as running:
        await both_workers_listening(running)
        replies: list[tuple[bytes, int]] = []
        for _ in range(40):  # until both workers have served refused RETRs too
            client, reply = await retr_session(running.port, "alice", dovecot.users["alice"])
            closed = await running.wait_for("session.close", client=client)
            replies.append((reply, closed["pid"]))
            refused_by = {pid for r, pid in replies if not r.startswith(b"+OK")}
            if len(replies) >= 12 and len(refused_by) == 2:
                break
    admitted = [pid for reply, pid in replies if reply.startswith(b"+OK")]
    assert len(admitted) == 5
    assert all(reply.startswith(b"-ERR [SYS/TEMP] rate limit exceeded")
               for reply, _ in replies if not reply.startswith(b"+OK"))
    assert len({pid for _, pid in replies}) == 2  # both workers served
    assert running.matching("config.per_process_limits") == []  # shared: no warning
