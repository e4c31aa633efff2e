"""The audit trail through the proxy, against a real Dovecot.

Each test runs the proxy as ``app.build`` assembles it, with a file audit
trail (hash chain, fsync per session, fail_closed) attached as
``popproxy run`` attaches it, and compares the records with what Dovecot
itself says: message bytes fetched directly, UIDLs, and what is left in the
Maildir afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import poplib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from prometheus_client import generate_latest

from popproxy.audit import AuditConfig, AuditTrail, open_audit
from popproxy.audit.cli import main as audit_main
from popproxy.config import HostPort
from popproxy.events import SessionClosed
from popproxy.logs import configure_logging
from popproxy.policy.config import parse_policy
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox, MailboxFactory
from tests.proxy_fixtures import RunningProxy, start_proxy

pytestmark = pytest.mark.dovecot

# Fields that differ from run to run; the rest of a record is compared exactly.
VOLATILE = {"ts", "session", "client", "seq", "prev", "hash", "latency", "duration",
            "bytes_in", "bytes_out", "upstream", "upstream_in", "upstream_out"}


@dataclass
class Audited:
    running: RunningProxy
    trail: AuditTrail
    path: Path

    @property
    def host(self) -> str:
        return self.running.host

    @property
    def port(self) -> int:
        return self.running.port

    async def settle(self, sessions: int = 1) -> None:
        """Wait until the proxy has closed ``sessions`` sessions: their
        records are written by then (the trail observes first, and a
        session's close writes what waits)."""
        with trio.fail_after(20):
            await self.running.wait_for(SessionClosed, sessions)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_bytes().splitlines()]

    def stable(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in self.records()]


def attach(running: RunningProxy, config: AuditConfig) -> AuditTrail:
    """Attach a trail the way ``app.run`` does (observer first, so it is current)."""
    trail = open_audit(config, running.app.metrics)
    assert trail is not None
    running.proxy.observers.insert(0, trail.observe)
    running.proxy.admission.append(lambda peer: trail.refusal())
    return trail


@pytest.fixture
async def audited(
    nursery: trio.Nursery, dovecot: Dovecot, tmp_path: Path
) -> AsyncIterator[Audited]:
    running = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port))
    path = tmp_path / "audit.jsonl"
    trail = attach(running, AuditConfig(enabled=True, sink="file", path=path, fail_closed=True))
    await nursery.start(trail.write_behind)  # as app.run runs it
    yield Audited(running, trail, path)
    trail.close()


def direct(dovecot: Dovecot, user: str) -> poplib.POP3:
    p = poplib.POP3(dovecot.host, dovecot.port, timeout=30)
    p.user(user)
    p.pass_(dovecot.users[user])
    return p


def direct_uidls(dovecot: Dovecot, user: str) -> dict[int, str]:
    """Message number -> UIDL, asked of Dovecot directly."""
    p = direct(dovecot, user)
    listing = {int(n): u.decode() for n, u in (x.split() for x in p.uidl()[1])}
    p.quit()
    return listing


def joined(lines: list[bytes]) -> bytes:
    """poplib's unstuffed lines back into the message octets."""
    return b"".join(line + b"\r\n" for line in lines)


