"""The nginx-compatible auth_http client, against a responder written here.

Network tests run a trio responder on 127.0.0.1 (port 0) in the test's own
trio run; the ones about time use trio's autojump clock, which then drives
the client's pool too (h11 on trio streams: trio's clock, trio's sockets).
``tests.auth_responder`` answers once per connection and closes, as nginx's
examples do; the kept-alive connections are ``test_routing_httpclient``'s.

Response data from nginx's documentation of ngx_mail_auth_http_module
(nginx.org, docs/mail/ngx_mail_auth_http_module.html, "Protocol") is used
verbatim as test vectors: ``NGINX_*`` below.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.addr import HostPort
from popproxy.routing.authhttp import (
    MAX_AUTH_WAIT,
    MAX_REFUSAL_TEXT,
    AuthHttpClient,
    AuthRequest,
    HookFailure,
    HookRefusal,
    HookRoute,
    HookSettings,
    escape,
    interpret_response,
    request_headers,
)
from tests.auth_responder import AuthResponder, HookRequest, ok, refuse, reply
from tests.hook_fakes import FakePool, FakeRequest, FakeResponse, response

# --- nginx's documented examples (request and responses), verbatim --------

NGINX_REQUEST = (
    b"GET /auth HTTP/1.0\r\n"
    b"Host: localhost\r\n"
    b"Auth-Method: plain\r\n"
    b"Auth-User: user\r\n"
    b"Auth-Pass: password\r\n"
    b"Auth-Protocol: imap\r\n"
    b"Auth-Login-Attempt: 1\r\n"
    b"Client-IP: 192.0.2.42\r\n"
    b"Client-Host: client.example.org\r\n"
)
NGINX_GOOD = (
    b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 198.51.100.1\r\nAuth-Port: 143\r\n\r\n"
)
NGINX_BAD = b"HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\nAuth-Wait: 3\r\n\r\n"
NGINX_GOOD_WITH_PASS = (
    b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 198.51.100.1\r\nAuth-Port: 143\r\n"
    b"Auth-Pass: plain-text-pass\r\n\r\n"
)
NGINX_SMTP_TEMPORARY = (
    b"HTTP/1.0 200 OK\r\nAuth-Status: Temporary server problem, try again later\r\n"
    b"Auth-Error-Code: 451 4.3.0\r\nAuth-Wait: 3\r\n\r\n"
)

#: A password that cannot turn up anywhere by accident.
SECRET = "Zq9 distinctive-p\u00e4ss%word"
SECRET_FORMS = (SECRET, escape(SECRET).decode("latin-1"), "distinctive")

Answer = Callable[[HookRequest], bytes | None]
Serve = Callable[[Answer], Awaitable[AuthResponder]]


def request(user: str = "alice", password: str = "wonderland", **kw: object) -> AuthRequest:
    return AuthRequest(user, password, **kw)  # type: ignore[arg-type]


def head(raw: bytes) -> list[tuple[bytes, bytes]]:
    """The header lines of a raw HTTP response (test helper)."""
    lines = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [(k, v.strip()) for k, _, v in (line.partition(b":") for line in lines)]


@pytest.fixture
async def serve(nursery: trio.Nursery) -> Serve:
    async def start(answer: Answer) -> AuthResponder:
        responder: AuthResponder = await nursery.start(AuthResponder(answer).serve)
        return responder

    return start


# --- pure: the request ------------------------------------------------------


def test_request_headers_as_nginx_sends_them() -> None:
    s = HookSettings("http://h/auth", headers=(("X-Auth-Key", "k3y"),))
    assert request_headers(s, request(client_ip="192.0.2.42", login_attempt=2,
                                      client_host="client.example.org", tls=True)) == [
        (b"Auth-Method", b"plain"),
        (b"Auth-User", b"alice"),
        (b"Auth-Pass", b"wonderland"),
        (b"Auth-Protocol", b"pop3"),
        (b"Auth-Login-Attempt", b"2"),
        (b"Client-IP", b"192.0.2.42"),
        (b"Client-Host", b"client.example.org"),
        (b"Auth-SSL", b"on"),
        (b"X-Auth-Key", b"k3y"),
    ]
    # No Client-Host without a name (nginx sends none for POP3), no Auth-SSL without TLS.
    names = [k for k, _ in request_headers(s, request(client_ip="::1"))]
    assert b"Client-Host" not in names
    assert b"Auth-SSL" not in names


def test_nginx_documented_request_has_our_header_names() -> None:
    ours = {k.lower() for k, _ in request_headers(HookSettings("http://h/"), request())}
    theirs = {line.split(b":")[0].lower() for line in NGINX_REQUEST.split(b"\r\n")[1:] if line}
    assert theirs - {b"host"} - ours == {b"client-host"}  # sent when a name is known


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ("alice", b"alice"),
        ("a b", b"a%20b"),
        ("100%", b"100%25"),
        ("x\r\nDELE 1", b"x%0D%0ADELE%201"),
        ("nul\x00", b"nul%00"),
        ("del\x7f", b"del%7F"),
        ("j\u00fcrgen", "j\u00fcrgen".encode()),  # nginx sends 8-bit octets as they are
        ("latin1-\udcfc", b"latin1-\xfc"),  # a PASS argument's raw octet, back as it came
        ("tab\tx", b"tab%09x"),
        ("sym!#$&'()*+,/:;=?@[]~", b"sym!#$&'()*+,/:;=?@[]~"),
    ],
)
def test_escape_like_nginx(value: str, wire: bytes) -> None:
    assert escape(value) == wire


@given(st.text())
def test_escape_round_trips_and_is_header_safe(value: str) -> None:
    wire = escape(value)
    assert urllib.parse.unquote_to_bytes(wire) == value.encode("utf-8", "surrogateescape")
    assert not any(b <= 0x20 or b == 0x7F for b in wire)


# --- pure: the answer -------------------------------------------------------


def test_nginx_good_response() -> None:
    result = interpret_response(head(NGINX_GOOD), request())
    assert result == HookRoute(HostPort("198.51.100.1", 143), "alice", "wonderland")


def test_nginx_bad_response() -> None:
    assert interpret_response(head(NGINX_BAD), request()) == HookRefusal(
        "Invalid login or password", 3)


def test_nginx_apop_good_response_gives_the_password() -> None:
    result = interpret_response(head(NGINX_GOOD_WITH_PASS), request())
    assert isinstance(result, HookRoute)
    assert result.password == "plain-text-pass"
    assert result.user == "alice"


def test_nginx_smtp_error_code_is_ignored_for_pop3() -> None:
    assert interpret_response(head(NGINX_SMTP_TEMPORARY), request()) == HookRefusal(
        "Temporary server problem, try again later", 3)


def test_header_names_are_case_insensitive_and_others_ignored() -> None:
    headers = [(b"AUTH-STATUS", b"OK"), (b"auth-server", b"::1"), (b"Auth-port", b"1110"),
               (b"X-Whatever", b"\xff"), (b"auth-user", b"bob.smith")]
    assert interpret_response(headers, request()) == HookRoute(
        HostPort("::1", 1110), "bob.smith", "wonderland")


def test_ok_without_a_server_is_a_route_without_an_address() -> None:
    assert interpret_response([(b"Auth-Status", b"OK")], request()) == HookRoute(
        None, "alice", "wonderland")


def test_refusal_without_wait_and_caps() -> None:
    assert interpret_response([(b"Auth-Status", b"Go away")], request()) == HookRefusal(
        "Go away", None)
    long = interpret_response(
        [(b"Auth-Status", b"x" * 1000), (b"Auth-Wait", b"86400")], request())
    assert long == HookRefusal("x" * MAX_REFUSAL_TEXT, MAX_AUTH_WAIT)
    cut = interpret_response([(b"Auth-Status", "\u00e4".encode() * 200)], request())
    assert cut == HookRefusal("\u00e4" * (MAX_REFUSAL_TEXT // 2), None)
    utf8 = interpret_response([(b"Auth-Status", "Zugang gesperrt \u2013 ruf an".encode())],
                              request())
    assert utf8 == HookRefusal("Zugang gesperrt \u2013 ruf an", None)


GARBAGE: list[tuple[list[tuple[bytes, bytes]], str]] = [
    ([], r"no Auth-Status header .*HTTP 200"),
    ([(b"Auth-Status", b"")], r"Auth-Status is empty"),
    ([(b"Auth-Status", b"\xffOK")], r"Auth-Status is not UTF-8"),
    ([(b"Auth-Status", b"bad\x1b[31m")], r"control characters"),
    ([(b"Auth-Status", b"OK"), (b"Auth-Status", b"OK")], r"Auth-Status twice"),
    ([(b"Auth-Status", b"OK"), (b"Auth-Server", b"mail.example.org"), (b"Auth-Port", b"110")],
     r"Auth-Server is not an IP address: 'mail.example.org'"),
    ([(b"Auth-Status", b"OK"), (b"Auth-Server", b"10.0.0.1")], r"only one of Auth-Server"),
    ([(b"Auth-Status", b"OK"), (b"Auth-Port", b"110")], r"only one of Auth-Server"),
    ([(b"Auth-Status", b"OK"), (b"Auth-Server", b"10.0.0.1"), (b"Auth-Port", b"0")],
     r"Auth-Port is not a port number: '0'"),
    ([(b"Auth-Status", b"OK"), (b"Auth-Server", b"10.0.0.1"), (b"Auth-Port", b"65536")],
     r"Auth-Port is not a port number"),
    ([(b"Auth-Status", b"OK"), (b"Auth-Server", b"10.0.0.1"), (b"Auth-Port", b"-1")],
     r"Auth-Port is not a port number"),
    ([(b"Auth-Status", b"OK"), (b"Auth-Server", b"10.0.0.1"), (b"Auth-Port", b"\xd9\xa1")],
     r"Auth-Port is not a port number"),
    ([(b"Auth-Status", b"OK"), (b"Auth-User", b"a b")], r"Auth-User unusable: .*whitespace"),
    ([(b"Auth-Status", b"OK"), (b"Auth-User", b"")], r"Auth-User unusable: empty"),
    ([(b"Auth-Status", b"OK"), (b"Auth-Pass", b"")], r"Auth-Pass is empty"),
    ([(b"Auth-Status", b"OK"), (b"Auth-Pass", b"a\r\nDELE 1")], r"Auth-Pass .* CR, LF"),
    ([(b"Auth-Status", b"no"), (b"Auth-Wait", b"soon")], r"Auth-Wait is not a number"),
    ([(b"Auth-Status", b"no"), (b"Auth-Wait", b"1.5")], r"Auth-Wait is not a number"),
    ([(b"Auth-Status", b"WAIT"), (b"Auth-Wait", b"1")], r"WAIT, which is not supported"),
]


@pytest.mark.parametrize(("headers", "reason"), GARBAGE)
def test_garbage_answers_are_failures(headers: list[tuple[bytes, bytes]], reason: str) -> None:
    result = interpret_response(headers, request())
    assert isinstance(result, HookFailure)
    assert result.kind == "error"
    assert re.search(reason, result.reason), result.reason


_header_names = st.sampled_from([b"Auth-Status", b"Auth-Server", b"Auth-Port", b"Auth-User",
                                 b"Auth-Wait", b"auth-status", b"X-Other"])
_values = st.one_of(st.binary(max_size=40), st.sampled_from(
    [b"OK", b"WAIT", b"127.0.0.1", b"::1", b"110", b"3", b""]))
# The secret (the client's, or a backend password the hook hands out) only
# where a password belongs: in Auth-Pass.
_pass_values = st.one_of(st.binary(max_size=20), st.sampled_from(
    [SECRET.encode(), b"", b"a\r\nb", SECRET.encode() + b"\x00"]))
_answer_headers = st.one_of(st.tuples(_header_names, _values),
                            st.tuples(st.sampled_from([b"Auth-Pass", b"auth-pass"]), _pass_values))


@given(st.lists(_answer_headers, max_size=8), st.integers(100, 599))
@settings(max_examples=500)
def test_any_answer_gives_a_typed_result_and_no_secret_in_reasons(
    headers: list[tuple[bytes, bytes]], status: int
) -> None:
    result = interpret_response(headers, request(password=SECRET), status)
    assert isinstance(result, HookRoute | HookRefusal | HookFailure)
    if isinstance(result, HookFailure):
        assert not any(s in result.reason for s in SECRET_FORMS)
    assert not any(s in repr(result) for s in SECRET_FORMS)
    if isinstance(result, HookRoute):
        assert "\r" not in result.password
        assert "\n" not in result.password
        assert result.user
        assert " " not in result.user
    if isinstance(result, HookRefusal):
        assert result.wait is None or 0 <= result.wait <= MAX_AUTH_WAIT
        assert "\n" not in result.text


# --- over the network -------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (NGINX_GOOD, HookRoute(HostPort("198.51.100.1", 143), "alice", "wonderland")),
        (NGINX_BAD, HookRefusal("Invalid login or password", 3)),
        (NGINX_GOOD_WITH_PASS,
         HookRoute(HostPort("198.51.100.1", 143), "alice", "plain-text-pass")),
        (NGINX_SMTP_TEMPORARY, HookRefusal("Temporary server problem, try again later", 3)),
    ],
)
async def test_nginx_documented_responses_over_http(
    serve: Serve, raw: bytes, expected: HookRoute | HookRefusal
) -> None:
    responder = await serve(lambda req: raw)
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        result = await client.lookup(request())
    assert result == expected  # the password too: repr=False hides it, == compares it


async def test_the_request_on_the_wire(serve: Serve) -> None:
    responder = await serve(lambda req: ok("10.0.0.7", 110))
    settings_ = HookSettings(responder.url, headers=(("X-Auth-Key", "k3y"),))
    async with AuthHttpClient(settings_) as client:
        result = await client.lookup(AuthRequest(
            "j\u00fcrgen", "pa ss%\r\n", client_ip="2001:db8::7", login_attempt=3, tls=True))
    assert result == HookRoute(HostPort("10.0.0.7", 110), "j\u00fcrgen", "pa ss%\r\n")
    (req,) = responder.requests
    assert (req.method, req.target) == ("GET", "/auth")
    assert req.header("Auth-Method") == "plain"
    assert req.header("Auth-User") == "j\u00fcrgen".encode().decode("latin-1")
    assert req.header("Auth-Pass") == "pa%20ss%25%0D%0A"
    assert req.header("Auth-Protocol") == "pop3"
    assert req.header("Auth-Login-Attempt") == "3"
    assert req.header("Client-IP") == "2001:db8::7"
    assert req.header("Client-Host") is None
    assert req.header("Auth-SSL") == "on"
    assert req.header("X-Auth-Key") == "k3y"
    assert req.header("Host") == f"127.0.0.1:{responder.port}"


async def test_user_and_password_rewriting(serve: Serve) -> None:
    def answer(req: HookRequest) -> bytes:
        assert req.header("Auth-User") == "alice"
        return ok("127.0.0.1", 1110, ("Auth-User", "alice@legacy.example"),
                  ("Auth-Pass", "backend-Secret"))

    responder = await serve(answer)
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        result = await client.lookup(request("alice", SECRET))
    assert result == HookRoute(HostPort("127.0.0.1", 1110), "alice@legacy.example",
                               "backend-Secret")


async def test_an_error_text_and_auth_wait(serve: Serve) -> None:
    responder = await serve(lambda req: refuse("[AUTH] Mailbox moved, ask support", wait=5)
                            if req.header("Auth-User") == "moved" else refuse("Nope"))
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        assert await client.lookup(request("moved")) == HookRefusal(
            "[AUTH] Mailbox moved, ask support", 5)
        assert await client.lookup(request("other")) == HookRefusal("Nope", None)


async def test_a_hook_that_never_answers(
    serve: Serve, autojump_clock: trio.testing.MockClock
) -> None:
    """It times out at auth_http_timeout; other lookups go on meanwhile."""
    responder = await serve(lambda req: None if req.header("Auth-User") == "slow" else ok())
    finished: dict[str, tuple[float, object]] = {}
    async with AuthHttpClient(HookSettings(responder.url, timeout=2.0)) as client:
        start = trio.current_time()

        async def one(user: str, delay: float) -> None:
            await trio.sleep(delay)
            result = await client.lookup(request(user))
            finished[user] = (trio.current_time() - start, result)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "slow", 0.0)
            nursery.start_soon(one, "fast1", 0.5)
            nursery.start_soon(one, "fast2", 1.0)
        elapsed, result = finished["slow"]
        assert result == HookFailure("no answer from the hook within 2s", "timeout")
        assert elapsed == pytest.approx(2.0, abs=0.01)
        for user, at in (("fast1", 0.5), ("fast2", 1.0)):
            elapsed, result = finished[user]
            assert elapsed == pytest.approx(at, abs=0.01)
            assert isinstance(result, HookRoute)
        # The client hung up on the silent hook: nothing stays open.
        await trio.testing.wait_all_tasks_blocked()
        assert responder.hanging == 0


async def test_bounded_concurrency(serve: Serve, autojump_clock: trio.testing.MockClock) -> None:
    """A silent hook holds at most ``concurrency`` requests; all lookups end in time."""
    responder = await serve(lambda req: None)
    times: list[float] = []
    async with AuthHttpClient(HookSettings(responder.url, timeout=3.0, concurrency=2)) as client:
        start = trio.current_time()

        async def one(i: int) -> None:
            await trio.sleep(i * 0.25)
            result = await client.lookup(request(f"user{i}"))
            assert isinstance(result, HookFailure)
            assert result.kind == "timeout"
            times.append(trio.current_time() - start - i * 0.25)

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
            await trio.sleep(1.0)
            assert client.in_flight == 2
            assert responder.hanging == 2
    assert responder.max_hanging == 2
    assert len(times) == 10
    assert all(t == pytest.approx(3.0, abs=0.01) for t in times)


async def test_outside_cancellation_propagates(
    serve: Serve, autojump_clock: trio.testing.MockClock
) -> None:
    responder = await serve(lambda req: None)
    async with AuthHttpClient(HookSettings(responder.url, timeout=5.0)) as client:
        with trio.move_on_after(1.0) as scope:
            await client.lookup(request())
        assert scope.cancelled_caught
        assert client.in_flight == 0


BROKEN_RESPONDERS: list[tuple[bytes, str]] = [
    (b"garbage\r\n\r\n", "malformed HTTP response"),
    (b"HTTP/1.0 200 OK\r\nAuth-Sta", "malformed HTTP response|connection to the hook broke"),
    (b"HTTP/1.0 200 OK\r\n\r\n", r"no Auth-Status header .*HTTP 200"),
    (b"HTTP/1.0 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad", r"no Auth-Status .*HTTP 502"),
    (reply(("Location", "http://elsewhere/"), status="302 Found"), r"no Auth-Status .*HTTP 302"),
    (ok("mail.example.org", 110), "Auth-Server is not an IP address"),
    (reply(("Auth-Status", "OK"), ("Auth-Server", "10.0.0.1"), ("Auth-Port", "pop3")),
     "Auth-Port is not a port number"),
    (reply(("Auth-Status", "no"), ("Auth-Wait", "later")), "Auth-Wait is not a number"),
    (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n",
     "malformed HTTP response|connection to the hook broke"),
    (b"HTTP/1.0 200 OK\r\nAuth-Status: O\x00K\r\n\r\n", "malformed HTTP response"),
]


@pytest.mark.parametrize(("raw", "reason"), BROKEN_RESPONDERS)
async def test_garbage_from_the_hook(serve: Serve, raw: bytes, reason: str) -> None:
    responder = await serve(lambda req: raw)
    async with AuthHttpClient(HookSettings(responder.url)) as client:
        result = await client.lookup(request())
    assert isinstance(result, HookFailure), result
    assert result.kind == "error"
    assert re.search(reason, result.reason), result.reason


async def test_a_hook_that_is_down() -> None:
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with AuthHttpClient(HookSettings(f"http://127.0.0.1:{port}/auth")) as client:
        assert await client.lookup(request()) == HookFailure("cannot connect to the hook")


async def test_reconfigure_applies_to_the_next_lookup(serve: Serve) -> None:
    first = await serve(lambda req: refuse("first"))
    second = await serve(lambda req: refuse("second"))
    async with AuthHttpClient(HookSettings(first.url)) as client:
        assert await client.lookup(request()) == HookRefusal("first", None)
        client.reconfigure(HookSettings(second.url, concurrency=1))
        assert await client.lookup(request()) == HookRefusal("second", None)
        assert client.settings == HookSettings(second.url, concurrency=1)


async def test_credentials_never_reach_reasons_or_logs(
    serve: Serve, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """A distinctive password, through every way the hook can fail."""
    caplog.set_level(logging.DEBUG)
    secret_line = b"Echo-" + SECRET.encode()  # no colon: h11 quotes such lines in errors
    answers: dict[str, bytes | None] = {
        "silent": None,
        "garbage": b"HTTP/1.0 200 OK\r\n" + secret_line + b"\r\n\r\n",
        "bad-pass": reply(("Auth-Status", "OK"), ("Auth-Pass", ""), ("X-Echo", SECRET)),
        "bad-server": ok("not-an-ip", 110, ("Auth-Pass", SECRET)),
        "refused": refuse("Invalid login or password", 1),
        "ok": ok("10.1.1.1", 110, ("Auth-Pass", SECRET)),
    }
    responder = await serve(lambda req: answers[req.header("Auth-User") or ""])
    results = []
    async with AuthHttpClient(HookSettings(responder.url, timeout=1.0)) as client:
        for user in answers:
            results.append(await client.lookup(request(user, SECRET)))
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with AuthHttpClient(HookSettings(f"http://127.0.0.1:{port}/")) as client:
        results.append(await client.lookup(request("down", SECRET)))
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["HookFailure"] * 4 + ["HookRefusal", "HookRoute", "HookFailure"]
    assert any(SECRET.encode("utf-8") in line for line in [secret_line])  # the trap is set
    for r in results:
        text = repr(r) + str(r) + (r.reason if isinstance(r, HookFailure) else "")
        assert not any(s in text for s in SECRET_FORMS), text
    # h11 and trio log nothing, so the whole logging tree at DEBUG saw nothing.
    assert not any(s in caplog.text for s in SECRET_FORMS)


def test_hook_settings_from_config_and_repr() -> None:
    from popproxy.routing import RoutingConfig

    assert HookSettings.from_config(RoutingConfig(default="x")) is None
    s = HookSettings.from_config(RoutingConfig(
        auth_http="http://h/a", auth_http_timeout=2.0, auth_http_concurrency=3,
        auth_http_headers=(("X-Auth-Key", "t0p-secret"),)))
    assert s == HookSettings("http://h/a", 2.0, 3, (("X-Auth-Key", "t0p-secret"),))
    assert "t0p-secret" not in repr(s)
    assert "wonderland" not in repr(request())


def test_a_fake_pool_can_stand_in() -> None:
    # For callers' unit tests: a stand-in for the client's pool, no socket.
    seen: list[FakeRequest] = []

    async def handler(req: FakeRequest) -> FakeResponse:
        seen.append(req)
        return response(Auth_Status="OK", Auth_Server="10.0.0.1", Auth_Port="110")

    pool = FakePool(handler)

    async def main() -> object:
        async with AuthHttpClient(HookSettings("http://hook/"), pool=pool) as client:
            return await client.lookup(request())

    assert trio.run(main) == HookRoute(HostPort("10.0.0.1", 110), "alice", "wonderland")
    (req,) = seen
    assert (req.url, req.header("Auth-User")) == ("http://hook/", "alice")
    assert pool.closed  # the client closes its pool


async def test_a_client_without_settings_fails_every_lookup() -> None:
    async with AuthHttpClient() as client:
        assert client.settings is None
        assert await client.lookup(request()) == HookFailure("routing.auth_http is not configured")


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://127.0.0.1/auth", "the request to the hook failed (UnsupportedProtocol)"),
    ("http:///auth", "the request to the hook failed (UnsupportedProtocol)"),
    ("http://127.0.0.1:99999/auth", "the request to the hook failed (InvalidURL)"),
])
async def test_an_unusable_url_built_by_hand(url: str, reason: str) -> None:
    # The configuration refuses these (config._url); settings made in code may not.
    async with AuthHttpClient(HookSettings(url)) as client:
        assert await client.lookup(request()) == HookFailure(reason)
