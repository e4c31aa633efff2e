"""One view of many workers: their metrics added up, their health together.

With ``[server] workers > 1`` the supervisor serves ``/metrics``,
``/healthz`` and ``/readyz`` once for all its workers (``popproxy.workers``).
Each worker keeps its metrics exactly as a single process does (the
command counters stay a custom collector, off the hot path), and answers
the supervisor's ``scrape`` with its collected families; at scrape time the
supervisor asks all of them at once and merges:

* counters and histograms are summed, sample by sample; so are gauges
  (``popproxy_sessions_active`` of two workers is the sessions of both);
* ``WORKER_MERGE`` names the exceptions: ``max`` or ``min`` over the
  workers and the supervisor (timestamps, ``..._successful`` flags, build
  info, the upstream addresses' state), or ``supervisor``, the supervisor's
  own value alone (configuration reloads, which it decides once for all);
* a worker that died leaves its last answered counters and histograms
  behind (``Retired``), so a total never goes down when a worker is
  replaced, which Prometheus would take for a counter reset.  What it
  counted after its last scrape is lost with it (a crash, or ``kill -9``;
  a worker that drains exits after the scrapes that saw its sessions);
* a worker that does not answer in time counts with its last answer.

Pure functions and small classes; the channel I/O is ``ask_all``, run from
the HTTP thread, never from the event loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric

from .health import Health, ProxyStatus
from .worker import Channel

__all__ = [
    "SUMMED_TYPES",
    "WORKER_MERGE",
    "Retired",
    "WorkerHealth",
    "WorkerMetrics",
    "WorkersCollector",
    "WorkersHealth",
    "ask_all",
    "merge",
]

#: Families whose samples only grow in a process's life: a dead worker's
#: last values stay in the sum.
SUMMED_TYPES: Final = frozenset({"counter", "histogram", "summary"})
#: Families of these types merge by ``max`` unless named in the rules.
_MAX_TYPES: Final = frozenset({"info", "stateset"})

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class _Family:
    name: str
    type: str
    help: str
    unit: str
    values: dict[SampleKey, float] = field(default_factory=dict)

    @classmethod
    def like(cls, m: Metric) -> _Family:
        return cls(m.name, m.type, m.documentation, m.unit)

    def metric(self) -> Metric:
        out = Metric(self.name, self.help, self.type, self.unit)
        for (sample, labels), value in self.values.items():
            out.add_sample(sample, dict(labels), value)
        return out


def _key(sample_name: str, labels: Mapping[str, str]) -> SampleKey:
    return sample_name, tuple(labels.items())


def _rule(family: Metric | _Family, rules: Mapping[str, str]) -> str:
    rule = rules.get(family.name)
    if rule is not None:
        return rule
    return "max" if family.type in _MAX_TYPES else "sum"


# --------------------------------------------------------------------------
# The rules, and the supervisor's own metrics
# --------------------------------------------------------------------------

#: How the supervisor's one ``/metrics`` combines a family over its workers
#: (``merge``), where summing, the default, would be wrong:
#: ``max``/``min`` over the workers and the supervisor's own value, or
#: ``supervisor``, the supervisor's value alone.  A gauge added to
#: ``Metrics`` that must not be summed over processes belongs here.
WORKER_MERGE: Final = {
    "popproxy_build": "max",
    # Each worker's probes and its pools' marks: an address is up when it
    # is up for every worker.
    "popproxy_upstream_up": "min",
    # A reload is decided once, by the supervisor (which checks the file
    # and passes SIGHUP on only when it is valid), not once per worker.
    "popproxy_config_reload": "supervisor",
    "popproxy_config_last_reload_successful": "min",
    "popproxy_config_last_reload_success_timestamp_seconds": "max",
}


class WorkerMetrics:
    """The supervisor's own metrics of its worker processes.

    Labelled by worker number (1..``workers``, a restarted worker keeps
    its number), so the label set is as small as the configuration.
    """

    def __init__(self, registry: CollectorRegistry, workers: int) -> None:
        self.up = Gauge(
            "popproxy_worker_up", "1 while worker process N runs, 0 while it waits to be "
            "restarted (or has stopped, when draining).",
            ["worker"], registry=registry,
        )
        self.restarts = Counter(
            "popproxy_worker_restarts", "Worker processes restarted after they exited "
            "unasked, by worker number.",
            ["worker"], registry=registry,
        )
        for n in range(1, workers + 1):
            self.up.labels(str(n))
            self.restarts.labels(str(n))

    def running(self, worker: int, up: bool) -> None:
        self.up.labels(str(worker)).set(1 if up else 0)

    def restarted(self, worker: int) -> None:
        self.restarts.labels(str(worker)).inc()


class Retired:
    """What dead workers counted: their last answered counters and histograms."""

    def __init__(self) -> None:
        self.families: dict[str, _Family] = {}

    def add(self, families: Iterable[Metric], rules: Mapping[str, str]) -> None:
        """Keep a dead worker's last answer (its summed families only)."""
        for m in families:
            if m.type not in SUMMED_TYPES or _rule(m, rules) != "sum":
                continue
            kept = self.families.setdefault(m.name, _Family.like(m))
            for s in m.samples:
                key = _key(s.name, s.labels)
                kept.values[key] = kept.values.get(key, 0.0) + s.value


