"""The processes under test: a private Dovecot and the proxy as a child process.

The proxy runs as a separate process (``python -m popproxy run -c FILE``) so
that its RSS can be read from ``/proc/<pid>/status`` and it does not share
the load generator's interpreter.  Both children are started in their own
session (process group), so a Ctrl-C in the terminal reaches only the
benchmark, whose ``finally`` blocks stop them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.dovecot import Dovecot

__all__ = [
    "APP_RUN_LAUNCHER",
    "CLI_LAUNCHER",
    "REPO_ROOT",
    "CpuMeter",
    "ProxyProcess",
    "RssSampler",
    "dovecot_extra_config",
    "dovecot_with_mail",
    "free_port",
    "proc_cpu_clock",
    "proc_cpu_seconds",
    "proc_status_kib",
    "process_tree",
    "raise_fd_limit",
    "reset_peak_rss",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Interpreter arguments that start the proxy; the config file's path follows.
#: ``popproxy run -c FILE``, the command line deployments use:
CLI_LAUNCHER: tuple[str, ...] = ("-m", "popproxy", "run", "-c")
#: The proxy assembled by ``popproxy.app.run`` (``app.build``: policy engine,
#: metrics observer; audit, metrics endpoint and SIGHUP reload per config),
#: for when ``popproxy run`` does not assemble it so.
APP_RUN_LAUNCHER: tuple[str, ...] = (
    "-c",
    "import functools, sys, trio\n"
    "from popproxy.app import run\n"
    "from popproxy.config import load_config\n"
    "from popproxy.logs import configure_logging\n"
    "config = load_config(sys.argv[1])\n"
    "configure_logging(config.log.level, config.log.format)\n"
    "trio.run(functools.partial(run, config, config_path=sys.argv[1]))\n",
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit(want: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``want``; return the new soft limit.

    Children (Dovecot, the proxy) inherit it.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def dovecot_extra_config(processes: int, *, performance: bool = True) -> str:
    """Dovecot settings for ``processes`` simultaneous logged-in sessions.

    Dovecot's defaults allow 100 processes per service (1024 for ``pop3``)
    and 1000 clients per process; one POP3 session is one ``pop3`` process.

    ``performance``: Dovecot's documented "high-performance" login mode
    (``pop3-login`` processes serve many connections, ``service_count = 0``)
    and reused ``pop3`` processes.  Otherwise Dovecot's stock
    "high-security" mode forks and execs a login process and a mail process
    for every connection, which on a small machine makes Dovecot's own
    process churn (not the proxy) the limit of the session rate.
    """
    text = (
        f"default_process_limit = {processes}\n"
        f"default_client_limit = {processes * 5}\n"
        "service pop3 {\n"
        f"  process_limit = {processes}\n"
    )
    if performance:
        text += (
            "  service_count = 100\n"
            "  process_min_avail = 4\n"
            "}\n"
            "service pop3-login {\n"
            "  service_count = 0\n"
            "  process_min_avail = 2\n"
            "}\n"
            # Every pop3 and pop3-login process may hold an auth connection.
            "service auth {\n"
            f"  client_limit = {processes * 3}\n"
        )
    return text + "}\n"


def dovecot_with_mail(stack: contextlib.ExitStack, users: Mapping[str, str], processes: int,
                      *, performance: bool = True) -> Dovecot:
    """A private Dovecot for ``users`` (name to password), each with the
    first sample message, stopped when ``stack`` closes."""
    from tests.dovecot import SAMPLE_MESSAGES, Dovecot

    dovecot = Dovecot(dict(users), max_userip_connections=200,
                      extra_config=dovecot_extra_config(processes, performance=performance))
    stack.callback(dovecot.stop)
    dovecot.start()
    for user in users:
        dovecot.deliver(user, SAMPLE_MESSAGES[0])
    return dovecot


def proc_status_kib(pid: int, field: str = "VmRSS") -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM, ...), in KiB."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(field.encode() + b":"):
                return int(line.split()[1])
    raise KeyError(field)


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far, at clock-tick resolution."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # "pid (comm) state ppid ..."; utime and stime are fields 14 and 15.
    fields = data[data.rfind(b")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu_clock(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of ``pid`` so far, to the
    nanosecond, from its POSIX CPU-time clock; None when it cannot be read."""
    # Linux names another process's CPU-time clock by a negative id,
    # (~pid << 3) | CPUCLOCK_SCHED (2), as glibc's clock_getcpuclockid does.
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except (OSError, OverflowError):
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


