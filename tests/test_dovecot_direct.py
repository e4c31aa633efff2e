"""The Dovecot fixture works: talk to it directly with poplib and raw sockets.

No proxy involved; these prove that the real server the interoperability
tests rely on behaves as they expect.
"""

from __future__ import annotations

import base64
import poplib
import re
import socket
from collections.abc import Iterator

import pytest

from tests.dovecot import SAMPLE_MESSAGES, Dovecot, expected_retr
from tests.dovecot_fixtures import Mailbox, MailboxFactory

pytestmark = pytest.mark.dovecot


class RawPOP3:
    """A minimal line-level POP3 client for what poplib has no API for."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.readline()

    def readline(self) -> bytes:
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise AssertionError(f"incomplete line from server: {line!r}")
        return line[:-2]

    def send(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.readline()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw(dovecot: Dovecot) -> Iterator[RawPOP3]:
    client = RawPOP3(dovecot.host, dovecot.port)
    try:
        yield client
    finally:
        client.close()


def connect(dovecot: Dovecot) -> poplib.POP3:
    return poplib.POP3(dovecot.host, dovecot.port, timeout=10)


def login(dovecot: Dovecot, user: str) -> poplib.POP3:
    client = connect(dovecot)
    client.user(user)
    client.pass_(dovecot.users[user])
    return client


def retr_bytes(client: poplib.POP3, n: int) -> bytes:
    _resp, lines, _octets = client.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


def test_greeting_has_apop_timestamp(dovecot: Dovecot) -> None:
    client = connect(dovecot)
    try:
        assert re.fullmatch(rb"\+OK .*<[^<>]+@[^<>]+>", client.getwelcome())
    finally:
        client.quit()


def test_user_pass_stat_list_retr(dovecot: Dovecot, mailbox: Mailbox) -> None:
    client = login(dovecot, mailbox.user)
    try:
        count, size = client.stat()
        assert count == len(mailbox.messages) == len(SAMPLE_MESSAGES)
        assert size == sum(len(m) for m in mailbox.messages)

        _resp, listing, _ = client.list()
        assert listing == [b"%d %d" % (i, len(m)) for i, m in enumerate(mailbox.messages, 1)]

        for i, expected in enumerate(mailbox.messages, 1):
            assert retr_bytes(client, i) == expected
    finally:
        client.quit()


def test_dot_lines_are_stuffed_on_the_wire(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """Dovecot dot-stuffs; unstuffed, the message is byte-identical."""
    dotted = next(i for i, m in enumerate(mailbox.messages, 1) if b"\r\n.\r\n" in m)
    raw = RawPOP3(dovecot.host, dovecot.port)
    try:
        assert raw.send(b"USER " + mailbox.user.encode()).startswith(b"+OK")
        assert raw.send(b"PASS " + dovecot.users[mailbox.user].encode()).startswith(b"+OK")
        assert raw.send(b"RETR %d" % dotted).startswith(b"+OK")
        wire: list[bytes] = []
        while (line := raw.readline()) != b".":
            wire.append(line)
        assert b".." in wire
        assert b"..hidden line" in wire
        assert b"...two dots" in wire
        unstuffed = [line[1:] if line.startswith(b".") else line for line in wire]
        assert b"".join(line + b"\r\n" for line in unstuffed) == mailbox.messages[dotted - 1]
        assert raw.send(b"QUIT").startswith(b"+OK")
    finally:
        raw.close()


def test_uidl_format_and_top(dovecot: Dovecot, mailbox: Mailbox) -> None:
    client = login(dovecot, mailbox.user)
    try:
        _resp, uidls, _ = client.uidl()
        assert len(uidls) == len(mailbox.messages)
        for i, entry in enumerate(uidls, 1):
            num, uid = entry.split()
            assert int(num) == i
            # pop3_uidl_format = %08Xu%08Xv (Dovecot prints lowercase hex);
            # fresh Maildir, so UIDs are 1..n
            assert re.fullmatch(rb"[0-9a-f]{16}", uid)
            assert int(uid[:8], 16) == i

        _resp, lines, _ = client.top(1, 0)
        header = mailbox.messages[0].split(b"\r\n\r\n", 1)[0]
        assert lines == [*header.split(b"\r\n"), b""]
    finally:
        client.quit()


def test_wrong_password_is_rejected(dovecot: Dovecot) -> None:
    client = connect(dovecot)
    try:
        client.user("alice")
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client.pass_("not-" + dovecot.users["alice"])
    finally:
        client.close()


def test_apop_login(dovecot: Dovecot, fresh_mailbox: MailboxFactory) -> None:
    box = fresh_mailbox("bob", SAMPLE_MESSAGES[:2])
    client = connect(dovecot)
    try:
        assert client.apop("bob", dovecot.users["bob"]).startswith(b"+OK")
        assert client.stat()[0] == 2
        assert retr_bytes(client, 2) == box.messages[1]
    finally:
        client.quit()


def test_apop_wrong_password_is_rejected(dovecot: Dovecot) -> None:
    client = connect(dovecot)
    try:
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client.apop("bob", dovecot.users["alice"])
    finally:
        client.close()


def test_auth_plain_with_initial_response(dovecot: Dovecot, mailbox: Mailbox, raw: RawPOP3) -> None:
    creds = f"\0{mailbox.user}\0{dovecot.users[mailbox.user]}".encode()
    assert raw.send(b"AUTH PLAIN " + base64.b64encode(creds)).startswith(b"+OK")
    assert raw.send(b"STAT").split()[:2] == [b"+OK", str(len(mailbox.messages)).encode()]
    assert raw.send(b"QUIT").startswith(b"+OK")


def test_auth_plain_with_continuation(dovecot: Dovecot, raw: RawPOP3) -> None:
    assert raw.send(b"AUTH PLAIN").startswith(b"+")
    creds = f"\0carol\0{dovecot.users['carol']}".encode()
    assert raw.send(base64.b64encode(creds)).startswith(b"+OK")
    assert raw.send(b"QUIT").startswith(b"+OK")


def test_auth_login(dovecot: Dovecot, raw: RawPOP3) -> None:
    assert raw.send(b"AUTH LOGIN") == b"+ " + base64.b64encode(b"Username:")
    assert raw.send(base64.b64encode(b"archive1")) == b"+ " + base64.b64encode(b"Password:")
    assert raw.send(base64.b64encode(dovecot.users["archive1"].encode())).startswith(b"+OK")
    assert raw.send(b"QUIT").startswith(b"+OK")


def test_capa_lists_sasl_mechanisms(dovecot: Dovecot) -> None:
    client = connect(dovecot)
    try:
        capa = client.capa()
        assert {"PLAIN", "LOGIN"} <= set(capa["SASL"])
        assert "USER" in capa
        assert "UIDL" in capa
    finally:
        client.quit()


def test_last(dovecot: Dovecot, mailbox: Mailbox, raw: RawPOP3) -> None:
    assert raw.send(b"USER " + mailbox.user.encode()).startswith(b"+OK")
    assert raw.send(b"PASS " + dovecot.users[mailbox.user].encode()).startswith(b"+OK")
    assert raw.send(b"LAST") == b"+OK 0"
    assert raw.send(b"RETR 2").startswith(b"+OK")
    while raw.readline() != b".":
        pass
    assert raw.send(b"LAST") == b"+OK 2"
    assert raw.send(b"QUIT").startswith(b"+OK")


def test_dele_then_quit_deletes(dovecot: Dovecot, mailbox: Mailbox) -> None:
    n = len(mailbox.messages)
    assert dovecot.message_count(mailbox.user) == n
    client = login(dovecot, mailbox.user)
    client.dele(1)
    client.dele(3)
    assert client.stat()[0] == n - 2
    client.quit()
    assert dovecot.message_count(mailbox.user) == n - 2

    client = login(dovecot, mailbox.user)
    try:
        assert client.stat()[0] == n - 2
        assert retr_bytes(client, 1) == mailbox.messages[1]
        assert retr_bytes(client, 2) == mailbox.messages[3]
    finally:
        client.quit()


def test_dele_then_rset_keeps(dovecot: Dovecot, mailbox: Mailbox) -> None:
    n = len(mailbox.messages)
    client = login(dovecot, mailbox.user)
    client.dele(1)
    client.dele(2)
    with pytest.raises(poplib.error_proto, match="-ERR"):
        client.retr(1)
    client.rset()
    assert client.stat()[0] == n
    assert retr_bytes(client, 1) == mailbox.messages[0]
    client.quit()
    assert dovecot.message_count(mailbox.user) == n


def test_dele_without_quit_keeps(dovecot: Dovecot, mailbox: Mailbox) -> None:
    """A session that ends without QUIT must not expunge (RFC 1939 §6)."""
    client = login(dovecot, mailbox.user)
    client.dele(1)
    client.close()  # drop the connection, no QUIT
    client = login(dovecot, mailbox.user)  # waits for the old session's end
    try:
        assert client.stat()[0] == len(mailbox.messages)
    finally:
        client.quit()
    assert dovecot.message_count(mailbox.user) == len(mailbox.messages)


def test_mailboxes_are_separate(dovecot: Dovecot, fresh_mailbox: MailboxFactory) -> None:
    fresh_mailbox("alice", SAMPLE_MESSAGES[:1])
    bob = fresh_mailbox("bob", SAMPLE_MESSAGES[1:])
    dovecot.clear("carol")
    assert dovecot.message_count("alice") == 1
    assert dovecot.message_count("bob") == len(SAMPLE_MESSAGES) - 1
    assert dovecot.message_count("carol") == 0
    client = login(dovecot, "bob")
    try:
        assert retr_bytes(client, 1) == bob.messages[0]
    finally:
        client.quit()
    client = login(dovecot, "carol")
    try:
        assert client.stat() == (0, 0)
    finally:
        client.quit()


def test_deliver_crlf_input_and_no_final_newline(dovecot: Dovecot) -> None:
    dovecot.clear("archive1")
    msg = b"Subject: crlf\r\nFrom: a@example.org\r\n\r\nline one\r\n.\r\nno newline at end"
    path = dovecot.deliver("archive1", msg)
    assert b"\r" not in path.read_bytes()
    client = login(dovecot, "archive1")
    try:
        assert retr_bytes(client, 1) == expected_retr(msg)
        assert expected_retr(msg).endswith(b"no newline at end\r\n")
    finally:
        client.quit()


def test_log_records_logins(dovecot: Dovecot) -> None:
    offset = dovecot.log_offset()
    login(dovecot, "carol").quit()
    assert "Login: user=<carol>" in dovecot.read_log_since(offset)
    assert "starting up" in dovecot.read_log()


@pytest.mark.usefixtures("dovecot_available")
def test_start_retries_when_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone grabs the chosen port before Dovecot binds it: pick another."""
    import tests.dovecot as mod

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken: int = blocker.getsockname()[1]
    ports = iter([taken])
    real_free_port = mod._free_port
    monkeypatch.setattr(mod, "_free_port", lambda host: next(ports, None) or real_free_port(host))
    try:
        with Dovecot(users={"dave": "dave-pw"}) as server:
            assert server.port != taken
            assert "Address already in use" in server.stderr_path.read_text() + server.read_log()
            client = login(server, "dave")
            client.quit()
        assert not server.root.exists()
    finally:
        blocker.close()
