"""Worker processes, in pieces: ``[server]`` and ``[state]`` in the
configuration, the check-config warning, the restart backoff, the
supervisor-worker channel, merging many workers' metrics into one view,
their health, the ``worker`` field on log lines, the per-worker audit file.

The processes themselves are in ``test_workers.py``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from popproxy.aggregate import (
    WORKER_MERGE,
    Retired,
    WorkerHealth,
    WorkersHealth,
    ask_all,
    merge,
)
from popproxy.audit import worker_path
from popproxy.cli import main
from popproxy.config import (
    Config,
    ConfigError,
    ServerConfig,
    available_cpus,
    parse_config,
)
from popproxy.logs import configure_logging
from popproxy.metrics import Metrics
from popproxy.worker import Channel, ChannelClosed, from_wire, to_wire
from popproxy.workers import Backoff, config_warnings

RULE = {"name": "retr-per-user", "match": {"commands": ["RETR"]}, "action": "rate_limit",
        "limit": "5/minute", "per": "user"}


def minimal(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"upstream": {"address": "127.0.0.1:110"}}
    raw.update(sections)
    return raw


# --------------------------------------------------------------------------
# [server] and [state]
# --------------------------------------------------------------------------


class TestServerSection:
    def test_one_worker_by_default(self) -> None:
        config = parse_config(minimal())
        assert config.server == ServerConfig(workers=1)
        assert config.server.worker_count() == 1

    def test_a_number_of_workers(self) -> None:
        assert parse_config(minimal(server={"workers": 4})).server.worker_count() == 4

    def test_auto_is_the_cpus_this_process_may_use(self) -> None:
        server = parse_config(minimal(server={"workers": "auto"})).server
        assert server.workers == "auto"
        assert server.worker_count() == len(os.sched_getaffinity(0)) == available_cpus()

    @pytest.mark.parametrize("value", [0, -1, 257, "4", "all", True, 2.0, [2]])
    def test_errors_name_the_key(self, value: object) -> None:
        with pytest.raises(ConfigError, match=r'^server\.workers: expected a number of '
                                              r'processes \(1\.\.256\) or "auto", got '):
            parse_config(minimal(server={"workers": value}))

    def test_unknown_key(self) -> None:
        with pytest.raises(ConfigError, match=r"^server\.worker: unknown key"):
            parse_config(minimal(server={"worker": 2}))

    def test_state_section_is_parsed(self) -> None:
        config = parse_config(minimal(state={"backend": "redis",
                                             "url": "redis://:pw@10.0.0.7:6380/2"}))
        assert config.state.backend == "redis"
        assert (config.state.target.host, config.state.target.port) == ("10.0.0.7", 6380)
        assert "pw" not in repr(config)
        assert parse_config(minimal()).state.backend == "memory"

    def test_state_errors_name_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"^state\.backend: "):
            parse_config(minimal(state={"backend": "etcd"}))


class TestPerProcessLimitsWarning:
    def test_no_warning_with_one_worker(self) -> None:
        assert config_warnings(parse_config(minimal(policy={"rules": [RULE]}))) == []

    def test_no_warning_with_shared_state(self) -> None:
        config = parse_config(minimal(server={"workers": 2}, state={"backend": "redis"},
                                      policy={"rules": [RULE]}))
        assert config_warnings(config) == []

    def test_workers_with_memory_state_warn_naming_what_is_per_process(self) -> None:
        config = parse_config(minimal(server={"workers": 3}, policy={"rules": [RULE]}))
        (warning,) = config_warnings(config)
        assert "server.workers = 3" in warning
        assert "retr-per-user (per user)" in warning
        assert "max_sessions_per_user = 10" in warning
        assert "login_failures_per_ip = 20" in warning
        assert 'backend = "redis"' in warning

    def test_check_config_warns_on_stderr_and_exits_0(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = tmp_path / "p.toml"
        path.write_text('[upstream]\naddress = "127.0.0.1:110"\n[server]\nworkers = 2\n'
                        '[[policy.rules]]\nname = "retr-per-user"\naction = "rate_limit"\n'
                        'limit = "5/minute"\nper = "client_ip"\nmatch = { commands = ["RETR"] }\n')
        assert main(["check-config", str(path)]) == 0
        out, err = capsys.readouterr()
        assert out == f"{path}: OK\n"
        (line,) = err.splitlines()
        assert line.startswith("popproxy: warning: server.workers = 2 (2 processes) with "
                               '[state] backend = "memory": the rate-limit rules '
                               "retr-per-user (per client_ip) and the built-in caps")

    def test_check_config_says_nothing_more_for_one_worker(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = tmp_path / "p.toml"
        path.write_text('[upstream]\naddress = "127.0.0.1:110"\n')
        assert main(["check-config", str(path)]) == 0
        assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------
# Restart backoff
# --------------------------------------------------------------------------


class TestBackoff:
    def test_doubles_while_the_worker_dies_young_up_to_the_cap(self) -> None:
        backoff = Backoff(first=0.5, cap=30.0, healthy_after=30.0)
        assert [backoff.next(1.0) for _ in range(9)] == [
            0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]

    def test_a_worker_that_ran_long_enough_is_restarted_quickly_again(self) -> None:
        backoff = Backoff(first=0.5, cap=30.0, healthy_after=30.0)
        for _ in range(5):
            backoff.next(0.1)
        assert backoff.next(30.0) == 0.5
        assert backoff.next(0.2) == 1.0

    def test_no_overflow_after_very_many_failures(self) -> None:
        backoff = Backoff(first=0.5, cap=30.0)
        for _ in range(5000):
            delay = backoff.next(0.0)
        assert delay == 30.0


# --------------------------------------------------------------------------
# The channel
# --------------------------------------------------------------------------


class FakeSocket:
    """recv() hands out ``chunks`` in order (a None chunk: a timeout), then EOF."""

    def __init__(self, chunks: list[bytes | None]) -> None:
        self.chunks = list(chunks)
        self.sent = b""

    def settimeout(self, timeout: float | None) -> None:
        pass

    def recv(self, size: int) -> bytes:
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if chunk is None:
            raise TimeoutError("timed out")
        return chunk

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        pass


def framed(*messages: dict[str, Any]) -> bytes:
    sink = FakeSocket([])
    channel = Channel(sink)  # type: ignore[arg-type]
    for m in messages:
        channel.send(m)
    return sink.sent


messages_st = st.lists(
    st.fixed_dictionaries({"id": st.integers(0, 2**31), "op": st.sampled_from(["scrape", "x"]),
                           "text": st.text(max_size=300)}),
    min_size=1, max_size=8,
)


class TestChannel:
    @given(messages_st, st.lists(st.integers(1, 400), max_size=40))
    def test_frames_come_out_whole_however_the_bytes_are_split(
        self, messages: list[dict[str, Any]], cuts: list[int]
    ) -> None:
        data = framed(*messages)
        chunks: list[bytes | None] = []
        pos = 0
        for cut in cuts:
            if pos >= len(data):
                break
            chunks.append(data[pos:pos + cut])
            pos += cut
        chunks.append(data[pos:])
        channel = Channel(FakeSocket([c for c in chunks if c]))  # type: ignore[arg-type]
        assert [channel.receive() for _ in messages] == messages
        with pytest.raises(ChannelClosed):
            channel.receive()

    def test_a_timeout_mid_frame_keeps_the_part_received(self) -> None:
        data = framed({"id": 1, "answer": "x" * 1000})
        channel = Channel(FakeSocket([data[:10], None, data[10:]]))  # type: ignore[arg-type]
        with pytest.raises(TimeoutError):
            channel.receive()
        assert channel.receive() == {"id": 1, "answer": "x" * 1000}

    def test_late_answers_to_earlier_requests_are_skipped(self) -> None:
        data = framed({"id": 1, "late": True}, {"id": 2, "late": False})
        channel = Channel(FakeSocket([data]))  # type: ignore[arg-type]
        assert channel.answer_to(2, time.monotonic() + 5) == {"id": 2, "late": False}

    def test_an_absurd_frame_length_closes_rather_than_buffers(self) -> None:
        channel = Channel(FakeSocket([b"\xff\xff\xff\xff" + b"x" * 100]))  # type: ignore[arg-type]
        with pytest.raises(ChannelClosed, match="broken"):
            channel.receive()

    def test_a_frame_that_is_not_an_object_is_refused(self) -> None:
        channel = Channel(FakeSocket([b"\x00\x00\x00\x02[]"]))  # type: ignore[arg-type]
        with pytest.raises(ChannelClosed, match="not a frame"):
            channel.receive()

    def test_deadline_is_kept(self) -> None:
        a, b = socket.socketpair()
        with a, b:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                Channel(a).receive(started + 0.2)
            assert 0.15 < time.monotonic() - started < 2.0


@pytest.fixture
def answering() -> Iterator[tuple[Channel, Channel, socket.socket]]:
    """Three supervisor-side channels: one to a worker-side thread that
    answers, one to a silent peer, one whose peer is closed."""
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    a3, b3 = socket.socketpair()
    b3.close()

    def worker() -> None:
        channel = Channel(b1)
        while True:
            try:
                request = channel.receive()
            except OSError:
                return
            channel.send({"id": request["id"], "op": request["op"], "pid": 42})

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        yield Channel(a1), Channel(a2), b2
    finally:
        for s in (a1, a2, a3, b2):
            s.close()
        thread.join(5)


class TestAskAll:
    def test_answers_in_order_none_for_silent_or_closed_peers(
        self, answering: tuple[Channel, Channel, socket.socket]
    ) -> None:
        good, silent, _ = answering
        closed_a, closed_b = socket.socketpair()
        closed_b.close()
        closed = Channel(closed_a)
        started = time.monotonic()
        answers = ask_all([silent, good, closed], "health", 0.5)
        elapsed = time.monotonic() - started
        closed_a.close()
        assert answers[0] is None
        assert answers[1] == {"id": 1, "op": "health", "pid": 42}
        assert answers[2] is None
        assert elapsed < 3.0  # bounded by the timeout, not the silent peer

    def test_a_late_answer_does_not_answer_the_next_request(
        self, answering: tuple[Channel, Channel, socket.socket]
    ) -> None:
        _, silent, peer = answering
        assert ask_all([silent], "scrape", 0.2) == [None]
        peer_channel = Channel(peer)
        first = peer_channel.receive(time.monotonic() + 5)
        peer_channel.send({"id": first["id"], "late": True})  # the answer comes late
        second_asked = threading.Thread(
            target=lambda: peer_channel.send(
                {"id": peer_channel.receive(time.monotonic() + 5)["id"], "late": False}),
            daemon=True)
        second_asked.start()
        assert ask_all([silent], "scrape", 5.0) == [{"id": 2, "late": False}]
        second_asked.join(5)


# --------------------------------------------------------------------------
# One view of many workers' metrics
# --------------------------------------------------------------------------


def worker_registry(sessions: int, active: int, latency: list[float],
                    reloads: int = 0) -> list[Metric]:
    r = CollectorRegistry()
    c = Counter("popproxy_sessions", "ended", ["outcome"], registry=r)
    c.labels("ok").inc(sessions)
    c.labels("refused")
    Gauge("popproxy_sessions_active", "open", registry=r).set(active)
    h = Histogram("popproxy_session_duration_seconds", "d", buckets=(0.1, 1.0), registry=r)
    for v in latency:
        h.observe(v)
    Gauge("popproxy_config_last_reload_success_timestamp_seconds", "t", registry=r).set(
        1000 + reloads)
    Counter("popproxy_config_reload", "r", ["outcome"], registry=r).labels("ok").inc(reloads)
    return from_wire(json.loads(json.dumps(to_wire(r.collect()))))


def value(families: list[Metric], sample: str, **labels: str) -> float:
    for m in families:
        for s in m.samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
    raise KeyError(sample)


class TestMerge:
    def test_counters_histograms_and_gauges_add_up(self) -> None:
        w1 = worker_registry(10, 2, [0.05, 0.5])
        w2 = worker_registry(5, 1, [5.0])
        out = merge([], [w1, w2], Retired(), WORKER_MERGE)
        assert value(out, "popproxy_sessions_total", outcome="ok") == 15
        assert value(out, "popproxy_sessions_total", outcome="refused") == 0
        assert value(out, "popproxy_sessions_active") == 3
        assert value(out, "popproxy_session_duration_seconds_bucket", le="0.1") == 1
        assert value(out, "popproxy_session_duration_seconds_bucket", le="1.0") == 2
        assert value(out, "popproxy_session_duration_seconds_bucket", le="+Inf") == 3
        assert value(out, "popproxy_session_duration_seconds_count") == 3
        assert value(out, "popproxy_session_duration_seconds_sum") == pytest.approx(5.55)

    def test_rules_max_min_and_the_supervisors_own_value(self) -> None:
        supervisor = Metrics(CollectorRegistry())
        supervisor.config_reload(False)  # rejected once, in the supervisor
        w1 = worker_registry(0, 0, [], reloads=1)
        w2 = worker_registry(0, 0, [], reloads=3)
        out = merge(supervisor.registry.collect(), [w1, w2], Retired(), WORKER_MERGE)
        # Not 4 + the supervisor's: only the supervisor decides reloads.
        assert value(out, "popproxy_config_reload_total", outcome="ok") == 0
        assert value(out, "popproxy_config_reload_total", outcome="fail") == 1
        assert value(out, "popproxy_config_last_reload_successful") == 0  # min
        assert value(out, "popproxy_config_last_reload_success_timestamp_seconds") > 1e9  # max
        assert value(out, "popproxy_build_info", version=supervisor_version()) == 1  # not 3

    def test_the_supervisors_families_come_first_in_order(self) -> None:
        supervisor = list(Metrics(CollectorRegistry()).registry.collect())
        extra = worker_registry(1, 0, [])
        extra.append(Metric("popproxy_routing_only_in_workers", "x", "gauge"))
        out = merge(supervisor, [extra], Retired(), WORKER_MERGE)
        assert [m.name for m in out][: len(supervisor)] == [m.name for m in supervisor]
        assert out[-1].name == "popproxy_routing_only_in_workers"

    def test_a_dead_workers_counts_stay_and_its_gauges_go(self) -> None:
        retired = Retired()
        before = worker_registry(10, 4, [0.5])
        retired.add(before, WORKER_MERGE)
        replacement = worker_registry(2, 1, [0.05])
        out = merge([], [replacement], retired, WORKER_MERGE)
        assert value(out, "popproxy_sessions_total", outcome="ok") == 12  # never goes down
        assert value(out, "popproxy_session_duration_seconds_count") == 2
        assert value(out, "popproxy_sessions_active") == 1  # the dead worker's are gone
        # The supervisor decides reloads: a dead worker's count is not kept either.
        assert "popproxy_config_reload" not in retired.families

    def test_wire_round_trip_keeps_nan_and_infinities(self) -> None:
        m = Metric("popproxy_x", "x", "gauge")
        m.add_sample("popproxy_x", {"a": "1"}, math.inf)
        m.add_sample("popproxy_x", {"a": "2"}, -math.inf)
        m.add_sample("popproxy_x", {"a": "3"}, math.nan)
        (back,) = from_wire(json.loads(json.dumps(to_wire([m]))))
        values = [s.value for s in back.samples]
        assert values[:2] == [math.inf, -math.inf]
        assert math.isnan(values[2])

    def test_malformed_wire_data_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="expected a list"):
            from_wire({"not": "a list"})
        with pytest.raises(ValueError, match="labels must be an object"):
            from_wire([["popproxy_x", "gauge", "x", "", [["popproxy_x", ["a"], 1]]]])


def supervisor_version() -> str:
    from popproxy import __version__

    return __version__


# --------------------------------------------------------------------------
# Health of many workers
# --------------------------------------------------------------------------


class Status:
    def __init__(self) -> None:
        self.config = Config()
        self.listening = True
        self.pools = None


class TestWorkersHealth:
    def make(self, workers: list[WorkerHealth], error: str | None = None) -> WorkersHealth:
        return WorkersHealth(Status(), lambda: workers, probe=lambda h, p, t: error)

    def test_all_well(self) -> None:
        health = self.make([WorkerHealth(1, True, True, "ok"), WorkerHealth(2, True, True, "ok")])
        assert health.alive() == (True, "ok")
        assert health.ready() == (True, "ready")

    def test_a_dead_or_stuck_worker_fails_liveness(self) -> None:
        health = self.make([WorkerHealth(1, True, True, "ok"),
                            WorkerHealth(2, False, False, "worker 2 (pid 7) does not answer")])
        assert health.alive() == (False, "worker 2 (pid 7) does not answer")
        assert health.ready() == (False, "worker 2 (pid 7) does not answer")

    def test_readiness_needs_every_worker_listening_and_the_upstream(self) -> None:
        health = self.make([WorkerHealth(1, True, True, "ok"), WorkerHealth(2, True, False, "ok")])
        assert health.alive() == (True, "ok")
        assert health.ready() == (False, "worker 2 is not listening yet")
        down = self.make([WorkerHealth(1, True, True, "ok")], error="Connection refused")
        assert down.ready() == (False, "upstream 127.0.0.1:110: Connection refused")

    def test_a_worker_whose_shared_state_fails_is_ready_but_degraded(self) -> None:
        why = "degraded: shared state (redis) failing: take: timeout"
        health = self.make([WorkerHealth(1, True, True, "ok"),
                            WorkerHealth(2, True, True, "ok", degraded=why)])
        assert health.ready() == (True, f"{why} (worker 2)")

    def test_a_stuck_supervisor_fails_liveness(self) -> None:
        now = [0.0]
        health = WorkersHealth(Status(), lambda: [], clock=lambda: now[0], stale_after=30.0)
        now[0] = 31.0
        assert health.alive() == (False, "supervisor: event loop unresponsive for 31s")


# --------------------------------------------------------------------------
# Logs and audit
# --------------------------------------------------------------------------


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    yield capsys
    structlog.reset_defaults()


def test_log_lines_of_a_worker_carry_its_number_and_pid(
    captured: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json", worker=3)
    structlog.get_logger("t").info("session.open", client="127.0.0.1:5")
    errors: list[BaseException] = []

    def from_a_thread() -> None:
        try:
            structlog.get_logger("t").info("from.thread")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=from_a_thread)
    thread.start()
    thread.join()
    assert errors == []
    lines = [json.loads(line) for line in captured.readouterr().out.splitlines()]
    assert [(r["event"], r["worker"], r["pid"]) for r in lines] == [
        ("session.open", 3, os.getpid()), ("from.thread", 3, os.getpid())]


def test_a_single_process_logs_no_worker_field(captured: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    structlog.get_logger("t").info("listening")
    assert "worker" not in json.loads(captured.readouterr().out)


@pytest.mark.parametrize(("name", "expected"), [
    ("audit.jsonl", "audit.w2.jsonl"),
    ("audit", "audit.w2"),
    (".audit", ".audit.w2"),
    ("trail.2026.jsonl", "trail.2026.w2.jsonl"),
])
def test_worker_audit_file_names(tmp_path: Path, name: str, expected: str) -> None:
    assert worker_path(tmp_path / name, 2) == tmp_path / expected


def test_run_with_workers_says_when_it_cannot_listen(
    tmp_path: Path, captured: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "p.toml"
        path.write_text(f'[listen]\naddress = "127.0.0.1:{port}"\n'
                        '[upstream]\naddress = "127.0.0.1:110"\n[server]\nworkers = 2\n')
        assert main(["run", "-c", str(path)]) == 1
    err = captured.readouterr().err
    assert err == f"popproxy: cannot listen on 127.0.0.1:{port}: Address already in use\n"
