"""Two real Dovecots at once, with different users and mail (for routing tests)."""

from __future__ import annotations

import poplib

import pytest

from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox, MailboxFactory
from tests.second_upstream import SECOND_MESSAGES, SECOND_USERS

pytestmark = pytest.mark.dovecot


def login(server: Dovecot, user: str, password: str | None = None) -> poplib.POP3:
    client = poplib.POP3(server.host, server.port, timeout=10)
    client.user(user)
    client.pass_(password if password is not None else server.users[user])
    return client


def retr(client: poplib.POP3, n: int) -> bytes:
    return b"".join(line + b"\r\n" for line in client.retr(n)[1])


def test_two_dovecots_run_at_once(dovecot: Dovecot, second_dovecot: Dovecot) -> None:
    assert dovecot.running
    assert second_dovecot.running
    assert dovecot.port != second_dovecot.port
    assert dovecot.root != second_dovecot.root
    assert dovecot.greeting != second_dovecot.greeting  # each names its own instance


def test_each_has_its_own_users(dovecot: Dovecot, second_dovecot: Dovecot) -> None:
    assert set(second_dovecot.users) == set(SECOND_USERS)
    client = login(second_dovecot, "dave")
    client.quit()
    for server, user, password in ((dovecot, "dave", SECOND_USERS["dave"]),
                                   (second_dovecot, "bob", dovecot.users["bob"])):
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            login(server, user, password)


def test_the_same_user_has_different_mail(
    dovecot: Dovecot, mailbox: Mailbox, second_dovecot: Dovecot,
    second_mailbox: MailboxFactory,
) -> None:
    """alice (same password on both) as after a migration: which server answered shows."""
    moved = second_mailbox("alice", SECOND_MESSAGES[:1])
    first = login(dovecot, "alice")
    second = login(second_dovecot, "alice", dovecot.users["alice"])
    try:
        assert first.stat()[0] == len(mailbox.messages) == 4
        assert second.stat()[0] == 1
        assert retr(first, 1) == mailbox.messages[0]
        assert retr(second, 1) == moved.messages[0]
        assert b"Message-ID: <moved-1@new.example.org>" in retr(second, 1)
    finally:
        first.quit()
        second.quit()


def test_second_mailbox_default(second_dovecot: Dovecot, second_mailbox: MailboxFactory) -> None:
    box = second_mailbox()
    client = login(second_dovecot, box.user)
    try:
        assert box.user == "dave"
        assert client.stat()[0] == len(SECOND_MESSAGES)
        assert [retr(client, i + 1) for i in range(len(box.messages))] == box.messages
    finally:
        client.quit()
