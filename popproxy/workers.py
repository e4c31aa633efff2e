"""``popproxy run`` with ``[server] workers > 1``: one supervisor, N workers.

The supervisor binds the listeners (and the ``[metrics]`` address) once,
then starts N worker processes (``popproxy.worker``), each a whole trio
proxy accepting on the same listening sockets, and looks after them, in
the manner of gunicorn's arbiter:

* a worker that exits unasked is restarted, after a delay that doubles
  while it keeps dying young (``Backoff``); logged (``worker.exited``,
  ``worker.restart``) and counted (``popproxy_worker_restarts_total``); one
  whose event loop is stuck (asked every ``WATCH_SECONDS``; no sign of life
  for ``STUCK_AFTER``) is killed and so restarted (``worker.stuck``);
* **SIGHUP**: the supervisor reads and checks the file first; a bad one is
  rejected here, once (``config.reload_failed``), and no worker hears of
  it; a good one is passed on (SIGHUP to every worker, each reloads as a
  single process does; a worker still starting gets it once it says it
  serves, since before that the signal would end it), and new workers
  start with it, even if the file has been spoiled since;
* **SIGTERM**: passed on, the supervisor's own copies of the listening
  sockets are closed (so that no connection waits in a backlog nobody
  accepts from), each worker drains, and the supervisor exits when the
  last one has; SIGKILL for any still there ``limits.drain_timeout`` plus
  ``KILL_MARGIN`` later;
* **SIGINT**: passed on; every worker stops at once.

``/metrics``, ``/healthz`` and ``/readyz`` are served once, by the
supervisor, over all workers (``popproxy.aggregate``).

How a worker starts, and why so: **spawn, not fork**.  A worker is a fresh
interpreter (``python -c "from popproxy.worker import main; main()"``),
exec'd by ``trio.lowlevel.open_process``, as multiprocessing's ``spawn``
start method (and hypercorn) do.  Forking would copy a process that runs
a trio event loop and threads (the metrics HTTP thread, glide's threads
for ``[state]``), with their locks in whatever state they were; forking
before any of them exist only works once, at start, and a restart needs
it again later.  The listening sockets and the worker's end of its channel
go over as inherited descriptors (``pass_fds``), named on the command line:
nothing is pickled and no helper thread hands sockets over (as
multiprocessing's spawn would).  Workers run in a session of their own, so
a Ctrl-C in a terminal reaches the supervisor only, which decides; a worker
whose supervisor vanished sees end-of-file on its channel and drains.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

import structlog
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from .addr import HostPort
from .aggregate import (
    WORKER_MERGE,
    Retired,
    WorkerHealth,
    WorkerMetrics,
    WorkersCollector,
    WorkersHealth,
    ask_all,
    merge,
)
from .config import Config, ConfigError
from .endpoint import make_app, serve_http
from .exits import cannot_listen
from .metrics import Metrics
from .server import open_listeners
from .worker import Channel, WorkerSpec, from_wire, parse_text

__all__ = [
    "KILL_MARGIN",
    "Backoff",
    "Supervised",
    "Supervisor",
    "config_warnings",
    "read_config",
    "run",
    "supervise",
]

logger = structlog.get_logger("popproxy.workers")

#: How much longer than ``limits.drain_timeout`` SIGTERM waits for a worker.
KILL_MARGIN: Final = 10.0
#: How long the HTTP thread waits for the workers' answers.
SCRAPE_TIMEOUT: Final = 2.5
HEALTH_TIMEOUT: Final = 1.5
#: How long a new worker may take to start serving before it is killed.
READY_TIMEOUT: Final = 60.0
#: How often a worker is asked whether its event loop runs, and how long it
#: may fail to say so before it is killed (and restarted).  A loop stuck
#: this long fails /healthz too (health.STALE_AFTER).
WATCH_SECONDS: Final = 10.0
STUCK_AFTER: Final = 30.0
_WORKER_MAIN: Final = "from popproxy.worker import main; main()"


def read_config(path: str | Path) -> tuple[Config, str]:
    """The configuration in ``path``, checked, and its text (what workers
    are started with); ``ConfigError`` names the file or the key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 ({exc.reason})") from None
    return parse_text(text, str(path)), text


