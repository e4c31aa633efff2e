"""A real, throwaway Dovecot POP3 server for the tests.

``Dovecot`` writes a private configuration into a temporary directory (own
``base_dir``, ``state_dir``, log file, Maildirs and passwd-file), starts
``dovecot -F -c <conf>`` in the foreground on a free loopback port and stops it
again.  It does not touch the system's Dovecot configuration, its runtime
directory or port 110.

Mail storage: ``deliver()`` stores messages the way a Maildir MDA does, with
bare LF line endings (CRLF in the input is turned into LF).  Dovecot turns them
back into CRLF and dot-stuffs lines on RETR/TOP, so what a POP3 client gets back
(after unstuffing) is ``expected_retr(message)``: the message with CRLF line
endings and a final CRLF.  LIST sizes are Dovecot's "virtual size", i.e. the
size of the CRLF form.

Running as root (the usual case on CI and the developer machines): the master
runs as root, drops to ``dovecot``/``dovenull`` for its internal and login
processes, and mail is accessed as the ``mail`` system user (Dovecot refuses
uid 0 for mail access), so the Maildirs are created owned by that user.  Not
root: best effort, everything runs as the current user.

``ensure_dovecot()`` finds the binary and, as root on a Debian-like system,
installs ``dovecot-core dovecot-pop3d`` with apt-get when it is missing.

TLS: with ``ssl_cert``/``ssl_key`` Dovecot offers STLS on ``port`` and also
listens for implicit TLS (pop3s) on ``tls_port``; ``ssl_required`` makes it
refuse logins on ``port`` before STLS (from addresses it does not consider
secured, see the class docstring).  ``trusted_networks`` sets
``login_trusted_networks``: clients from there get ``[XCLIENT]`` in the
greeting and may send ``XCLIENT ADDR=... PORT=...`` before logging in.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import ssl as _ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.packages import apt_install, can_install

__all__ = [
    "DEFAULT_USERS",
    "SAMPLE_MESSAGES",
    "Dovecot",
    "DovecotError",
    "dovecot_binary",
    "ensure_dovecot",
    "expected_retr",
    "to_maildir_bytes",
]

DEBIAN_PACKAGES: tuple[str, ...] = ("dovecot-core", "dovecot-pop3d")

#: user name -> plaintext password.  Distinct passwords, a little punctuation.
DEFAULT_USERS: Mapping[str, str] = {
    "alice": "alice-Secret1",
    "bob": "bob-Secret2",
    "carol": "carol!Pw#3",
    "archive1": "archive1-Secret4",
}

# Where Debian, Fedora and a source build put Dovecot's helper programs.
_LIBEXEC_DIRS: tuple[str, ...] = (
    "/usr/lib/dovecot",
    "/usr/libexec/dovecot",
    "/usr/local/libexec/dovecot",
    "/usr/lib64/dovecot",
)
_SBIN_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin", "/sbin")

_BIND_FAILURE = re.compile(rb"bind\(.*\) failed|Address already in use", re.IGNORECASE)


class DovecotError(RuntimeError):
    """Dovecot could not be configured or started."""


# --------------------------------------------------------------------------
# Finding / installing Dovecot
# --------------------------------------------------------------------------


def dovecot_binary() -> str | None:
    """Path of the ``dovecot`` master binary, or None.  Looks in sbin too."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which("dovecot", path=search)


def _pop3_missing_reason(binary: str) -> str | None:
    """Why this Dovecot cannot serve POP3 (None if it looks like it can)."""
    dirs = [Path(d) for d in _LIBEXEC_DIRS if Path(d).is_dir()]
    if not dirs:
        # Unknown layout: let start() find out.
        return None
    if any((d / "pop3").exists() and (d / "pop3-login").exists() for d in dirs):
        return None
    return (
        f"{binary} is installed but its POP3 server (pop3, pop3-login in "
        f"{', '.join(map(str, dirs))}) is not: install dovecot-pop3d"
    )


def _dovecot_status() -> str | None:
    binary = dovecot_binary()
    if binary is None:
        return "no 'dovecot' binary on PATH or in /usr/sbin, /usr/local/sbin"
    return _pop3_missing_reason(binary)


