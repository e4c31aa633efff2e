"""A real peer the tests need but could not have: skip loudly, or fail in CI.

One ``MissingPeer`` per kind of peer (Dovecot, redis-server, rsyslog):
``unavailable(reason)`` skips the test with a loud reason, or fails it
under ``CI=true`` (CI must not go green by skipping them), and
``summary(reporter)`` repeats the reasons in a banner at the end of the
run, from the fixture module's ``pytest_terminal_summary`` hook.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["MissingPeer"]


class MissingPeer:
    """Why a real peer could not be had this session, and what to do."""

    def __init__(self, peer: str, tests: str, fix: str) -> None:
        self.peer = peer  # "REAL DOVECOT"
        self.tests = tests  # "interoperability test"
        self.fix = fix  # "apt-get install dovecot-core dovecot-pop3d (as root)"
        self.reasons: list[str] = []

    def unavailable(self, reason: str) -> NoReturn:
        """Skip the test (with ``CI=true``: fail it), saying why."""
        if reason not in self.reasons:
            self.reasons.append(reason)
        message = f"{self.peer} NOT AVAILABLE, {self.tests} NOT run: {reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

    def summary(self, tr: pytest.TerminalReporter) -> None:
        """Repeat loudly, once, at the very end, that these tests did not run."""
        if not self.reasons:
            return
        tr.section(f"{self.peer.removeprefix('REAL ')} TESTS DID NOT RUN",
                   sep="!", red=True, bold=True)
        tr.write_line(
            f"The {self.tests}s against a {self.peer.lower()} were "
            + ("FAILED (CI=true)." if os.environ.get("CI") == "true" else "SKIPPED."),
            red=True, bold=True)
        for reason in self.reasons:
            tr.write_line(f"Reason: {reason}", red=True)
        tr.write_line(f"Fix: {self.fix}", red=True)
