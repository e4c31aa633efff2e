"""Routed mode end to end: one proxy in front of two real Dovecots.

The first Dovecot (``dovecot``) plays the legacy box, the second
(``second_dovecot``, tests/second_upstream.py) the new server; ``alice``
exists on both with different mail, so a test can tell where a login went.
Clients are Python's poplib, curl and mpop; every route (rule, map file,
auth_http hook, default) is checked against a direct session to the server
it should reach.
"""

from __future__ import annotations

import poplib
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from prometheus_client import generate_latest

from popproxy.app import build, load, reload
from popproxy.audit import AuditConfig, RecordBuilder
from popproxy.cli import main
from popproxy.config import Config, ConfigError, HostPort, parse_config
from popproxy.events import AuthResult, Event, SessionClosed
from popproxy.observe import SessionInfo
from tests.auth_responder import AuthResponder, HookRequest, ok, refuse
from tests.clients import ClientRun, client_env, run_client, write_mpop_config
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox, MailboxFactory
from tests.proxy_fixtures import RunningProxy, start_proxy_config
from tests.second_upstream import SECOND_MESSAGES

Fetched = tuple[tuple[int, int], list[bytes], list[bytes], list[bytes]]
SECRET = "Zq8-distinctive-pw!"  # must never reach logs, audit, metrics


def fetch_all(host: str, port: int, user: str, password: str) -> Fetched:
    """STAT, LIST, UIDL and every RETR of one session (poplib, blocking)."""
    p = poplib.POP3(host, port, timeout=20)
    try:
        p.user(user)
        p.pass_(password)
        stat = p.stat()
        listing = p.list()[1]
        uidl = p.uidl()[1]
        bodies = [b"\r\n".join(p.retr(i)[1]) for i in range(1, stat[0] + 1)]
        p.quit()
    finally:
        p.close()
    return stat, listing, uidl, bodies


def address(d: Dovecot) -> str:
    return f"{d.host}:{d.port}"


def routed(legacy: Dovecot, new: Dovecot, routing: dict[str, Any],
           new_address: str | list[str] | None = None) -> Config:
    return parse_config({
        "listen": {"address": "127.0.0.1:0"},
        "upstreams": {
            "legacy": {"address": address(legacy)},
            "new": {"address": new_address if new_address is not None else address(new)},
        },
        "routing": routing,
    })


class Audit:
    """The audit's record builder beside the proxy, and SessionClosed waits."""

    def __init__(self, running: RunningProxy) -> None:
        self.builder = RecordBuilder(AuditConfig(enabled=True))
        self.records: list[dict[str, Any]] = []
        running.proxy.observers.insert(0, self)

    def __call__(self, info: SessionInfo, event: Event) -> None:
        self.records += self.builder.observe(info, event)

    def auths(self) -> list[tuple[str | None, bool, str | None, str | None]]:
        return [(r.get("user"), r["outcome"] == "ok", r.get("upstream"), r.get("route"))
                for r in self.records if r["event"] == "auth"]


@pytest.fixture
def legacy_alice(fresh_mailbox: MailboxFactory) -> Mailbox:
    return fresh_mailbox("alice")


@pytest.fixture
def new_boxes(second_mailbox: Callable[..., Mailbox]) -> dict[str, Mailbox]:
    return {user: second_mailbox(user, SECOND_MESSAGES) for user in ("alice", "dave", "erin")}


async def through(running: RunningProxy, user: str, password: str) -> Fetched:
    return await trio.to_thread.run_sync(fetch_all, running.host, running.port, user, password)


async def direct(d: Dovecot, user: str) -> Fetched:
    return await trio.to_thread.run_sync(fetch_all, d.host, d.port, user, d.users[user])


