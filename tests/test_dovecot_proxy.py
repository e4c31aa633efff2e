"""Interoperability: Python's poplib through popproxy to a real Dovecot.

Dovecot is started by the tests (tests/dovecot.py) on loopback with a
throwaway configuration; these tests are the proof that the proxy works
with a real server, not just with the built-in demo.
"""

from __future__ import annotations

import base64
import hashlib
import poplib
from typing import cast

import pytest
import trio

from popproxy.config import HostPort
from popproxy.events import AuthResult, MessageComplete, Response, SessionClosed
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox, MailboxFactory
from tests.proxy_fixtures import RunningProxy, start_proxy

pytestmark = pytest.mark.dovecot


@pytest.fixture
async def proxy(nursery: trio.Nursery, dovecot: Dovecot) -> RunningProxy:
    return await start_proxy(nursery, HostPort(dovecot.host, dovecot.port))


def pop(proxy: RunningProxy) -> poplib.POP3:
    return poplib.POP3(proxy.host, proxy.port, timeout=30)


async def settle(proxy: RunningProxy, sessions: int = 1) -> None:
    """Wait until the proxy has reported ``sessions`` closed sessions."""
    with trio.fail_after(10):
        await proxy.wait_for(SessionClosed, sessions)


async def raw_session(proxy: RunningProxy, send: bytes) -> bytes:
    """One raw connection: send bytes after the greeting, read until EOF."""
    with trio.fail_after(30):
        s = await trio.open_tcp_stream(proxy.host, proxy.port)
        greeting = await s.receive_some(4096)
        assert greeting.startswith(b"+OK")
        await s.send_all(send)
        data = b""
        while chunk := await s.receive_some(65536):
            data += chunk
        return data