@functools.cache
def ensure_dovecot() -> str | None:
    """Make a Dovecot with POP3 available.

    Returns None when it is (installing the Debian packages first if needed
    and possible), else a human-readable reason why not.  The result is
    cached for the process: the install is attempted at most once.
    """
    reason = _dovecot_status()
    if reason is None:
        return None
    cannot = can_install(DEBIAN_PACKAGES)
    if cannot is not None:
        return f"{reason}; {cannot}"
    failure = apt_install(DEBIAN_PACKAGES)
    if failure is not None:
        return f"{reason}; installing it failed: {failure}"
    after = _dovecot_status()
    if after is not None:
        return f"installed {' '.join(DEBIAN_PACKAGES)}, but still: {after}"
    return None


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


def to_maildir_bytes(message: bytes) -> bytes:
    """The form ``deliver()`` stores: LF line endings, ending in LF."""
    data = message.replace(b"\r\n", b"\n")
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data


def expected_retr(message: bytes) -> bytes:
    """What RETR gives back for a delivered ``message`` (unstuffed, CRLF).

    Equal to ``b"".join(line + b"\\r\\n" for line in poplib_lines)``.
    """
    return to_maildir_bytes(message).replace(b"\n", b"\r\n")


SAMPLE_MESSAGES: tuple[bytes, ...] = (
    b"Return-Path: <bob@example.org>\n"
    b"From: Bob Example <bob@example.org>\n"
    b"To: Alice Example <alice@example.org>\n"
    b"Subject: Lunch on Thursday?\n"
    b"Date: Mon, 04 Nov 2024 09:15:00 +0000\n"
    b"Message-ID: <lunch-1@example.org>\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=us-ascii\n"
    b"\n"
    b"Hi Alice,\n"
    b"\n"
    b"are you free for lunch on Thursday? The usual place at noon.\n"
    b"\n"
    b"Bob\n",
    # Body lines that need dot-stuffing: a leading dot, a lone dot, two dots.
    b"From: Carol <carol@example.org>\n"
    b"To: alice@example.org\n"
    b"Subject: Dots at the start of lines\n"
    b"Date: Mon, 04 Nov 2024 10:00:00 +0000\n"
    b"Message-ID: <dots-2@example.org>\n"
    b"\n"
    b"The next line starts with a dot:\n"
    b".hidden line\n"
    b"and the next one is a single dot:\n"
    b".\n"
    b"..two dots\n"
    b"...\n"
    b"still the same message.\n",
    # 8-bit body and a long-ish multipart message.
    b"From: =?UTF-8?Q?J=C3=BCrgen?= <juergen@example.de>\n"
    b"To: alice@example.org\n"
    b"Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\n"
    b"Date: Tue, 05 Nov 2024 08:30:00 +0100\n"
    b"Message-ID: <gruesse-3@example.de>\n"
    b"MIME-Version: 1.0\n"
    b'Content-Type: multipart/alternative; boundary="b1"\n'
    b"\n"
    b"--b1\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"\n"
    b"Gr\xc3\xbc\xc3\x9fe aus M\xc3\xbcnchen!\n"
    + b"".join(b"Zeile %d: lorem ipsum dolor sit amet\n" % i for i in range(1, 41))
    + b"--b1\n"
    b"Content-Type: text/html; charset=utf-8\n"
    b"\n"
    b"<p>Gr\xc3\xbc\xc3\x9fe aus M\xc3\xbcnchen!</p>\n"
    b"--b1--\n",
    # Minimal message with an empty body.
    b"From: noreply@example.com\n"
    b"To: alice@example.org\n"
    b"Subject: empty body\n"
    b"Date: Wed, 06 Nov 2024 12:00:00 +0000\n"
    b"Message-ID: <empty-4@example.com>\n"
    b"\n",
)


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _first_existing_user(names: Sequence[str]) -> pwd.struct_passwd | None:
    for name in names:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


def _proc_group_members(pgid: int) -> list[int]:
    """Linux: pids of live (not zombie) processes in process group ``pgid``."""
    pids: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces/parens.
        # Zombies are skipped: orphans are reaped by init, maybe not at once.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def _temp_parent() -> str | None:
    # Dovecot's unix sockets live under base_dir; keep the path short enough
    # for sun_path (108 bytes) even when TMPDIR is long.
    return None if len(tempfile.gettempdir()) <= 40 else "/tmp"


