"""Per-user routing (DESIGN.md part 2): config, map file, rules, the
nginx-compatible auth_http hook, the router combining them, address pools.

Self-contained: nothing here does POP3 I/O or knows the session; the
server asks ``Router.lookup`` where a login goes and ``Pools`` which
address to try.
"""

from .authhttp import (
    AuthHttpClient,
    AuthRequest,
    HookFailure,
    HookRefusal,
    HookResult,
    HookRoute,
    HookSettings,
)
from .config import RoutingConfig, RoutingRule, parse_routing
from .mapfile import MapEntry, MapFileError, UserMap, load_map_file, parse_map
from .pool import Pools
from .router import (
    HTTP_UPSTREAM,
    OUTCOMES,
    SOURCES,
    LookupFailed,
    LookupObserver,
    NoRoute,
    Refused,
    Route,
    Router,
    RouteResult,
)
from .rules import RuleSet

__all__ = [
    "HTTP_UPSTREAM",
    "OUTCOMES",
    "SOURCES",
    "AuthHttpClient",
    "AuthRequest",
    "HookFailure",
    "HookRefusal",
    "HookResult",
    "HookRoute",
    "HookSettings",
    "LookupFailed",
    "LookupObserver",
    "MapEntry",
    "MapFileError",
    "NoRoute",
    "Pools",
    "Refused",
    "Route",
    "RouteResult",
    "Router",
    "RoutingConfig",
    "RoutingRule",
    "RuleSet",
    "UserMap",
    "load_map_file",
    "parse_map",
    "parse_routing",
]