def merge(
    supervisor: Iterable[Metric],
    workers: Iterable[Iterable[Metric]],
    retired: Retired,
    rules: Mapping[str, str],
) -> list[Metric]:
    """The supervisor's families and its workers' as one exposition.

    Families come in the supervisor's order, then any only workers have;
    samples in the order first seen.  ``rules`` (``WORKER_MERGE``)
    maps a family name to ``sum``, ``max``, ``min`` or ``supervisor``.
    """
    out: dict[str, _Family] = {}

    def add(m: Metric | _Family, from_supervisor: bool) -> None:
        rule = _rule(m, rules)
        if rule == "supervisor" and not from_supervisor:
            return
        family = out.get(m.name)
        if family is None:
            family = out[m.name] = _Family(m.name, m.type, _help(m), m.unit)
        values = family.values
        pairs = (m.values.items() if isinstance(m, _Family)
                 else ((_key(s.name, s.labels), s.value) for s in m.samples))
        for key, value in pairs:
            old = values.get(key)
            if old is None:
                values[key] = value
            elif rule == "max":
                values[key] = max(old, value)
            elif rule == "min":
                values[key] = min(old, value)
            else:
                values[key] = old + value

    for m in supervisor:
        add(m, True)
    for families in workers:
        for m in families:
            add(m, False)
    for kept in retired.families.values():
        add(kept, False)
    return [family.metric() for family in out.values()]


def _help(m: Metric | _Family) -> str:
    return m.help if isinstance(m, _Family) else m.documentation


class WorkersCollector:
    """A prometheus collector whose ``collect`` is the supervisor's merged view."""

    def __init__(self, collect: Callable[[], list[Metric]]) -> None:
        self._collect = collect

    def describe(self) -> list[Metric]:
        return []  # nothing to check for duplicates: names vary with the workers

    def collect(self) -> list[Metric]:
        return self._collect()


def ask_all(
    channels: Sequence[Channel], op: str, timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict[str, Any] | None]:
    """Ask every channel ``op`` at once and collect the answers (None where
    a channel did not answer within ``timeout``, or is closed).

    Blocking: for the HTTP thread.  All requests go out before any answer
    is read, so the workers work on them in parallel.
    """
    deadline = clock() + timeout
    sent: list[tuple[Channel, int] | None] = []
    held: list[Channel] = []
    try:
        for channel in channels:
            if not channel.lock.acquire(timeout=max(0.0, deadline - clock())):
                sent.append(None)
                continue
            held.append(channel)
            request_id = channel.next_id()
            try:
                channel.send({"op": op, "id": request_id}, timeout=max(0.001, deadline - clock()))
            except OSError:
                sent.append(None)
                continue
            sent.append((channel, request_id))
        answers: list[dict[str, Any] | None] = []
        for item in sent:
            answer = None
            if item is not None:
                with contextlib.suppress(OSError, ValueError):
                    answer = item[0].answer_to(item[1], deadline)
            answers.append(answer)
        return answers
    finally:
        for channel in held:
            channel.lock.release()


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    """One worker as ``/healthz`` and ``/readyz`` see it."""

    worker: int
    alive: bool
    listening: bool
    why: str  # "ok", or what is wrong, naming the worker
    degraded: str | None = None  # "degraded: ..." while its shared state fails
    refusing: str | None = None  # "refusing new sessions: ..." (health.refusing)


class WorkersHealth(Health):
    """``Health`` of the supervisor and every worker.

    ``/healthz``: the supervisor's own event loop beats, and every worker
    runs and answers, with an event loop that beats (a worker that died
    and waits for its restart, or is stuck, fails it).  ``/readyz``: not
    draining, every worker accepts on the listeners and none refuses every
    new session (its share of the clients would be refused), the upstream accepts a
    connection (probed once, by the supervisor, not by every worker); and
    "degraded: ..." (still 200) while a worker's shared state fails.
    """

    def __init__(self, status: ProxyStatus, workers: Callable[[], list[WorkerHealth]],
                 **kwargs: Any) -> None:
        super().__init__(status, **kwargs)
        self.workers = workers

    def _own(self) -> tuple[bool, str]:
        alive, why = super().alive()
        return alive, why if alive else f"supervisor: {why}"

    def alive(self) -> tuple[bool, str]:
        alive, why = self._own()
        if not alive:
            return alive, why
        for w in self.workers():
            if not w.alive:
                return False, w.why
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self.proxy.listening:
            return False, "not listening"
        alive, why = self._own()
        if not alive:
            return alive, why
        workers = self.workers()
        for w in workers:
            if not w.alive:
                return False, w.why
            if not w.listening:
                return False, f"worker {w.worker} is not listening yet"
            if w.refusing is not None:
                return False, f"worker {w.worker}: {w.refusing}"
        error = self.upstream_error()
        if error is not None:
            return False, error
        for w in workers:
            if w.degraded is not None:
                return True, f"{w.degraded} (worker {w.worker})"
        return True, "ready"
