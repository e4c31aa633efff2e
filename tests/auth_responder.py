"""A small nginx-style ``auth_http`` responder for the tests, on trio.

It listens on 127.0.0.1, port 0, in the test's own trio run (so trio's
MockClock governs both ends), records every request and answers with the
raw bytes its ``answer`` callable returns, or never answers when it
returns None (the connection is held until the client closes it)::

    responder = AuthResponder(lambda req: reply(("Auth-Status", "OK"), ...))
    await nursery.start(responder.serve)
    client = AuthHttpClient(HookSettings(responder.url, timeout=2.0))

Raw bytes on purpose: tests can send what a broken responder sends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

__all__ = ["AuthResponder", "HookRequest", "ok", "refuse", "reply"]

_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class HookRequest:
    """One request as received: the request line and the headers in order."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The value of ``name`` (case-insensitive), None when absent."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


def reply(*headers: tuple[str, str], status: str = "200 OK", body: bytes = b"") -> bytes:
    """An HTTP/1.0 response with these headers (nginx's examples use 1.0)."""
    head = f"HTTP/1.0 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + body


def ok(server: str = "127.0.0.1", port: int = 110, *extra: tuple[str, str]) -> bytes:
    return reply(("Auth-Status", "OK"), ("Auth-Server", server), ("Auth-Port", str(port)),
                 *extra)


def refuse(text: str = "Invalid login or password", wait: int | None = None) -> bytes:
    extra = [("Auth-Wait", str(wait))] if wait is not None else []
    return reply(("Auth-Status", text), *extra)


class AuthResponder:
    """Answers each request with ``answer(request)``; None: never answers.

    An unanswered request is held until the client closes the connection,
    so ``hanging`` counts the requests a client still keeps open.
    """

    def __init__(self, answer: Callable[[HookRequest], bytes | None]) -> None:
        self.answer = answer
        self.requests: list[HookRequest] = []
        #: Connections being held without an answer right now.
        self.hanging = 0
        self.max_hanging = 0
        self.url = ""
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[AuthResponder] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/auth"
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                if len(data) > _MAX_HEAD:
                    return
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            request_line, *lines = head.split("\r\n")
            method, target, _version = request_line.split(" ", 2)
            headers = tuple(
                (k, v.strip()) for k, _, v in (line.partition(":") for line in lines)
            )
            request = HookRequest(method, target, headers)
            self.requests.append(request)
            answer = self.answer(request)
            if answer is None:
                self.hanging += 1
                self.max_hanging = max(self.max_hanging, self.hanging)
                try:
                    # Hold the request until the client gives up and closes.
                    while await stream.receive_some(65536):
                        pass
                except trio.BrokenResourceError:
                    pass
                finally:
                    self.hanging -= 1
                return
            try:
                await stream.send_all(answer)
            except trio.BrokenResourceError:
                return
