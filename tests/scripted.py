"""A scripted POP3 upstream and client-side readers for in-memory proxy tests.

``logged_in_upstream`` greets, accepts any login and answers +OK, unless
told otherwise per verb; the tests that drive a whole proxy (``app.build``)
over in-memory streams put it behind the proxy.
"""

from __future__ import annotations

import trio

__all__ = ["logged_in_upstream", "read_all", "read_until"]


async def read_until(stream: trio.abc.Stream, end: bytes, limit: int = 1 << 24) -> bytes:
    """Read until the data ends with ``end`` (EOF before it fails the test)."""
    data = b""
    while not data.endswith(end):
        chunk = await stream.receive_some(65536)
        assert chunk, data[-200:]
        data += chunk
        assert len(data) < limit
    return data


async def read_all(stream: trio.abc.Stream, limit: int = 1 << 24) -> bytes:
    """Read until EOF (or the stream breaks)."""
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
            assert len(data) < limit
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return data


async def logged_in_upstream(stream: trio.abc.Stream,
                             answers: dict[bytes, bytes] | None = None) -> None:
    """Greets, accepts any login, answers the commands in ``answers`` (a
    verb to its whole reply), +OK to other commands, and never answers the
    verbs mapped to b"" (it hangs).  QUIT closes after its reply."""
    answers = answers or {}
    await stream.send_all(b"+OK scripted\r\n")
    buf = b""
    try:
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                verb = line.split(b" ", 1)[0].upper()
                reply = answers.get(verb, b"+OK\r\n")
                if reply == b"":
                    await trio.sleep_forever()
                await stream.send_all(reply)
                if verb == b"QUIT":
                    await stream.aclose()
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
