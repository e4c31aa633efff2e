"""Real rsyslog daemons for the tests of ``deploy/rsyslog/``.

``ensure_rsyslog()`` finds ``rsyslogd`` with its GnuTLS network driver and,
as root on a Debian-like system, installs ``rsyslog rsyslog-gnutls`` with
apt-get when they are missing (``tests.packages``; no daemon is started by
the packages).  ``rsyslog_or_skip()`` skips a test with a loud reason when
rsyslog cannot be had, and fails it under ``CI=true``, as the Dovecot
fixtures do.

``Rsyslogd`` runs one ``rsyslogd -n`` in the foreground with a private
main configuration (its own work directory, pid file and state files, no
system inputs) that includes the files given, and waits until it says it is
ready: rsyslogd reports ``READY=1`` on the ``NOTIFY_SOCKET`` of systemd's
notify protocol once its inputs run, so no test waits by sleeping.
``render()`` copies a file from ``deploy/`` with exact replacements of its
paths and ports, failing if one is not in the file, so the tests run the
real file, not a copy that could drift from it.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import trio

from tests.packages import apt_install, can_install
from tests.peers import MissingPeer

__all__ = [
    "DEBIAN_PACKAGES",
    "Rsyslogd",
    "ensure_rsyslog",
    "render",
    "rsyslog_or_skip",
    "rsyslogd_binary",
]

DEBIAN_PACKAGES: tuple[str, ...] = ("rsyslog", "rsyslog-gnutls")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
_MODULE_DIRS = ("/usr/lib/*/rsyslog", "/usr/lib/rsyslog", "/usr/lib64/rsyslog")


def rsyslogd_binary() -> str | None:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("rsyslogd", path=search)


def _status() -> str | None:
    if rsyslogd_binary() is None:
        return "no 'rsyslogd' on PATH or in /usr/sbin"
    if not any(glob.glob(f"{d}/lmnsd_gtls.so") for d in _MODULE_DIRS):
        return "rsyslog's GnuTLS driver (lmnsd_gtls.so, package rsyslog-gnutls) is missing"
    return None


@functools.cache
def ensure_rsyslog() -> str | None:
    """None when rsyslogd with TLS is here (installed now if need be), else why not."""
    reason = _status()
    if reason is None:
        return None
    cannot = can_install(DEBIAN_PACKAGES)
    if cannot is not None:
        return f"{reason}; {cannot}"
    failure = apt_install(DEBIAN_PACKAGES)
    if failure is not None:
        return f"{reason}; installing it failed: {failure}"
    return _status()


_missing = MissingPeer("REAL RSYSLOG", "audit shipping test",
                       "apt-get install rsyslog rsyslog-gnutls (as root)")


def rsyslog_or_skip() -> None:
    """Skip (with ``CI=true``: fail) the test when rsyslog cannot be had."""
    reason = ensure_rsyslog()
    if reason is not None:
        _missing.unavailable(reason)


def render(source: Path, target: Path, replacements: Mapping[str, str]) -> Path:
    """Write ``source`` to ``target`` with each key replaced by its value.

    Every key must occur in the file: a test must not silently run a file
    whose paths or ports it did not set.
    """
    text = source.read_text()
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"{source}: {old!r} is not in the file any more")
        text = text.replace(old, new)
    target.write_text(text)
    return target


class Rsyslogd:
    """One rsyslogd in the foreground, in a directory of its own."""

    def __init__(self, name: str, includes: Sequence[Path], *,
                 max_message_size: str = "64k") -> None:
        self.name = name
        # Short: the notify socket's path must fit in sun_path (108 bytes).
        parent = None if len(tempfile.gettempdir()) <= 40 else "/tmp"
        self.root = Path(tempfile.mkdtemp(prefix=f"popproxy-rsyslog-{name}-", dir=parent))
        self.work = self.root / "work"
        self.work.mkdir()
        self.pid_path = self.root / "rsyslogd.pid"
        self.log_path = self.root / "rsyslogd.log"
        self.conf_path = self.root / "rsyslog.conf"
        lines = [
            # What /etc/rsyslog.conf sets on a host, before its drop-ins.
            f'global(workDirectory="{self.work}" maxMessageSize="{max_message_size}")',
            # Its own errors go to a file the test shows when something fails.
            '$ErrorMessagesToStderr on',
            *(f'include(file="{p}")' for p in includes),
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.proc: trio.Process | None = None

    def check(self) -> None:
        """``rsyslogd -N1``: the configuration is valid."""
        binary = rsyslogd_binary() or "rsyslogd"
        done = subprocess.run([binary, "-N1", "-f", str(self.conf_path)], capture_output=True,
                              timeout=30, check=False)
        if done.returncode != 0:
            raise AssertionError(f"rsyslogd -N1 {self.conf_path}:\n"
                                 f"{done.stderr.decode(errors='replace')}")

    def _open_log(self) -> BinaryIO:
        return open(self.log_path, "wb")

    async def start(self) -> None:
        """Start it and wait for ``READY=1``; raises if it dies first."""
        binary = rsyslogd_binary() or "rsyslogd"
        notify = self.root / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
            raw.bind(str(notify))
            sock = trio.socket.from_stdlib_socket(raw.dup())
        env = dict(os.environ, NOTIFY_SOCKET=str(notify))
        with sock, self._open_log() as log:
            self.proc = await trio.lowlevel.open_process(
                [binary, "-n", "-f", str(self.conf_path), "-i", str(self.pid_path)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
            with trio.move_on_after(START_TIMEOUT) as waited:
                async with trio.open_nursery() as nursery:

                    async def died() -> None:
                        assert self.proc is not None
                        await self.proc.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(died)
                    while b"READY=1" not in (await sock.recv(4096)).split(b"\n"):
                        pass
                    nursery.cancel_scope.cancel()
        if waited.cancelled_caught or self.proc.returncode is not None:
            await self.stop()
            raise AssertionError(f"rsyslogd ({self.name}) did not start:\n{self.log()}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    async def stop(self) -> None:
        """SIGTERM (rsyslogd writes out and closes its files) and wait."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    def remove(self) -> None:
        """Delete its directory (left in place when a test fails, to look into)."""
        shutil.rmtree(self.root, ignore_errors=True)