class CpuMeter:
    """Adds up a process's CPU time and the wall time of measured blocks.

    ``user`` and ``system`` come from ``/proc/<pid>/stat`` in clock ticks
    (10 ms): a block of a few ticks is off by up to one.  ``cpu``, their sum,
    is read from the process's CPU-time clock instead when it can be, which
    keeps short blocks (a pipelined batch, a few sessions) exact.

    ``tree=True``: the process and every descendant alive when a block
    starts (a supervisor and its worker processes), summed; a process that
    ends inside a block is not counted for that block (``lost`` says how
    often that happened).
    """

    def __init__(self, pid: int, *, tree: bool = False) -> None:
        self.pid = pid
        self.tree = tree
        self.user = 0.0
        self.system = 0.0
        self.wall = 0.0
        self.lost = 0
        self._clock: float | None = 0.0  # None once a block could not read it

    @property
    def cpu(self) -> float:
        return self.user + self.system if self._clock is None else self._clock

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        pids = process_tree(self.pid) if self.tree else [self.pid]
        w0 = time.perf_counter()
        start = {p: (_seconds(p), proc_cpu_clock(p)) for p in pids}
        try:
            yield
        finally:
            end = {p: (_seconds(p), proc_cpu_clock(p)) for p in pids}
            self.wall += time.perf_counter() - w0
            clock: float | None = 0.0
            for p in pids:
                (t0, c0), (t1, c1) = start[p], end[p]
                if t0 is None or t1 is None:
                    self.lost += 1
                    continue
                self.user += t1[0] - t0[0]
                self.system += t1[1] - t0[1]
                clock = None if clock is None or c0 is None or c1 is None else (
                    clock + c1 - c0)
            if self._clock is not None and clock is not None:
                self._clock += clock
            else:
                self._clock = None


