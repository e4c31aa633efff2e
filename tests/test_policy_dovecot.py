"""Policy enforced through the proxy, against a real Dovecot."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.app import build, run
from popproxy.config import HostPort, load_config
from popproxy.events import CommandSent, PolicyDecision, SessionClosed
from popproxy.policy.config import PolicyConfig, parse_policy
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox, MailboxFactory
from tests.proxy_fixtures import RunningProxy, start_proxy

pytestmark = pytest.mark.dovecot


class Client:
    """A raw POP3 client: send lines, read one reply per command."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, proxy: RunningProxy | tuple[str, int]) -> Client:
        host, port = (proxy.host, proxy.port) if isinstance(proxy, RunningProxy) else proxy
        client = cls(await trio.open_tcp_stream(host, port))
        await client.line()
        return client

    async def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    async def multiline(self) -> bytes:
        while b"\r\n.\r\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        body, self.buf = self.buf.split(b"\r\n.\r\n", 1)
        return body

    async def cmd(self, line: str) -> bytes:
        await self.stream.send_all(line.encode() + b"\r\n")
        return await self.line()

    async def login(self, user: str, password: str) -> bytes:
        assert (await self.cmd(f"USER {user}")).startswith(b"+OK")
        return await self.cmd(f"PASS {password}")


def policy(rules: list[dict[str, Any]], **extra: Any) -> PolicyConfig:
    return parse_policy({"rules": rules, **extra})


async def proxy_with(nursery: trio.Nursery, dovecot: Dovecot, cfg: PolicyConfig) -> RunningProxy:
    return await start_proxy(nursery, HostPort(dovecot.host, dovecot.port), policy=cfg)


async def test_read_only_mailbox_keeps_its_mail(
    nursery: trio.Nursery, dovecot: Dovecot, fresh_mailbox: MailboxFactory
) -> None:
    user, messages = fresh_mailbox("archive1")
    proxy = await proxy_with(nursery, dovecot, policy([{
        "name": "archive-is-read-only", "match": {"users": ["archive*"], "commands": ["DELE"]},
        "action": "deny", "message": "this mailbox is read-only",
    }]))
    with trio.fail_after(30):
        c = await Client.connect(proxy)
        assert (await c.login(user, dovecot.users[user])).startswith(b"+OK")
        assert await c.cmd("DELE 1") == b"-ERR [SYS/PERM] this mailbox is read-only"
        assert (await c.cmd("QUIT")).startswith(b"+OK")
        await proxy.wait_for(SessionClosed)
    assert dovecot.message_count(user) == len(messages)
    (decision,) = proxy.of_type(PolicyDecision)
    assert (decision.rule, decision.action, decision.enforced) == (
        "archive-is-read-only", "deny", True)
    assert "DELE" not in [e.command.verb for e in proxy.of_type(CommandSent)]


async def test_eleventh_retr_in_a_minute_refused_other_user_unaffected(
    nursery: trio.Nursery, dovecot: Dovecot, fresh_mailbox: MailboxFactory
) -> None:
    alice, _ = fresh_mailbox("alice")
    bob, _ = fresh_mailbox("bob")
    proxy = await proxy_with(nursery, dovecot, policy([{
        "name": "retr-per-user", "match": {"commands": ["RETR", "TOP"]},
        "action": "rate_limit", "limit": "10/minute", "per": "user",
    }]))
    with trio.fail_after(30):
        a = await Client.connect(proxy)
        await a.login(alice, dovecot.users[alice])
        for _ in range(10):
            assert (await a.cmd("RETR 1")).startswith(b"+OK")
            await a.multiline()
        refused = await a.cmd("RETR 1")
        assert refused.startswith(b"-ERR [SYS/TEMP] rate limit exceeded")
        b = await Client.connect(proxy)
        await b.login(bob, dovecot.users[bob])
        assert (await b.cmd("RETR 1")).startswith(b"+OK")
        await b.multiline()
    sent = [e.command.verb for e in proxy.of_type(CommandSent)]
    assert sent.count("RETR") == 11  # 10 of alice's, 1 of bob's: the 11th never left