def message_id(message: bytes) -> str:
    m = re.search(rb"(?im)^message-id:\s*(\S+)", message)
    assert m is not None
    return m.group(1).decode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_retr_top_dele_rset_quit_gives_exactly_the_expected_records(
    audited: Audited, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    user, messages = mailbox

    def fetch_directly() -> tuple[list[bytes], bytes]:
        p = direct(dovecot, user)
        retrieved = [joined(p.retr(i)[1]) for i in (1, 2, 3)]
        top = joined(p.top(3, 5)[1])
        p.quit()
        return retrieved, top

    retrieved, top = await trio.to_thread.run_sync(fetch_directly)
    assert retrieved == messages[:3]

    def client() -> None:
        p = poplib.POP3(audited.host, audited.port, timeout=30)
        p.user(user)
        p.pass_(dovecot.users[user])
        for i in (1, 2, 3):
            p.retr(i)
        p.top(3, 5)
        p.dele(1)
        p.dele(3)
        p.rset()
        p.dele(2)
        p.quit()

    await trio.to_thread.run_sync(client)
    await audited.settle()

    ids = [message_id(m) for m in retrieved]
    base = {"user": user}

    def command(verb: str, *args: str) -> dict[str, Any]:
        return {"event": "command", **base, "verb": verb, "args": list(args), "outcome": "ok"}

    def deletion(event: str, msg: int) -> dict[str, Any]:
        return {"event": f"message.delete.{event}", **base, "msg": msg, "uidl": None,
                "message_id": ids[msg - 1]}

    expected: list[dict[str, Any]] = [
        {"event": "session.open"},
        {**command("USER", user), "user": None},
        {**command("PASS", "<redacted>"), "user": None},
        {"event": "auth", **base, "mechanism": "USER", "outcome": "ok", "tls": None},
    ]
    for i in (1, 2, 3):
        expected += [
            {"event": "message.retrieve", **base, "command": "RETR", "msg": i, "uidl": None,
             "octets": len(retrieved[i - 1]), "sha256": sha(retrieved[i - 1]),
             "message_id": ids[i - 1], "complete": True},
            command("RETR", str(i)),
        ]
    expected += [
        {"event": "message.retrieve", **base, "command": "TOP", "msg": 3, "lines": 5,
         "uidl": None, "octets": len(top), "sha256": sha(top), "message_id": ids[2],
         "complete": True},
        command("TOP", "3", "5"),
        command("DELE", "1"), deletion("marked", 1),
        command("DELE", "3"), deletion("marked", 3),
        command("RSET"), {"event": "message.delete.reset", **base, "msgs": [1, 3]},
        command("DELE", "2"), deletion("marked", 2),
        command("QUIT"), deletion("committed", 2),
        {"event": "session.close", **base, "reason": "quit", "outcome": "ok", "detail": "quit",
         "commands": 11, "sessions_open": 0},
    ]
    for rec in expected:
        if rec.get("user", "") is None:
            del rec["user"]
    assert audited.stable() == expected

    # Exactly one deletion happened, and it is the one the audit says.
    assert dovecot.message_count(user) == len(messages) - 1

    def remaining_ids() -> list[str]:
        p = direct(dovecot, user)
        count = p.stat()[0]
        found = [message_id(joined(p.top(i, 0)[1])) for i in range(1, count + 1)]
        p.quit()
        return found

    left = await trio.to_thread.run_sync(remaining_ids)
    (committed,) = [r for r in audited.records() if r["event"] == "message.delete.committed"]
    assert committed["message_id"] not in left
    assert sorted(left) == sorted(i for i in [*ids, message_id(messages[3])]
                                  if i != committed["message_id"])
    assert audit_main(["verify", str(audited.path)], io.StringIO()) == 0


async def test_uidl_learned_from_the_client_listing(
    audited: Audited, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    """UIDLs come from the client's UIDL reply and match Dovecot's, also when committed."""
    user, messages = mailbox

    before = await trio.to_thread.run_sync(direct_uidls, dovecot, user)

    def client() -> None:
        p = poplib.POP3(audited.host, audited.port, timeout=30)
        p.user(user)
        p.pass_(dovecot.users[user])
        p.uidl()
        p.retr(2)
        p.dele(2)
        p.quit()

    await trio.to_thread.run_sync(client)
    await audited.settle()
    by_event = {r["event"]: r for r in audited.records() if r["event"].startswith("message.")}
    assert by_event["message.retrieve"]["uidl"] == before[2]
    assert by_event["message.delete.marked"]["uidl"] == before[2]
    assert by_event["message.delete.committed"]["uidl"] == before[2]
    after = await trio.to_thread.run_sync(direct_uidls, dovecot, user)
    assert before[2] not in after.values()
    assert len(after) == len(messages) - 1


async def test_resolve_uidl_names_messages_the_client_never_listed(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox, tmp_path: Path
) -> None:
    """With resolve_uidl, the proxy asks ``UIDL n`` itself; the client never sees it."""
    user, messages = mailbox
    config = AuditConfig(enabled=True, sink="file", path=tmp_path / "audit.jsonl",
                         resolve_uidl=True)
    running = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port), audit=config)
    trail = attach(running, config)
    audited = Audited(running, trail, config.path or tmp_path)

    before = await trio.to_thread.run_sync(direct_uidls, dovecot, user)

    def client() -> bytes:
        p = poplib.POP3(audited.host, audited.port, timeout=30)
        p.user(user)
        p.pass_(dovecot.users[user])
        body = joined(p.retr(3)[1])
        p.dele(3)
        p.quit()
        return body

    assert await trio.to_thread.run_sync(client) == messages[2]  # replies untouched
    await audited.settle()
    trail.close()
    by_event = {r["event"]: r for r in audited.records() if r["event"].startswith("message.")}
    assert by_event["message.retrieve"]["uidl"] == before[3]
    assert by_event["message.delete.committed"]["uidl"] == before[3]
    commands = [r["verb"] for r in audited.records() if r["event"] == "command"]
    assert "UIDL" not in commands  # the proxy's own question is not a client command