def config_warnings(config: Config) -> list[str]:
    """What ``check-config`` and ``run`` warn about: limits that several
    workers count each on their own (``[state] backend = "memory"``)."""
    workers = config.server.worker_count()
    if workers <= 1 or config.state.backend != "memory":
        return []
    rules = [f"{r.name} (per {r.per})" for r in config.policy.rules if r.action == "rate_limit"]
    p = config.policy.protections
    caps = (f"max_sessions_per_user = {p.max_sessions_per_user}, "
            f"max_sessions_per_ip = {p.max_sessions_per_ip}, "
            f"login_failures_per_user = {p.login_failures_per_user}, "
            f"login_failures_per_ip = {p.login_failures_per_ip}")
    counted = (f"the rate-limit rules {', '.join(rules)} and " if rules else "") + (
        f"the built-in caps and login throttling ({caps})")
    shown = f'"{config.server.workers}"' if config.server.workers == "auto" else str(workers)
    return [
        f"server.workers = {shown} ({workers} processes) with "
        f'[state] backend = "memory": {counted} are counted by each worker process on its '
        f"own, so a client may get up to {workers} times as much; "
        f'[state] backend = "redis" shares them'
    ]


@dataclass
class Backoff:
    """Delays before restarting one worker: ``first``, doubling (up to
    ``cap``) while it keeps exiting within ``healthy_after`` of its start."""

    first: float = 0.5
    cap: float = 30.0
    healthy_after: float = 30.0
    streak: int = 0

    def next(self, uptime: float) -> float:
        """The delay before the next start, after a run of ``uptime`` seconds."""
        if uptime >= self.healthy_after:
            self.streak = 0
        delay = min(self.cap, self.first * 2.0 ** min(self.streak, 32))
        self.streak += 1
        return delay


@dataclass(eq=False)
class _Slot:
    """Worker number ``number``: its current process, if any."""

    number: int
    backoff: Backoff
    process: trio.Process | None = None
    channel: Channel | None = None
    ready: bool = False  # it said it serves: SIGHUP and questions may go to it
    generation: int = 0  # the configuration it was started with (Supervisor.generation)
    started: float = 0.0
    last: list[Metric] | None = None  # its last answer to a scrape


