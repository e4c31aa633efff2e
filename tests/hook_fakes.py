"""A stand-in for httpcore's connection pool: an auth_http hook without sockets.

``AuthHttpClient(settings, pool=FakePool(answer))`` sends every request to
``answer``, an async callable from ``FakeRequest`` to ``FakeResponse``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FakePool", "FakeRequest", "FakeResponse", "response"]


@dataclass(frozen=True)
class FakeRequest:
    method: bytes
    url: str
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None:
        """The value of ``name`` (case-insensitive), None when absent."""
        values = [v.decode("utf-8", "surrogateescape") for k, v in self.headers
                  if k.lower() == name.lower().encode()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


@dataclass
class FakeResponse:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    async def aiter_stream(self) -> AsyncIterator[bytes]:
        if self.body:
            yield self.body


def response(status: int = 200, **headers: str) -> FakeResponse:
    """``response(Auth_Status="OK")``: underscores in names become dashes."""
    return FakeResponse(status, [(k.replace("_", "-").encode(), v.encode("utf-8"))
                                 for k, v in headers.items()])


class FakePool:
    def __init__(self, answer: Callable[[FakeRequest], Awaitable[FakeResponse]]) -> None:
        self.answer = answer

    @asynccontextmanager
    async def stream(
        self, method: bytes, url: str, *, headers: list[tuple[bytes, bytes]],
        extensions: dict[str, Any],
    ) -> AsyncIterator[FakeResponse]:
        yield await self.answer(FakeRequest(method, url, headers))

    async def aclose(self) -> None:
        pass