async def test_session_killed_before_quit_is_uncommitted(
    audited: Audited, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    """The client vanishes after DELE: uncommitted records, and Dovecot keeps the mail."""
    user, messages = mailbox
    with trio.fail_after(30):
        s = await trio.open_tcp_stream(audited.host, audited.port)
        await s.receive_some(4096)
        await s.send_all(f"USER {user}\r\nPASS {dovecot.users[user]}\r\n"
                         "DELE 1\r\nDELE 3\r\n".encode())
        got = b""
        while got.count(b"\r\n") < 4:
            got += await s.receive_some(4096)
        await s.aclose()
    await audited.settle()
    ok = {"user": user, "outcome": "ok"}
    assert audited.stable() == [
        {"event": "session.open"},
        {"event": "command", "verb": "USER", "args": [user], "outcome": "ok"},
        {"event": "command", "verb": "PASS", "args": ["<redacted>"], "outcome": "ok"},
        {"event": "auth", "user": user, "mechanism": "USER", "outcome": "ok", "tls": None},
        {"event": "command", "verb": "DELE", "args": ["1"], **ok},
        {"event": "message.delete.marked", "user": user, "msg": 1, "uidl": None},
        {"event": "command", "verb": "DELE", "args": ["3"], **ok},
        {"event": "message.delete.marked", "user": user, "msg": 3, "uidl": None},
        {"event": "message.delete.uncommitted", "user": user, "msg": 1, "uidl": None},
        {"event": "message.delete.uncommitted", "user": user, "msg": 3, "uidl": None},
        {"event": "session.close", "user": user, "reason": "client gone",
         "outcome": "client_closed", "detail": "client closed", "commands": 4,
         "sessions_open": 0},
    ]
    assert dovecot.message_count(user) == len(messages)


async def test_proxy_shutdown_mid_session_is_uncommitted(
    audited: Audited, dovecot: Dovecot, mailbox: Mailbox
) -> None:
    """The proxy stops while marks exist: uncommitted, reason shutdown, mail kept."""
    user, messages = mailbox
    with trio.fail_after(30):
        s = await trio.open_tcp_stream(audited.host, audited.port)
        await s.receive_some(4096)
        await s.send_all(f"USER {user}\r\nPASS {dovecot.users[user]}\r\nDELE 2\r\n".encode())
        got = b""
        while got.count(b"\r\n") < 3:
            got += await s.receive_some(4096)
        audited.running.cancel_scope.cancel()
        await audited.settle()
        await s.aclose()
    records = audited.records()
    assert [(r["event"], r.get("msg")) for r in records[-3:]] == [
        ("message.delete.marked", 2), ("message.delete.uncommitted", 2),
        ("session.close", None)]
    assert records[-1]["reason"] == "shutdown"
    assert dovecot.message_count(user) == len(messages)


@pytest.fixture
def operational_log() -> Iterator[io.BytesIO]:
    """The operational logs as ``popproxy run`` writes them (JSON, debug), captured."""
    buf = io.BytesIO()
    configure_logging("debug", "json", file=buf)
    yield buf
    structlog.reset_defaults()


async def test_no_credential_in_any_audit_log_or_metric(
    audited: Audited, dovecot: Dovecot, mailbox: Mailbox, operational_log: io.BytesIO
) -> None:
    """USER/PASS (right and wrong), APOP, AUTH PLAIN both ways, AUTH LOGIN: no secret leaks."""
    user, _ = mailbox
    password = dovecot.users[user]
    wrong = "Wrong-Pw!42"
    plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    login_user = base64.b64encode(user.encode()).decode()
    login_pass = base64.b64encode(password.encode()).decode()
    digests: list[str] = []

    def clients() -> None:
        p = poplib.POP3(audited.host, audited.port, timeout=30)
        p.user(user)
        with pytest.raises(poplib.error_proto):
            p.pass_(wrong)
        p.user(user)
        p.pass_(password)
        p.stat()
        p.quit()

        p = poplib.POP3(audited.host, audited.port, timeout=30)
        stamp = re.search(rb"<[^>]+>", p.getwelcome())
        assert stamp is not None
        digests.append(hashlib.md5(stamp.group(0) + password.encode()).hexdigest())
        p.apop(user, password)
        p.retr(1)
        p.quit()

    await trio.to_thread.run_sync(clients)
    sessions = 2
    for script in (
        [f"AUTH PLAIN {plain}", "STAT", "QUIT"],
        ["AUTH PLAIN", plain, "STAT", "QUIT"],
        ["AUTH LOGIN", login_user, login_pass, "STAT", "QUIT"],
    ):
        with trio.fail_after(30):
            s = await trio.open_tcp_stream(audited.host, audited.port)
            got = await s.receive_some(4096)
            for line in script:
                await s.send_all(line.encode() + b"\r\n")
                got = await s.receive_some(4096)
            assert got.startswith(b"+OK")
            await s.aclose()
        sessions += 1
    await audited.settle(sessions)

    auths = [(r["mechanism"], r["outcome"]) for r in audited.records() if r["event"] == "auth"]
    assert auths == [("USER", "fail"), ("USER", "ok"), ("APOP", "ok"), ("PLAIN", "ok"),
                     ("PLAIN", "ok"), ("LOGIN", "ok")]
    secrets = [password, wrong, plain, login_pass, *digests]
    audit_text = audited.path.read_text()
    log_text = operational_log.getvalue().decode()
    metrics_text = generate_latest(audited.running.app.metrics.registry).decode()
    assert '"event":"auth"' in log_text  # the operational logs were captured
    assert '"event":"session.close"' in log_text
    for secret in secrets:
        assert secret not in audit_text
        assert secret not in log_text
        assert secret not in metrics_text


async def test_verify_passes_on_a_real_log_and_names_tampered_records(
    audited: Audited, dovecot: Dovecot, mailbox: Mailbox, tmp_path: Path
) -> None:
    """One-byte edit, deleted line, swapped pair: each fails, naming the record."""
    user, _ = mailbox

    def client() -> None:
        p = poplib.POP3(audited.host, audited.port, timeout=30)
        p.user(user)
        p.pass_(dovecot.users[user])
        p.uidl()
        p.retr(1)
        p.retr(2)
        p.dele(1)
        p.quit()

    for _ in range(2):
        await trio.to_thread.run_sync(client)
    await audited.settle(2)
    audited.trail.close()
    out = io.StringIO()
    assert audit_main(["verify", str(audited.path)], out) == 0
    assert out.getvalue().startswith("OK: ")

    original = audited.path.read_bytes().splitlines(keepends=True)
    retrieve = next(i for i, line in enumerate(original) if b'"message.retrieve"' in line)
    seq = json.loads(original[retrieve])["seq"]

    def check(name: str, lines: list[bytes], where: str) -> None:
        path = tmp_path / name
        path.write_bytes(b"".join(lines))
        out = io.StringIO()
        assert audit_main(["verify", str(path)], out) == 1
        assert f"BROKEN: {path}:{where}" in out.getvalue(), out.getvalue()

    edited = original[:]
    octets = json.loads(edited[retrieve])["octets"]
    edited[retrieve] = edited[retrieve].replace(
        f'"octets":{octets}'.encode(), f'"octets":{octets + 1}'.encode())
    assert len(edited[retrieve]) == len(original[retrieve])
    check("edited.jsonl", edited, f"{retrieve + 1}: record seq {seq}: the hash does not match")

    deleted = original[:retrieve] + original[retrieve + 1 :]
    check("deleted.jsonl", deleted,
          f"{retrieve + 1}: record seq {seq + 1}: follows seq {seq - 1}")

    swapped = original[:]
    swapped[retrieve], swapped[retrieve + 1] = swapped[retrieve + 1], swapped[retrieve]
    check("swapped.jsonl", swapped,
          f"{retrieve + 1}: record seq {seq + 1}: out of order: seq {seq} should come next")


async def test_fail_closed_refuses_sessions_until_the_file_is_writable(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox, tmp_path: Path
) -> None:
    """A full disk (/dev/full): new sessions get -ERR [SYS/TEMP]; then the audit recovers."""
    user, _ = mailbox
    running = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port))
    path = tmp_path / "audit.jsonl"
    path.symlink_to("/dev/full")
    trail = attach(running, AuditConfig(enabled=True, sink="file", path=path, fail_closed=True))
    try:
        with trio.fail_after(30):
            s = await trio.open_tcp_stream(running.host, running.port)
            refused = b""
            while not refused.endswith(b"\r\n"):
                refused += await s.receive_some(4096)
            await s.aclose()
        assert refused == b"-ERR [SYS/TEMP] audit trail unavailable\r\n"
        with trio.fail_after(20):
            await running.wait_for(SessionClosed, 1)
        registry = running.app.metrics.registry
        assert (registry.get_sample_value("popproxy_audit_errors_total") or 0) >= 2

        path.unlink()
        path.symlink_to(tmp_path / "real.jsonl")

        def client() -> int:
            p = poplib.POP3(running.host, running.port, timeout=30)
            p.user(user)
            p.pass_(dovecot.users[user])
            count = p.stat()[0]
            p.quit()
            return int(count)

        assert await trio.to_thread.run_sync(client) == len(mailbox.messages)
        with trio.fail_after(20):
            await running.wait_for(SessionClosed, 2)
    finally:
        trail.close()
    records = [json.loads(x) for x in (tmp_path / "real.jsonl").read_bytes().splitlines()]
    assert [(r["event"], r.get("reason")) for r in records[:2]] == [
        ("session.open", None), ("session.close", "refused")]
    assert records[1]["detail"] == "audit trail unavailable"
    assert records[-1]["reason"] == "quit"
    assert audit_main(["verify", str(tmp_path / "real.jsonl")], io.StringIO()) == 0


