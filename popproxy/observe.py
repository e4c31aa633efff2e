"""The observer contract: who hears which session events, and what they see.

An observer is a callable ``observe(info, event)``.  ``info`` is a
``SessionInfo``, a read-only view of the session the event belongs to (its
id, its client, who is logged in): observers never get the live ``Session``
and cannot steer it.  ``Dispatcher.emit`` hands each event to the observers
that listen for its type (``listens_to``), in order, and keeps one
observer's failure from reaching the data path or the other observers.

No trio, no I/O: the trio shell (``server.py``, ``relay.py``) calls
``emit``; audit, metrics and logs implement observers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import structlog

from .events import AuthResult, Event

__all__ = ["Dispatcher", "Observer", "SessionInfo", "listens_to"]

logger = structlog.get_logger("popproxy.observe")


class SessionInfo:
    """What observers know about the session an event belongs to.

    ``user`` is the authenticated user, once the upstream accepted a login:
    the dispatcher learns it from the ``AuthResult`` event itself, before
    any observer hears that event.
    """

    __slots__ = ("_user", "client", "id")

    def __init__(self, id: str, client: str, user: str | None = None) -> None:
        self.id = id
        self.client = client
        self._user = user

    @property
    def user(self) -> str | None:
        return self._user

    def __repr__(self) -> str:
        return f"SessionInfo(id={self.id!r}, client={self.client!r}, user={self._user!r})"


Observer = Callable[[SessionInfo, Event], None]
_O = TypeVar("_O", bound=Callable[..., None])


def listens_to(*kinds: type[Event]) -> Callable[[_O], _O]:
    """Mark an observer that only acts on these event types.

    The dispatcher then does not call it for the others: a few function
    calls saved per event add up, as every command makes two events.  An
    object whose bound method observes may instead have an ``event_types``
    attribute.
    """
    def mark(observer: _O) -> _O:
        observer.event_types = frozenset(kinds)  # type: ignore[attr-defined]
        return observer
    return mark


def hears(observer: Observer, kind: type[Event]) -> bool:
    """Whether ``observer`` listens for events of type ``kind``."""
    kinds = getattr(observer, "event_types", None)
    if kinds is None:
        owner = getattr(observer, "__self__", None)
        kinds = getattr(owner, "event_types", None)
    return kinds is None or kind in kinds


class Dispatcher:
    """Routes events to the observers of a (mutable) list.

    The list may change at any time (an observer attached or removed); the
    routing table is worked out again when it has.
    """

    __slots__ = ("_routed", "_routes", "observers")

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = observers
        self._routed: tuple[Observer, ...] = ()
        self._routes: dict[type[Event], tuple[Observer, ...]] = {}

    def route(self, kind: type[Event]) -> tuple[Observer, ...]:
        """The observers that hear events of type ``kind``, in order."""
        observers = tuple(self.observers)
        if observers != self._routed:  # an observer came or went
            self._routed = observers
            self._routes.clear()
        hear = self._routes.get(kind)
        if hear is None:
            hear = self._routes[kind] = tuple(o for o in observers if hears(o, kind))
        return hear

    def emit(self, info: SessionInfo, events: Iterable[Event]) -> None:
        if tuple(self.observers) != self._routed:
            self.route(Event)  # work the table out again
        routes = self._routes
        for event in events:
            if isinstance(event, AuthResult) and event.ok:
                info._user = event.user
            hear = routes.get(type(event))
            if hear is None:
                hear = self.route(type(event))
            for observe in hear:
                try:
                    observe(info, event)
                except Exception:
                    # An observer's failure is reported, never allowed to
                    # break the data path of this or any other session.
                    logger.exception("observer.failed", observer=repr(observe))