async def test_rule_map_and_default_send_each_user_to_their_server(
    nursery: trio.Nursery, dovecot: Dovecot, second_dovecot: Dovecot, tmp_path: Path,
    legacy_alice: Mailbox, new_boxes: dict[str, Mailbox], fresh_mailbox: MailboxFactory,
) -> None:
    fresh_mailbox("bob")
    users_map = tmp_path / "users.map"
    users_map.write_text("# moved this week\nalice new\n")
    running = await start_proxy_config(nursery, routed(dovecot, second_dovecot, {
        "default": "legacy", "map_file": str(users_map),
        "rules": [{"users": ["dave", "er*"], "upstream": "new"}],
    }))
    audit = Audit(running)
    with trio.fail_after(60):
        for user, server in (("dave", second_dovecot), ("erin", second_dovecot),
                             ("alice", second_dovecot), ("bob", dovecot)):
            got = await through(running, user, server.users[user])
            assert got == await direct(server, user), user
        await running.wait_for(SessionClosed, 4)
    # alice's mail on the new server is not her legacy mail: the map moved her.
    assert (await direct(dovecot, "alice"))[3] != (await direct(second_dovecot, "alice"))[3]
    assert audit.auths() == [("dave", True, "new", "rule"), ("erin", True, "new", "rule"),
                             ("alice", True, "new", "map"), ("bob", True, "legacy", "default")]
    closes = [r for r in audit.records if r["event"] == "session.close"]
    assert [c["upstream"] for c in closes] == [address(second_dovecot)] * 3 + [address(dovecot)]


async def test_curl_and_mpop_through_routing(
    nursery: trio.Nursery, dovecot: Dovecot, second_dovecot: Dovecot, tmp_path: Path,
    new_boxes: dict[str, Mailbox],
) -> None:
    from tests.clients import maildir_messages, require_program
    from tests.test_real_clients import curl_pop3, lf_form

    curl = require_program("curl", "curl")
    mpop = require_program("mpop", "mpop")
    running = await start_proxy_config(nursery, routed(dovecot, second_dovecot, {
        "default": "legacy", "rules": [{"users": ["dave", "erin"], "upstream": "new"}]}))
    password = second_dovecot.users["dave"]
    with trio.fail_after(60):
        for path in ("", "1", "2"):  # curl logs in with SASL PLAIN here
            run: ClientRun = await curl_pop3(curl, running.host, running.port, "dave", password,
                                             path, tmp_path)
            want = await curl_pop3(curl, second_dovecot.host, second_dovecot.port, "dave",
                                   password, path, tmp_path)
            assert run.check().stdout == want.check().stdout, path
        maildir = tmp_path / "Maildir"
        config = write_mpop_config(tmp_path, host=running.host, port=running.port, user="erin",
                                   password=second_dovecot.users["erin"], auth="user",
                                   maildir=maildir)
        (await run_client([mpop, f"--file={config}", "--keep=on", "--half-quiet", "proxy"],
                          env=client_env(tmp_path))).check()
    assert sorted(maildir_messages(maildir)) == sorted(lf_form(new_boxes["erin"].messages))
    mechanisms = [e.mechanism for e in running.of_type(AuthResult)]
    assert mechanisms == ["PLAIN"] * 3 + ["USER"]


async def test_the_auth_hook_routes_and_rewrites(
    nursery: trio.Nursery, dovecot: Dovecot, second_dovecot: Dovecot,
    new_boxes: dict[str, Mailbox],
) -> None:
    def answer(request: HookRequest) -> bytes:
        if request.header("Auth-User") == "hook-erin" and request.header("Auth-Pass") == SECRET:
            return ok(second_dovecot.host, second_dovecot.port, ("Auth-User", "erin"),
                      ("Auth-Pass", second_dovecot.users["erin"]))
        return refuse("Invalid login or password", wait=1)

    hook: AuthResponder = await nursery.start(AuthResponder(answer).serve)
    running = await start_proxy_config(nursery, routed(dovecot, second_dovecot, {
        "auth_http": hook.url, "auth_http_timeout": "5s"}))
    with trio.fail_after(60):
        got = await through(running, "hook-erin", SECRET)
        assert got == await direct(second_dovecot, "erin")
        started = trio.current_time()
        with pytest.raises(poplib.error_proto, match="Invalid login or password"):
            await through(running, "hook-erin", "wrong")
        assert trio.current_time() - started >= 1.0  # Auth-Wait held the refusal
    first = hook.requests[0]
    assert (first.method, first.header("Auth-Method"), first.header("Auth-Protocol"),
            first.header("Auth-Login-Attempt"), first.header("Client-IP")) == (
        "GET", "plain", "pop3", "1", "127.0.0.1")
    auths = [(a.user, a.ok, a.upstream, a.route) for a in running.of_type(AuthResult)]
    assert auths == [("hook-erin", True, "http", "http"), ("hook-erin", False, None, None)]