async def test_search_a_real_log(audited: Audited, dovecot: Dovecot, mailbox: Mailbox) -> None:
    """Who read or deleted message <dots-2@example.org>?  search answers from the log."""
    user, _ = mailbox

    def client() -> None:
        p = poplib.POP3(audited.host, audited.port, timeout=30)
        p.user(user)
        p.pass_(dovecot.users[user])
        p.retr(2)
        p.retr(1)
        p.dele(2)
        p.quit()

    await trio.to_thread.run_sync(client)
    await audited.settle()
    out = io.StringIO()
    assert audit_main(["search", str(audited.path), "--message-id", "dots-2@example.org",
                       "--json"], out, io.StringIO()) == 0
    found = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [r["event"] for r in found] == ["message.retrieve", "message.delete.marked",
                                           "message.delete.committed"]
    assert {r["user"] for r in found} == {user}
    out = io.StringIO()
    assert audit_main(["search", str(audited.path), "--user", user, "--event",
                       "message.delete"], out, io.StringIO()) == 0
    table = out.getvalue().splitlines()
    assert table[0].split() == ["TIME", "EVENT", "USER", "CLIENT", "SESSION", "DETAILS"]
    assert [row.split()[1] for row in table[1:]] == ["message.delete.marked",
                                                     "message.delete.committed"]


