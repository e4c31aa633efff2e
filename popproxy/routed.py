"""The sans-IO session in routed mode: the proxy holds the login.

``RoutedSession`` is a ``Session`` whose AUTHORIZATION state is the
proxy's own (``front.LoginFront``): it greets the client itself
(``start``), answers CAPA, USER, AUTH and QUIT, and when the credentials
are complete asks the trio shell, through ``Output.login``, to look the
route up and log in upstream.  The shell reports back with
``routed_login``; from a successful login on, the session relays exactly as
in transparent mode.  Everything else (pipelining order, STLS, policy,
audit events) is the ``Session``'s.
"""

from __future__ import annotations

from .front import GREETING, Credentials, LoginFront, Step
from .policy import Ask, Decision, Policy, allow_all
from .pop3 import Command, State, Status, Trigger, parse_status
from .session import Session
from .session_state import Output, OutputBuilder, Pending, SessionLimits

__all__ = ["RoutedSession"]

_LOGIN_FAILED = Status(False, b"[SYS/TEMP] upstream login failed", "SYS/TEMP")


class RoutedSession(Session):
    """A session whose login the proxy holds and routes (see the module)."""

    def __init__(
        self,
        limits: SessionLimits | None = None,
        policy: Policy = allow_all,
        *,
        client: str | None = None,
        tls: bool = False,
        starttls: bool = False,
        require_tls_for_auth: bool = False,
        resolve_uidl: bool = False,
    ) -> None:
        super().__init__(limits, policy, client=client, tls=tls, starttls=starttls,
                         require_tls_for_auth=require_tls_for_auth, resolve_uidl=resolve_uidl)
        self._front = LoginFront()

    def start(self, now: float) -> Output:
        """Greet the client: there is no upstream yet to do it."""
        out = OutputBuilder()
        if self.state is State.GREETING:
            out.client.append(GREETING)
            self._set_state(Trigger.GREETED, out)
            self._progress(out, now)
        return out.done()

    def routed_login(
        self, reply: bytes, now: float, *, upstream: str | None = None,
        route: str | None = None,
    ) -> Output:
        """The login that ``Output.login`` asked for came out.

        ``reply`` is the status line for the client: the upstream's answer
        to PASS, passed on unchanged (its [AUTH], [IN-USE], [LOGIN-DELAY],
        [SYS/TEMP] codes included), or the proxy's own ``-ERR`` when no
        upstream answered.  On ``+OK`` the relay has attached the upstream
        and the session relays from now on; on ``-ERR`` the client stays in
        AUTHORIZATION and may try again on the same connection.
        """
        out = OutputBuilder()
        entries = self._pipeline.entries
        if self._closed or not entries or not entries[0].login:
            return out.done()
        head = entries[0]
        status = parse_status(reply.rstrip(b"\r\n"))
        if status is None or status.continuation:
            reply, status = b"-ERR [SYS/TEMP] upstream login failed\r\n", _LOGIN_FAILED
        login = self._login
        if login.routed is not None:
            login.routed = (*login.routed[:2], upstream, route)
        if status.ok and self._admit_login(head, status, reply, out, now):
            return out.done()
        out.client.append(reply)
        self._complete(head, status.ok, status.code, status.text, len(reply), out, now)
        self._progress(out, now)
        return out.done()

    # ------------------------------------------------------------------
    # The seams of Session this mode fills in

    def _judge(self, cmd: Command, now: float) -> tuple[bytes | None, Decision | Ask | None]:
        reply, decision = super()._judge(cmd, now)
        if reply is None and cmd.verb == "CAPA" and self.state is State.AUTHORIZATION:
            reply = self._front.capa(offer_stls=self.starttls and not self.tls,
                                     hide_logins=self.require_tls_for_auth and not self.tls)
        return reply, decision

    def _forward(self, p: Pending, sasl: bool, out: OutputBuilder, now: float) -> None:
        if self.state is not State.AUTHORIZATION:
            super()._forward(p, sasl, out, now)
            return
        cmd = p.command
        if cmd.verb in ("USER", "AUTH") and cmd.args:
            self._login.named(cmd)  # for policy: who is logging in
            self._facts = None
        self._step(p, self._front.answer(cmd), out, now)

    def _sasl_response(self, line: bytes, out: OutputBuilder, now: float) -> None:
        if self.state is not State.AUTHORIZATION:
            super()._sasl_response(line, out, now)
            return
        self._step(self._pipeline.entries[0], self._front.sasl(line[:-2]), out, now)

    def _step(self, p: Pending, step: Step, out: OutputBuilder, now: float) -> None:
        """Carry out what the login front said about ``p``."""
        if step.login is not None:
            self._login_request(p, step.login, out)
        elif step.sasl:
            # A continuation: what is ahead of ``p`` in the FIFO goes first.
            self._flush(out, now)
            assert step.reply is not None
            out.client.append(step.reply)
            self._login.sasl_expected = True
        else:
            p.local_reply = step.reply
            p.closes = p.command.verb == "QUIT"
            if p is self._pipeline.entries[0]:
                self._flush(out, now)

    def _login_request(self, p: Pending, credentials: Credentials, out: OutputBuilder) -> None:
        """The reply to ``p`` comes from the upstream login (``routed_login``).

        It counts as in flight upstream meanwhile, so the relay's response
        timeout bounds the whole of the lookup, the connect and the login.
        """
        self._login.routed = (credentials.user, credentials.mechanism, None, None)
        p.login = True
        self._pipeline.sent(p, 0)
        out.login = credentials