async def test_a_hook_that_never_answers(
    nursery: trio.Nursery, dovecot: Dovecot, second_dovecot: Dovecot,
    new_boxes: dict[str, Mailbox],
) -> None:
    """-ERR [SYS/TEMP] within the timeout (plus a little); others unaffected."""
    hook: AuthResponder = await nursery.start(AuthResponder(lambda request: None).serve)
    running = await start_proxy_config(nursery, routed(dovecot, second_dovecot, {
        "auth_http": hook.url, "auth_http_timeout": "1s",
        "rules": [{"users": ["dave"], "upstream": "new"}]}))
    outcome: list[tuple[str, float]] = []

    def hanging_login() -> None:
        began = trio.from_thread.run_sync(trio.current_time)
        try:
            fetch_all(running.host, running.port, "somebody", "x")
        except poplib.error_proto as exc:
            outcome.append((str(exc), trio.from_thread.run_sync(trio.current_time) - began))

    with trio.fail_after(30):
        async with trio.open_nursery() as both:
            both.start_soon(trio.to_thread.run_sync, hanging_login)
            # Routed by rule meanwhile: the hook is never asked.
            assert await through(running, "dave", second_dovecot.users["dave"]) == (
                await direct(second_dovecot, "dave"))
    ((text, waited),) = outcome
    assert "[SYS/TEMP]" in text
    assert 1.0 <= waited < 3.0


async def test_a_pool_skips_an_address_that_is_down(
    nursery: trio.Nursery, dovecot: Dovecot, second_dovecot: Dovecot,
    new_boxes: dict[str, Mailbox],
) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        dead = HostPort("127.0.0.1", closed.getsockname()[1])
        pool = [str(dead), address(second_dovecot)]
        running = await start_proxy_config(nursery, routed(dovecot, second_dovecot, {
            "default": "new", "down_time": "60s"}, new_address=pool))
        with trio.fail_after(60):
            for _ in range(3):
                assert await through(running, "dave", second_dovecot.users["dave"]) == (
                    await direct(second_dovecot, "dave"))
    pools = running.proxy.pools
    assert pools is not None
    assert not pools.is_up("new", dead)
    registry = running.app.metrics.registry
    # One failed connect: the next two sessions went straight to the second address.
    assert registry.get_sample_value("popproxy_upstream_errors_total", {"reason": "connect"}) == 1


async def test_wrong_password_then_the_right_one_on_one_connection(
    nursery: trio.Nursery, dovecot: Dovecot, second_dovecot: Dovecot,
    new_boxes: dict[str, Mailbox],
) -> None:
    running = await start_proxy_config(nursery, routed(dovecot, second_dovecot, {
        "default": "new"}))

    def twice() -> tuple[int, int]:
        p = poplib.POP3(running.host, running.port, timeout=20)
        try:
            p.user("dave")
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                p.pass_("not-the-password")
            p.user("dave")
            p.pass_(second_dovecot.users["dave"])
            stat = p.stat()
            p.quit()
            return stat
        finally:
            p.close()

    with trio.fail_after(30):
        assert await trio.to_thread.run_sync(twice) == (await direct(second_dovecot, "dave"))[0]
    assert [a.ok for a in running.of_type(AuthResult)] == [False, True]