@pytest.mark.parametrize("mode", ["enforce", "monitor"])
async def test_policy_decisions_are_audited(
    nursery: trio.Nursery, dovecot: Dovecot, fresh_mailbox: MailboxFactory, tmp_path: Path,
    mode: str,
) -> None:
    """A read-only rule: policy.decision, DELE denied, nothing deleted; monitor: recorded only."""
    user, messages = fresh_mailbox("archive1")
    rules = [{"name": "archive-is-read-only",
              "match": {"users": ["archive*"], "commands": ["DELE"]},
              "action": "deny", "message": "this mailbox is read-only"}]
    running = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port),
                                policy=parse_policy({"rules": rules, "mode": mode}))
    path = tmp_path / "audit.jsonl"
    trail = attach(running, AuditConfig(enabled=True, sink="file", path=path))

    def client() -> None:
        p = poplib.POP3(running.host, running.port, timeout=30)
        p.user(user)
        p.pass_(dovecot.users[user])
        if mode == "enforce":
            with pytest.raises(poplib.error_proto, match="read-only"):
                p.dele(1)
        else:
            p.dele(1)
        p.quit()

    try:
        await trio.to_thread.run_sync(client)
        with trio.fail_after(20):
            await running.wait_for(SessionClosed)
    finally:
        trail.close()
    records = [json.loads(x) for x in path.read_bytes().splitlines()]
    (decision,) = [r for r in records if r["event"] == "policy.decision"]
    assert {k: decision[k] for k in ("user", "rule", "action", "command", "args", "enforced")} == {
        "user": user, "rule": "archive-is-read-only", "action": "deny", "command": "DELE",
        "args": ["1"], "enforced": mode == "enforce"}
    (dele,) = [r for r in records if r["event"] == "command" and r["verb"] == "DELE"]
    deletions = [r["event"] for r in records if r["event"].startswith("message.delete")]
    if mode == "enforce":
        assert (dele["outcome"], dele["code"], dele["latency"]) == ("denied", "SYS/PERM", None)
        assert deletions == []
        assert dovecot.message_count(user) == len(messages)
    else:
        assert dele["outcome"] == "ok"
        assert deletions == ["message.delete.marked", "message.delete.committed"]
        assert dovecot.message_count(user) == len(messages) - 1
