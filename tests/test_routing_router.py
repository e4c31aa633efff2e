"""The router: rules, then the map, then the hook, then default; observing; reload."""

from __future__ import annotations

import fnmatch
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from popproxy.addr import HostPort
from popproxy.routing import (
    HTTP_UPSTREAM,
    OUTCOMES,
    SOURCES,
    AuthHttpClient,
    HookSettings,
    LookupFailed,
    NoRoute,
    Refused,
    Route,
    Router,
    RoutingConfig,
    RoutingRule,
    RuleSet,
    parse_map,
)
from tests.auth_responder import AuthResponder, HookRequest, ok
from tests.hook_fakes import FakePool, FakeRequest, FakeResponse, response

NAMES = frozenset({"legacy", "new", "archive"})
MAP = parse_map("alice new\nbob new bob.smith\nar* archive\n", NAMES, "users.map")
HOOK_URL = "http://hook.test/auth"

hook_answer = response


class Hook:
    """A hook without sockets: records users asked, answers with ``answer``."""

    def __init__(self, answer: Callable[[FakeRequest], Awaitable[FakeResponse]]) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def __call__(self, request: FakeRequest) -> FakeResponse:
        self.asked.append(request.header("Auth-User") or "")
        return await self.answer(request)

    def client(self) -> AuthHttpClient:
        return AuthHttpClient(HookSettings(HOOK_URL), pool=FakePool(self))


async def routes_to_new(request: FakeRequest) -> FakeResponse:
    return hook_answer(Auth_Status="OK", Auth_Server="10.0.1.10", Auth_Port="995",
                       Auth_Pass="backend-pw")


def config(**kw: object) -> RoutingConfig:
    return RoutingConfig(**kw)  # type: ignore[arg-type]


Observed = list[tuple[str, str, float]]


def recorder() -> tuple[Observed, Callable[[str, str, float], None]]:
    seen: Observed = []

    def observe(source: str, outcome: str, seconds: float) -> None:
        assert source in SOURCES
        assert outcome in OUTCOMES
        assert seconds >= 0
        seen.append((source, outcome, seconds))

    return seen, observe


def steps(seen: Observed) -> list[tuple[str, str]]:
    return [(s, o) for s, o, _ in seen]


# ------------------------------------------------------------------- rules


def test_rules_first_match_wins_case_insensitively() -> None:
    rules = RuleSet([
        RoutingRule(("acc*", "billing"), "new"),
        RoutingRule(("a*",), "archive", "archivist"),
        RoutingRule(("*",), "legacy"),
    ])
    assert rules.match("Accounting") == RoutingRule(("acc*", "billing"), "new")
    assert rules.match("BILLING").upstream == "new"  # type: ignore[union-attr]
    assert rules.match("alice").upstream == "archive"  # type: ignore[union-attr]
    assert rules.match("zed").upstream == "legacy"  # type: ignore[union-attr]
    assert RuleSet([RoutingRule(("x",), "new")]).match("y") is None
    assert len(rules) == 3


@given(st.lists(st.text("ab*?[]!", min_size=1, max_size=5), min_size=1, max_size=4),
       st.text("abAB", max_size=6))
def test_a_rule_matches_like_fnmatchcase_on_lower_case(globs: list[str], user: str) -> None:
    rule = RoutingRule(tuple(globs), "new")
    expected = any(fnmatch.fnmatchcase(user.lower(), g.lower()) for g in globs)
    assert (RuleSet([rule]).match(user) is not None) is expected


# ------------------------------------------------------------------ router


