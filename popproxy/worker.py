"""One worker process of ``popproxy run`` with ``[server] workers > 1``.

The supervisor (``popproxy.workers``) starts each worker as a fresh
interpreter (``python -c "from popproxy.worker import main; main()" SPEC``)
that inherits two kinds of file descriptors, named in SPEC (JSON):

* the listening sockets the supervisor bound, per ``[[listen]]`` entry: the
  worker accepts on them, as every other worker does, and the kernel hands
  each new connection to one of the processes waiting in ``accept``;
* its end of a private socket pair, the **channel**: length-prefixed JSON
  frames.  The supervisor's first frame carries the configuration text it
  validated (``{"op": "start", "config": TEXT}``); the worker's first,
  ``{"op": "ready"}``, says it serves.  After that the supervisor asks, and
  the worker answers from a thread of its own, so that an answer never waits
  for the event loop: ``scrape`` (this process's metric families, exactly
  what its own ``/metrics`` would show) and ``health`` (is the event loop
  beating, are the listeners accepting).  End of file on the channel means
  the supervisor is gone: the worker drains as on SIGTERM.

Everything else is ``app.run`` as a single process runs it: the same
proxy, policy, observers and SIGHUP reload (the supervisor checks the file
first and passes SIGHUP on only when it is valid, and only to workers that
said they serve), the same SIGTERM drain and SIGINT stop.  Log lines carry
``worker`` and ``pid``; the audit trail goes to the worker's own file
(``audit.w2.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import struct
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
import structlog
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from . import app
from .config import Config, ConfigError, parse_config
from .endpoint import HEARTBEAT_SECONDS
from .health import Health, degraded, refusing
from .server import ListenerGroup
from .tls import check_files

__all__ = [
    "Channel",
    "ChannelClosed",
    "WorkerSpec",
    "from_wire",
    "main",
    "parse_text",
    "to_wire",
]

logger = structlog.get_logger("popproxy.worker")

_HEADER: Final = struct.Struct("!I")
#: A frame larger than this is a broken peer, not a metrics exposition.
MAX_FRAME: Final = 64 << 20
#: How long a new worker waits for the supervisor's first frame.
START_TIMEOUT: Final = 30.0
_RECEIVE: Final = 1 << 16

#: A family as it crosses the channel: name, type, help, unit, samples
#: (sample name, labels, value).  Values that JSON cannot carry (NaN, ±Inf)
#: travel as strings.
WireFamily = list[Any]


class ChannelClosed(ConnectionError):
    """The other end of the channel closed it (or its process is gone)."""


class Channel:
    """One end of the supervisor-worker socket pair: length-prefixed JSON.

    ``receive`` keeps a partial frame in a buffer when it times out, so a
    slow answer is picked up whole by a later call instead of desynchronising
    the stream; answers carry the ``id`` of the request, so a late answer is
    recognised and skipped.  ``lock`` is for the supervisor side, where
    HTTP threads share a channel: hold it from ``send`` to ``receive``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self._buf = bytearray()
        self._ids = 0

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def send(self, message: Mapping[str, Any], timeout: float | None = None) -> None:
        """Send one frame; ``OSError`` (or ``ChannelClosed``) when it cannot."""
        data = orjson.dumps(message)
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(_HEADER.pack(len(data)) + data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ChannelClosed(str(exc)) from None

    def receive(self, deadline: float | None = None) -> dict[str, Any]:
        """The next frame; ``TimeoutError`` after ``deadline`` (monotonic
        time; None waits for ever), ``ChannelClosed`` at end of file."""
        while True:
            if len(self._buf) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buf)
                if size > MAX_FRAME:
                    raise ChannelClosed(f"frame of {size} octets: the peer is broken")
                end = _HEADER.size + size
                if len(self._buf) >= end:
                    message = orjson.loads(memoryview(self._buf)[_HEADER.size:end])
                    del self._buf[:end]
                    if not isinstance(message, dict):
                        raise ChannelClosed(f"not a frame: {type(message).__name__}")
                    return message
            # Past the deadline, still take what has arrived (0: non-blocking):
            # the answers to ``ask_all`` are read one after another.
            self.sock.settimeout(
                None if deadline is None else max(0.0, deadline - time.monotonic()))
            try:
                data = self.sock.recv(_RECEIVE)
            except BlockingIOError:
                raise TimeoutError("no answer in time") from None
            except ConnectionResetError as exc:
                raise ChannelClosed(str(exc)) from None
            if not data:
                raise ChannelClosed("end of file")
            self._buf += data

    def answer_to(self, request_id: int, deadline: float) -> dict[str, Any]:
        """The answer to request ``request_id``, skipping late answers to
        earlier requests that timed out."""
        while True:
            message = self.receive(deadline)
            if message.get("id") == request_id:
                return message

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------
# Metric families on the wire
# --------------------------------------------------------------------------


def _value(v: float) -> float | str:
    return v if math.isfinite(v) else repr(float(v))  # 'nan', 'inf', '-inf'


def to_wire(families: Iterable[Metric]) -> list[WireFamily]:
    """Collected metric families as JSON-ready lists (``from_wire`` undoes it)."""
    return [
        [m.name, m.type, m.documentation, m.unit,
         [[s.name, s.labels, _value(s.value)] for s in m.samples]]
        for m in families
    ]