class Dovecot:
    """A private Dovecot POP3 server on 127.0.0.1 and a free port.

    Use as a context manager or call ``start()`` / ``stop()``.  The temp dir
    (config, passwd-file, Maildirs, log) is made by the constructor and
    removed by ``stop()`` unless ``keep_dir`` (or POPPROXY_KEEP_DOVECOT=1).

    users: name -> plaintext password (default ``DEFAULT_USERS``); names in
        lower case (Dovecot lower-cases login names).
    ssl: ``ssl = yes``; then also pass ``ssl_cert``/``ssl_key`` (below, or as
        settings in extra_config).
    ssl_cert, ssl_key: PEM files (certificate chain, private key).  Given,
        they switch ``ssl`` on and open a second, implicit-TLS listener
        (pop3s) on ``tls_port``; ``port`` stays plaintext and offers STLS.
    ssl_required: ``ssl = required``: no login on ``port`` before STLS.
        Dovecot exempts "secured" clients, i.e. those from
        ``trusted_networks`` and those whose address equals the server's
        (127.0.0.1 to 127.0.0.1): use another loopback ``host`` such as
        127.0.0.2 (Linux then connects from 127.0.0.1) to see it refuse.
    verify_ca: CA file the readiness probe checks ``tls_port``'s certificate
        (and host name) against; default: the handshake is not verified.
    trusted_networks: ``login_trusted_networks`` (e.g. "127.0.0.0/8 ::1"):
        such clients may send XCLIENT (their greeting says "[XCLIENT]").
    auth_mechanisms: SASL mechanisms; with "apop" the greeting has a timestamp.
    auth_failure_delay: seconds before a failed login is answered (Dovecot's
        default is 2; 0 here, which Dovecot rounds up to its 0.5 s timer).
    auth_penalty: keep anvil's per-IP penalty for failed logins (2..15 s
        extra delay on the following logins from 127.0.0.1); off by default.
    max_userip_connections: mail_max_userip_connections (Dovecot: 10).
    extra_config: appended verbatim to dovecot.conf.

    After ``start()``: ``port``, ``tls_port`` (0 without ``ssl_cert``),
    ``greeting`` (the full greeting line without CRLF, from the readiness
    probe on ``port``), ``startup_seconds``.
    """

    host: str
    port: int
    users: dict[str, str]
    root: Path
    conf_path: Path
    log_path: Path

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        ssl: bool = False,
        ssl_cert: str | os.PathLike[str] | None = None,
        ssl_key: str | os.PathLike[str] | None = None,
        ssl_required: bool = False,
        verify_ca: str | os.PathLike[str] | None = None,
        trusted_networks: str = "",
        auth_mechanisms: str = "plain login apop",
        auth_failure_delay: int = 0,
        auth_penalty: bool = False,
        max_userip_connections: int = 100,
        extra_config: str = "",
        start_timeout: float = 10.0,
        keep_dir: bool | None = None,
    ) -> None:
        self.host = host
        self.port = 0
        #: implicit-TLS (pop3s) port after start(); 0 when there is none.
        self.tls_port = 0
        self.users = dict(DEFAULT_USERS if users is None else users)
        for name, password in self.users.items():
            if not name or any(c in name + password for c in ":\n\r"):
                raise ValueError(f"unusable user/password for passwd-file: {name!r}")
        if (ssl_cert is None) != (ssl_key is None):
            raise ValueError("pass both ssl_cert and ssl_key, or neither")
        self.ssl_cert = None if ssl_cert is None else Path(ssl_cert).resolve()
        self.ssl_key = None if ssl_key is None else Path(ssl_key).resolve()
        self.ssl = ssl or ssl_required or self.ssl_cert is not None
        self.ssl_required = ssl_required
        self.verify_ca = None if verify_ca is None else Path(verify_ca).resolve()
        if any(c in trusted_networks for c in "\n\r{}#"):
            raise ValueError(f"unusable trusted_networks: {trusted_networks!r}")
        self.trusted_networks = trusted_networks
        self.auth_mechanisms = auth_mechanisms
        self.auth_failure_delay = auth_failure_delay
        self.auth_penalty = auth_penalty
        self.max_userip_connections = max_userip_connections
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        if keep_dir is None:
            keep_dir = os.environ.get("POPPROXY_KEEP_DOVECOT", "") not in ("", "0")
        self.keep_dir = keep_dir
        self.binary = dovecot_binary() or "dovecot"
        self.is_root = os.geteuid() == 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self.greeting: bytes = b""
        self._seq = 0
        self._last_stamp = (0, 0)

        if self.is_root:
            mail = _first_existing_user(["mail", "nobody"])
            internal = _first_existing_user(["dovecot", "nobody"])
            login = _first_existing_user(["dovenull", "nobody"])
            if mail is None or internal is None or login is None:
                raise DovecotError("need system users mail/dovecot/dovenull (or nobody)")
            self.mail_uid, self.mail_gid = mail.pw_uid, mail.pw_gid
            self._internal_user = internal.pw_name
            self._login_user = login.pw_name
        else:
            me = pwd.getpwuid(os.geteuid())
            self.mail_uid, self.mail_gid = me.pw_uid, os.getegid()
            self._internal_user = me.pw_name
            self._login_user = me.pw_name

        self.root = Path(tempfile.mkdtemp(prefix="popproxy-dovecot-", dir=_temp_parent()))
        #: Dovecot's login_greeting (after "+OK "; the APOP timestamp follows).
        self.greeting_text = f"popproxy test Dovecot {self.root.name[-8:]} ready."
        # Dovecot's unprivileged processes must be able to traverse it.
        self.root.chmod(0o755)
        self.conf_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.stderr_path = self.root / "dovecot.stderr"
        self.passwd_path = self.root / "passwd"
        self.home_root = self.root / "home"
        self.home_root.mkdir(mode=0o755)
        for name in self.users:
            self._make_home(name)
        self._write_passwd()

    # ---------------------------------------------------------------- config

    def _make_home(self, user: str) -> None:
        home = self.home_root / user
        for d in (home, home / "Maildir", *(home / "Maildir" / s for s in ("new", "cur", "tmp"))):
            d.mkdir(mode=0o700, exist_ok=True)
            self._chown(d)

    def _chown(self, path: Path) -> None:
        if self.is_root:
            os.chown(path, self.mail_uid, self.mail_gid)

    def _write_passwd(self) -> None:
        lines = [
            f"{name}:{{PLAIN}}{password}:{self.mail_uid}:{self.mail_gid}::"
            f"{self.home_root / name}::\n"
            for name, password in self.users.items()
        ]
        self.passwd_path.write_text("".join(lines))
        # Read by the auth process, which runs as the internal user.
        self.passwd_path.chmod(0o644)

    def _ssl_text(self) -> str:
        mode = "required" if self.ssl_required else "yes" if self.ssl else "no"
        lines = [f"ssl = {mode}"]
        if self.ssl_cert is not None and self.ssl_key is not None:
            lines += [f"ssl_cert = <{self.ssl_cert}", f"ssl_key = <{self.ssl_key}"]
        if self.trusted_networks:
            lines.append(f"login_trusted_networks = {self.trusted_networks}")
        return "\n".join(lines)

    def config_text(self) -> str:
        """The dovecot.conf for the current ``port`` (and ``tls_port``)."""
        if self.is_root:
            # Dovecot refuses mail access as uid 0: run mail processes as
            # ``mail`` (the uid/gid also come from the passwd-file).
            privileges = f"mail_uid = {self.mail_uid}\nmail_gid = {self.mail_gid}\n"
            login_extra = anvil_extra = auth_extra = ""
        else:
            # Rootless: no chroot (needs root), every process runs as us.
            group = grp.getgrgid(self.mail_gid).gr_name
            privileges = f"default_internal_group = {group}\n"
            login_extra = "  chroot =\n  user = $default_login_user\n"
            anvil_extra = "  chroot =\n"
            auth_extra = "  user = $default_internal_user\n"
        if not self.auth_penalty:
            # Otherwise each failed login from 127.0.0.1 makes the following
            # logins (successful ones too) wait 2, 4, 8, 15 s: anvil's auth
            # penalty.  Without its socket, auth runs with the penalty off.
            anvil_extra += "  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n"
        if self.tls_port:
            pop3s = f"    address = {self.host}\n    port = {self.tls_port}\n    ssl = yes\n"
        else:
            pop3s = "    port = 0\n"
        return f"""\
# Throwaway config written by tests/dovecot.py
base_dir = {self.root / "run"}
state_dir = {self.root / "state"}
instance_name = popproxy-test-{os.getpid()}-{self.root.name}
log_path = {self.log_path}
info_log_path = {self.log_path}
debug_log_path = {self.log_path}
protocols = pop3
listen = {self.host}
{self._ssl_text()}
disable_plaintext_auth = no
# APOP needs the "apop" mechanism here *and* plaintext passwords in the
# passdb; pop3-login then puts the <timestamp> into its greeting.
auth_mechanisms = {self.auth_mechanisms}
auth_verbose = yes
auth_failure_delay = {self.auth_failure_delay} secs
mail_max_userip_connections = {self.max_userip_connections}
default_internal_user = {self._internal_user}
default_login_user = {self._login_user}
{privileges}first_valid_uid = {min(self.mail_uid, 500)}
last_valid_uid = 0
first_valid_gid = 0
mail_location = maildir:~/Maildir
mail_fsync = never
pop3_enable_last = yes
pop3_uidl_format = %08Xu%08Xv
login_greeting = {self.greeting_text}

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_path}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd_path}
}}
service pop3-login {{
{login_extra}  inet_listener pop3 {{
    address = {self.host}
    port = {self.port}
  }}
  inet_listener pop3s {{
{pop3s}  }}
}}
service anvil {{
{anvil_extra}}}
service auth {{
{auth_extra}}}
{self.extra_config}
"""

    # ----------------------------------------------------------- lifecycle

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, attempts: int = 5) -> None:
        """Start Dovecot; retry with a new port if the port got taken."""
        if self.running:
            return
        t0 = time.monotonic()
        last_error = ""
        for _ in range(attempts):
            self.port = _free_port(self.host)
            if self.ssl_cert is not None:
                self.tls_port = _free_port(self.host)
                while self.tls_port == self.port:
                    self.tls_port = _free_port(self.host)
            self.conf_path.write_text(self.config_text())
            self.conf_path.chmod(0o644)
            outcome = self._start_once()
            if outcome is None:
                self.startup_seconds = time.monotonic() - t0
                atexit.register(self.stop)
                return
            bind_failed, last_error = outcome
            self._terminate()
            if not bind_failed:
                break
        self.stop()
        raise DovecotError(f"Dovecot did not start:\n{last_error}")

    def _start_once(self) -> tuple[bool, str] | None:
        """None on success, else (failed to bind?, diagnostic text)."""
        with self.stderr_path.open("ab") as err:
            err_offset = err.tell()
            self.proc = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        greeting = tls_greeting = b""
        want_apop = "apop" in self.auth_mechanisms.lower().split()
        tls_context = self._probe_context() if self.tls_port else None

        def usable(line: bytes) -> bool:
            # The nonce proves it is our Dovecot answering, not a squatter on
            # the port; the <timestamp> comes once auth is up (APOP).
            return (
                line.startswith(b"+OK")
                and self.greeting_text.encode() in line
                and (not want_apop or b"<" in line)
            )

        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None
            new_stderr = self.stderr_path.read_bytes()[err_offset:]
            if _BIND_FAILURE.search(new_stderr):
                return True, self._diagnostics("dovecot could not bind its port")
            if exited:
                return False, self._diagnostics(f"dovecot exited with {self.proc.returncode}")
            greeting = self._try_greeting()
            if usable(greeting) and tls_context is not None:
                try:
                    tls_greeting = self._try_greeting(self.tls_port, tls_context)
                except _ssl.SSLCertVerificationError as exc:
                    return False, self._diagnostics(
                        f"port {self.tls_port}: certificate not accepted ({exc}); "
                        f"verify_ca={self.verify_ca}"
                    )
            if usable(greeting) and (tls_context is None or usable(tls_greeting)):
                self.greeting = greeting
                return None
            time.sleep(0.01)
        bind_failed = bool(_BIND_FAILURE.search(self.stderr_path.read_bytes()[err_offset:]))
        last = f"last: {greeting!r}" + (f", over TLS: {tls_greeting!r}" if tls_context else "")
        return bind_failed, self._diagnostics(
            f"no usable greeting within {self.start_timeout}s ({last})"
        )

    def _probe_context(self) -> _ssl.SSLContext:
        """TLS client context of the readiness probe on ``tls_port``."""
        if self.verify_ca is not None:
            return _ssl.create_default_context(cafile=str(self.verify_ca))
        context = _ssl.SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = _ssl.CERT_NONE
        return context

    def _try_greeting(self, port: int | None = None, tls: _ssl.SSLContext | None = None) -> bytes:
        """The greeting line on ``port`` (default: ``self.port``), b"" if none.

        With ``tls``, after an implicit-TLS handshake (host name ``host``);
        a certificate that ``tls`` does not accept raises
        ``ssl.SSLCertVerificationError``.
        """
        try:
            with contextlib.ExitStack() as stack:
                s = stack.enter_context(
                    socket.create_connection((self.host, port or self.port), timeout=0.25)
                )
                if tls is not None:
                    s = stack.enter_context(tls.wrap_socket(s, server_hostname=self.host))
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"+OK"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                return data.strip()
        except _ssl.SSLCertVerificationError:
            raise
        except OSError:
            return b""

    def _diagnostics(self, headline: str) -> str:
        parts = [headline, f"config: {self.conf_path}"]
        for label, path in (("stderr", self.stderr_path), ("log", self.log_path)):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip()
                if text:
                    parts.append(f"--- {label} ({path}) ---\n" + "\n".join(text.splitlines()[-30:]))
        return "\n".join(parts)

    def _terminate(self, graceful: bool = False) -> None:
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session=True: the master leads its group
        if proc.poll() is None:
            if graceful:
                # Dovecot's master sleeps ~1.1 s (more with open sessions)
                # while shutting its children down.
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.kill()
            proc.wait(timeout=10)
        # The children exit when the master dies; kill any stragglers of ours.
        deadline = time.monotonic() + 5.0
        while (left := _proc_group_members(pgid)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        self.proc = None

    def stop(self, *, graceful: bool = False) -> None:
        """Stop Dovecot and all its processes, then remove the temp dir.

        By default the processes are SIGKILLed (instant; everything is
        throwaway).  ``graceful=True`` sends SIGTERM to the master and waits
        for its orderly shutdown, which takes Dovecot over a second.
        """
        atexit.unregister(self.stop)
        self._terminate(graceful)
        if not self.keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------- mailboxes

    def password(self, user: str) -> str:
        return self.users[user]

    def maildir(self, user: str) -> Path:
        if user not in self.users:
            raise KeyError(f"unknown user {user!r}")
        return self.home_root / user / "Maildir"

    def _next_stamp(self) -> tuple[int, int]:
        # Dovecot gives new mail UIDs in the order of the time stamps in their
        # file names, so make them strictly increasing: delivery order is
        # POP3 message-number order.
        now = time.time_ns() // 1000
        stamp = (now // 1_000_000, now % 1_000_000)
        if stamp <= self._last_stamp:
            sec, usec = self._last_stamp
            stamp = (sec + 1, 0) if usec >= 999_999 else (sec, usec + 1)
        self._last_stamp = stamp
        return stamp

    def deliver(self, user: str, message: bytes) -> Path:
        """Put ``message`` into ``user``'s Maildir/new (stored with LF endings).

        Returns the file's path.  What RETR returns is ``expected_retr(message)``.
        """
        maildir = self.maildir(user)
        data = to_maildir_bytes(message)
        sec, usec = self._next_stamp()
        self._seq += 1
        name = f"{sec}.M{usec:06d}P{os.getpid()}Q{self._seq}.popproxy-test,S={len(data)}"
        tmp = maildir / "tmp" / name
        with open(tmp, "xb") as f:
            f.write(data)
        tmp.chmod(0o600)
        self._chown(tmp)
        dest = maildir / "new" / name
        tmp.rename(dest)
        return dest

    def deliver_many(self, user: str, messages: Sequence[bytes]) -> list[bytes]:
        """Deliver in order; return what RETR 1..n should give back."""
        for m in messages:
            self.deliver(user, m)
        return [expected_retr(m) for m in messages]

    def clear(self, user: str, *, reset: bool = False) -> None:
        """Empty ``user``'s mailbox.

        With ``reset=True`` the Maildir is recreated from scratch (indexes and
        dovecot-uidlist too), so UIDs start at 1 again under a new UIDVALIDITY.
        """
        maildir = self.maildir(user)
        if reset:
            shutil.rmtree(maildir, ignore_errors=True)
            self._make_home(user)
            return
        for sub in ("new", "cur", "tmp"):
            d = maildir / sub
            if not d.is_dir():
                continue
            for f in d.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()

    def reset_mailbox(self, user: str, messages: Sequence[bytes] = SAMPLE_MESSAGES) -> list[bytes]:
        """``clear(user, reset=True)`` then deliver ``messages``; return RETR forms."""
        self.clear(user, reset=True)
        return self.deliver_many(user, messages)

    def message_files(self, user: str) -> list[Path]:
        maildir = self.maildir(user)
        files: list[Path] = []
        for sub in ("new", "cur"):
            d = maildir / sub
            if d.is_dir():
                files.extend(p for p in d.iterdir() if p.is_file())
        return sorted(files)

    def message_count(self, user: str) -> int:
        """Messages in ``user``'s Maildir (files in new/ and cur/)."""
        return len(self.message_files(user))

    # ------------------------------------------------------------------ logs

    def read_log(self) -> str:
        """Dovecot's log so far (empty string if none yet)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_offset(self) -> int:
        """Current size of the log; pass to ``read_log_since``."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Dovecot {self.host}:{self.port} {state} root={self.root}>"