async def test_rule_then_map_then_hook_then_default() -> None:
    hook = Hook(routes_to_new)
    seen, observe = recorder()
    async with hook.client() as client:
        router = Router(
            config(default="legacy", map_file=Path("users.map"), auth_http=HOOK_URL,
                   rules=(RoutingRule(("acc*",), "new", "accounts"),)),
            MAP, client, observer=observe)

        assert await router.lookup("accountant", "pw1") == Route(
            "new", "rule", "accounts", "pw1")
        assert steps(seen) == [("rule", "hit")]

        seen.clear()
        assert await router.lookup("Bob", "pw2") == Route("new", "map", "bob.smith", "pw2")
        assert await router.lookup("alice", "pw3") == Route("new", "map", "alice", "pw3")
        assert await router.lookup("arnold", "pw4") == Route("archive", "map", "arnold", "pw4")
        assert steps(seen) == [("rule", "miss"), ("map", "hit")] * 3
        assert hook.asked == []  # the hook is asked only when rules and map miss

        seen.clear()
        result = await router.lookup("carol", "pw5", client_ip="192.0.2.1")
        assert result == Route(HTTP_UPSTREAM, "http", "carol", "backend-pw",
                               HostPort("10.0.1.10", 995))
        assert steps(seen) == [("rule", "miss"), ("map", "miss"), ("http", "hit")]
        assert hook.asked == ["carol"]


async def test_default_and_no_route() -> None:
    seen, observe = recorder()
    router = Router(config(default="legacy"), observer=observe)
    assert await router.lookup("anyone", "pw") == Route("legacy", "default", "anyone", "pw")
    assert steps(seen) == [("default", "hit")]  # no rules, no map, no hook: not consulted
    router = Router(config(rules=(RoutingRule(("a*",), "new"),)), observer=observe)
    seen.clear()
    assert await router.lookup("zed", "pw") == NoRoute()
    assert steps(seen) == [("rule", "miss"), ("default", "miss")]


async def test_hook_ok_without_a_server_goes_to_default() -> None:
    async def vouch(request: FakeRequest) -> FakeResponse:
        return hook_answer(Auth_Status="OK", Auth_User="carol@legacy", Auth_Pass="legacy-pw")

    seen, observe = recorder()
    async with Hook(vouch).client() as client:
        router = Router(config(default="legacy", auth_http=HOOK_URL), None, client,
                        observer=observe)
        assert await router.lookup("carol", "pw") == Route(
            "legacy", "default", "carol@legacy", "legacy-pw")
        assert steps(seen) == [("http", "hit"), ("default", "hit")]

        seen.clear()
        router.reload(config(auth_http=HOOK_URL))  # now without a default
        result = await router.lookup("carol", "pw")
        assert isinstance(result, LookupFailed)
        assert result.kind == "error"
        assert "routing.default is not set" in result.reason
        assert steps(seen) == [("http", "hit"), ("default", "miss")]


async def test_refusal_and_failure_never_fall_through_to_default() -> None:
    async def answer(request: FakeRequest) -> FakeResponse:
        if request.header("Auth-User") == "mallory":
            return hook_answer(Auth_Status="Invalid login or password", Auth_Wait="3")
        return hook_answer(Auth_Status="OK", Auth_Server="mail.example.org", Auth_Port="110")

    seen, observe = recorder()
    async with Hook(answer).client() as client:
        router = Router(config(default="legacy", auth_http=HOOK_URL), None, client,
                        observer=observe)
        assert await router.lookup("mallory", "x") == Refused("Invalid login or password", 3)
        failed = await router.lookup("carol", "x")
        assert failed == LookupFailed("Auth-Server is not an IP address: 'mail.example.org'",
                                      "error")
        assert steps(seen) == [("http", "refused"), ("http", "error")]


async def test_a_silent_hook_times_out_and_other_lookups_go_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def answer(request: FakeRequest) -> FakeResponse:
        if request.header("Auth-User") == "slow":
            await trio.sleep_forever()
        await trio.sleep(0.25)
        return await routes_to_new(request)

    seen, observe = recorder()
    async with Hook(answer).client() as client:
        # The router applies the config's hook settings to the client.
        router = Router(config(map_file=Path("users.map"), auth_http=HOOK_URL,
                               auth_http_timeout=2.0),
                        MAP, client, observer=observe, clock=trio.current_time)
        results: dict[str, tuple[float, object]] = {}
        start = trio.current_time()

        async def one(user: str) -> None:
            result = await router.lookup(user, "pw")
            results[user] = (trio.current_time() - start, result)

        async with trio.open_nursery() as nursery:
            for user in ("slow", "alice", "carol"):
                nursery.start_soon(one, user)
    assert results["slow"][1] == LookupFailed("no answer from the hook within 2s", "timeout")
    assert results["slow"][0] == pytest.approx(2.0, abs=0.01)
    assert results["alice"] == (0.0, Route("new", "map", "alice", "pw"))
    assert results["carol"][0] == pytest.approx(0.25, abs=0.01)
    durations = {(s, o): d for s, o, d in seen}
    assert durations[("http", "timeout")] == pytest.approx(2.0, abs=0.01)
    assert durations[("http", "hit")] == pytest.approx(0.25, abs=0.01)
    assert durations[("map", "hit")] == 0.0


