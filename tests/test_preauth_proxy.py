"""Hostile clients before login, through the running proxy (issue 17).

A flood of unknown verbs is answered, then closed, at a bounded cost to
the audit trail; reconnecting to flood on is bounded per client address;
mistyped verbs never bring a password to the audit file or the debug log
(against a real Dovecot, before login and after); PASS without USER is the
proxy's to refuse.
"""

from __future__ import annotations

import json
import poplib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.audit import AuditConfig, AuditTrail, open_audit
from popproxy.config import HostPort
from popproxy.events import SessionClosed
from popproxy.session_state import TOO_MANY_REFUSED
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox
from tests.flood import Flood, flood
from tests.log_capture import captured_log
from tests.proxy_fixtures import RunningProxy, start_proxy

SECRET = "Zebra-Staple-9!"


@dataclass
class Audited:
    running: RunningProxy
    trail: AuditTrail
    path: Path

    async def settle(self, sessions: int) -> None:
        """Until ``sessions`` sessions closed: their records are written by then."""
        with trio.fail_after(30):
            await self.running.wait_for(SessionClosed, sessions)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_bytes().splitlines()]


async def audited_proxy(nursery: trio.Nursery, upstream: HostPort, path: Path) -> Audited:
    """The proxy with a file trail attached as ``popproxy run`` attaches it
    (every command recorded: ``commands = "all"``, the default)."""
    running = await start_proxy(nursery, upstream)
    trail = open_audit(AuditConfig(enabled=True, sink="file", path=path, fail_closed=True),
                       running.app.metrics)
    assert trail is not None
    running.proxy.observers.insert(0, trail.observe)
    await nursery.start(trail.write_behind)
    return Audited(running, trail, path)


@pytest.fixture
async def demo_audited(
    nursery: trio.Nursery, demo_upstream: HostPort, tmp_path: Path
) -> AsyncIterator[Audited]:
    audited = await audited_proxy(nursery, demo_upstream, tmp_path / "audit.jsonl")
    yield audited
    audited.trail.close()


async def test_four_flooding_connections_are_closed_at_a_bounded_audit_cost(
    demo_audited: Audited,
) -> None:
    before = demo_audited.path.stat().st_size if demo_audited.path.exists() else 0
    results: list[Flood] = []

    async def one() -> None:
        results.append(await flood(demo_audited.running.port))

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(one)
        await demo_audited.settle(4)
    for result in results:
        replies = result.received.splitlines()[1:]  # after the greeting
        assert replies[-1] == TOO_MANY_REFUSED.rstrip()  # closed by the proxy, told why
        assert len(replies) == 11
    growth = demo_audited.path.stat().st_size - before
    assert growth < 256 * 1024
    records = demo_audited.records()
    commands = [r for r in records if r["event"] == "command"]
    assert len(commands) == 4 * 11
    assert all(r["verb"] == "OTHER" and r["args"] is None and r["arg_octets"] == 1000
               for r in commands)
    assert b"AAAA" not in demo_audited.path.read_bytes()
    closes = [r for r in records if r["event"] == "session.close"]
    assert [(r["reason"], r["outcome"]) for r in closes] == [
        ("client error", "protocol_error")] * 4


async def test_reconnecting_to_flood_is_bounded_per_client_address(
    demo_audited: Audited,
) -> None:
    """160 sessions from one address, 11 refused commands each: at most
    ``prelogin_commands_per_client`` (256) command records a minute, and the
    rest counted in the sessions' ``session.close``."""
    sessions = 0

    async def reconnecting() -> None:
        nonlocal sessions
        for _ in range(40):
            received = (await flood(demo_audited.running.port)).received
            assert received.endswith(TOO_MANY_REFUSED)
            sessions += 1

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(reconnecting)
        await demo_audited.settle(sessions)
    records = demo_audited.records()
    written = sum(r["event"] == "command" for r in records)
    suppressed = sum(r.get("suppressed_commands", 0) for r in records
                     if r["event"] == "session.close")
    assert written == AuditConfig().prelogin_commands_per_client
    assert written + suppressed == 160 * 11