async def test_an_upstream_that_closes_after_a_failed_pass(nursery: trio.Nursery) -> None:
    """The client still gets the -ERR, stays in AUTHORIZATION and logs in next time."""
    connections = 0

    async def upstream(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        buf = b""
        await stream.send_all(b"+OK legacy ready\r\n")
        while True:
            while b"\r\n" not in buf:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buf += data
            line, buf = buf.split(b"\r\n", 1)
            if line.startswith(b"PASS ") and line != b"PASS right":
                await stream.send_all(b"-ERR [AUTH] Authentication failed.\r\n")
                await stream.aclose()  # as some servers do
                return
            await stream.send_all(b"+OK 0 0\r\n" if line == b"STAT" else b"+OK\r\n")
            if line == b"QUIT":
                return

    listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    running = await start_proxy_config(nursery, parse_config({
        "listen": {"address": "127.0.0.1:0"}, "upstreams": {"legacy": {
            "address": f"127.0.0.1:{port}"}}, "routing": {"default": "legacy"}}))

    def twice() -> bytes:
        p = poplib.POP3(running.host, running.port, timeout=20)
        try:
            p.user("u")
            with pytest.raises(poplib.error_proto, match=r"Authentication failed"):
                p.pass_("wrong")
            p.user("u")
            p.pass_("right")
            count, size = p.stat()
            p.quit()
            return b"+OK %d %d" % (count, size)
        finally:
            p.close()

    with trio.fail_after(30):
        assert await trio.to_thread.run_sync(twice) == b"+OK 0 0"
    assert connections == 2


async def test_sighup_moves_a_user_and_a_live_session_stays(
    nursery: trio.Nursery, dovecot: Dovecot, second_dovecot: Dovecot, tmp_path: Path,
    legacy_alice: Mailbox, new_boxes: dict[str, Mailbox],
) -> None:
    users_map = tmp_path / "users.map"
    users_map.write_text("alice legacy\n")
    config_file = tmp_path / "popproxy.toml"
    config_file.write_text(
        f'[listen]\naddress = "127.0.0.1:0"\n'
        f'[upstreams.legacy]\naddress = "{address(dovecot)}"\n'
        f'[upstreams.new]\naddress = "{address(second_dovecot)}"\n'
        f'[routing]\nmap_file = "{users_map}"\n')
    running = await start_proxy_config(nursery, load(config_file))
    legacy_mail = (await direct(dovecot, "alice"))[3]
    new_mail = (await direct(second_dovecot, "alice"))[3]
    assert legacy_mail != new_mail

    live = await trio.to_thread.run_sync(poplib.POP3, running.host, running.port, 20)
    try:
        await trio.to_thread.run_sync(live.user, "alice")
        await trio.to_thread.run_sync(live.pass_, dovecot.users["alice"])
        users_map.write_text("alice new\n")
        assert reload(running.app, lambda: load(config_file))
        with trio.fail_after(30):
            assert (await through(running, "alice", dovecot.users["alice"]))[3] == new_mail
            # The session that was open stays where it logged in.
            body = await trio.to_thread.run_sync(live.retr, 1)
        assert b"\r\n".join(body[1]) == legacy_mail[0]
        await trio.to_thread.run_sync(live.quit)
    finally:
        live.close()
    users_map.write_text("alice nowhere\n")  # a bad map keeps the old one
    assert not reload(running.app, lambda: load(config_file))
    with trio.fail_after(30):
        assert (await through(running, "alice", dovecot.users["alice"]))[3] == new_mail


async def test_credentials_never_reach_logs_audit_or_metrics(
    nursery: trio.Nursery, dovecot: Dovecot, second_dovecot: Dovecot,
    new_boxes: dict[str, Mailbox],
) -> None:
    """A distinctive password: a failing hook, a hook refusal, a failed
    upstream login and a good one; it appears nowhere an operator reads."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_hook = f"http://127.0.0.1:{closed.getsockname()[1]}/auth"
        cases: list[tuple[dict[str, Any], str]] = [
            ({"auth_http": dead_hook}, "dave"),  # the hook is down
            ({"rules": [{"users": ["dave"], "upstream": "new"}]}, "dave"),  # wrong password
        ]
        records: list[dict[str, Any]] = []
        with structlog.testing.capture_logs() as logs:
            for routing, user in cases:
                running = await start_proxy_config(
                    nursery, routed(dovecot, second_dovecot, routing))
                audit = Audit(running)
                with trio.fail_after(30), pytest.raises(poplib.error_proto):
                    await through(running, user, SECRET)
                await running.wait_for(SessionClosed)
                records += audit.records
                exposition = generate_latest(running.app.metrics.registry).decode()
                assert SECRET not in exposition
                assert SECRET not in repr(running.events)
    assert records
    assert SECRET not in repr(records)
    assert logs
    assert SECRET not in repr(logs)


def test_config_errors_name_the_key_and_the_map_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"upstreams": {"legacy": {"address": "127.0.0.1:110"}}}
    with pytest.raises(ConfigError, match=r"routing\.default"):
        parse_config({**base, "routing": {"default": "nowhere"}})
    with pytest.raises(ConfigError, match=r"upstreams: named upstreams are only used"):
        parse_config({**base, "upstream": {"address": "127.0.0.1:110"}})
    users_map = tmp_path / "users.map"
    users_map.write_text("alice legacy\nbob elsewhere\n")
    config_file = tmp_path / "popproxy.toml"
    config_file.write_text('[upstreams.legacy]\naddress = "127.0.0.1:110"\n'
                           f'[routing]\nmap_file = "{users_map}"\n')
    assert main(["check-config", str(config_file)]) == 1
    err = capsys.readouterr().err
    assert "users.map:2" in err
    assert "elsewhere" in err


def test_transparent_mode_is_untouched() -> None:
    """Without [routing], the proxy builds no router (APOP passes, greeting relayed)."""
    app = build(parse_config({"upstream": {"address": "127.0.0.1:110"}}))
    assert app.proxy.router is None
    assert app.hook is None