async def test_reload_swaps_tables_for_new_lookups_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def vouch_slowly(request: FakeRequest) -> FakeResponse:
        await trio.sleep(1.0)
        return hook_answer(Auth_Status="OK")

    async with Hook(vouch_slowly).client() as client:
        router = Router(config(default="legacy", auth_http=HOOK_URL), None, client)
        moved = parse_map("carol new\n", NAMES, "users.map")
        in_flight: list[object] = []

        async def lookup() -> None:
            in_flight.append(await router.lookup("carol", "pw"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup)
            await trio.sleep(0.5)  # the lookup is waiting for the hook
            router.reload(config(default="archive", map_file=Path("users.map"),
                                 auth_http=HOOK_URL), moved)
        # The lookup that was running finished with the tables it started with.
        assert in_flight == [Route("legacy", "default", "carol", "pw")]
        assert await router.lookup("carol", "pw") == Route("new", "map", "carol", "pw")
        assert await router.lookup("dave", "pw") == Route("archive", "default", "dave", "pw")
        assert router.user_map is moved


async def test_a_bad_reload_keeps_the_old_tables() -> None:
    router = Router(config(map_file=Path("users.map")), MAP)
    with pytest.raises(ValueError, match="pass the loaded map"):
        router.reload(config(default="legacy", map_file=Path("users.map")), None)
    with pytest.raises(ValueError, match="pass an AuthHttpClient"):
        router.reload(config(auth_http=HOOK_URL))
    assert router.user_map is MAP
    assert await router.lookup("dave", "pw") == NoRoute()  # still the old: no default
    with pytest.raises(ValueError, match="pass an AuthHttpClient"):
        Router(config(auth_http=HOOK_URL))


async def test_reload_reconfigures_the_hook() -> None:
    hook = Hook(routes_to_new)
    # Created without settings, as a server without auth_http would.
    async with AuthHttpClient(pool=FakePool(hook)) as client:
        router = Router(config(default="legacy"), None, client)
        assert await router.lookup("carol", "pw") == Route("legacy", "default", "carol", "pw")
        router.reload(config(auth_http=HOOK_URL + "?v=2", auth_http_timeout=3.0,
                             auth_http_concurrency=5))
        assert client.settings == HookSettings(HOOK_URL + "?v=2", 3.0, 5)
        result = await router.lookup("carol", "pw")
        assert isinstance(result, Route)
        assert result.source == "http"
        assert hook.asked == ["carol"]


def test_route_repr_hides_the_password() -> None:
    route = Route("new", "map", "alice", "Zq9-distinctive")
    assert "Zq9-distinctive" not in repr(route)
    assert "Zq9-distinctive" not in str(route)


async def test_with_a_real_responder(nursery: trio.Nursery) -> None:
    def answer(req: HookRequest) -> bytes:
        return ok("127.0.0.1", 1110, ("Auth-User", f"{req.header('Auth-User')}.backend"))

    responder: AuthResponder = await nursery.start(AuthResponder(answer).serve)
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        router = Router(config(auth_http=responder.url), None, client)
        result = await router.lookup("carol", "pw", client_ip="192.0.2.9", login_attempt=2,
                                     tls=True)
    assert result == Route("http", "http", "carol.backend", "pw", HostPort("127.0.0.1", 1110))
    (req,) = responder.requests
    assert req.header("Client-IP") == "192.0.2.9"
    assert req.header("Auth-Login-Attempt") == "2"
    assert req.header("Auth-SSL") == "on"