def _exit_text(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


class Supervisor:
    """Starts, restarts, signals and asks the worker processes.

    ``run`` (in the event loop) until every worker has exited after SIGTERM
    or SIGINT.  ``collect`` and ``worker_health`` are for the HTTP thread;
    ``_view`` guards what both sides read (the slots' processes, channels
    and last answers, and ``retired``).
    """

    def __init__(
        self,
        config: Config,
        path: Path,
        text: str,
        sockets: Sequence[tuple[int, trio.SocketListener]],
        metrics: Metrics,
        workers: int,
        *,
        backoff: Callable[[], Backoff] = Backoff,
        python: str = sys.executable,
        watch_every: float = WATCH_SECONDS,
        stuck_after: float = STUCK_AFTER,
    ) -> None:
        self.config = config
        self.path = path
        self.text = text
        self.generation = 0  # good reloads so far
        self.sockets = list(sockets)
        self.metrics = metrics
        self.worker_metrics = WorkerMetrics(metrics.registry, workers)
        self.slots = [_Slot(n, backoff()) for n in range(1, workers + 1)]
        self.python = python
        self.watch_every = watch_every
        self.stuck_after = stuck_after
        self.stopping: signal.Signals | None = None
        self._stop = trio.Event()
        self._view = threading.Lock()
        self.retired = Retired()

    # -- what Health needs (ProxyStatus) ------------------------------------

    @property
    def listening(self) -> bool:
        return self.stopping is None

    @property
    def pools(self) -> None:
        return None  # the workers' pools mark addresses down, each its own

    # -- the event loop side ----------------------------------------------

    async def run(self) -> None:
        """Start the workers and look after them until they have all stopped."""
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._signals, signals, outer)
                async with trio.open_nursery() as keepers:
                    for slot in self.slots:
                        keepers.start_soon(self._keep, slot)
                outer.cancel_scope.cancel()
        self._close_listeners()
        logger.info("shutdown.done")

    async def _signals(self, signals: AsyncIterator[int],
                       nursery: trio.Nursery) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await self.reload()
            elif self.stop(signal.Signals(signum)) and signum == signal.SIGTERM:
                nursery.start_soon(self._kill_after, self.config.limits.drain_timeout + KILL_MARGIN)

    async def _keep(self, slot: _Slot) -> None:
        """Worker ``slot``: start it, wait for it, start it again, until stopping."""
        while self.stopping is None:
            process: trio.Process | None = None
            try:
                process = await self._spawn(slot)
            except OSError as exc:
                logger.error("worker.spawn_failed", worker=slot.number, error=str(exc))
            if process is not None:
                try:
                    await self._until_ready(slot, process)
                    async with trio.open_nursery() as nursery:
                        if slot.ready:
                            nursery.start_soon(self._watch, slot, process)
                        status = await process.wait()
                        nursery.cancel_scope.cancel()
                finally:
                    with trio.CancelScope(shield=True):
                        if process.returncode is None:  # we are being torn down
                            process.kill()
                            await process.wait()
                        await trio.to_thread.run_sync(self._retire, slot)
                uptime = trio.current_time() - slot.started
                log = logger.info if self.stopping is not None else logger.warning
                log("worker.exited", worker=slot.number, pid=process.pid,
                    status=_exit_text(status), uptime=round(uptime, 3))
            else:
                uptime = 0.0
            if self.stopping is not None:
                return
            delay = slot.backoff.next(uptime)
            self.worker_metrics.restarted(slot.number)
            logger.warning("worker.restart", worker=slot.number, delay=delay)
            with trio.move_on_after(delay):
                await self._stop.wait()

    async def _spawn(self, slot: _Slot) -> trio.Process:
        ours, theirs = socket.socketpair()
        try:
            spec = WorkerSpec(slot.number, str(self.path),
                              tuple((i, lst.socket.fileno()) for i, lst in self.sockets),
                              theirs.fileno())
            process = await trio.lowlevel.open_process(
                [self.python, "-c", _WORKER_MAIN, spec.to_json()],
                pass_fds=[fd for _, fd in spec.listeners] + [spec.channel],
                start_new_session=True, stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        channel = Channel(ours)
        with self._view:
            slot.process, slot.channel, slot.last, slot.ready = process, channel, None, False
        slot.started = trio.current_time()
        slot.generation = self.generation
        self.worker_metrics.running(slot.number, True)
        logger.info("worker.started", worker=slot.number, pid=process.pid)
        if self.stopping is not None:  # stopped while it was being started
            process.send_signal(self.stopping)
        try:
            # The text this supervisor checked last (a worker that reads the
            # file itself could find it changed and not yet checked).
            await trio.to_thread.run_sync(channel.send, {"op": "start", "config": self.text},
                                          10.0)
        except OSError as exc:  # it died at once: process.wait() tells how
            logger.warning("worker.start_failed", worker=slot.number, error=str(exc))
        return process

    async def _until_ready(self, slot: _Slot, process: trio.Process) -> None:
        """Wait for the worker's ``ready``; kill it if none comes in time."""
        channel = slot.channel
        assert channel is not None
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            message = await trio.to_thread.run_sync(channel.receive, deadline,
                                                    abandon_on_cancel=True)
        except TimeoutError:
            logger.error("worker.start_timeout", worker=slot.number, pid=process.pid,
                         detail=f"not serving {READY_TIMEOUT:.0f}s after it was started")
            process.kill()
            return
        except (OSError, ValueError):
            return  # it ended while starting: process.wait() tells how
        if message.get("op") != "ready":
            logger.error("worker.bad_answer", worker=slot.number, error=repr(message)[:200])
            process.kill()
            return
        with self._view:
            slot.ready = True
        logger.info("worker.ready", worker=slot.number, pid=process.pid,
                    seconds=round(trio.current_time() - slot.started, 3))
        if slot.generation != self.generation and self.stopping is None:
            # A reload was passed on while it started, from text it had not
            # been given: it reads the file now, as the others did.
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGHUP)

    async def _watch(self, slot: _Slot, process: trio.Process) -> None:
        """Kill the worker if it is stuck (gunicorn's worker timeout): its
        event loop has not run, or it has not answered, for ``stuck_after``."""
        channel = slot.channel
        assert channel is not None
        silent_since: float | None = None
        while True:
            await trio.sleep(self.watch_every)
            if self.stopping is not None:
                return  # draining: SIGTERM's own deadline applies
            (answer,) = await trio.to_thread.run_sync(
                ask_all, [channel], "health", HEALTH_TIMEOUT, abandon_on_cancel=True)
            now = trio.current_time()
            if answer is None:
                silent_since = now if silent_since is None else silent_since
                stuck, why = now - silent_since, "no answer"
            else:
                silent_since = None
                stuck, why = float(answer.get("lag", 0.0)), "event loop not running"
            if stuck >= self.stuck_after:
                logger.error("worker.stuck", worker=slot.number, pid=process.pid,
                             detail=f"{why} for {stuck:.0f}s: killed")
                process.kill()
                return

    def _retire(self, slot: _Slot) -> None:
        """A worker has exited: keep its last counts, drop its channel (a thread)."""
        with self._view:
            if slot.last is not None:
                self.retired.add(slot.last, WORKER_MERGE)
            channel, slot.channel, slot.process, slot.last = slot.channel, None, None, None
            slot.ready = False
        self.worker_metrics.running(slot.number, False)
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)  # wakes an HTTP thread reading it
            with channel.lock:
                channel.close()

    async def _kill_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                logger.error("worker.killed", worker=slot.number, pid=process.pid,
                             detail=f"still running {seconds:.0f}s after SIGTERM")
                process.kill()

    def stop(self, signum: signal.Signals) -> bool:
        """SIGTERM (drain) or SIGINT (now): pass it on; stop restarting.
        True when this changed anything (a second SIGTERM does not)."""
        if self.stopping is not None and (signum == signal.SIGTERM or
                                          self.stopping == signal.SIGINT):
            return False
        self.stopping = signum
        self._stop.set()
        live = [s for s in self.slots if s.process is not None and s.process.returncode is None]
        if signum == signal.SIGTERM:
            logger.info("shutdown.drain", workers=len(live),
                        timeout=self.config.limits.drain_timeout)
        else:
            logger.info("shutdown.now", workers=len(live))
        for slot in live:
            assert slot.process is not None
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signum)
        self._close_listeners()
        return True

    def _close_listeners(self) -> None:
        for _, listener in self.sockets:
            listener.socket.close()

    async def reload(self) -> bool:
        """SIGHUP: check the file; pass SIGHUP on only if it is valid."""
        try:
            config, text = await trio.to_thread.run_sync(read_config, self.path)
        except ConfigError as exc:
            logger.error("config.reload_failed", error=str(exc))
            self.metrics.config_reload(False)
            return False
        if config.server != self.config.server:
            logger.warning("config.reload_partial",
                           detail="[server] workers change after a restart")
        for warning in config_warnings(config):
            logger.warning("config.per_process_limits", detail=warning)
        self.text = text
        self.generation += 1
        self.metrics.config_reload(True)
        signalled = starting = 0
        for slot in self.slots:
            process = slot.process
            if process is None or process.returncode is not None:
                continue
            if not slot.ready:
                starting += 1  # signalled once it serves (_until_ready)
                continue
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGHUP)
                signalled += 1
        logger.info("config.passed_on", workers=signalled, starting=starting)
        return True

    # -- the HTTP thread side ----------------------------------------------

    def collect(self) -> list[Metric]:
        """All workers' metrics and the supervisor's, merged (``/metrics``)."""
        with self._view:
            live = [(s, s.channel) for s in self.slots if s.channel is not None and s.ready]
        answers = ask_all([c for _, c in live if c is not None], "scrape", SCRAPE_TIMEOUT)
        own = list(self.metrics.registry.collect())
        with self._view:
            snapshots: list[list[Metric]] = []
            for (slot, channel), answer in zip(live, answers, strict=True):
                if slot.channel is not channel:
                    continue  # it exited meanwhile: its counts are in retired
                if answer is not None:
                    try:
                        slot.last = from_wire(answer.get("families"))
                    except (ValueError, TypeError) as exc:
                        logger.error("worker.bad_answer", worker=slot.number, error=str(exc))
                if slot.last is not None:
                    snapshots.append(slot.last)
            return merge(own, snapshots, self.retired, WORKER_MERGE)

    def worker_health(self) -> list[WorkerHealth]:
        """Every worker's liveness and readiness, asked now (``/healthz``)."""
        with self._view:
            slots = [(s, s.channel, s.process, s.ready) for s in self.slots]
        asked = [(s, c, p) for s, c, p, ready in slots if c is not None and p is not None and ready]
        answers = dict(zip(
            [s.number for s, _, _ in asked],
            ask_all([c for _, c, _ in asked if c is not None], "health", HEALTH_TIMEOUT),
            strict=True,
        ))
        out = []
        for slot, _, process, ready in slots:
            n = slot.number
            if process is not None and not ready:
                out.append(WorkerHealth(n, True, False, f"worker {n} is starting"))
                continue
            if process is None:
                if self.stopping is not None:
                    out.append(WorkerHealth(n, True, False, f"worker {n} has stopped"))
                else:
                    out.append(WorkerHealth(n, False, False,
                                            f"worker {n} is not running (being restarted)"))
                continue
            answer = answers.get(n)
            if answer is None:
                out.append(WorkerHealth(n, False, False,
                                        f"worker {n} (pid {process.pid}) does not answer"))
                continue
            alive = bool(answer.get("alive"))
            why = "ok" if alive else f"worker {n} (pid {process.pid}): {answer.get('why')}"
            degraded, refusing = answer.get("degraded"), answer.get("refusing")
            out.append(WorkerHealth(n, alive, bool(answer.get("listening")), why,
                                    str(degraded) if degraded else None,
                                    str(refusing) if refusing else None))
        return out