def unstuff_retr(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


async def test_every_rfc1939_command(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, messages = mailbox
    password = dovecot.users[user]

    def client() -> None:
        p = pop(proxy)
        assert p.getwelcome().startswith(b"+OK")
        p.user(user)
        p.pass_(password)
        count, size = p.stat()
        assert count == len(messages)
        assert size == sum(len(m) for m in messages)
        _, listing, _ = p.list()
        assert [int(x.split()[1]) for x in listing] == [len(m) for m in messages]
        assert cast(bytes, p.list(2)).split()[2] == str(len(messages[1])).encode()
        _, uidls, _ = p.uidl()
        assert len(uidls) == len(messages)
        assert p.uidl(1).split()[2] == uidls[0].split()[1]
        for i, message in enumerate(messages, 1):
            assert unstuff_retr(p.retr(i)[1]) == message
        top = unstuff_retr(p.top(1, 0)[1])
        assert messages[0].startswith(top.rstrip(b"\r\n"))
        assert p.noop().startswith(b"+OK")
        assert p.dele(1).startswith(b"+OK")
        with pytest.raises(poplib.error_proto, match="-ERR"):
            p.retr(1)  # marked deleted
        assert p.rset().startswith(b"+OK")
        assert unstuff_retr(p.retr(1)[1]) == messages[0]
        assert p.quit().startswith(b"+OK")

    await trio.to_thread.run_sync(client)
    await settle(proxy)
    assert dovecot.message_count(user) == len(messages)  # RSET undid the DELE
    done = proxy.of_type(MessageComplete)
    assert [d.sha256 for d in done[: len(messages)]] == [
        hashlib.sha256(m).hexdigest() for m in messages
    ]
    assert all(d.complete for d in done)
    assert proxy.of_type(AuthResult) == [AuthResult("USER", user, True, None)]


async def test_dele_then_quit_really_deletes(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, messages = mailbox

    def client() -> None:
        p = pop(proxy)
        p.user(user)
        p.pass_(dovecot.users[user])
        p.dele(1)
        p.dele(3)
        p.quit()

    await trio.to_thread.run_sync(client)
    await settle(proxy)
    assert dovecot.message_count(user) == len(messages) - 2


async def test_dele_without_quit_deletes_nothing(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    """A session that ends without QUIT must not delete (RFC 1939 §6)."""
    user, messages = mailbox
    login = f"USER {user}\r\nPASS {dovecot.users[user]}\r\n".encode()
    with trio.fail_after(30):
        s = await trio.open_tcp_stream(proxy.host, proxy.port)
        await s.receive_some(4096)
        await s.send_all(login + b"DELE 1\r\nDELE 2\r\n")
        got = b""
        while got.count(b"\r\n") < 4:
            got += await s.receive_some(4096)
        await s.aclose()
    await settle(proxy)
    assert dovecot.message_count(user) == len(messages)


async def test_dele_then_rset_then_quit_keeps_mail(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, messages = mailbox
    reply = await raw_session(
        proxy,
        f"USER {user}\r\nPASS {dovecot.users[user]}\r\nDELE 1\r\nRSET\r\nQUIT\r\n".encode(),
    )
    assert reply.count(b"+OK") == 5
    await settle(proxy)
    assert dovecot.message_count(user) == len(messages)


async def test_20_mib_message_hash_equals_direct(
    proxy: RunningProxy, dovecot: Dovecot, fresh_mailbox: MailboxFactory
) -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    dotted = b".leading dot line\r\n..two\r\n.\r\n"
    body = (line * 1000 + dotted) * (20 * 1024 * 1024 // (len(line) * 1000 + len(dotted)))
    big = b"Subject: big\r\nMessage-ID: <big@test>\r\n\r\n" + body
    user, (expected,) = fresh_mailbox("bob", [big])
    password = dovecot.users[user]

    def fetch(host: str, port: int) -> str:
        p = poplib.POP3(host, port, timeout=60)
        p.user(user)
        p.pass_(password)
        digest = hashlib.sha256(unstuff_retr(p.retr(1)[1])).hexdigest()
        p.quit()
        return digest

    direct = await trio.to_thread.run_sync(fetch, dovecot.host, dovecot.port)
    proxied = await trio.to_thread.run_sync(fetch, proxy.host, proxy.port)
    assert len(expected) > 20 * 1000 * 1000
    assert proxied == direct == hashlib.sha256(expected).hexdigest()
    await settle(proxy)
    (done,) = proxy.of_type(MessageComplete)
    assert done.sha256 == direct
    assert done.octets == len(expected)
    assert done.message_id == "<big@test>"


async def test_200_pipelined_commands_in_order(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, messages = mailbox
    n = len(messages)
    commands = [f"LIST {i % (n + 2) + 1}" if i % 2 else f"UIDL {i % (n + 2) + 1}"
                for i in range(200)]
    login = f"USER {user}\r\nPASS {dovecot.users[user]}\r\n"
    batch = (login + "".join(c + "\r\n" for c in commands) + "QUIT\r\n").encode()
    lines = (await raw_session(proxy, batch)).split(b"\r\n")
    replies = lines[2:202]
    for command, reply in zip(commands, replies, strict=True):
        number = int(command.split()[1])
        if number <= n:
            assert reply.startswith(f"+OK {number} ".encode()), (command, reply)
        else:
            assert reply.startswith(b"-ERR"), (command, reply)
    assert lines[202].startswith(b"+OK")


async def test_auth_plain_passes_through(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, _ = mailbox
    blob = base64.b64encode(f"\0{user}\0{dovecot.users[user]}".encode())
    reply = await raw_session(proxy, b"AUTH PLAIN " + blob + b"\r\nSTAT\r\nQUIT\r\n")
    assert reply.startswith(b"+OK")
    assert reply.split(b"\r\n")[1].startswith(b"+OK 4 ")
    await settle(proxy)
    assert AuthResult("PLAIN", user, True, None) in proxy.of_type(AuthResult)


async def test_auth_plain_with_continuation_and_cancel(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, _ = mailbox
    blob = base64.b64encode(f"\0{user}\0{dovecot.users[user]}".encode())
    with trio.fail_after(30):
        s = await trio.open_tcp_stream(proxy.host, proxy.port)
        await s.receive_some(4096)
        await s.send_all(b"AUTH PLAIN\r\n")
        assert (await s.receive_some(4096)).startswith(b"+ ")
        await s.send_all(b"*\r\n")
        assert (await s.receive_some(4096)).startswith(b"-ERR")
        await s.send_all(b"AUTH PLAIN\r\n")
        assert (await s.receive_some(4096)).startswith(b"+ ")
        await s.send_all(blob + b"\r\n")
        assert (await s.receive_some(4096)).startswith(b"+OK")
        await s.send_all(b"QUIT\r\n")
        await s.receive_some(4096)


async def test_apop_passes_through(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, messages = mailbox

    def client() -> int:
        p = pop(proxy)
        assert b"<" in p.getwelcome()  # the upstream's timestamp, verbatim
        p.apop(user, dovecot.users[user])
        count = p.stat()[0]
        p.quit()
        return int(count)

    assert await trio.to_thread.run_sync(client) == len(messages)
    await settle(proxy)
    assert proxy.of_type(AuthResult) == [AuthResult("APOP", user, True, None)]


async def test_last_passes_through(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, _ = mailbox

    def client() -> tuple[bytes, bytes]:
        p = pop(proxy)
        p.user(user)
        p.pass_(dovecot.users[user])
        before = p._shortcmd("LAST")  # type: ignore[attr-defined]
        p.retr(2)
        after = p._shortcmd("LAST")  # type: ignore[attr-defined]
        p.quit()
        return before, after

    before, after = await trio.to_thread.run_sync(client)
    assert before == b"+OK 0"
    assert after == b"+OK 2"


async def test_capa_between_user_and_pass(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, _ = mailbox

    def client() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        p = pop(proxy)
        p.user(user)
        before = p.capa()
        p.pass_(dovecot.users[user])
        after = p.capa()
        p.quit()
        return before, after

    before, after = await trio.to_thread.run_sync(client)
    assert "UIDL" in before
    assert "UIDL" in after
    assert "STLS" not in before  # the proxy does not offer what it cannot do


async def test_commands_pipelined_after_a_refused_stls_are_answered(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    """STLS refused (no STLS on this port): the connection stays plain text
    and what was pipelined behind it is answered in turn; a client that
    pipelines its fallback must not wait for replies that never come."""
    user, messages = mailbox
    rest = f"USER {user}\r\nPASS {dovecot.users[user]}\r\nSTAT\r\nQUIT\r\n".encode()
    with trio.fail_after(30):
        s = await trio.open_tcp_stream(proxy.host, proxy.port)
        await s.receive_some(4096)
        await s.send_all(b"STLS\r\n" + rest)
        replies = b""
        while replies.count(b"\r\n") < 5:
            chunk = await s.receive_some(4096)
            assert chunk, replies
            replies += chunk
        await s.aclose()
    lines = replies.split(b"\r\n")[:5]
    assert lines[0] == b"-ERR STLS is not available on this port"
    assert [line[:3] for line in lines[1:]] == [b"+OK"] * 4
    assert lines[3].startswith(f"+OK {len(messages)} ".encode())
    await settle(proxy)
    forwarded = [r.command.verb for r in proxy.of_type(Response) if not r.local]
    assert forwarded == ["USER", "PASS", "STAT", "QUIT"]


async def test_wrong_password_then_right_one(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, _ = mailbox

    def client() -> bytes:
        p = pop(proxy)
        p.user(user)
        with pytest.raises(poplib.error_proto, match="AUTH"):
            p.pass_("wrong password")
        p.user(user)
        p.pass_(dovecot.users[user])
        return p.quit()

    assert (await trio.to_thread.run_sync(client)).startswith(b"+OK")
    await settle(proxy)
    outcomes = [(a.user, a.ok) for a in proxy.of_type(AuthResult)]
    assert outcomes == [(user, False), (user, True)]


async def test_credentials_never_reach_events(
    proxy: RunningProxy, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    """Passwords, SASL blobs and APOP digests appear in no event repr."""
    user, _ = mailbox
    password = dovecot.users[user]
    blob = base64.b64encode(f"\0{user}\0{password}".encode())
    await raw_session(proxy, f"USER {user}\r\nPASS {password}\r\nQUIT\r\n".encode())
    await raw_session(proxy, b"AUTH PLAIN " + blob + b"\r\nQUIT\r\n")
    await settle(proxy, 2)
    text = repr(proxy.events)
    assert password not in text
    assert blob.decode() not in text


async def test_hostile_input_leaves_the_proxy_serving(
    proxy: RunningProxy, dovecot: Dovecot, fresh_mailbox: MailboxFactory
) -> None:
    """A 100 KiB line and a client vanishing mid-RETR; then a normal session."""
    user, messages = fresh_mailbox("carol", [b"Subject: big\r\n\r\n" + b"x" * 4_000_000])
    password = dovecot.users[user]
    assert await raw_session(proxy, b"USER " + b"A" * 100 * 1024 + b"\r\n") == (
        b"-ERR line too long\r\n"
    )
    with trio.fail_after(30):
        s = await trio.open_tcp_stream(proxy.host, proxy.port)
        await s.receive_some(4096)
        await s.send_all(f"USER {user}\r\nPASS {password}\r\nRETR 1\r\n".encode())
        got = b""
        while len(got) < 100_000:
            got += await s.receive_some(65536)
        await s.aclose()
    await settle(proxy, 2)
    (cut,) = proxy.of_type(MessageComplete)
    assert cut.complete is False
    assert 0 < cut.octets < len(messages[0])

    def client() -> int:
        p = pop(proxy)
        p.user(user)
        p.pass_(password)
        count = p.stat()[0]
        p.quit()
        return int(count)

    assert await trio.to_thread.run_sync(client) == 1