@pytest.fixture
async def dovecot_audited(
    nursery: trio.Nursery, dovecot: Dovecot, tmp_path: Path
) -> AsyncIterator[Audited]:
    audited = await audited_proxy(nursery, HostPort(dovecot.host, dovecot.port),
                                  tmp_path / "audit.jsonl")
    yield audited
    audited.trail.close()


MISTYPED = ("PASSS", "PAS", "XPASS", "PASS:", "PASSWORD")


@pytest.mark.dovecot
async def test_mistyped_verbs_never_bring_a_password_to_audit_or_log(
    dovecot_audited: Audited, dovecot: Dovecot, mailbox: Mailbox,
) -> None:
    """Before login (refused by the proxy) and after (Dovecot's -ERR), every
    mistyped verb's argument stays out of the trail and the debug log."""
    user, _ = mailbox
    password = dovecot.users[user]
    audited = dovecot_audited

    def ask(p: poplib.POP3, line: str) -> bytes:
        try:
            return p._shortcmd(line)  # type: ignore[attr-defined,no-any-return]
        except poplib.error_proto as exc:
            return exc.args[0]  # type: ignore[no-any-return]

    def client() -> list[bytes]:
        p = poplib.POP3(audited.running.host, audited.running.port, timeout=30)
        answers = [ask(p, f"{verb} {password}") for verb in MISTYPED[:3]]  # under the limit
        p.user(user)
        p.pass_(password)
        answers += [ask(p, f"{verb} {password}") for verb in MISTYPED]
        p.quit()
        return answers

    with captured_log("debug") as log:
        with trio.fail_after(30):
            answers = await trio.to_thread.run_sync(client)
            await audited.settle(1)
    assert all(a.startswith(b"-ERR") for a in answers)
    assert len(answers) == 3 + len(MISTYPED)
    trail = audited.path.read_text("utf-8")
    text = log.getvalue().decode("utf-8")
    assert password not in trail
    assert password not in text
    for verb in MISTYPED:
        assert f'"{verb}"' not in trail
        assert f'"{verb}"' not in text
    unknown = [r for r in audited.records() if r.get("verb") == "OTHER"]
    # After login the policy's built-in rules (or Dovecot) refuse them.
    assert [(r.get("user"), r["outcome"] != "ok", r["arg_octets"]) for r in unknown] == [
        (None, True, len(password))] * 3 + [
        # "PASS:" is no verb at all: a malformed line, whose words are not kept.
        (user, True, 0 if verb.endswith(":") else len(password)) for verb in MISTYPED]
    logged = [json.loads(ln) for ln in text.splitlines()]
    assert sum(ln.get("verb") == "OTHER" for ln in logged) == 3 + len(MISTYPED)


@pytest.mark.dovecot
async def test_pass_without_user_is_refused_by_the_proxy(
    dovecot_audited: Audited, dovecot: Dovecot, mailbox: Mailbox,
) -> None:
    user, _ = mailbox
    password = dovecot.users[user]
    audited = dovecot_audited

    def client() -> None:
        p = poplib.POP3(audited.running.host, audited.running.port, timeout=30)
        with pytest.raises(poplib.error_proto, match="No username given"):
            p.pass_(password)
        p.user(user)
        p.pass_(password)
        p.quit()

    with trio.fail_after(30):
        await trio.to_thread.run_sync(client)
        await audited.settle(1)
    records = audited.records()
    auths = [r for r in records if r["event"] == "auth"]
    assert [(r["user"], r["outcome"]) for r in auths] == [(user, "ok")]
    assert all("user" not in r or r["user"] is not None for r in records)
    first_pass = next(r for r in records if r.get("verb") == "PASS")
    assert first_pass["outcome"] == "denied"
