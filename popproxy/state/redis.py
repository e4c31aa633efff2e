"""Shared state in Redis or Valkey, through valkey-glide, under trio.

Every operation is one ``EVALSHA`` of ``state.lua`` (one round trip): the
script reads the server's clock (``TIME``), so every worker and host agrees
on time, and does its reads and writes atomically.  The script is not loaded
ahead: the first ``EVALSHA`` after a start (or after Redis lost its script
cache in a restart) answers NOSCRIPT and is followed by one ``EVAL``, which
caches it again; ``calls["script_load"]`` counts those.

Faults, so that no caller ever waits on Redis for longer than ``timeout``:

* every call runs under ``trio.move_on_after(timeout)`` (glide's own
  request timeout is set to the same, so the core gives up on it too);
* a call that times out or cannot reach Redis opens a short circuit: for
  ``retry_interval`` seconds calls fail at once, without waiting, instead of
  each spending ``timeout`` against a Redis known to be away; then calls go
  through again, and the first that succeeds closes it;
* everything that goes wrong comes out as ``StateError(op, reason)``;
  glide reconnects by itself (lazily, with a short backoff), so a Redis that
  comes back is used again without a restart.

Credentials from the URL go to glide and nowhere else: reasons are scrubbed
of the password, and the address shown is ``RedisTarget.__str__``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import trio
from glide import (
    AdvancedGlideClientConfiguration,
    BackoffStrategy,
    ClosingError,
    GlideClient,
    GlideClientConfiguration,
    GlideError,
    Logger,
    LogLevel,
    NodeAddress,
    RequestError,
    ServerCredentials,
)
from glide import ConnectionError as GlideConnectionError
from glide import TimeoutError as GlideTimeoutError

from .base import Clock, HealthTracker, Limit, StateError, StateHealth, Verdict
from .config import RedisTarget, StateConfig
from .script import SCRIPT, SCRIPT_SHA

__all__ = ["RedisState", "glide_configuration", "open_redis_state"]

RETRY_INTERVAL = 1.0
# glide's reconnection backoff: attempts at up to 50 ms * 2^n apart, n
# capped at 4 (0.8 s); so a Redis that came back is found within about a
# second, and a Redis that stays away costs a connection attempt a second.
_BACKOFF = BackoffStrategy(num_of_retries=4, factor=50, exponent_base=2)


def glide_configuration(target: RedisTarget, timeout: float) -> GlideClientConfiguration:
    """The glide client configuration for ``target`` with per-request ``timeout``."""
    timeout_ms = max(1, math.ceil(timeout * 1000))
    if target.unix_socket is not None:
        address = NodeAddress(unix_socket_path=target.unix_socket)
    else:
        address = NodeAddress(target.host, target.port)
    credentials = None
    if target.password is not None:
        credentials = ServerCredentials(password=target.password, username=target.username)
    return GlideClientConfiguration(
        [address],
        use_tls=target.tls,
        credentials=credentials,
        request_timeout=timeout_ms,
        reconnect_strategy=_BACKOFF,
        database_id=target.db or None,
        client_name=f"popproxy-{os.getpid()}",
        advanced_config=AdvancedGlideClientConfiguration(connection_timeout=timeout_ms),
        # Start without Redis: the proxy serves (on_error) until it is there.
        lazy_connect=True,
    )


@contextlib.asynccontextmanager
async def open_redis_state(
    config: StateConfig,
    *,
    retry_interval: float = RETRY_INTERVAL,
    clock: Clock = time.monotonic,
    script_clock: Clock | None = None,
) -> AsyncIterator[RedisState]:
    """A ``RedisState`` for ``config``, its client closed on exit.

    Opening does not connect (nor fail while Redis is down): the first call
    does.  Use it inside the ``trio.run`` that makes the calls.
    ``script_clock`` is for tests only (see ``RedisState``).
    """
    # glide's core logs to the console by itself; its errors reach us as
    # exceptions, which become StateErrors for the caller to log properly.
    Logger.set_logger_config(LogLevel.OFF)
    try:
        client = await GlideClient.create(glide_configuration(config.target, config.timeout))
    except GlideError as exc:
        raise StateError("connect", _reason(exc, config.target)) from None
    try:
        yield RedisState(
            client,
            key_prefix=config.key_prefix,
            timeout=config.timeout,
            target=config.target,
            retry_interval=retry_interval,
            clock=clock,
            script_clock=script_clock,
        )
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(max(1.0, config.timeout)):
            await client.close()


def _is_noscript(exc: RequestError) -> bool:
    # glide words the server's "NOSCRIPT No matching script" as "...
    # NoScriptError: No matching script..."; either form is accepted.
    text = str(exc)
    return "NoScriptError" in text or "NOSCRIPT" in text


def _reason(exc: BaseException, target: RedisTarget) -> str:
    """A one-line reason for ``exc`` that cannot leak the password."""
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    if target.password:
        text = text.replace(target.password, "***")
    return f"{type(exc).__name__}: {text} ({target})"


class RedisState:
    """Implements ``SharedState`` in Redis or Valkey.

    ``clock`` (monotonic) times the circuit and the health fields.
    ``script_clock``, for tests only, passes its times to the script in
    place of the server's ``TIME``, to compare this backend with
    ``MemoryState`` step by step; production leaves it None.
    """

    def __init__(
        self,
        client: GlideClient,
        *,
        key_prefix: str,
        timeout: float,
        target: RedisTarget,
        retry_interval: float = RETRY_INTERVAL,
        clock: Clock = time.monotonic,
        script_clock: Clock | None = None,
    ) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.target = target
        self.retry_interval = retry_interval
        self.clock = clock
        self.script_clock = script_clock
        #: Round trips by operation: one per call, plus "script_load" for
        #: the EVAL that follows a NOSCRIPT.
        self.calls: Counter[str] = Counter()
        self._health = HealthTracker("redis", clock)
        self._open_until = -math.inf  # the circuit: fail fast before this time
        self._down_reason = ""  # why it opened
        self._nonce = itertools.count()
        self._nonce_base = os.urandom(6).hex()

    # ------------------------------------------------------------ plumbing

    def _circuit_open(self) -> bool:
        return self.clock() < self._open_until

    def retry_in(self) -> float:
        """Seconds until a call reaches Redis again after it was found
        unreachable (0.0: now); until then calls fail at once."""
        return max(0.0, self._open_until - self.clock())

    def _fail(self, op: str, reason: str, *, unavailable: bool) -> StateError:
        if unavailable:
            self._open_until = self.clock() + self.retry_interval
            self._down_reason = reason
        error = StateError(op, reason)
        self._health.failed(error)
        return error

    async def _call(
        self, op: str, script_op: str, keys: Sequence[str], args: Sequence[str]
    ) -> object:
        """Run ``script_op`` of the script for API operation ``op``: EVALSHA
        (EVAL on NOSCRIPT), bounded by the timeout."""
        if self._circuit_open():
            raise self._fail(
                op, f"not asked: Redis unavailable ({self._down_reason}); "
                    f"trying again in {self.retry_in():.1f}s",
                unavailable=False,
            )
        now = "" if self.script_clock is None else repr(self.script_clock())
        prefix = self.key_prefix
        command: list[str | bytes] = ["EVALSHA", SCRIPT_SHA, str(len(keys))]
        command += [prefix + k for k in keys]
        command += [script_op, now, *args]
        self.calls[op] += 1
        reply: object = None
        with trio.move_on_after(self.timeout) as scope:
            try:
                try:
                    reply = await self.client.custom_command(command)
                except RequestError as exc:
                    if not _is_noscript(exc):
                        raise
                    self.calls["script_load"] += 1
                    command[:2] = ["EVAL", SCRIPT]
                    reply = await self.client.custom_command(command)
            except (GlideTimeoutError, GlideConnectionError, ClosingError) as exc:
                raise self._fail(op, _reason(exc, self.target), unavailable=True) from None
            except GlideError as exc:  # a script or server error: Redis is there
                raise self._fail(op, _reason(exc, self.target), unavailable=False) from None
        if scope.cancelled_caught:
            raise self._fail(
                op, f"no answer within {self.timeout:g}s ({self.target})", unavailable=True
            )
        self._health.ok()
        return reply

    def _ints(self, op: str, reply: object, n: int) -> tuple[int, ...]:
        if isinstance(reply, list) and len(reply) == n and all(type(v) is int for v in reply):
            return tuple(reply)
        raise self._fail(op, f"unexpected reply {str(reply)[:80]!r}", unavailable=False)

    # ------------------------------------------------------------- limits

    async def take(
        self, items: Sequence[tuple[Limit, float]], *, force: bool = False
    ) -> Verdict:
        if not items:
            return Verdict((), True)
        reply = await self._call("take", "take", *self._take_args(items, force))
        return self._verdict("take", reply, len(items))

    async def charge(self, items: Sequence[tuple[Limit, float]]) -> None:
        if items:
            reply = await self._call("charge", "take", *self._take_args(items, True))
            self._verdict("charge", reply, len(items))

    @staticmethod
    def _take_args(
        items: Sequence[tuple[Limit, float]], force: bool
    ) -> tuple[list[str], list[str]]:
        keys = []
        args = ["1" if force else "0"]
        for limit, cost in items:
            keys.append(limit.key)
            interval = limit.interval
            args += [repr(interval), repr(limit.burst * interval), repr(float(cost))]
        return keys, args

    def _verdict(self, op: str, reply: object, n: int) -> Verdict:
        if isinstance(reply, list) and len(reply) == n + 1:
            try:
                return Verdict(tuple([float(w) for w in reply[1:]]), reply[0] == 1)
            except (TypeError, ValueError):
                pass
        raise self._fail(op, f"unexpected reply {str(reply)[:80]!r}", unavailable=False)

    # ------------------------------------------------------- failed logins

    async def record_failure(
        self, keys: Sequence[str], window: float, keep: int
    ) -> tuple[int, ...]:
        if not keys:
            return ()
        nonce = f"{self._nonce_base}{next(self._nonce)}"
        reply = await self._call(
            "record_failure", "fail", ["lf:" + k for k in keys],
            [repr(float(window)), str(keep), nonce],
        )
        return self._ints("record_failure", reply, len(keys))

    async def count_failures(self, keys: Sequence[str], window: float) -> tuple[int, ...]:
        if not keys:
            return ()
        reply = await self._call(
            "count_failures", "failures", ["lf:" + k for k in keys], [repr(float(window))]
        )
        return self._ints("count_failures", reply, len(keys))

    async def clear_failures(self, keys: Sequence[str]) -> None:
        if keys:
            await self._call("clear_failures", "clear", ["lf:" + k for k in keys], [])

    # -------------------------------------------------------- session caps

    async def acquire_lease(self, cap: str, session: str, limit: int, ttl: float) -> bool:
        reply = await self._call(
            "acquire_lease", "acquire", ["cap:" + cap], [session, str(limit), repr(float(ttl))]
        )
        return self._ints("acquire_lease", [reply], 1) == (1,)

    async def renew_leases(
        self, caps: Sequence[str], session: str, ttl: float
    ) -> tuple[bool, ...]:
        if not caps:
            return ()
        reply = await self._call(
            "renew_leases", "renew", ["cap:" + c for c in caps], [session, repr(float(ttl))]
        )
        return tuple(v == 1 for v in self._ints("renew_leases", reply, len(caps)))

    async def release_leases(self, caps: Sequence[str], session: str) -> None:
        if caps:
            await self._call("release_leases", "release", ["cap:" + c for c in caps], [session])

    async def release_many(self, leases: Sequence[tuple[str, str]]) -> None:
        if leases:
            await self._call("release_leases", "release_many",
                             ["cap:" + cap for cap, _ in leases], [s for _, s in leases])

    async def check_login(
        self, keys: Sequence[str], window: float, limits: Sequence[int],
        cap: str, session: str, cap_limit: int, ttl: float,
    ) -> tuple[tuple[int, ...], bool]:
        reply = await self._call(
            "check_login", "login", [*("lf:" + k for k in keys), "cap:" + cap],
            [repr(float(window)), session, str(cap_limit), repr(float(ttl)),
             *map(str, limits)],
        )
        values = self._ints("check_login", reply, len(keys) + 1)
        return values[:-1], values[-1] == 1

    # -------------------------------------------------------------- health

    def health(self) -> StateHealth:
        return self._health.snapshot(self._health.degraded or self._circuit_open())

    async def check(self) -> bool:
        """PING Redis (bounded by the timeout, the circuit left aside): True if
        it answered.  For a ``/readyz`` probe task while ``health()`` says
        degraded; a success closes the circuit.  Counted as ``calls["ping"]``.
        """
        self.calls["ping"] += 1
        with trio.move_on_after(self.timeout):
            try:
                await self.client.custom_command(["PING"])
            except GlideError as exc:
                self._fail("ping", _reason(exc, self.target), unavailable=True)
                return False
            self._open_until = -math.inf
            self._health.ok()
            return True
        self._fail("ping", f"no answer within {self.timeout:g}s ({self.target})",
                   unavailable=True)
        return False
