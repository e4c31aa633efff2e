"""Address pools with failover in order, and their up/down state.

Pure bookkeeping, no I/O: the caller connects and reports back.  For each
session::

    for address in pools.candidates("new"):
        try:
            stream = await connect_and_read_greeting(address)
        except (OSError, ...):
            pools.mark_down("new", address)   # skipped for down_time
            continue
        pools.mark_up("new", address)
        break
    else:
        ...  # -ERR [SYS/TEMP]: nothing answered

``candidates`` lists the addresses not marked down, in configured order;
when every address is down, the first is tried anyway (the marks might be
stale, and refusing without trying would turn a blip into an outage).

The clock is injectable (``time.monotonic`` by default; ``trio.current_time``
under trio makes the marks follow trio's MockClock in tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from ..addr import HostPort

__all__ = ["Pools"]


class Pools:
    """The pools of all named upstreams and the down marks of their addresses."""

    def __init__(
        self,
        upstreams: Mapping[str, Sequence[HostPort]],
        down_time: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._upstreams: dict[str, tuple[HostPort, ...]] = {}
        self._down_until: dict[tuple[str, HostPort], float] = {}
        self.down_time = down_time
        self.reconfigure(upstreams, down_time)

    def reconfigure(self, upstreams: Mapping[str, Sequence[HostPort]], down_time: float) -> None:
        """Take a new set of pools (a reload); marks of addresses kept stay."""
        new = {name: tuple(addresses) for name, addresses in upstreams.items()}
        for name, addresses in new.items():
            if not addresses:
                raise ValueError(f"upstream {name!r} has no address")
        self._upstreams = new
        self._down_until = {
            key: until for key, until in self._down_until.items()
            if key[1] in new.get(key[0], ())
        }
        self.down_time = down_time

    def candidates(self, upstream: str) -> tuple[HostPort, ...]:
        """The addresses to try, in order: those up, else just the first.

        ``KeyError`` for an upstream that is not configured.
        """
        addresses = self._upstreams[upstream]
        now = self._clock()
        up = tuple(a for a in addresses if self._down_until.get((upstream, a), now) <= now)
        return up or addresses[:1]

    def mark_down(self, upstream: str, address: HostPort) -> bool:
        """The address failed to connect or greet: skip it for ``down_time``.

        Returns True when it was up before (a transition worth logging).
        """
        key = self._key(upstream, address)
        was_up = self.is_up(upstream, address)
        self._down_until[key] = self._clock() + self.down_time
        return was_up

    def mark_up(self, upstream: str, address: HostPort) -> bool:
        """The address answered: clear its mark.  True when it was down."""
        key = self._key(upstream, address)
        was_down = not self.is_up(upstream, address)
        self._down_until.pop(key, None)
        return was_down

    def is_up(self, upstream: str, address: HostPort) -> bool:
        key = self._key(upstream, address)
        until = self._down_until.get(key)
        return until is None or until <= self._clock()

    def snapshot(self) -> list[tuple[str, HostPort, bool]]:
        """``(upstream, address, up)`` for every configured address, in order.

        Evaluate it at scrape time (a mark expires without any event), e.g.
        from a custom collector feeding ``popproxy_upstream_up``.
        """
        now = self._clock()
        return [
            (name, a, self._down_until.get((name, a), now) <= now)
            for name, addresses in self._upstreams.items()
            for a in addresses
        ]

    def _key(self, upstream: str, address: HostPort) -> tuple[str, HostPort]:
        if address not in self._upstreams[upstream]:
            raise KeyError(f"{address} is not in upstream {upstream!r}")
        return (upstream, address)