def from_wire(raw: object) -> list[Metric]:
    """``to_wire``'s lists back as metric families; ``ValueError`` if malformed."""
    if not isinstance(raw, list):
        raise ValueError("expected a list of metric families")
    out: list[Metric] = []
    for item in raw:
        name, typ, doc, unit, samples = item
        family = Metric(str(name), str(doc), str(typ), str(unit))
        for sample_name, labels, value in samples:
            if not isinstance(labels, dict):
                raise ValueError(f"{name}: labels must be an object")
            family.add_sample(str(sample_name), {str(k): str(v) for k, v in labels.items()},
                              float(value))
        out.append(family)
    return out


# --------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------


def parse_text(text: str, name: str) -> Config:
    """A configuration from TOML text, checked as ``app.load`` checks a file
    (the TLS files it names are read); errors name ``name`` or the key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from None
    config = parse_config(raw)
    check_files(config)
    return config


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker is told on its command line (the descriptors it inherits)."""

    worker: int  # 1..N; a restarted worker keeps its number
    config_path: str  # read again on SIGHUP
    listeners: tuple[tuple[int, int], ...]  # (index in config.listeners, socket fd)
    channel: int  # fd of the worker's end of the channel

    def to_json(self) -> str:
        return json.dumps({"worker": self.worker, "config_path": self.config_path,
                           "listeners": self.listeners, "channel": self.channel})

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        raw = json.loads(text)
        return cls(int(raw["worker"]), str(raw["config_path"]),
                   tuple((int(i), int(fd)) for i, fd in raw["listeners"]), int(raw["channel"]))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a worker process (started by the supervisor only)."""
    args = sys.argv[1:] if argv is None else argv
    sys.exit(run_worker(WorkerSpec.from_json(args[0])))


def run_worker(spec: WorkerSpec) -> int:
    """Serve until told to stop; the process's exit status."""
    # The supervisor passes SIGHUP on only once this worker said it serves
    # (and so has the proxy's own handler); one from elsewhere before that
    # must not end the process (the default action), nor one during the
    # last steps of shutdown, after trio has put the disposition back.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=spec.channel))
    try:
        start = channel.receive(time.monotonic() + START_TIMEOUT)
        config = parse_text(str(start["config"]), spec.config_path)
    except (OSError, KeyError, ValueError) as exc:
        # ConfigError is a ValueError: the file's TLS files changed since
        # the supervisor read them, say.
        print(f"popproxy worker {spec.worker}: cannot start: {exc}", file=sys.stderr)
        return 2
    from .logs import configure_logging

    configure_logging(config.log.level, config.log.format, worker=spec.worker)
    registry = CollectorRegistry()
    proxy_app = app.build(config, registry)
    health = Health(proxy_app.proxy)
    # popproxy_upstream_up{upstream,address} as this worker sees them (its
    # probes, its pools' marks); the supervisor shows the lowest of all.
    proxy_app.metrics.upstream_up.source = health.upstreams
    try:
        trio.run(_serve, spec, config, proxy_app, health, channel, registry)
    except KeyboardInterrupt:  # SIGINT before or after the proxy's own handler
        return 130
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return 0


async def _serve(spec: WorkerSpec, config: Config, proxy_app: app.App, health: Health,
                 channel: Channel, registry: CollectorRegistry) -> None:
    groups = _listener_groups(config, spec.listeners)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_beat, health)

        async def proxy(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
            await app.run(config, groups, config_path=spec.config_path, app=proxy_app,
                          worker=spec.worker, task_status=task_status)
            nursery.cancel_scope.cancel()

        await nursery.start(proxy)
        # Serving, with the SIGHUP receiver of app.run in place: say so (the
        # supervisor waits for this before it passes SIGHUP on or asks
        # anything), then answer its questions from a thread of our own.
        with contextlib.suppress(OSError):  # the supervisor is gone: the thread notices
            channel.send({"op": "ready"}, timeout=10.0)
        threading.Thread(target=_answer, args=(channel, registry, health, proxy_app),
                         name="popproxy-worker-channel", daemon=True).start()


def _listener_groups(config: Config, fds: Iterable[tuple[int, int]]) -> list[ListenerGroup]:
    """The inherited listening sockets, grouped by their ``[[listen]]`` entry."""
    by_index: dict[int, list[trio.SocketListener]] = {}
    for index, fd in fds:
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        by_index.setdefault(index, []).append(trio.SocketListener(sock))
    return [(config.listeners[i], group) for i, group in sorted(by_index.items())]


async def _beat(health: Health) -> None:
    """The event loop's heartbeat, for ``health`` answers (as serve_metrics beats)."""
    while True:
        health.beat()
        await trio.sleep(HEARTBEAT_SECONDS)


def _answer(channel: Channel, registry: CollectorRegistry, health: Health,
            proxy_app: app.App) -> None:
    """The channel thread: answer the supervisor until it goes away."""
    while True:
        try:
            request = channel.receive()
        except (OSError, ValueError):
            break
        op = request.get("op")
        answer: dict[str, Any] = {"id": request.get("id")}
        if op == "scrape":
            answer["families"] = to_wire(registry.collect())
        elif op == "health":
            alive, why = health.alive()
            answer |= {"alive": alive, "why": why, "lag": round(health.lag(), 3),
                       "listening": proxy_app.proxy.listening,
                       "degraded": degraded(proxy_app.proxy),
                       "refusing": refusing(proxy_app.proxy),
                       "sessions": proxy_app.proxy.active}
        else:
            answer["error"] = f"unknown op {op!r}"
        try:
            channel.send(answer)
        except OSError:
            break
    # The supervisor is gone (killed, or crashed): nobody will pass SIGTERM
    # on or restart us, so drain and leave rather than serve unsupervised.
    logger.warning("worker.orphaned", detail="the supervisor is gone: draining")
    os.kill(os.getpid(), signal.SIGTERM)
