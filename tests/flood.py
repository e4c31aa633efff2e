"""A client that floods the proxy before login (issue 17), for the tests and
``benchmarks/flood_bench.py`` alike."""

from __future__ import annotations

import time
from dataclasses import dataclass

import trio

__all__ = ["JUNK", "Flood", "flood"]

#: An unknown verb with a 1,000-octet argument, as in issue 17's reproduction.
JUNK = b"XJUNK " + b"A" * 1000 + b"\r\n"


@dataclass(frozen=True)
class Flood:
    """What one flooding connection saw."""

    received: bytes  # what came back
    sent: int  # JUNK lines that went out
    seconds: float  # from connect to the end
    closed: bool  # the proxy closed the connection (not our time limit)


async def flood(port: int, *, seconds: float = 5.0, most: int = 5000) -> Flood:
    """Send ``JUNK`` on a new connection to 127.0.0.1:``port`` until the
    proxy closes it (or ``seconds``, or ``most`` lines)."""
    start = time.perf_counter()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    sent = 0
    closed = trio.Event()

    async def reader() -> None:
        try:
            while chunk := await stream.receive_some(65536):
                received.extend(chunk)
        except trio.BrokenResourceError:
            pass  # a reset: the proxy closed with our junk unread (what was sent is read)
        closed.set()

    async with trio.open_nursery() as inner:
        inner.start_soon(reader)
        with trio.move_on_after(seconds):
            while sent < most and not closed.is_set():
                try:
                    await stream.send_all(JUNK * 8)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                sent += 8
            await closed.wait()
        inner.cancel_scope.cancel()
    await stream.aclose()
    return Flood(bytes(received), sent, time.perf_counter() - start, closed.is_set())
