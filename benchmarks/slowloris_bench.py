"""A real login under slowloris: how long it takes, with and without.

Starts a private Dovecot (``tests/dovecot.py``) and the proxy as a child
process (``python -m popproxy run``), then times a real client (Python's
``poplib``: connect, greeting, USER/PASS, RETR 1, QUIT), first alone and then
while ``--dribblers`` connections (300 by default) each send one byte a
second and never finish a line, never log in.  Those hold their session
slots (up to ``limits.max_unauthenticated``, half of ``max_sessions``; more
are refused) until ``limits.idle_timeout`` or ``limits.login_timeout``; the
logged-in users' share stays free.  Also timed: RETR 1 on a session that
logged in before the dribblers came.

    python -m benchmarks.slowloris_bench [--dribblers 300] [--logins 5]

With ``--dribblers`` over the unauthenticated share (say 1000 against the
default ``max_sessions = 1000``), the excess is refused and so are new real
logins, until slots free up; the session logged in before goes on.

``Dribblers`` and ``real_login`` are also what ``tests/test_slowloris.py`` runs.
"""

from __future__ import annotations

import argparse
import poplib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from benchmarks._procs import ProxyProcess, dovecot_extra_config, raise_fd_limit
from tests.dovecot import SAMPLE_MESSAGES, Dovecot, ensure_dovecot

#: How long a dribbler goes on at most (a byte a second): every load loop is bounded.
MAX_DRIBBLE_SECONDS = 600


@dataclass(frozen=True)
class Login:
    """One real session's times, in seconds from the connect."""

    login: float  # greeting, USER and PASS answered
    total: float  # and RETR 1 and QUIT
    message: bytes  # what RETR 1 returned (unstuffed, CRLF)


def real_login(host: str, port: int, user: str, password: str) -> Login:
    """A real client's session (blocking: run it in a thread)."""
    start = time.perf_counter()
    client = poplib.POP3(host, port, timeout=60)
    try:
        client.user(user)
        client.pass_(password)
        logged_in = time.perf_counter() - start
        lines = client.retr(1)[1]
        client.quit()
    finally:
        client.close()
    message = b"".join(line + b"\r\n" for line in lines)
    return Login(logged_in, time.perf_counter() - start, message)


class Dribblers:
    """``count`` connections that each send a byte a second and never a line.

    ``open`` returns once every one was greeted (so each holds a session
    slot); the dribbling goes on until the nursery is cancelled, for at most
    ``MAX_DRIBBLE_SECONDS``.  ``refused``: connections the proxy turned away
    (their first line was ``-ERR``), ``closed``: those it closed later.
    """

    def __init__(self, host: str, port: int, count: int, interval: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.count = count
        self.interval = interval
        self.greeted = 0
        self.refused = 0
        self.closed = 0
        self.first_refusal = b""  # the first refused connection's line, if any

    async def open(self, nursery: trio.Nursery) -> None:
        for _ in range(self.count):
            await nursery.start(self._one)

    async def _one(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stream = await trio.open_tcp_stream(self.host, self.port)
        async with stream:
            first = b""
            while not first.endswith(b"\r\n"):
                data = await stream.receive_some(512)
                if not data:
                    break
                first += data
            if not first.startswith(b"+OK"):
                self.refused += 1
                self.first_refusal = self.first_refusal or first or b"(closed)"
                task_status.started()
                return
            self.greeted += 1
            task_status.started()
            try:
                for _ in range(int(MAX_DRIBBLE_SECONDS / self.interval)):
                    await stream.send_all(b"A")  # never a CRLF
                    with trio.move_on_after(self.interval):
                        if not await stream.receive_some(512):
                            self.closed += 1
                            return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed += 1


@dataclass
class Arm:
    """What one arm measured."""

    logins: list[Login]  # real sessions that got in
    refused: int  # real sessions turned away (the unauthenticated share was full)
    established: list[float]  # RETR 1 on a session logged in before the dribblers came
    crowd: Dribblers


def _established_retr(client: poplib.POP3) -> float:
    start = time.perf_counter()
    client.retr(1)
    return time.perf_counter() - start


async def _measure(host: str, port: int, user: str, password: str, logins: int,
                   dribblers: int) -> Arm:
    crowd = Dribblers(host, port, dribblers)
    # A user who logged in before the slowloris came: its session must not notice.
    held = poplib.POP3(host, port, timeout=60)
    held.user(user)
    held.pass_(password)
    arm = Arm([], 0, [], crowd)
    try:
        async with trio.open_nursery() as nursery:
            await crowd.open(nursery)
            for _ in range(logins):
                arm.established.append(await trio.to_thread.run_sync(_established_retr, held))
                try:
                    arm.logins.append(await trio.to_thread.run_sync(
                        real_login, host, port, user, password))
                except poplib.error_proto:
                    arm.refused += 1
            nursery.cancel_scope.cancel()
        held.quit()
    finally:
        held.close()
    return arm


def _ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms (max {max(values) * 1000:.1f})"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.slowloris_bench",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dribblers", type=int, default=300)
    p.add_argument("--logins", type=int, default=5, help="real sessions timed in each arm")
    p.add_argument("--max-sessions", type=int, default=1000)
    args = p.parse_args(argv)

    reason = ensure_dovecot()
    if reason is not None:
        print(f"slowloris_bench: no Dovecot: {reason}", file=sys.stderr)
        return 2
    raise_fd_limit(4 * args.dribblers + 1024)
    # Every dribbler is a pop3-login connection upstream (transparent mode).
    dovecot = Dovecot(extra_config=dovecot_extra_config(args.dribblers + 64))
    with dovecot, tempfile.TemporaryDirectory(prefix="popproxy-slowloris-") as tmp:
        expected = dovecot.reset_mailbox("alice", SAMPLE_MESSAGES)[0]
        proxy = ProxyProcess(dovecot.port, Path(tmp), max_sessions=args.max_sessions)
        proxy.start()
        try:
            user, password = "alice", dovecot.users["alice"]
            alone = trio.run(_measure, proxy.host, proxy.port, user, password,
                             args.logins, 0)
            crowded = trio.run(_measure, proxy.host, proxy.port, user, password,
                               args.logins, args.dribblers)
        finally:
            proxy.stop()
    crowd = crowded.crowd
    ok = all(login.message == expected for login in (*alone.logins, *crowded.logins))
    print(f"slowloris: {args.dribblers} dribbling connections: {crowd.greeted} held, "
          f"{crowd.refused} refused ({crowd.first_refusal.decode().strip()!r}), "
          f"{crowd.closed} closed by the proxy meanwhile; max_sessions = {args.max_sessions}")
    print(f"  real login (connect to PASS answered), alone:  "
          f"{_ms([x.login for x in alone.logins])}")
    if crowded.logins:
        print(f"  real login under slowloris:                    "
              f"{_ms([x.login for x in crowded.logins])}")
        print(f"  whole session (and RETR 1, QUIT), alone:       "
              f"{_ms([x.total for x in alone.logins])}")
        print(f"  whole session under slowloris:                 "
              f"{_ms([x.total for x in crowded.logins])}")
    print(f"  real logins refused under slowloris:           {crowded.refused} of {args.logins}")
    print(f"  RETR 1 on a session logged in before, alone:   {_ms(alone.established)}")
    print(f"  RETR 1 on that session under slowloris:        {_ms(crowded.established)}")
    print("  messages retrieved intact: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
