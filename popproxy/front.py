"""The proxy's own POP3 front before login, in routed mode (no I/O).

With ``[routing]`` the proxy holds the login itself, as nginx's mail proxy
and perdition do: it greets (without an APOP timestamp: APOP cannot be
routed), answers CAPA from what it supports, takes USER/PASS, and
terminates AUTH PLAIN and AUTH LOGIN (RFC 5034, RFC 4616) itself.  When
the credentials are complete it hands them to the trio shell as
``Credentials``, which looks the route up and logs in upstream; the
session then relays as in transparent mode.

Credentials live in a ``Credentials`` value only until that login: never
in an event, a log line or an exception.  Decoded SASL credentials that
contain CR, LF or NUL are refused (they would become extra command lines
upstream: nginx's fix for the same class of bug), and so is a PLAIN
authorization identity other than the user's own (the proxy cannot act
for another user).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Final

from .pop3 import Command

__all__ = ["GREETING", "Credentials", "LoginFront", "Step"]

GREETING: Final = b"+OK POP3 server ready\r\n"
_PROMPT_USER: Final = b"+ VXNlcm5hbWU6\r\n"  # base64("Username:"), as AUTH LOGIN servers send
_PROMPT_PASSWORD: Final = b"+ UGFzc3dvcmQ6\r\n"  # base64("Password:")
_CONTINUE: Final = b"+ \r\n"
_MECHANISMS: Final = ("PLAIN", "LOGIN")


@dataclass(frozen=True, slots=True)
class Credentials:
    """A complete login to route: ``mechanism`` is "USER", "PLAIN" or "LOGIN"."""

    user: str
    password: str = field(repr=False)
    mechanism: str


@dataclass(frozen=True, slots=True)
class Step:
    """What the front does with a command or SASL line.

    ``reply``: the line(s) for the client, or None when ``login`` is set
    (the reply comes from the upstream login).  ``sasl``: the next client
    line is a SASL response.
    """

    reply: bytes | None = None
    login: Credentials | None = None
    sasl: bool = False


class LoginFront:
    """The login conversation of one routed session."""

    __slots__ = ("_mechanism", "_sasl_user", "_user")

    def __init__(self) -> None:
        self._user: str | None = None  # from USER
        self._mechanism: str | None = None  # the SASL exchange in progress
        self._sasl_user: str | None = None  # AUTH LOGIN's user, before the password

    def capa(self, *, offer_stls: bool, hide_logins: bool) -> bytes:
        """The CAPA reply before login: what the proxy itself supports
        (no USER or SASL while logins wait for STLS: ``hide_logins``)."""
        tags = [] if hide_logins else ["USER", "SASL PLAIN LOGIN"]
        tags += ["PIPELINING", "RESP-CODES", "AUTH-RESP-CODE", "TOP", "UIDL"]
        if offer_stls:
            tags.append("STLS")
        return b"+OK Capability list follows\r\n" + "".join(
            t + "\r\n" for t in tags).encode() + b".\r\n"

    def answer(self, cmd: Command) -> Step:
        """A command before login (STLS and the state checks came first)."""
        verb = cmd.verb
        if verb == "USER":
            if len(cmd.args) != 1:
                return Step(b"-ERR USER takes one argument: the user name\r\n")
            self._user = cmd.args[0]
            return Step(b"+OK\r\n")
        if verb == "PASS":
            if self._user is None:
                return Step(b"-ERR No username given.\r\n")  # as the core (pop3.local_reply)
            user, self._user = self._user, None
            password = cmd.args[0] if cmd.args else ""
            return Step(login=Credentials(user, password, "USER"))
        if verb == "AUTH":
            return self._auth(cmd)
        if verb == "APOP":
            # The client's digest covers a greeting timestamp the upstream
            # never sent; nothing can be forwarded (field notes 1.9).
            return Step(b"-ERR [AUTH] APOP is not available here: use USER/PASS or AUTH\r\n")
        if verb == "QUIT":
            return Step(b"+OK bye\r\n")
        return Step(f"-ERR {verb} is not available before login\r\n".encode())

    def _auth(self, cmd: Command) -> Step:
        if not cmd.args:  # the mechanism list Outlook and Thunderbird ask for
            return Step(b"+OK\r\n" + b"".join(m.encode() + b"\r\n" for m in _MECHANISMS)
                        + b".\r\n")
        mechanism = cmd.args[0].upper()
        if mechanism not in _MECHANISMS:
            return Step(b"-ERR [AUTH] unsupported mechanism: use PLAIN or LOGIN\r\n")
        if len(cmd.args) > 2:
            return Step(b"-ERR malformed AUTH command\r\n")
        self._mechanism = mechanism
        self._sasl_user = None
        if len(cmd.args) == 2:  # an initial response (RFC 5034 §4)
            return self.sasl(cmd.args[1].encode("ascii", "replace"), initial=True)
        return Step(_CONTINUE if mechanism == "PLAIN" else _PROMPT_USER, sasl=True)

    def sasl(self, line: bytes, *, initial: bool = False) -> Step:
        """A client's SASL response (base64, ``=`` for empty, ``*`` to cancel)."""
        mechanism = self._mechanism
        if mechanism is None:
            return Step(b"-ERR no authentication in progress\r\n")
        if line == b"*":
            self._mechanism = self._sasl_user = None
            return Step(b"-ERR authentication cancelled\r\n")
        try:
            data = b"" if line == b"=" else base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._mechanism = self._sasl_user = None
            return Step(b"-ERR malformed SASL response\r\n")
        if mechanism == "PLAIN":
            if not data and initial:  # "=": an empty initial response, ask again
                return Step(_CONTINUE, sasl=True)
            self._mechanism = None
            parts = data.split(b"\0")
            if len(parts) != 3 or not parts[1]:
                return Step(b"-ERR [AUTH] malformed PLAIN credentials\r\n")
            authzid, user, password = parts
            if authzid and authzid != user:
                return Step(b"-ERR [AUTH] acting for another user is not supported\r\n")
            return self._credentials(user, password, "PLAIN")
        # LOGIN: the user name, then the password, each asked for.
        if self._sasl_user is None:
            if not data:
                self._mechanism = None
                return Step(b"-ERR [AUTH] empty user name\r\n")
            if _unsafe(data):
                self._mechanism = None
                return Step(_UNSAFE)
            self._sasl_user = data.decode("utf-8", "surrogateescape")
            return Step(_PROMPT_PASSWORD, sasl=True)
        user_name, self._sasl_user = self._sasl_user, None
        self._mechanism = None
        return self._credentials(user_name.encode("utf-8", "surrogateescape"), data, "LOGIN")

    def _credentials(self, user: bytes, password: bytes, mechanism: str) -> Step:
        if _unsafe(user) or _unsafe(password):
            return Step(_UNSAFE)
        # Octets that are not UTF-8 survive the round trip to the upstream.
        return Step(login=Credentials(user.decode("utf-8", "surrogateescape"),
                                      password.decode("utf-8", "surrogateescape"), mechanism))


_UNSAFE: Final = b"-ERR [AUTH] credentials contain CR, LF or NUL\r\n"


def _unsafe(data: bytes) -> bool:
    return b"\r" in data or b"\n" in data or b"\0" in data
