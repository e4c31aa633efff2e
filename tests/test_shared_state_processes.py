"""Shared limits across separate ``popproxy run`` processes (as replicas on
several hosts would be), sharing one real redis-server, in front of real
Dovecot; and a process killed with sessions open leaks no cap slot.

tests/test_workers.py does the per-user limit with two worker processes of
one ``popproxy run``; tests/test_shared_state_redis.py runs two proxies in
one process, with Redis frozen and back.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.dovecot import Dovecot
from tests.dovecot_fixtures import MailboxFactory
from tests.popproxy_process import LineReader, Popproxy, running_popproxy
from tests.redis_server import RedisServer

pytestmark = pytest.mark.dovecot

RETR_5 = ('[[policy.rules]]\nname = "retr-5"\naction = "rate_limit"\nlimit = "5/minute"\n'
          'per = "user"\nmatch = { commands = ["RETR"] }\n')


def config_text(dovecot: Dovecot, redis: RedisServer, prefix: str, extra: str = "") -> str:
    return (
        '[listen]\naddress = "127.0.0.1:0"\n'
        f'[upstream]\naddress = "{dovecot.host}:{dovecot.port}"\n'
        '[log]\nformat = "json"\n'
        f'[state]\nbackend = "redis"\nurl = "{redis.url}"\nkey_prefix = "{prefix}"\n'
        'timeout = "250ms"\nlease_time = "2s"\n'
        + extra
    )


@contextlib.asynccontextmanager
async def two_proxies(tmp_path: Path, text: str) -> AsyncIterator[tuple[Popproxy, Popproxy]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_popproxy(text, tmp_path / "a") as a, \
            running_popproxy(text, tmp_path / "b") as b:
        yield a, b


class Client:
    """One POP3 connection, line by line."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = LineReader(stream)
        host, port = stream.socket.getsockname()[:2]
        self.address = f"{host}:{port}"

    @classmethod
    async def open(cls, port: int) -> Client:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        assert (await client.reader.line()).startswith(b"+OK")
        return client

    async def cmd(self, line: str) -> bytes:
        await self.stream.send_all(line.encode() + b"\r\n")
        return await self.reader.line()

    async def login(self, user: str, password: str) -> bytes:
        assert (await self.cmd(f"USER {user}")).startswith(b"+OK")
        return await self.cmd(f"PASS {password}")

    async def retr(self) -> bytes:
        reply = await self.cmd("RETR 1")
        if reply.startswith(b"+OK"):
            while await self.reader.line() != b".":
                pass
        return reply

    async def quit(self) -> None:
        assert (await self.cmd("QUIT")).startswith(b"+OK")
        await self.stream.aclose()


async def test_five_retr_a_minute_across_two_processes(
    tmp_path: Path, dovecot: Dovecot, fresh_mailbox: MailboxFactory,
    redis_server: RedisServer, redis_prefix: str,
) -> None:
    box = fresh_mailbox("alice")
    password = dovecot.users[box.user]
    text = config_text(dovecot, redis_server, redis_prefix, RETR_5)
    with trio.fail_after(120):
        async with two_proxies(tmp_path, text) as (a, b):
            replies: list[tuple[str, bytes]] = []
            for i in range(14):
                proxy = (a, b)[i % 2]
                client = await Client.open(proxy.port)
                assert (await client.login(box.user, password)).startswith(b"+OK")
                replies.append(("ab"[i % 2], await client.retr()))
                await client.quit()
    admitted = [who for who, reply in replies if reply.startswith(b"+OK")]
    assert len(admitted) == 5
    assert set(admitted) == {"a", "b"}  # both processes admitted some
    assert all(reply.startswith(b"-ERR [SYS/TEMP] rate limit exceeded")
               for _, reply in replies if not reply.startswith(b"+OK"))


async def test_two_sessions_per_user_across_two_processes(
    tmp_path: Path, dovecot: Dovecot, fresh_mailbox: MailboxFactory,
    redis_server: RedisServer, redis_prefix: str,
) -> None:
    box = fresh_mailbox("alice")
    password = dovecot.users[box.user]
    text = config_text(dovecot, redis_server, redis_prefix,
                       "[policy.protections]\nmax_sessions_per_user = 2\n")
    with trio.fail_after(60):
        async with two_proxies(tmp_path, text) as (a, b):
            first, second = await Client.open(a.port), await Client.open(b.port)
            assert (await first.login(box.user, password)).startswith(b"+OK")
            assert (await second.login(box.user, password)).startswith(b"+OK")
            for proxy in (a, b):
                third = await Client.open(proxy.port)
                refused = await third.login(box.user, password)
                assert refused == b"-ERR [IN-USE] too many sessions for this user"
            await first.quit()
            await a.wait_for("session.close", client=first.address)  # its slot is back
            fourth = await Client.open(b.port)
            assert (await fourth.login(box.user, password)).startswith(b"+OK")
            for client in (second, fourth):
                await client.quit()


async def test_a_killed_process_s_slots_come_back_within_the_lease(
    tmp_path: Path, dovecot: Dovecot, fresh_mailbox: MailboxFactory,
    private_redis: RedisServer, redis_prefix: str,
) -> None:
    """``kill -9`` of a process with a session open: nothing releases its
    slot, the lease runs out (``lease_time = "2s"``), and the slot is free
    again then, not later."""
    box = fresh_mailbox("alice")
    password = dovecot.users[box.user]
    text = config_text(dovecot, private_redis, redis_prefix,
                       "[policy.protections]\nmax_sessions_per_user = 1\n")
    key = f"{redis_prefix}cap:user:{box.user}"
    with trio.fail_after(60):
        async with two_proxies(tmp_path, text) as (a, b):
            held = await Client.open(a.port)
            assert (await held.login(box.user, password)).startswith(b"+OK")
            killed_at = server_time(private_redis)
            a.process.send_signal(signal.SIGKILL)
            await a.process.wait()
            other = await Client.open(b.port)
            assert await other.login(box.user, password) == (
                b"-ERR [IN-USE] too many sessions for this user")
            # The dead session's lease: when it runs out, on Redis's clock.
            expires = max(float(score) for score in
                          private_redis.command("ZRANGE", key, "0", "-1", "WITHSCORES")
                          .split(b"\r\n")[4::4])
            assert expires - killed_at <= 2.0 + 0.1  # at most one lease_time after
            await trio.sleep(max(0.0, expires - server_time(private_redis)) + 0.05)
            again = await Client.open(b.port)
            assert (await again.login(box.user, password)).startswith(b"+OK")
            await again.quit()


def server_time(redis: RedisServer) -> float:
    """Redis's clock (``TIME``), in seconds."""
    reply = redis.command("TIME").split(b"\r\n")
    return int(reply[2]) + int(reply[4]) / 1e6
