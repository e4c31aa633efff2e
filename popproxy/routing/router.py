"""Where a login goes: rules, then the map file, then the hook, then default.

``Router.lookup`` answers one of:

``Route``
    connect to ``upstream`` (a configured name, or ``"http"`` with
    ``address`` for a server the hook named) and log in there as
    ``backend_user`` with ``password``; ``source`` is what decided
    (``rule``, ``map``, ``http``, ``default``: the audit's ``route``).
``NoRoute``
    nothing routes this user and there is no ``default``: ``-ERR [AUTH]``.
``Refused``
    the hook refused the login: ``-ERR`` with its text, after ``wait``
    seconds when given.
``LookupFailed``
    the hook is down, slow or talking nonsense: ``-ERR [SYS/TEMP]``.
    A failing hook never falls through to ``default``: that would send
    users to a server that may not hold their mail.

The hook is consulted only when neither a rule nor the map routed the
user, and it also authenticates (as nginx's does), so with a hook
configured ``default`` is reached only when the hook answers ``OK``
without naming a server: the hook vouched for the login (and may have
rewritten user and password) and left the choice of server to us.

Observing: ``observer(source, outcome, seconds)`` is called once for each
source consulted, in order, with ``source`` in ``SOURCES`` and ``outcome``
in ``OUTCOMES`` (both closed sets, fit for metric labels).  It runs inline
in the lookup: keep it cheap, and it must not raise.

``hit``      the source routed the user (for ``default``: there is one)
``miss``     it had nothing for the user, the next source is asked
``refused``  the hook refused the login
``timeout``  the hook did not answer in time
``error``    the hook could not be reached or its answer was unusable

Reload: ``reload(config, user_map)`` swaps rules, map, default and hook
settings in one assignment; a lookup already running finishes with the
tables it started with, the next one sees only the new ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from ..addr import HostPort
from .authhttp import AuthHttpClient, AuthRequest, HookFailure, HookRefusal, HookSettings
from .config import RoutingConfig
from .mapfile import UserMap
from .rules import RuleSet

__all__ = [
    "HTTP_UPSTREAM",
    "OUTCOMES",
    "SOURCES",
    "LookupFailed",
    "LookupObserver",
    "NoRoute",
    "Outcome",
    "Refused",
    "Route",
    "RouteResult",
    "Router",
    "Source",
]

Source = Literal["rule", "map", "http", "default"]
Outcome = Literal["hit", "miss", "refused", "timeout", "error"]
SOURCES: Final[tuple[Source, ...]] = ("rule", "map", "http", "default")
OUTCOMES: Final[tuple[Outcome, ...]] = ("hit", "miss", "refused", "timeout", "error")
#: The ``upstream`` of routes to a server the hook named (a bounded label).
HTTP_UPSTREAM: Final = "http"

LookupObserver = Callable[[Source, Outcome, float], None]


@dataclass(frozen=True, slots=True)
class Route:
    """Log in at ``upstream`` as ``backend_user`` with ``password``."""

    upstream: str  # a configured upstream's name, or HTTP_UPSTREAM
    source: Source
    backend_user: str
    password: str = field(repr=False)  # only until the upstream login; never log it
    address: HostPort | None = None  # set for HTTP_UPSTREAM: the hook's server


@dataclass(frozen=True, slots=True)
class NoRoute:
    """Nothing routes the user and there is no default: ``-ERR [AUTH]``."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The hook refused: answer ``-ERR text`` after ``wait`` seconds."""

    text: str
    wait: int | None  # None: the hook sent no Auth-Wait (nginx then closes)


@dataclass(frozen=True, slots=True)
class LookupFailed:
    """The hook failed; ``reason`` is for logs: ``-ERR [SYS/TEMP]`` to the client."""

    reason: str
    kind: Literal["timeout", "error"]


RouteResult = Route | NoRoute | Refused | LookupFailed


