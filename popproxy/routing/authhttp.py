"""An nginx-compatible ``auth_http`` client (``ngx_mail_auth_http_module``).

The protocol, as nginx documents and implements it: one ``GET`` to the
configured URL with the login in request headers, the answer in response
headers (the body and the HTTP status are ignored, as nginx ignores them):

request
    ``Auth-Method: plain``, ``Auth-User``, ``Auth-Pass``,
    ``Auth-Protocol: pop3``, ``Auth-Login-Attempt`` (1, 2, ... within the
    session), ``Client-IP``, ``Client-Host`` (only when the caller knows a
    name: nginx sends none for POP3), ``Auth-SSL: on`` for a TLS client, and
    the configured ``auth_http_headers``.  User and password are escaped as
    nginx escapes them (``%XX`` for space, ``%``, control characters; we
    add DEL, which HTTP forbids raw), so existing responders that
    URL-decode them keep working.
response
    ``Auth-Status``: ``OK``, or the text of a refusal.  With ``OK``,
    ``Auth-Server`` (an IP address, never a host name) and ``Auth-Port``
    say where to go; optional ``Auth-User``/``Auth-Pass`` replace what the
    proxy logs in upstream with (sent as they are: nginx does not
    URL-decode them either).  With a refusal, ``Auth-Wait: N`` asks to hold
    the answer N seconds (nginx then lets the client retry; without it
    nginx closes the connection).

Results are typed values, never exceptions: ``HookRoute``, ``HookRefusal``,
``HookFailure``.  A failure's ``reason`` is for logs and is built from
fixed text only, never from exception messages or header values that might
hold a password (h11's parse errors quote the offending line).

Bounds: each lookup runs under ``timeout`` in total, including the wait
for one of ``concurrency`` slots (a ``trio.CapacityLimiter``), so a hook
that never answers holds at most ``concurrency`` requests open while every
lookup still ends within its timeout.  The response body is read only to
keep the connection (up to ``MAX_BODY``), never interpreted.

The HTTP client is ``httpclient.HttpPool``: h11, the maintained sans-IO
HTTP/1.1 state machine (httpcore's, and so httpx's), on trio streams with
kept-alive connections; see that module for why not httpcore itself.
Environment proxies (``HTTP_PROXY``...) are not consulted: the request
carries a password and must go where the configuration says, nowhere else.

Differences from nginx, deliberate: ``Auth-Status: OK`` without
``Auth-Server`` *and* ``Auth-Port`` is a route without an address (the
router then uses ``routing.default``; nginx calls it an error); nginx's
undocumented ``Auth-Status: WAIT`` (ask again later) is a failure;
duplicate response headers and an unparsable ``Auth-Wait`` are failures
(nginx takes the last and ignores the latter); ``Auth-Wait`` is capped at
``MAX_AUTH_WAIT``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Protocol

import trio

from ..addr import HostPort
from .config import RoutingConfig, check_user_name
from .httpclient import IDLE_EXPIRY, MAX_BODY, MAX_KEPT, HttpAnswer, HttpFailure, HttpPool

__all__ = [
    "IDLE_EXPIRY",
    "MAX_AUTH_WAIT",
    "MAX_BODY",
    "MAX_KEPT",
    "MAX_REFUSAL_TEXT",
    "AuthHttpClient",
    "AuthRequest",
    "HookFailure",
    "HookRefusal",
    "HookResult",
    "HookRoute",
    "HookSettings",
    "HttpAnswer",
    "HttpFailure",
    "HttpPool",
    "Pool",
    "escape",
    "interpret_response",
    "request_headers",
]

#: Longest ``Auth-Wait`` honoured, in seconds: a typo in a hook
#: (``Auth-Wait: 30000``) must not park sessions for hours.
MAX_AUTH_WAIT = 60
#: Refusal texts are cut to this many octets (UTF-8): they become a ``-ERR``
#: line, and RFC 2449 §4 bounds responses to 512 octets.
MAX_REFUSAL_TEXT = 256
_ANSWER_HEADERS = (
    b"auth-status", b"auth-server", b"auth-port", b"auth-user", b"auth-pass", b"auth-wait",
)
_CANONICAL = {h: "-".join(p.capitalize() for p in h.decode().split("-")) for h in _ANSWER_HEADERS}
# nginx's NGX_ESCAPE_MAIL_AUTH set (space, "%", 0x00-0x1F) plus DEL.
_ESCAPE = frozenset(range(0x21)) | {ord("%"), 0x7F}


@dataclass(frozen=True, slots=True)
class HookSettings:
    """What a lookup needs from ``[routing]``."""

    url: str
    timeout: float = 5.0
    concurrency: int = 64
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold a secret

    @classmethod
    def from_config(cls, config: RoutingConfig) -> HookSettings | None:
        if config.auth_http is None:
            return None
        return cls(
            url=config.auth_http,
            timeout=config.auth_http_timeout,
            concurrency=config.auth_http_concurrency,
            headers=config.auth_http_headers,
        )


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """One login to ask the hook about."""

    user: str
    password: str = field(repr=False)
    client_ip: str = ""
    login_attempt: int = 1
    client_host: str | None = None
    tls: bool = False


@dataclass(frozen=True, slots=True)
class HookRoute:
    """``Auth-Status: OK``: where to log in, and as whom."""

    address: HostPort | None  # None: the hook named no server (see module docstring)
    user: str  # Auth-User, or the client's user name
    password: str = field(repr=False)  # Auth-Pass, or the client's password


@dataclass(frozen=True, slots=True)
class HookRefusal:
    """The hook refused the login; ``text`` is for the client's ``-ERR``."""

    text: str
    wait: int | None  # Auth-Wait in seconds (capped), None when absent