async def test_brute_force_never_reaches_upstream_beyond_n(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, _ = mailbox
    proxy = await proxy_with(nursery, dovecot, policy(
        [], protections={"login_failures_per_user": 3, "login_failure_delay": "250ms"}))
    replies = []
    with trio.fail_after(60):
        c = await Client.connect(proxy)
        for attempt in range(6):
            try:
                replies.append(await c.login(user, f"wrong-{attempt}"))
            except EOFError:  # Dovecot may hang up after failures; try anew
                c = await Client.connect(proxy)
                replies.append(await c.login(user, f"wrong-{attempt}"))
        # Even the right password is refused while the throttle holds.
        replies.append(await c.login(user, dovecot.users[user]))
    assert all(r.startswith(b"-ERR") for r in replies)
    assert replies[-1] == b"-ERR [AUTH] too many failed logins, try again later"
    passes = [e for e in proxy.of_type(CommandSent) if e.command.verb == "PASS"]
    assert len(passes) == 3


async def test_session_caps_per_user_and_per_ip(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, _ = mailbox
    proxy = await proxy_with(nursery, dovecot, policy(
        [], protections={"max_sessions_per_user": 1, "max_sessions_per_ip": 2}))
    with trio.fail_after(30):
        first = await Client.connect(proxy)
        assert (await first.login(user, dovecot.users[user])).startswith(b"+OK")
        second = await Client.connect(proxy)
        assert await second.login(user, dovecot.users[user]) == (
            b"-ERR [IN-USE] too many sessions for this user")
        await proxy.wait_for(SessionClosed)  # the refused one is closed
        third = await Client.connect(proxy)  # 2 open from this address now
        s = await trio.open_tcp_stream(proxy.host, proxy.port)
        assert await s.receive_some(4096) == (
            b"-ERR [SYS/TEMP] too many sessions from your address\r\n")
        assert (await third.cmd("QUIT")).startswith(b"+OK")
        assert (await first.cmd("QUIT")).startswith(b"+OK")


async def test_pipelined_denial_in_the_middle_keeps_order(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, messages = mailbox
    proxy = await proxy_with(nursery, dovecot, policy([{
        "name": "no-dele", "match": {"commands": ["DELE"]}, "action": "deny",
        "message": "DELE disabled by policy",
    }]))
    with trio.fail_after(30):
        c = await Client.connect(proxy)
        await c.login(user, dovecot.users[user])
        await c.stream.send_all(b"STAT\r\nLIST 1\r\nDELE 1\r\nUIDL 1\r\nNOOP\r\n")
        replies = [await c.line() for _ in range(5)]
    assert replies[0].startswith(b"+OK %d " % len(messages))
    assert replies[1].startswith(b"+OK 1 ")
    assert replies[2] == b"-ERR [SYS/PERM] DELE disabled by policy"
    assert replies[3].startswith(b"+OK 1 ")
    assert replies[4].startswith(b"+OK")


async def test_monitor_mode_lets_everything_through_and_records(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, messages = mailbox
    proxy = await proxy_with(nursery, dovecot, policy([{
        "name": "no-dele", "match": {"commands": ["DELE"]}, "action": "deny",
    }], mode="monitor"))
    with trio.fail_after(30):
        c = await Client.connect(proxy)
        await c.login(user, dovecot.users[user])
        assert (await c.cmd("DELE 1")).startswith(b"+OK")
        assert (await c.cmd("QUIT")).startswith(b"+OK")
        await proxy.wait_for(SessionClosed)
    assert dovecot.message_count(user) == len(messages) - 1
    (decision,) = proxy.of_type(PolicyDecision)
    assert (decision.rule, decision.enforced) == ("no-dele", False)


async def test_sighup_swaps_rules_in_a_live_proxy(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox, tmp_path: Path
) -> None:
    user, _ = mailbox
    path = tmp_path / "popproxy.toml"
    base = (f'[listen]\naddress = "127.0.0.1:0"\n'
            f'[upstream]\naddress = "{dovecot.host}:{dovecot.port}"\n')
    path.write_text(base)
    app = build(load_config(path))
    listeners = await nursery.start(
        lambda task_status: run(app.proxy.config, config_path=path, app=app,
                                task_status=task_status))
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(30):
        c = await Client.connect(("127.0.0.1", port))
        await c.login(user, dovecot.users[user])
        assert (await c.cmd("DELE 1")).startswith(b"+OK")
        assert (await c.cmd("RSET")).startswith(b"+OK")

        path.write_text(base + '[[policy.rules]]\nname = "ro"\naction = "deny"\n'
                        'match = { commands = ["DELE"] }\nmessage = "read-only now"\n')
        os.kill(os.getpid(), signal.SIGHUP)
        await app.wait_for_reloads(1)
        assert await c.cmd("DELE 1") == b"-ERR [SYS/PERM] read-only now"  # same session

        path.write_text(base + "[limits]\nidle_timeout = 'soon'\n")  # invalid
        os.kill(os.getpid(), signal.SIGHUP)
        await app.wait_for_reloads(2)
        assert await c.cmd("DELE 1") == b"-ERR [SYS/PERM] read-only now"  # old rules kept
        assert (await c.cmd("QUIT")).startswith(b"+OK")
    # The nursery fixture cancels the proxy at teardown.
