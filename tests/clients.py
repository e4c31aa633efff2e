"""Real POP3 client programs (curl, mpop, fetchmail) for the interoperability tests.

* ``ensure_program(name, package)``: find a program; as root on a Debian-like
  system, ``apt-get install`` its package when it is missing.  Returns None
  when the program is there, else the reason it is not.
* ``require_program(name, package)``: the program's path, or skip the test
  with a loud reason (``pytest.fail`` instead when ``CI=true``: CI must not go
  green by skipping the tests that prove interoperability).
* ``run_client(args, ...)``: run a client from a trio test *without blocking
  the loop* (the proxy under test runs in the same loop), always under a
  deadline.
* ``write_mpop_config`` / ``write_fetchmail_rc`` / ``mda_script``: throwaway
  client configurations for a temp directory; ``maildir_messages`` /
  ``numbered_files`` read back what the clients delivered.

Everything here talks to loopback only and writes only below the directories
it is given (plus, for the install, the system's packages).
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
import trio

from tests.packages import apt_install, can_install

__all__ = [
    "ClientRun",
    "client_env",
    "ensure_program",
    "maildir_messages",
    "mda_script",
    "numbered_files",
    "require_program",
    "run_client",
    "unavailable",
    "write_fetchmail_rc",
    "write_mpop_config",
]

#: Default deadline for one client run.
CLIENT_TIMEOUT = 30.0


# --------------------------------------------------------------------------
# Finding / installing the programs
# --------------------------------------------------------------------------


def _which(name: str) -> str | None:
    # sbin too: daemons used as test peers (haproxy) live in /usr/sbin.
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/local/bin", "/bin",
                              "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which(name, path=search)


@functools.cache
def ensure_program(name: str, package: str) -> str | None:
    """Make program ``name`` available; None when it is, else why it is not.

    When it is missing and we are root on a system with apt-get, installs
    ``package`` non-interactively (running ``apt-get update`` first if the
    first attempt fails).  Blocking: call it from a sync fixture, not from
    inside a trio test.  Cached, so each install is attempted once a run.
    """
    if _which(name) is not None:
        return None
    missing = f"'{name}' is not installed (Debian package {package})"
    cannot = can_install([package])
    if cannot is not None:
        return f"{missing}; {cannot}"
    failure = apt_install([package])
    if failure is not None:
        return f"{missing}; {failure}"
    if _which(name) is None:
        return f"installed {package}, but there is still no '{name}' on PATH"
    return None


def unavailable(reason: str) -> NoReturn:
    """Skip loudly; fail instead on CI (``CI=true``)."""
    message = (
        "\n" + "!" * 72 + "\n"
        "REAL POP3 CLIENT NOT AVAILABLE - interoperability tests with it are NOT being run.\n"
        f"Reason: {reason}\n" + "!" * 72
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_program(name: str, package: str) -> str:
    """Path of program ``name`` (installing ``package`` if needed and possible),
    or skip/fail the test via ``unavailable``."""
    reason = ensure_program(name, package)
    path = _which(name)
    if reason is not None or path is None:
        unavailable(reason or f"'{name}' vanished from PATH")
    return path


# --------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRun:
    args: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    def describe(self) -> str:
        def tail(data: bytes) -> str:
            lines = data.decode(errors="replace").rstrip().splitlines()
            return "\n".join(lines[-40:]) or "(empty)"

        return (
            f"$ {' '.join(self.args)}\n"
            f"exit status {self.returncode} after {self.seconds:.2f}s\n"
            f"--- stdout (tail) ---\n{tail(self.stdout)}\n"
            f"--- stderr (tail) ---\n{tail(self.stderr)}"
        )

    def check(self) -> ClientRun:
        """Assert exit status 0; the failure message shows the output."""
        assert self.returncode == 0, self.describe()
        return self


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for a client: a private HOME, C locale, no proxies.

    curl honours ``all_proxy`` for every protocol, so inherited proxy
    variables are dropped: the clients must talk to loopback directly.
    """
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HOME=str(home), LC_ALL="C", LANG="C")
    env.update(extra)
    return env


