"""A second real upstream for routing tests: another private Dovecot.

Loaded as a pytest plugin (``pytest_plugins`` in tests/conftest.py), next to
``tests.dovecot_fixtures``, whose ``dovecot`` is the first upstream.  The
``Dovecot`` class already keeps each instance apart (own temp dir,
``base_dir``, ``instance_name``, passwd-file and free port), so a second one
only needs other users and other mail:

* ``second_dovecot`` (session): users ``SECOND_USERS``: ``dave`` and
  ``erin``, who exist only here, and ``alice`` with the same password as on
  the first server (a user migrated with her password, as in a move from a
  legacy box), whose mail here differs from the first server's.  ``bob``,
  ``carol`` and ``archive1`` exist only on the first.
* ``second_mailbox`` (function): a callable ``(user="dave",
  messages=SECOND_MESSAGES) -> Mailbox`` that empties a user's Maildir on
  the second server and delivers ``messages`` (RETR forms in the result).

Without Dovecot these skip (fail under ``CI=true``) as the first one does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import pytest

from tests.dovecot import DEFAULT_USERS, Dovecot
from tests.dovecot_fixtures import Mailbox, MailboxFactory, running_dovecot

__all__ = ["SECOND_MESSAGES", "SECOND_USERS", "second_dovecot", "second_mailbox"]

SECOND_USERS: Mapping[str, str] = {
    "dave": "dave-Second5",
    "erin": "erin!Second#6",
    "alice": DEFAULT_USERS["alice"],
}

#: Mail that is not in ``SAMPLE_MESSAGES``: a test can tell the servers apart.
SECOND_MESSAGES: tuple[bytes, ...] = (
    b"From: Migration Team <it@example.org>\n"
    b"To: you@example.org\n"
    b"Subject: Your mailbox now lives on the new server\n"
    b"Date: Thu, 03 Dec 2026 09:00:00 +0000\n"
    b"Message-ID: <moved-1@new.example.org>\n"
    b"\n"
    b"Nothing to change on your side: the proxy sends you here.\n",
    b"From: Erin <erin@example.org>\n"
    b"To: dave@example.org\n"
    b"Subject: Second server, second message\n"
    b"Date: Thu, 03 Dec 2026 10:30:00 +0000\n"
    b"Message-ID: <second-2@new.example.org>\n"
    b"\n"
    b".a line starting with a dot\n"
    b"and the end.\n",
)


@pytest.fixture(scope="session")
def second_dovecot(dovecot_available: None) -> Iterator[Dovecot]:
    """A second running private Dovecot with ``SECOND_USERS``."""
    with running_dovecot(lambda: Dovecot(SECOND_USERS), " (the second upstream)") as server:
        yield server


@pytest.fixture
def second_mailbox(second_dovecot: Dovecot) -> MailboxFactory:
    """Factory: ``second_mailbox(user="dave", messages=SECOND_MESSAGES) -> Mailbox``."""

    def make(user: str = "dave", messages: Sequence[bytes] = SECOND_MESSAGES) -> Mailbox:
        return Mailbox(user, second_dovecot.reset_mailbox(user, messages))

    return make
