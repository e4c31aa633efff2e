"""A stand-in for the hook client's connection pool: an auth_http hook without sockets.

``AuthHttpClient(settings, pool=FakePool(answer))`` sends every request to
``answer``, an async callable from ``FakeRequest`` to ``FakeResponse``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from popproxy.routing.authhttp import HttpAnswer

__all__ = ["FakePool", "FakeRequest", "FakeResponse", "response"]


@dataclass(frozen=True)
class FakeRequest:
    """A ``GET`` as the client hands it to its pool (no ``Host``: the pool adds it)."""

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


def response(status: int = 200, **headers: str) -> FakeResponse:
    """``response(Auth_Status="OK")``: underscores in names become dashes."""
    return FakeResponse(status, [(k.replace("_", "-").encode(), v.encode("utf-8"))
                                 for k, v in headers.items()])


class FakePool:
    """What ``AuthHttpClient`` needs of its pool (``authhttp.Pool``), without sockets."""

    def __init__(self, answer: Callable[[FakeRequest], Awaitable[FakeResponse]]) -> None:
        self.answer = answer
        self.closed = False

    async def get(self, url: str, headers: list[tuple[bytes, bytes]]) -> HttpAnswer:
        answer = await self.answer(FakeRequest(url, headers))
        return HttpAnswer(answer.status, answer.headers)

    async def aclose(self) -> None:
        self.closed = True
