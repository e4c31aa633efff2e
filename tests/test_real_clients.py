"""Real POP3 clients (curl, mpop, fetchmail) through the proxy to a real Dovecot.

Each test starts a proxy in the test's trio loop in front of the session's
Dovecot, runs an external client program against the proxy (never blocking
the loop: ``trio.run_process`` under a deadline), and then checks three
things: what the client delivered (byte for byte, modulo the client's own
documented local-delivery CRLF -> LF conversion), what Dovecot holds
afterwards, and what the proxy told its observers (AuthResult,
MessageComplete, SessionClosed).

Missing client programs are installed with apt-get when running as root;
otherwise the tests skip loudly, and fail on CI (``CI=true``).

curl and POP3 USER/PASS: curl (checked with 7.88) has no login option that
forces USER/PASS for POP3 ("AUTH=+LOGIN" is IMAP-only since curl 8.2.0; for
pop3 curl 7.88 rejects it with exit 3 "URL using bad/illegal format"), and it
prefers SASL, then APOP, over USER/PASS whenever the server offers them, as
Dovecot does.  So curl covers SASL PLAIN, SASL LOGIN and APOP here; USER/PASS
is covered by mpop (``auth user``) and fetchmail.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from popproxy.config import HostPort
from popproxy.events import (
    AuthResult,
    Event,
    MessageComplete,
    Response,
    SessionClosed,
    SessionOpened,
    State,
    StateChanged,
)
from popproxy.observe import SessionInfo
from tests.clients import (
    ClientRun,
    client_env,
    maildir_messages,
    mda_script,
    numbered_files,
    require_program,
    run_client,
    write_fetchmail_rc,
    write_mpop_config,
)
from tests.dovecot import SAMPLE_MESSAGES, Dovecot, to_maildir_bytes
from tests.dovecot_fixtures import Mailbox, MailboxFactory
from tests.proxy_fixtures import RunningProxy, start_proxy

pytestmark = [pytest.mark.realclient, pytest.mark.dovecot]

E = TypeVar("E", bound=Event)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def curl() -> str:
    return require_program("curl", "curl")


@pytest.fixture(scope="session")
def mpop() -> str:
    return require_program("mpop", "mpop")


@pytest.fixture(scope="session")
def fetchmail() -> str:
    return require_program("fetchmail", "fetchmail")


class SessionTracker:
    """An observer that knows when every session opened so far has closed.

    The client program may exit a moment before the proxy has finished its
    side of the session (and emitted SessionClosed).
    """

    def __init__(self) -> None:
        self.live = 0
        self.idle = trio.Event()
        self.idle.set()

    def __call__(self, info: SessionInfo, event: Event) -> None:
        if isinstance(event, SessionOpened):
            self.live += 1
            if self.idle.is_set():
                self.idle = trio.Event()
        elif isinstance(event, SessionClosed):
            self.live -= 1
            if self.live == 0:
                self.idle.set()

    async def wait_idle(self) -> None:
        while self.live:
            await self.idle.wait()


@pytest.fixture
async def proxy(nursery: trio.Nursery, dovecot: Dovecot) -> RunningProxy:
    """The proxy, in this test's trio loop, in front of the real Dovecot."""
    running = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port))
    running.proxy.observers = [*running.proxy.observers, SessionTracker()]
    return running


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def events_of(proxy: RunningProxy, kind: type[E]) -> list[E]:
    return [e for _, e in proxy.events if isinstance(e, kind)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return "root" if os.geteuid() == 0 else "nobody"


async def sessions_closed(proxy: RunningProxy) -> None:
    """Wait (5 s at most) until every session the proxy opened was closed."""
    with trio.fail_after(5.0):
        for observer in proxy.proxy.observers:
            if isinstance(observer, SessionTracker):
                await observer.wait_idle()


def check_proxy_events(
    proxy: RunningProxy,
    *,
    user: str,
    mechanism: str | None,
    sessions: int,
    retrieved: Sequence[bytes],
) -> None:
    """What the observers saw: ``sessions`` sessions, each one successful
    login of ``user`` (with ``mechanism`` unless None) and a QUIT, and whole
    RETR bodies whose SHA-256s are those of ``retrieved``."""
    opened = events_of(proxy, SessionOpened)
    closed = events_of(proxy, SessionClosed)
    assert len(opened) == sessions, proxy.events
    assert [c.reason for c in closed] == ["quit"] * sessions, closed

    auths = events_of(proxy, AuthResult)
    assert len(auths) == sessions, auths
    for auth in auths:
        assert auth.ok, auth
        assert auth.user == user, auth
        if mechanism is not None:
            assert auth.mechanism == mechanism, auth

    completes = [e for e in events_of(proxy, MessageComplete) if e.command.verb == "RETR"]
    assert all(c.complete for c in completes), completes
    assert sorted(c.sha256 for c in completes) == sorted(sha256(m) for m in retrieved)
    assert sorted(c.octets for c in completes) == sorted(len(m) for m in retrieved)


def lf_form(messages: Sequence[bytes]) -> list[bytes]:
    """What a local delivery (mpop maildir, fetchmail MDA) writes: LF endings."""
    return [to_maildir_bytes(m) for m in messages]


def big_mailbox() -> list[bytes]:
    """40 small distinct messages, dot-stuffing lines included, plus a ~2 MiB one."""
    messages = [
        (
            f"From: sender{i}@example.org\n"
            f"To: alice@example.org\n"
            f"Subject: message {i}\n"
            f"Message-ID: <many-{i}@example.org>\n"
            "\n"
            f"body of message {i}\n"
            ".leading dot\n"
            ".\n"
            "last line\n"
        ).encode()
        for i in range(40)
    ]
    line = b"%07d " + b"x" * 60 + b"\n"
    body = b"".join((b"." if i % 7 == 0 else b"") + line % i for i in range(30_000))
    messages.insert(
        17,
        b"From: big@example.org\nTo: alice@example.org\nSubject: big\n"
        b"Message-ID: <big@example.org>\n\n" + body,
    )
    return messages


# --------------------------------------------------------------------------
# curl
# --------------------------------------------------------------------------


async def curl_pop3(
    curl: str,
    host: str,
    port: int,
    user: str,
    password: str,
    path: str,
    home: Path,
    login_options: str | None = None,
) -> ClientRun:
    args = [
        curl,
        "-q",
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        "20",
        "--user",
        f"{user}:{password}",
    ]
    if login_options is not None:
        args += ["--login-options", login_options]
    args.append(f"pop3://{host}:{port}/{path}")
    return await run_client(args, env=client_env(home))


@pytest.mark.parametrize(
    ("login_options", "mechanism"),
    [
        pytest.param(None, None, id="default"),
        pytest.param("AUTH=PLAIN", "PLAIN", id="sasl-plain"),
        pytest.param("AUTH=LOGIN", "LOGIN", id="sasl-login"),
        pytest.param("AUTH=+APOP", "APOP", id="apop"),
    ],
)
async def test_curl_list_and_retr_match_direct(
    curl: str,
    dovecot: Dovecot,
    mailbox: Mailbox,
    proxy: RunningProxy,
    tmp_path: Path,
    login_options: str | None,
    mechanism: str | None,
) -> None:
    password = dovecot.users[mailbox.user]

    async def fetch(host: str, port: int, path: str) -> bytes:
        run = await curl_pop3(
            curl, host, port, mailbox.user, password, path, tmp_path, login_options
        )
        return run.check().stdout

    listing = await fetch(proxy.host, proxy.port, "")
    assert listing == await fetch(dovecot.host, dovecot.port, "")
    expected_listing = b"".join(
        b"%d %d\r\n" % (i, len(m)) for i, m in enumerate(mailbox.messages, 1)
    )
    assert listing == expected_listing

    for n, message in enumerate(mailbox.messages, 1):
        through_proxy = await fetch(proxy.host, proxy.port, str(n))
        direct = await fetch(dovecot.host, dovecot.port, str(n))
        assert through_proxy == direct, f"message {n} differs from a direct fetch"
        assert through_proxy == message, f"message {n} is not what was delivered"

    await sessions_closed(proxy)
    check_proxy_events(
        proxy,
        user=mailbox.user,
        mechanism=mechanism,
        sessions=1 + len(mailbox.messages),
        retrieved=mailbox.messages,
    )
    assert dovecot.message_count(mailbox.user) == len(mailbox.messages)


async def test_curl_user_with_punctuation_in_password(
    curl: str,
    dovecot: Dovecot,
    fresh_mailbox: MailboxFactory,
    proxy: RunningProxy,
    tmp_path: Path,
) -> None:
    box = fresh_mailbox("carol", SAMPLE_MESSAGES[1:3])
    password = dovecot.users["carol"]
    assert "!" in password
    assert "#" in password
    run = await curl_pop3(curl, proxy.host, proxy.port, "carol", password, "2", tmp_path)
    assert run.check().stdout == box.messages[1]
    await sessions_closed(proxy)
    check_proxy_events(proxy, user="carol", mechanism=None, sessions=1, retrieved=[box.messages[1]])


async def test_curl_wrong_password_is_refused(
    curl: str,
    dovecot: Dovecot,
    mailbox: Mailbox,
    proxy: RunningProxy,
    tmp_path: Path,
) -> None:
    run = await curl_pop3(
        curl,
        proxy.host,
        proxy.port,
        mailbox.user,
        "wrong-password",
        "1",
        tmp_path,
        "AUTH=PLAIN",
    )
    # 67 is CURLE_LOGIN_DENIED.
    assert run.returncode == 67, run.describe()
    assert run.stdout == b""
    await sessions_closed(proxy)
    auths = events_of(proxy, AuthResult)
    assert auths == [AuthResult("PLAIN", mailbox.user, False, auths[0].code)], auths
    assert not events_of(proxy, MessageComplete)
    assert dovecot.message_count(mailbox.user) == len(mailbox.messages)


# --------------------------------------------------------------------------
# mpop
# --------------------------------------------------------------------------


async def run_mpop(
    mpop: str,
    proxy: RunningProxy,
    dovecot: Dovecot,
    user: str,
    tmp_path: Path,
    *,
    auth: str,
    keep: bool,
    time_limit: float = 30.0,
) -> list[bytes]:
    """Fetch ``user``'s mailbox through the proxy with mpop; return the
    messages in the Maildir it delivered to (sorted by content)."""
    maildir = tmp_path / "Maildir"
    config = write_mpop_config(
        tmp_path,
        host=proxy.host,
        port=proxy.port,
        user=user,
        password=dovecot.users[user],
        auth=auth,
        maildir=maildir,
    )
    keep_opt = "--keep=on" if keep else "--keep=off"
    run = await run_client(
        [mpop, f"--file={config}", keep_opt, "--half-quiet", "proxy"],
        env=client_env(tmp_path),
        time_limit=time_limit,
    )
    run.check()
    await sessions_closed(proxy)
    return maildir_messages(maildir)


@pytest.mark.parametrize(("auth", "mechanism"), [("user", "USER"), ("plain", "PLAIN")])
async def test_mpop_keep_delivers_every_message_unchanged(
    mpop: str,
    dovecot: Dovecot,
    mailbox: Mailbox,
    proxy: RunningProxy,
    tmp_path: Path,
    auth: str,
    mechanism: str,
) -> None:
    got = await run_mpop(mpop, proxy, dovecot, mailbox.user, tmp_path, auth=auth, keep=True)
    assert got == sorted(lf_form(mailbox.messages))
    assert dovecot.message_count(mailbox.user) == len(mailbox.messages)
    check_proxy_events(
        proxy, user=mailbox.user, mechanism=mechanism, sessions=1, retrieved=mailbox.messages
    )


async def test_mpop_keep_many_messages_and_a_large_one(
    mpop: str,
    dovecot: Dovecot,
    fresh_mailbox: MailboxFactory,
    proxy: RunningProxy,
    tmp_path: Path,
) -> None:
    """mpop pipelines its RETRs (Dovecot announces PIPELINING): 41 bodies,
    one of ~2 MiB with many dot-stuffed lines, through the proxy's window."""
    box = fresh_mailbox("bob", big_mailbox())
    got = await run_mpop(
        mpop, proxy, dovecot, box.user, tmp_path, auth="user", keep=True, time_limit=60.0
    )
    assert len(got) == len(box.messages)
    assert got == sorted(lf_form(box.messages))
    assert dovecot.message_count(box.user) == len(box.messages)
    check_proxy_events(proxy, user=box.user, mechanism="USER", sessions=1, retrieved=box.messages)


# --------------------------------------------------------------------------
# fetchmail
# --------------------------------------------------------------------------


async def run_fetchmail(
    fetchmail: str,
    proxy: RunningProxy,
    dovecot: Dovecot,
    user: str,
    tmp_path: Path,
    *,
    keep: bool,
) -> list[bytes]:
    """Fetch ``user``'s mailbox through the proxy with fetchmail and an MDA
    that stores each message in its own file; return them in delivery order."""
    home = tmp_path / "home"
    out = tmp_path / "delivered"
    home.mkdir()
    out.mkdir()
    script = mda_script(tmp_path)
    rc = write_fetchmail_rc(
        home,
        host=proxy.host,
        port=proxy.port,
        user=user,
        password=dovecot.users[user],
        local_user=local_user(),
        mda=f"{shlex.quote(str(script))} {shlex.quote(str(out))}",
        keep=keep,
    )
    run = await run_client(
        [
            fetchmail,
            "--verbose",
            "--fetchmailrc",
            str(rc),
            "--pidfile",
            str(home / "fetchmail.pid"),
            "--idfile",
            str(home / "fetchids"),
            "--invisible",  # no Received: header
        ],
        env=client_env(home, FETCHMAILHOME=str(home)),
    )
    run.check()
    await sessions_closed(proxy)
    return numbered_files(out)


async def test_fetchmail_keep_delivers_every_message_unchanged(
    fetchmail: str,
    dovecot: Dovecot,
    mailbox: Mailbox,
    proxy: RunningProxy,
    tmp_path: Path,
) -> None:
    got = await run_fetchmail(fetchmail, proxy, dovecot, mailbox.user, tmp_path, keep=True)
    assert got == lf_form(mailbox.messages)  # in order: message 1 first
    assert dovecot.message_count(mailbox.user) == len(mailbox.messages)
    check_proxy_events(
        proxy, user=mailbox.user, mechanism="USER", sessions=1, retrieved=mailbox.messages
    )
    assert not [r for r in events_of(proxy, Response) if r.command.verb == "DELE"], (
        "fetchmail --keep must not delete"
    )


# --------------------------------------------------------------------------
# Deletion: DELE ... QUIT through the proxy really expunges
# --------------------------------------------------------------------------


@pytest.fixture(params=["mpop", "fetchmail"])
def deleting_client(request: pytest.FixtureRequest) -> tuple[str, str]:
    name: str = request.param
    return name, require_program(name, name)


async def test_fetch_without_keep_empties_the_mailbox(
    deleting_client: tuple[str, str],
    dovecot: Dovecot,
    mailbox: Mailbox,
    proxy: RunningProxy,
    tmp_path: Path,
) -> None:
    name, program = deleting_client
    assert dovecot.message_count(mailbox.user) == len(mailbox.messages)
    if name == "mpop":
        got = await run_mpop(
            program, proxy, dovecot, mailbox.user, tmp_path, auth="user", keep=False
        )
        assert got == sorted(lf_form(mailbox.messages))
    else:
        got = await run_fetchmail(program, proxy, dovecot, mailbox.user, tmp_path, keep=False)
        assert got == lf_form(mailbox.messages)

    assert dovecot.message_count(mailbox.user) == 0, dovecot.message_files(mailbox.user)
    check_proxy_events(
        proxy, user=mailbox.user, mechanism="USER", sessions=1, retrieved=mailbox.messages
    )
    deles = [r for r in events_of(proxy, Response) if r.command.verb == "DELE"]
    assert len(deles) == len(mailbox.messages), deles
    assert all(r.ok for r in deles), deles
    quits = [r for r in events_of(proxy, Response) if r.command.verb == "QUIT"]
    assert len(quits) == 1, quits
    assert quits[0].ok, quits
    assert StateChanged(State.TRANSACTION, State.UPDATE) in events_of(proxy, StateChanged)
