"""Helpers for the shared-state tests: a settable clock and the two backends
behind one fixture."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from popproxy.state import MemoryState, SharedState, parse_state
from popproxy.state.redis import RedisState, open_redis_state
from tests.redis_server import RedisServer

__all__ = ["FakeClock", "backend_state", "redis_state"]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def redis_state(
    server: RedisServer,
    prefix: str,
    *,
    script_clock: FakeClock | None = None,
    clock: FakeClock | None = None,
    url: str | None = None,
) -> AsyncIterator[RedisState]:
    """A RedisState on ``server`` under key prefix ``prefix``, 250 ms timeout;
    ``clock`` times its circuit (default: the real monotonic clock)."""
    config = parse_state({
        "backend": "redis", "url": url or server.url, "key_prefix": prefix, "timeout": "250ms",
    })
    async with open_redis_state(
        config, script_clock=script_clock, clock=clock or time.monotonic
    ) as state:
        yield state


@contextlib.asynccontextmanager
async def backend_state(
    kind: str, clock: FakeClock, server: RedisServer | None, prefix: str
) -> AsyncIterator[SharedState]:
    """``kind`` ("memory" or "redis") on the fake ``clock``: MemoryState reads
    it, RedisState passes its times to the script instead of the server's."""
    if kind == "memory":
        yield MemoryState(clock=clock)
        return
    assert server is not None
    async with redis_state(server, prefix, script_clock=clock) as state:
        yield state