def _seconds(pid: int) -> tuple[float, float] | None:
    try:
        return proc_cpu_seconds(pid)
    except OSError:
        return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (peak RSS) of ``pid`` (Linux ``clear_refs`` 5); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread.

    Context manager; ``peak_kib`` and ``samples`` afterwards.  Bounded: stops
    after ``max_seconds`` even if never exited.
    """

    def __init__(self, pid: int, interval: float = 0.002, max_seconds: float = 300.0) -> None:
        self.pid = pid
        self.interval = interval
        self.max_seconds = max_seconds
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                rss = proc_status_kib(self.pid)
            except (OSError, KeyError):
                return
            self.peak_kib = max(self.peak_kib, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


class ProxyProcess:
    """``python -m popproxy run -c FILE`` in front of ``upstream_port``.

    ``listen_extra``: TOML lines added to the ``[listen]`` table (e.g.
    ``tls = "implicit"`` with ``cert``/``key``); ``extra_config``: TOML
    appended after the generated sections (e.g. ``[policy]`` and its
    ``[[policy.rules]]``).  ``probe_tls``: the client context the readiness
    probe does its implicit-TLS handshake with (for a TLS listener).
    ``launcher``: interpreter arguments before the config path
    (``CLI_LAUNCHER`` or ``APP_RUN_LAUNCHER``).  ``source_root``: the tree
    whose ``popproxy`` package runs (first on ``PYTHONPATH`` and the working
    directory, so it wins over the installed one); another revision's tree
    for an A/B run.
    """

    def __init__(
        self,
        upstream_port: int,
        workdir: Path,
        *,
        max_sessions: int = 1000,
        log_level: str = "warning",
        python: str = sys.executable,
        start_timeout: float = 15.0,
        listen_extra: str = "",
        extra_config: str = "",
        probe_tls: ssl.SSLContext | None = None,
        launcher: Sequence[str] = CLI_LAUNCHER,
        source_root: Path = REPO_ROOT,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.upstream_port = upstream_port
        self.workdir = workdir
        self.max_sessions = max_sessions
        self.log_level = log_level
        self.python = python
        self.start_timeout = start_timeout
        self.listen_extra = listen_extra
        self.extra_config = extra_config
        self.probe_tls = probe_tls
        self.launcher = tuple(launcher)
        self.source_root = source_root
        self.config_path = workdir / "popproxy.toml"
        self.log_path = workdir / "popproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("proxy not started")
        return self.proc.pid

    def config_text(self) -> str:
        return (
            "[listen]\n"
            f'address = "{self.host}:{self.port}"\n'
            + (self.listen_extra.rstrip("\n") + "\n" if self.listen_extra else "")
            + "[upstream]\n"
            f'address = "127.0.0.1:{self.upstream_port}"\n'
            "[limits]\n"
            f"max_sessions = {self.max_sessions}\n"
            # A load test is one address and a few users: the built-in per-IP
            # and per-user session caps (100 and 10) would refuse most of it.
            "[policy.protections]\n"
            f"max_sessions_per_ip = {self.max_sessions + 100}\n"
            f"max_sessions_per_user = {self.max_sessions + 100}\n"
            "[log]\n"
            f'level = "{self.log_level}"\n'
            'format = "json"\n'
            + (self.extra_config.rstrip("\n") + "\n" if self.extra_config else "")
        )

    def child_env(self) -> dict[str, str]:
        """The proxy's environment: ``source_root`` first on ``PYTHONPATH``."""
        env = dict(os.environ)
        path = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = str(self.source_root) + (os.pathsep + path if path else "")
        return env

    def check_config(self) -> str:
        """Write the configuration and run ``popproxy check-config`` on it.

        '' when it passes, else its exit status and output.  Before
        ``start()`` the listen port in it is 0.
        """
        self.config_path.write_text(self.config_text())
        done = subprocess.run(
            [self.python, "-m", "popproxy", "check-config", str(self.config_path)],
            cwd=self.source_root, env=self.child_env(), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=60,
        )
        if done.returncode == 0:
            return ""
        out = (done.stdout + done.stderr).decode(errors="replace").strip()
        return f"exit {done.returncode}: {out}"

    def start(self, attempts: int = 3) -> None:
        last = ""
        for _ in range(attempts):
            self.port = free_port(self.host)
            self.config_path.write_text(self.config_text())
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [self.python, *self.launcher, str(self.config_path)],
                    cwd=self.source_root,
                    env=self.child_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            last = self._wait_ready()
            if not last:
                return
            self.stop()
        raise RuntimeError(f"the proxy did not start: {last}\n{self.log_tail()}")

    def _wait_ready(self) -> str:
        """'' once a session through the proxy gets Dovecot's greeting, else why not."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        why = "timeout"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with {self.proc.returncode}"
            try:
                with contextlib.ExitStack() as stack:
                    s = stack.enter_context(
                        socket.create_connection((self.host, self.port), timeout=2.0))
                    if self.probe_tls is not None:
                        s = stack.enter_context(
                            self.probe_tls.wrap_socket(s, server_hostname=self.host))
                    data = s.recv(512)
                    if data.startswith(b"+OK"):
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                        return ""
                    why = f"greeting {data[:100]!r}"
            except OSError as exc:
                why = str(exc)
            time.sleep(0.05)
        return why

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"the proxy process is gone (exit {code})\n{self.log_tail()}")

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_lines()[-lines:])

    def stop(self) -> None:
        """SIGINT (the proxy stops at once), then SIGKILL if it lingers."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5.0)
        self.proc = None