@dataclass(frozen=True, slots=True)
class HookFailure:
    """No usable answer; ``reason`` is for logs and never holds a credential."""

    reason: str
    kind: Literal["timeout", "error"] = "error"


HookResult = HookRoute | HookRefusal | HookFailure


def escape(value: str) -> bytes:
    """``value`` as nginx puts it into ``Auth-User``/``Auth-Pass``.

    UTF-8 (``surrogateescape``: a password's raw octets come back out as
    they came in), with space, ``%``, control characters and DEL as ``%XX``.
    """
    raw = value.encode("utf-8", "surrogateescape")
    if _ESCAPE.isdisjoint(raw):
        return raw
    return b"".join(b"%%%02X" % b if b in _ESCAPE else bytes((b,)) for b in raw)


def request_headers(settings: HookSettings, request: AuthRequest) -> list[tuple[bytes, bytes]]:
    """The request headers for ``request`` (pure; see the module docstring)."""
    headers = [
        (b"Auth-Method", b"plain"),
        (b"Auth-User", escape(request.user)),
        (b"Auth-Pass", escape(request.password)),
        (b"Auth-Protocol", b"pop3"),
        (b"Auth-Login-Attempt", str(max(1, request.login_attempt)).encode()),
        (b"Client-IP", escape(request.client_ip)),
    ]
    if request.client_host:
        headers.append((b"Client-Host", escape(request.client_host)))
    if request.tls:
        headers.append((b"Auth-SSL", b"on"))
    headers.extend((k.encode("ascii"), v.encode("ascii")) for k, v in settings.headers)
    return headers


def _failure(reason: str) -> HookFailure:
    return HookFailure(reason, "error")


def _printable(text: str) -> bool:
    return all(c == "\t" or c.isprintable() for c in text)


