"""Installing Debian packages for the tests that need real programs.

Used by ``tests.dovecot`` (Dovecot) and ``tests.clients`` (curl, mpop,
fetchmail): when a program is missing and we are root on a Debian-like
system, its packages are installed with apt-get, non-interactively, under
bounded timeouts, and without letting the packages start any daemons.

* ``can_install(packages)``: None when an install can be attempted, else why
  not (not root, no apt-get).
* ``apt_install(packages)``: ``apt-get install`` them (once more after
  ``apt-get update`` if the first attempt fails); None on success, else why
  it failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "APT_INSTALL_TIMEOUT",
    "APT_UPDATE_TIMEOUT",
    "apt_get_binary",
    "apt_install",
    "can_install",
]

APT_INSTALL_TIMEOUT = 300.0
APT_UPDATE_TIMEOUT = 180.0

_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def apt_get_binary() -> str | None:
    """Path of ``apt-get``, or None.  Looks in the usual bin dirs too."""
    search = os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin"]
    )
    return shutil.which("apt-get", path=search)


def can_install(packages: Sequence[str]) -> str | None:
    """None if ``apt_install(packages)`` can be attempted here, else why not."""
    names = " ".join(packages)
    if os.name != "posix" or os.geteuid() != 0:
        return f"not root, so not installing it (run: apt-get install {names})"
    if apt_get_binary() is None:
        return f"no apt-get here to install {names} with"
    return None


def _run_apt(args: Sequence[str], timeout: float) -> tuple[bool, str]:
    """Run ``apt-get ARGS``; (succeeded, last lines of its output or the error)."""
    command = f"'apt-get {' '.join(args)}'"
    binary = apt_get_binary()
    if binary is None:
        return False, f"{command} could not run: no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", APT_LISTCHANGES_FRONTEND="none")
    try:
        proc = subprocess.run(
            [binary, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, f"{command} timed out after {timeout:.0f}s"
    except OSError as exc:
        return False, f"{command} could not run: {exc}"
    tail = proc.stdout.decode(errors="replace").strip().splitlines()[-5:]
    return proc.returncode == 0, "\n".join(tail)


@contextlib.contextmanager
def _no_service_start() -> Iterator[None]:
    """Keep package postinst scripts from starting daemons (Dovecot, fetchmail).

    Debian's invoke-rc.d honours /usr/sbin/policy-rc.d (exit 101 = "don't").
    Docker images usually have one already; otherwise a temporary one is put
    in place and removed afterwards.
    """
    policy = _POLICY_RC_D
    if policy.exists() or not policy.parent.is_dir():
        yield
        return
    try:
        policy.write_text("#!/bin/sh\n# temporary, written by popproxy's tests\nexit 101\n")
        policy.chmod(0o755)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            policy.unlink()


def apt_install(packages: Sequence[str]) -> str | None:
    """Install Debian ``packages``; None on success, else a failure reason.

    Runs ``apt-get install -y -q --no-install-recommends PACKAGES`` and, if
    that fails, ``apt-get update -q`` and the install once more; no daemon is
    started meanwhile.  Blocking (minutes at worst).  Check ``can_install``
    first: this does not.
    """
    install = ["install", "-y", "-q", "--no-install-recommends", *packages]
    with _no_service_start():
        ok, out = _run_apt(install, APT_INSTALL_TIMEOUT)
        if not ok:
            updated, out_update = _run_apt(["update", "-q"], APT_UPDATE_TIMEOUT)
            if not updated:
                return f"'apt-get update' failed:\n{out_update}\n(install said:\n{out})"
            ok, out = _run_apt(install, APT_INSTALL_TIMEOUT)
    if not ok:
        return f"'apt-get install {' '.join(packages)}' failed:\n{out}"
    return None
