"""pytest fixtures for the real Dovecot POP3 server (see tests/dovecot.py).

Load it with ``pytest_plugins = ["tests.dovecot_fixtures"]`` in tests/conftest.py (a
star import gets the fixtures but not the end-of-run banner hook).

* ``dovecot_available`` (session, yields None): ensures Dovecot is installed
  (apt-get as root if needed).  Without it the tests that use it are skipped
  with a loud reason (and a banner at the end of the run), or fail when
  ``CI=true`` (CI must not go green by skipping them).
* ``dovecot`` (session): one running ``Dovecot`` for the whole session.
* ``fresh_mailbox`` (function): a callable ``(user="alice", messages=SAMPLE_MESSAGES)
  -> Mailbox`` that empties a user's Maildir and delivers ``messages``.
* ``mailbox`` (function): ``fresh_mailbox()`` for alice with the sample messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import pytest

from tests.dovecot import SAMPLE_MESSAGES, Dovecot, DovecotError, ensure_dovecot
from tests.peers import MissingPeer

__all__ = [
    "Mailbox",
    "MailboxFactory",
    "dovecot",
    "dovecot_available",
    "fresh_mailbox",
    "mailbox",
]


class Mailbox(NamedTuple):
    """A freshly filled mailbox.

    ``messages[i]`` is what ``RETR i+1`` returns: CRLF line endings, already
    dot-unstuffed, ending in CRLF (i.e. poplib's lines each + b"\\r\\n").
    The password is ``dovecot.users[user]``.
    """

    user: str
    messages: list[bytes]


MailboxFactory = Callable[..., Mailbox]


# Why Dovecot could not be had this session (for the end-of-run banner).
_missing = MissingPeer("REAL DOVECOT", "interoperability test",
                       "apt-get install dovecot-core dovecot-pop3d (as root)")
_unavailable = _missing.unavailable


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Repeat loudly, once, at the very end, that these tests did not run."""
    _missing.summary(terminalreporter)


@pytest.fixture(scope="session")
def dovecot_available() -> None:
    """Skip (or, with CI=true, fail) unless Dovecot with POP3 is installed.

    Installs it with apt-get first when missing and running as root.
    """
    reason = ensure_dovecot()
    if reason is not None:
        _unavailable(reason)


@contextlib.contextmanager
def running_dovecot(make: Callable[[], Dovecot], what: str = "") -> Iterator[Dovecot]:
    """``make()`` started, and stopped afterwards.  When it cannot be set up
    or started, the test is skipped (failed under CI=true) with a reason
    that ends in ``what`` (e.g. " with TLS")."""
    try:
        server = make()
    except (DovecotError, OSError) as exc:
        _unavailable(f"Dovecot is installed but could not be set up{what}: {exc}")
    try:
        server.start()
    except (DovecotError, OSError) as exc:
        server.stop()
        _unavailable(f"Dovecot is installed but could not be started{what}: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dovecot(dovecot_available: None) -> Iterator[Dovecot]:
    """A running private Dovecot POP3 server, shared by the whole session."""
    with running_dovecot(Dovecot) as server:
        yield server


@pytest.fixture
def fresh_mailbox(dovecot: Dovecot) -> MailboxFactory:
    """Factory: ``fresh_mailbox(user="alice", messages=SAMPLE_MESSAGES) -> Mailbox``.

    Recreates the user's Maildir (UIDs restart at 1) and delivers the messages
    in order, so message number i+1 is ``messages[i]``.
    """

    def make(user: str = "alice", messages: Sequence[bytes] = SAMPLE_MESSAGES) -> Mailbox:
        return Mailbox(user, dovecot.reset_mailbox(user, messages))

    return make


@pytest.fixture
def mailbox(fresh_mailbox: MailboxFactory) -> Mailbox:
    """alice's mailbox, emptied and filled with the sample messages (4 of them,
    including body lines ".hidden line", "." and "..two dots")."""
    return fresh_mailbox()
