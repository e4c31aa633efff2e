"""How the command line ends when the world says no.

* An address that cannot be bound (in use, a port below 1024 without the
  right to bind it, an address this host does not have) is a mistake of
  configuration or deployment, not a bug: ``popproxy run`` says so in one
  line naming the address and the reason, and exits with status 1, as for
  a bad configuration.  ``CannotListen`` carries that line out of the
  nurseries; ``cannot_listen`` finds it in the exception group trio raises.
* A command whose standard output is closed early (``popproxy audit search
  ... | head``) stops quietly, as ``grep`` does: no ``BrokenPipeError``
  traceback, exit status 141 (128 + SIGPIPE, what the shell shows for a
  process that SIGPIPE ended).  ``quiet_on_closed_pipe`` wraps a command.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from .addr import HostPort

__all__ = ["CLOSED_PIPE", "CannotListen", "cannot_listen", "quiet_on_closed_pipe"]

#: The exit status after standard output was closed under us.
CLOSED_PIPE = 128 + signal.SIGPIPE


class CannotListen(OSError):
    """An address could not be bound: ``str()`` is the operator's line."""

    def __init__(self, what: str, address: HostPort, error: OSError) -> None:
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(error.errno, f"cannot {what} on {address}: {reason}")
        self.address = address

    def __str__(self) -> str:
        return str(self.strerror)


def cannot_listen(exc: BaseException) -> CannotListen | None:
    """The first ``CannotListen`` in ``exc`` (itself, or nested in exception
    groups, or its cause), None if there is none."""
    if isinstance(exc, CannotListen):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = cannot_listen(inner)
            if found is not None:
                return found
    return None


def quiet_on_closed_pipe(command: Callable[[], int]) -> int:
    """Run ``command``; if its standard output is closed under it, stop
    quietly with ``CLOSED_PIPE`` (see the module docstring)."""
    try:
        status = command()
        sys.stdout.flush()  # what print() buffered fails here, not at exit
        return status
    except BrokenPipeError:
        # Python flushes stdout again at exit, and would complain about the
        # same pipe: point the descriptor at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
        return CLOSED_PIPE