@dataclass(frozen=True, slots=True)
class _Tables:
    rules: RuleSet
    user_map: UserMap | None
    hook: bool
    default: str | None


class Router:
    """Per-user routing for one process.

    ``user_map`` is required when ``config.map_file`` is set (load it with
    ``load_map_file``), ``hook`` when ``config.auth_http`` is: create one
    ``AuthHttpClient()`` for the life of the server, even without
    ``auth_http`` (a reload may add it); the router gives it its settings.
    ``clock`` times the lookups for ``observer``.
    """

    def __init__(
        self,
        config: RoutingConfig,
        user_map: UserMap | None = None,
        hook: AuthHttpClient | None = None,
        *,
        observer: LookupObserver | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._hook = hook
        self._observer = observer
        self._clock = clock
        self._tables = self._build(config, user_map)

    def _build(self, config: RoutingConfig, user_map: UserMap | None) -> _Tables:
        if config.map_file is not None and user_map is None:
            raise ValueError("routing.map_file is set: pass the loaded map")
        settings = HookSettings.from_config(config)
        if settings is not None and self._hook is None:
            raise ValueError("routing.auth_http is set: pass an AuthHttpClient")
        if settings is not None and self._hook is not None:
            self._hook.reconfigure(settings)
        return _Tables(
            rules=RuleSet(config.rules),
            user_map=user_map if config.map_file is not None else None,
            hook=settings is not None,
            default=config.default,
        )

    def reload(self, config: RoutingConfig, user_map: UserMap | None = None) -> None:
        """Use a new ``[routing]`` (and map) for lookups that start from now on.

        Validates first; on ``ValueError`` the old tables stay in force.
        """
        tables = self._build(config, user_map)
        self._tables = tables

    @property
    def user_map(self) -> UserMap | None:
        """The map in force (to keep it when a reloaded file is bad)."""
        return self._tables.user_map

    def _observe(self, source: Source, outcome: Outcome, started: float) -> None:
        if self._observer is not None:
            self._observer(source, outcome, self._clock() - started)

    async def lookup(
        self,
        user: str,
        password: str,
        *,
        client_ip: str = "",
        login_attempt: int = 1,
        client_host: str | None = None,
        tls: bool = False,
    ) -> RouteResult:
        """Route one login (``user`` as the client sent it)."""
        t = self._tables

        if len(t.rules):
            started = self._clock()
            rule = t.rules.match(user)
            self._observe("rule", "miss" if rule is None else "hit", started)
            if rule is not None:
                return Route(rule.upstream, "rule", rule.backend_user or user, password)

        if t.user_map is not None:
            started = self._clock()
            entry = t.user_map.lookup(user)
            self._observe("map", "miss" if entry is None else "hit", started)
            if entry is not None:
                return Route(entry.upstream, "map", entry.backend_user or user, password)

        if t.hook and self._hook is not None:
            started = self._clock()
            answer = await self._hook.lookup(AuthRequest(
                user, password, client_ip=client_ip, login_attempt=login_attempt,
                client_host=client_host, tls=tls,
            ))
            if isinstance(answer, HookFailure):
                self._observe("http", answer.kind, started)
                return LookupFailed(answer.reason, answer.kind)
            if isinstance(answer, HookRefusal):
                self._observe("http", "refused", started)
                return Refused(answer.text, answer.wait)
            self._observe("http", "hit", started)
            if answer.address is not None:
                return Route(HTTP_UPSTREAM, "http", answer.user, answer.password,
                             answer.address)
            # OK without a server: the hook vouched, the default decides.
            user, password = answer.user, answer.password
            if t.default is None:
                started = self._clock()
                self._observe("default", "miss", started)
                return LookupFailed(
                    "the hook answered OK without Auth-Server and routing.default is not set",
                    "error")

        started = self._clock()
        self._observe("default", "miss" if t.default is None else "hit", started)
        if t.default is None:
            return NoRoute()
        return Route(t.default, "default", user, password)
