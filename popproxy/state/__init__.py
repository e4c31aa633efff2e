"""Shared state for rate limits, failed-login throttling and session caps.

``[state] backend = "memory"`` keeps them in this process (``MemoryState``);
``"redis"`` in a Redis or Valkey that every worker and replica shares
(``RedisState``, through valkey-glide).  Both implement ``SharedState``;
``open_state(config)`` gives the one the configuration names.  This package
decides nothing: the policy engine asks, and applies ``on_error`` when a
call raises ``StateError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from .base import Limit, SharedState, StateError, StateHealth, Verdict
from .config import RedisTarget, StateConfig, parse_state
from .memory import MemoryState

__all__ = [
    "Limit",
    "MemoryState",
    "RedisTarget",
    "SharedState",
    "StateConfig",
    "StateError",
    "StateHealth",
    "Verdict",
    "open_state",
    "parse_state",
]


@contextlib.asynccontextmanager
async def open_state(config: StateConfig) -> AsyncIterator[SharedState]:
    """The backend ``config`` names, open for the duration of the block.

    The Redis client library is imported only when it is used.
    """
    if config.backend == "memory":
        yield MemoryState()
        return
    from .redis import open_redis_state

    async with open_redis_state(config) as state:
        yield state