async def run_client(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    time_limit: float = CLIENT_TIMEOUT,
) -> ClientRun:
    """Run a client program in the background of the trio loop, with a deadline.

    stdin is empty (no client may sit waiting for a password).  Raises
    ``AssertionError`` when the deadline passes (the process is killed).
    """
    argv = tuple(str(a) for a in args)
    started = trio.current_time()
    try:
        with trio.fail_after(time_limit):
            proc = await trio.run_process(
                list(argv),
                stdin=b"",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
    except trio.TooSlowError:
        raise AssertionError(
            f"$ {' '.join(argv)}\ndid not finish within {time_limit:.0f}s (killed)"
        ) from None
    return ClientRun(argv, proc.returncode, proc.stdout, proc.stderr, trio.current_time() - started)


# --------------------------------------------------------------------------
# Client configurations and what they deliver
# --------------------------------------------------------------------------


def _rc_quote(text: str) -> str:
    """A double-quoted string for mpop's and fetchmail's configuration syntax."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_mpop_config(
    directory: Path,
    *,
    host: str,
    port: int,
    user: str,
    password: str,
    auth: str,
    maildir: Path,
) -> Path:
    """An mpop configuration with one account ``proxy``; returns its path.

    ``tls off`` plus an explicit ``auth`` method: with the default ``auth on``
    mpop refuses every method that would send the password in clear
    ("cannot use a secure authentication method") when there is no TLS.
    ``received_header off`` keeps the delivered messages unchanged (apart
    from mpop's CRLF -> LF conversion for local delivery).  mpop insists that
    a file holding a password is readable by its owner only.
    """
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    path = directory / "mpoprc"
    path.write_text(
        "defaults\n"
        "tls off\n"
        "timeout 20\n"
        "received_header off\n"
        "\n"
        "account proxy\n"
        f"host {host}\n"
        f"port {port}\n"
        f"user {user}\n"
        f"password {_rc_quote(password)}\n"
        f"auth {auth}\n"
        f"delivery maildir {maildir}\n"
        f"uidls_file {_rc_quote(str(directory / 'mpop-uidls'))}\n"
    )
    path.chmod(0o600)
    return path


def mda_script(directory: Path) -> Path:
    """A shell MDA: ``script OUTDIR`` stores stdin as OUTDIR/000001, 000002, ...

    The clients deliver one message at a time, so counting the files gives
    the delivery order.
    """
    path = directory / "deliver.sh"
    path.write_text(
        '#!/bin/sh\nset -e\nn=$(ls "$1" | wc -l)\nexec cat > "$1/$(printf %06d $((n + 1)))"\n'
    )
    path.chmod(0o755)
    return path


def write_fetchmail_rc(
    directory: Path,
    *,
    host: str,
    port: int,
    user: str,
    password: str,
    local_user: str,
    mda: str,
    keep: bool,
) -> Path:
    """A fetchmail run control file (mode 0600, or fetchmail refuses it).

    ``sslproto ''`` turns off fetchmail's opportunistic STARTTLS (the proxy
    has no TLS yet and strips STLS from CAPA anyway); ``no rewrite`` keeps the
    headers unchanged; ``fetchall`` takes seen messages too.
    """
    path = directory / "fetchmailrc"
    keep_opt = "keep" if keep else "nokeep"
    path.write_text(
        f"poll {host} with proto POP3 port {port}\n"
        f"  user {_rc_quote(user)} there with password {_rc_quote(password)}"
        f" is {_rc_quote(local_user)} here\n"
        f"  options {keep_opt} fetchall no rewrite sslproto ''\n"
        f"  mda {_rc_quote(mda)}\n"
    )
    path.chmod(0o600)
    return path


def maildir_messages(maildir: Path) -> list[bytes]:
    """Contents of all messages in a Maildir (new/ and cur/), sorted by content."""
    found: list[bytes] = []
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.is_dir():
            found.extend(p.read_bytes() for p in d.iterdir() if p.is_file())
    return sorted(found)


def numbered_files(directory: Path) -> list[bytes]:
    """Contents of the files ``mda_script`` wrote, in delivery order."""
    return [p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()]