@dataclass
class Supervised:
    """What ``supervise`` reports once it listens (for embedding and tests)."""

    supervisor: Supervisor
    listeners: list[trio.SocketListener] = field(default_factory=list)
    metrics_address: HostPort | None = None  # the real one when [metrics] asked for port 0


async def supervise(
    config: Config,
    path: Path,
    text: str,
    *,
    python: str = sys.executable,
    watch_every: float = WATCH_SECONDS,
    stuck_after: float = STUCK_AFTER,
    task_status: trio.TaskStatus[Supervised] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, start ``config.server.worker_count()`` workers, supervise them
    until they have all stopped (after SIGTERM or SIGINT)."""
    workers = config.server.worker_count()
    sockets: list[tuple[int, trio.SocketListener]] = []
    try:
        for index, lc in enumerate(config.listeners):
            for listener in await open_listeners(lc.addresses):
                sockets.append((index, listener))
    except BaseException:
        for _, listener in sockets:
            listener.socket.close()
        raise
    metrics = Metrics(CollectorRegistry())
    supervisor = Supervisor(config, path, text, sockets, metrics, workers, python=python,
                            watch_every=watch_every, stuck_after=stuck_after)
    for warning in config_warnings(config):
        logger.warning("config.per_process_limits", detail=warning)
    logger.info("workers.starting", workers=workers,
                addresses=[str(HostPort.of(*lst.socket.getsockname()[:2])) for _, lst in sockets])
    started = Supervised(supervisor, [lst for _, lst in sockets])
    async with trio.open_nursery() as nursery:
        if config.metrics.address is not None:
            health = WorkersHealth(supervisor, supervisor.worker_health)
            exposition = CollectorRegistry(auto_describe=False)
            exposition.register(WorkersCollector(supervisor.collect))
            started.metrics_address = await nursery.start(
                serve_http, config.metrics.address, make_app(exposition, health), health)
        task_status.started(started)
        await supervisor.run()
        nursery.cancel_scope.cancel()


def run(config_path: str) -> int:
    """``popproxy run`` with ``workers > 1``: the exit status."""
    try:
        config, text = read_config(config_path)
    except ConfigError as exc:
        print(f"popproxy: {exc}", file=sys.stderr)
        return 2
    failure: str | None = None
    try:
        trio.run(partial(supervise, config, Path(config_path), text))
    except* OSError as group:
        found = cannot_listen(group)
        failure = str(found) if found is not None else f"cannot listen: {_leaf(group)}"
    if failure is not None:
        print(f"popproxy: {failure}", file=sys.stderr)
        return 1
    return 0


def _leaf(exc: BaseException) -> BaseException:
    """The first exception in ``exc`` that is not a group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
