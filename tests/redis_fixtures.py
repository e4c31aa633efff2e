"""pytest fixtures for a real redis-server (see tests/redis_server.py).

Loaded through ``pytest_plugins`` in tests/conftest.py (so that the
end-of-run banner hook is registered too).

* ``redis_available`` (session): ensures ``redis-server`` is installed
  (apt-get as root if needed).  Without it the tests that use it are
  skipped with a loud reason and a banner at the end of the run, or fail
  when ``CI=true`` (CI must not go green by skipping them).
* ``redis_server`` (session): one running server shared by the session;
  tests keep apart by key prefix (``redis_prefix``).
* ``private_redis`` (function): a server of the test's own, for tests that
  stop, freeze or restart it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.peers import MissingPeer
from tests.redis_server import RedisServer, RedisServerError, ensure_redis

__all__ = ["private_redis", "redis_available", "redis_prefix", "redis_server", "running_redis"]

_missing = MissingPeer("REAL REDIS", "shared-state test", "apt-get install redis-server (as root)")
_unavailable = _missing.unavailable


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Repeat loudly, once, at the very end, that these tests did not run."""
    _missing.summary(terminalreporter)


@pytest.fixture(scope="session")
def redis_available() -> None:
    """Skip (or, with CI=true, fail) unless redis-server is installed.

    Installs it with apt-get first when missing and running as root.
    """
    reason = ensure_redis()
    if reason is not None:
        _unavailable(reason)


@contextlib.contextmanager
def running_redis(make: Callable[[], RedisServer] = RedisServer) -> Iterator[RedisServer]:
    """``make()`` started, and stopped afterwards; skipped (failed under
    CI=true) with the reason when it cannot be started."""
    try:
        server = make()
    except (RedisServerError, OSError) as exc:
        _unavailable(f"redis-server is installed but could not be set up: {exc}")
    try:
        server.start()
    except (RedisServerError, OSError) as exc:
        server.stop()
        _unavailable(f"redis-server is installed but could not be started: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(redis_available: None) -> Iterator[RedisServer]:
    """A running private redis-server, shared by the whole session."""
    with running_redis() as server:
        yield server


@pytest.fixture
def private_redis(redis_available: None) -> Iterator[RedisServer]:
    """A redis-server of this test's own (to stop, freeze or restart)."""
    with running_redis() as server:
        yield server


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses, on the shared server."""
    return f"test-{uuid.uuid4().hex[:12]}:"
