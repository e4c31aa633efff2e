"""A real, throwaway ``redis-server`` for the tests (and the state benchmark).

``RedisServer`` writes a private configuration into a temporary directory
(its own ``dir``, log file and unix socket; no RDB snapshots, no AOF),
starts ``redis-server <conf>`` in the foreground on a free loopback port and
stops it again.  It never touches the system's Redis, its data or port 6379.

For the fault tests it can also be stopped and started again *on the same
port* (``restart``: what a Redis that went away and came back looks like to
a client), and frozen with SIGSTOP (``pause``/``resume``: a Redis that
accepts bytes into the kernel's buffers but never answers, i.e. half-open
from the client's point of view).

``ensure_redis()`` finds the binary and, as root on a Debian-like system,
installs the ``redis-server`` package with apt-get when it is missing (the
same way ``tests/dovecot.py`` gets Dovecot).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.packages import apt_install, can_install

__all__ = ["DEBIAN_PACKAGES", "RedisServer", "RedisServerError", "ensure_redis", "redis_binary"]

DEBIAN_PACKAGES: tuple[str, ...] = ("redis-server",)
_SBIN_DIRS: tuple[str, ...] = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")


class RedisServerError(RuntimeError):
    """redis-server could not be configured or started."""


def redis_binary() -> str | None:
    """Path of ``redis-server``, or None."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which("redis-server", path=search)


@functools.cache
def ensure_redis() -> str | None:
    """Make ``redis-server`` available: None when it is, else why not.

    Installs the Debian package first when missing and possible (root,
    apt-get).  Cached: the install is attempted at most once per process.
    """
    if redis_binary() is not None:
        return None
    reason = "no 'redis-server' binary on PATH or in /usr/bin, /usr/sbin"
    cannot = can_install(DEBIAN_PACKAGES)
    if cannot is not None:
        return f"{reason}; {cannot}"
    failure = apt_install(DEBIAN_PACKAGES)
    if failure is not None:
        return f"{reason}; installing it failed: {failure}"
    if redis_binary() is None:
        return f"installed {' '.join(DEBIAN_PACKAGES)}, but still: {reason}"
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A private redis-server on 127.0.0.1 and a free port.

    Use as a context manager or call ``start()`` / ``stop()``.  ``password``
    sets ``requirepass``.  After ``start()``: ``port``, ``unix_socket``,
    ``url`` (``redis://127.0.0.1:PORT/0``, with the password if any).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        password: str | None = None,
        tls_cert: os.PathLike[str] | str | None = None,
        tls_key: os.PathLike[str] | str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        if password is not None and any(c in password for c in ' "\r\n'):
            raise ValueError("unusable password for redis.conf")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("pass both tls_cert and tls_key, or neither")
        #: (certificate chain, key): then ``port`` speaks TLS only (rediss://).
        self.tls = None if tls_cert is None or tls_key is None else (
            Path(tls_cert).resolve(), Path(tls_key).resolve())
        self.host = host
        self.port = 0
        self.password = password
        self.start_timeout = start_timeout
        self.binary = redis_binary() or "redis-server"
        self.proc: subprocess.Popen[bytes] | None = None
        # unix sockets need a short path (sun_path is 108 bytes).
        parent = None if len(tempfile.gettempdir()) <= 40 else "/tmp"
        self.root = Path(tempfile.mkdtemp(prefix="popproxy-redis-", dir=parent))
        self.conf_path = self.root / "redis.conf"
        self.log_path = self.root / "redis.log"
        self.unix_socket = self.root / "redis.sock"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.host}:{self.port}/0"

    def config_text(self) -> str:
        if self.tls:
            listen = [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls[0]}",
                f"tls-key-file {self.tls[1]}",
                "tls-auth-clients no",
            ]
        else:
            listen = [f"port {self.port}"]
        lines = [
            "# Throwaway config written by tests/redis_server.py",
            f"bind {self.host}",
            *listen,
            f"unixsocket {self.unix_socket}",
            "unixsocketperm 700",
            f"dir {self.root}",
            f"logfile {self.log_path}",
            "daemonize no",
            'save ""',
            "appendonly no",
            "databases 4",
            "protected-mode yes",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> RedisServer:
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
        """Start on a fresh free port (a new one if the port got taken)."""
        if self.running:
            return
        last = ""
        for _ in range(attempts):
            self.port = _free_port(self.host)
            outcome = self._start_once()
            if outcome is None:
                atexit.register(self.stop)
                return
            bind_failed, last = outcome
            if not bind_failed:
                break
        self.stop()
        raise RedisServerError(f"redis-server did not start:\n{last}")

    def restart(self) -> None:
        """Start again on the same port after ``kill()``: Redis came back."""
        if self.running:
            return
        outcome = self._start_once()
        if outcome is not None:
            raise RedisServerError(f"redis-server did not restart on {self.port}:\n{outcome[1]}")

    def _start_once(self) -> tuple[bool, str] | None:
        """None once it answers PING, else (failed to bind?, diagnostics)."""
        self.conf_path.write_text(self.config_text())
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            [self.binary, str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        # Polling an external process's port is the one wait here that has no
        # event to block on (as for Dovecot in tests/dovecot.py); bounded.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self._log_since(offset)
                self.proc = None
                return "Address already in use" in log, f"exited early; log:\n{log}"
            if self.ping():
                return None
            time.sleep(0.01)
        log = self._log_since(offset)
        self.kill()
        return False, f"no answer to PING within {self.start_timeout}s; log:\n{log}"

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")[-3000:]
        except OSError:
            return ""

    def ping(self, timeout: float = 0.5) -> bool:
        """Whether the server answers PING now (AUTH first if it has a password)."""
        request = b"PING\r\n"
        if self.password:
            request = f"AUTH {self.password}\r\n".encode() + request
        try:
            with self._connect(timeout) as s:
                s.sendall(request)
                data = b""
                while b"PONG" not in data and len(data) < 1000:
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    data += chunk
                return b"+PONG" in data
        except OSError:
            return False

    def _connect(self, timeout: float) -> socket.socket:
        """A connection to the server (TLS when it speaks TLS, unverified:
        this is the tests' own helper talking to the tests' own server)."""
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if not self.tls:
            return sock
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context.wrap_socket(sock, server_hostname=self.host)

    def command(self, *args: str, db: int = 0, timeout: float = 2.0) -> bytes:
        """Send one command in database ``db``; its raw RESP reply (for tests)."""
        parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
        request = f"*{len(args)}\r\n{''.join(parts)}".encode()
        preamble = [f"AUTH {self.password}"] if self.password else []
        preamble += [f"SELECT {db}"] if db else []
        request = "".join(p + "\r\n" for p in preamble).encode() + request
        # QUIT makes the server close once it has answered: read to the end.
        request += b"QUIT\r\n"
        with self._connect(timeout) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        for _ in preamble:
            data = data.split(b"\r\n", 1)[1]  # their +OK
        return data.removesuffix(b"+OK\r\n")  # QUIT's

    def integer(self, *args: str, db: int = 0) -> int:
        """A command whose reply is an integer (``:N``), e.g. PTTL, DBSIZE."""
        reply = self.command(*args, db=db)
        if not reply.startswith(b":"):
            raise RedisServerError(f"{args[0]}: expected an integer reply, got {reply[:80]!r}")
        return int(reply[1:].split(b"\r\n", 1)[0])

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap; the port and temp dir stay for ``restart()``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # in case it was paused
                proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Kill the server and remove its directory."""
        atexit.unregister(self.stop)
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.host}:{self.port} {state} root={self.root}>"