def _address(server: bytes, port: bytes) -> HostPort | HookFailure:
    shown = server[:64].decode("ascii", "replace")
    try:
        host = server.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        ip = ipaddress.ip_address(host)
    except ValueError:
        return _failure(f"Auth-Server is not an IP address: {shown!r}")
    if not (port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return _failure(f"Auth-Port is not a port number: {port[:16].decode('ascii', 'replace')!r}")
    return HostPort(str(ip), int(port))


def interpret_response(
    headers: Sequence[tuple[bytes, bytes]], request: AuthRequest, status_code: int = 200
) -> HookResult:
    """Turn the hook's response headers into a result (pure, total).

    Header names are matched case-insensitively; headers other than the
    ``Auth-*`` answers are ignored, as nginx ignores them.
    """
    fields: dict[bytes, bytes] = {}
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in _CANONICAL:
            if name in fields:
                return _failure(f"the hook sent {_CANONICAL[name]} twice")
            fields[name] = value.strip(b" \t")
    status = fields.get(b"auth-status")
    if status is None:
        return _failure(f"no Auth-Status header in the hook's answer (HTTP {status_code})")
    try:
        text = status.decode("utf-8")
    except UnicodeDecodeError:
        return _failure("Auth-Status is not UTF-8")
    if not text or not _printable(text):
        return _failure("Auth-Status is empty or has control characters")

    if text == "OK":
        server, port = fields.get(b"auth-server"), fields.get(b"auth-port")
        address: HostPort | None = None
        if server is not None or port is not None:
            if not server or not port:
                return _failure("the hook sent only one of Auth-Server and Auth-Port")
            parsed = _address(server, port)
            if isinstance(parsed, HookFailure):
                return parsed
            address = parsed
        user = request.user
        if (raw_user := fields.get(b"auth-user")) is not None:
            user = raw_user.decode("utf-8", "surrogateescape")
            if (why := check_user_name(user)) is not None:
                return _failure(f"Auth-User unusable: {why}")
        password = request.password
        if (raw_pass := fields.get(b"auth-pass")) is not None:
            if not raw_pass or any(b in raw_pass for b in b"\r\n\0"):
                # Never quote it: it is a password.
                return _failure("Auth-Pass is empty or has CR, LF or NUL")
            password = raw_pass.decode("utf-8", "surrogateescape")
        return HookRoute(address, user, password)

    if text == "WAIT":
        return _failure("the hook answered Auth-Status: WAIT, which is not supported")
    wait: int | None = None
    if (raw_wait := fields.get(b"auth-wait")) is not None:
        if not (raw_wait.isdigit() and len(raw_wait) <= 9):
            shown = raw_wait[:16].decode("ascii", "replace")
            return _failure(f"Auth-Wait is not a number of seconds: {shown!r}")
        wait = min(int(raw_wait), MAX_AUTH_WAIT)
    if len(status) > MAX_REFUSAL_TEXT:
        text = status[:MAX_REFUSAL_TEXT].decode("utf-8", "ignore")  # not mid-character
    return HookRefusal(text, wait)


class Pool(Protocol):
    """What the client needs of its connection pool (``HttpPool``; tests fake it)."""

    async def get(self, url: str, headers: list[tuple[bytes, bytes]]
                  ) -> HttpAnswer | HttpFailure:
        """``GET url`` with ``headers`` (``Host`` added): the answer or a failure."""
        ...

    async def aclose(self) -> None: ...


class AuthHttpClient:
    """A pooled HTTP client for the hook; use ``async with`` (closes it).

    One per process, shared by all sessions; ``reconfigure`` applies a
    reloaded ``[routing]`` to the lookups that start afterwards.  Without
    settings (no ``auth_http`` yet: a reload may add one) every lookup is a
    failure.  ``pool`` is for tests (an ``HttpPool`` with another TLS
    context, or a stand-in without sockets).
    """

    def __init__(self, settings: HookSettings | None = None, *, pool: Pool | None = None) -> None:
        self._settings = settings
        self._limiter = trio.CapacityLimiter(settings.concurrency if settings else 1)
        self._pool: Pool = pool if pool is not None else HttpPool()

    @property
    def settings(self) -> HookSettings | None:
        return self._settings

    @property
    def in_flight(self) -> int:
        """Requests holding a slot now (at most ``settings.concurrency``)."""
        return int(self._limiter.borrowed_tokens)

    def reconfigure(self, settings: HookSettings) -> None:
        """New URL, timeout, slots or headers for lookups that start from now on."""
        self._limiter.total_tokens = settings.concurrency
        self._settings = settings

    async def aclose(self) -> None:
        """Close the kept connections."""
        await self._pool.aclose()

    async def __aenter__(self) -> AuthHttpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def lookup(self, request: AuthRequest) -> HookResult:
        """Ask the hook; always returns within ``settings.timeout`` (plus a tick).

        Cancellation from outside (the client went away) propagates.
        """
        settings = self._settings
        if settings is None:
            return _failure("routing.auth_http is not configured")
        result: HookResult = HookFailure(
            f"no answer from the hook within {settings.timeout:g}s", "timeout")
        with trio.move_on_after(settings.timeout):
            async with self._limiter:
                answer = await self._pool.get(settings.url, request_headers(settings, request))
                if isinstance(answer, HttpFailure):
                    result = _failure(answer.reason)
                else:
                    result = interpret_response(answer.headers, request, answer.status)
        return result
