"""The pure part of ``benchmarks.breakdown``: folded stacks into categories."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks._stacks import (
    CATEGORIES,
    KERNEL,
    OTHER,
    RUN_LOOP,
    SAMPLED,
    Breakdown,
    Categorizer,
    Frame,
    allocate,
    parse_folded,
    parse_frame,
    shares,
)
from benchmarks.breakdown import _source_line_reader, event_class_names

ROOT = ("_run_module_as_main (<frozen runpy>:198);_run_code (<frozen runpy>:88);"
        "<module> (popproxy/__main__.py:7);main (popproxy/cli.py:84);"
        "run (trio/_core/_run.py:2532);unrolled_run (trio/_core/_run.py:2866)")
PUMP = ROOT + ";Relay.pump_upstream (popproxy/relay.py:141);Relay._pump (popproxy/relay.py:163)"
EMIT = (PUMP + ";Relay.process (popproxy/relay.py:179);Relay.deliver (popproxy/relay.py:256)"
        ";Proxy._emit (popproxy/server.py:142);Dispatcher.emit (popproxy/observe.py:115)")
SESSION = (PUMP + ";Relay.process (popproxy/relay.py:172);Relay.feed (popproxy/relay.py:348)"
           ";Session.receive_upstream (popproxy/session.py:165)")

SOURCE = {
    ("popproxy/session.py", 656): "        event = Response(p.command, ok, code, text, octets)",
    ("popproxy/session.py", 398): "            p = Pending(cmd, now, reply)",
}


def categorizer() -> Categorizer:
    return Categorizer(frozenset({"Event", "Response", "CommandSent"}),
                       lambda file, line: SOURCE.get((file, line), ""))


def category(folded_stack: str) -> str:
    (stack,) = parse_folded(folded_stack + " 1")
    return categorizer().category(stack)[0]


@pytest.mark.parametrize(("stack", "expected"), [
    # trio's run loop with no task frame below it
    (ROOT, "trio"),
    # trio called from sockio.py, and sockio.py itself: trio I/O
    (PUMP + ";receive (popproxy/sockio.py:53);wait_readable (trio/_core/_generated_io_epoll.py:45)"
     ";EpollIOManager._epoll_wait (trio/_core/_io_epoll.py:309)", "trio"),
    (PUMP + ";send_all (popproxy/sockio.py:79)", "trio"),
    (PUMP + ";_LockImpl.acquire_nowait (trio/_sync.py:589)", "trio"),
    (ROOT + ";wait_task_rescheduled (trio/_core/_traps.py:216);Value.unwrap (outcome/_impl.py:180)",
     "trio"),
    (ROOT + ";__eq__ (<attrs generated methods trio._core._traps.WaitTaskRescheduled>:5)",
     "trio"),
    # the relay's own code
    (PUMP, "shell"),
    (PUMP + ";connect (popproxy/upstream.py:90)", "shell"),
    # framing and parsing below the session
    (SESSION + ";Session._read_upstream (popproxy/session.py:185)"
     ";ResponseReader.next_event (popproxy/pop3/_reader.py:113)"
     ";parse_status (popproxy/pop3/_response.py:55)", "framing"),
    (SESSION, "session"),
    (SESSION + ";CommandInput.parse (popproxy/session_state.py:176)", "session"),
    (SESSION + ";RoutedSession._step (popproxy/routed.py:110)", "session"),
    (SESSION + ";Front.answer (popproxy/front.py:79)", "session"),
    (SESSION + ";PolicyDesk.decide (popproxy/session_policy.py:45)"
     ";Engine.decide (popproxy/policy/engine.py:200)", "policy"),
    # a standard-library leaf passes to its caller
    (SESSION + ";PolicyDesk.decide (popproxy/session_policy.py:45)"
     ";Engine.decide (popproxy/policy/engine.py:200);isinstance_hook (abc.py:119)", "policy"),
    # emitting: the shell's emit function, the dispatcher, an event's own code
    (EMIT[: EMIT.index(";Dispatcher")], "events"),
    (EMIT, "events"),
    (EMIT + ";EndReason.outcome (popproxy/events.py:110)", "events"),
    # a generated __init__ is the event's when its caller's line names an event
    (SESSION + ";Session._respond (popproxy/session.py:656)"
     ";__create_fn__.<locals>.__init__ (<string>:3)", "events"),
    (SESSION + ";Session._dispatch (popproxy/session.py:398)"
     ";__create_fn__.<locals>.__init__ (<string>:3)", "session"),
    (SESSION + ";Session._dispatch (popproxy/session.py:1)"
     ";__create_fn__.<locals>.__init__ (<string>:3)", "session"),
    # observers below the dispatcher
    (EMIT + ";Metrics.observe (popproxy/metrics.py:300)"
     ";Counter.inc (prometheus_client/metrics.py:310)", "metrics"),
    (EMIT + ";Metrics.observe (popproxy/metrics.py:300)"
     ";Counter.inc (prometheus_client/metrics.py:310);__enter__ (threading.py:270)", "metrics"),
    (EMIT + ";AuditTrail.observe (popproxy/audit/_trail.py:227)"
     ";RecordBuilder._base (popproxy/audit/_records.py:183)", "audit"),
    (EMIT + ";AuditTrail.observe (popproxy/audit/_trail.py:227)"
     ";canonical (popproxy/audit/_chain.py:81);dumps (json/__init__.py:238)", "audit"),
    # structlog: the audit's when the audit called it, else the logs'
    (ROOT + ";AuditTrail.write_behind (popproxy/audit/_trail.py:315)"
     ";AuditTrail._flush (popproxy/audit/_trail.py:276)"
     ";meth (structlog/_native.py:172);BoundLoggerBase._process_event (structlog/_base.py:174)",
     "audit"),
    (ROOT + ";AuditTrail._flush (popproxy/audit/_trail.py:276);meth (structlog/_native.py:172)"
     ";_Render.__call__ (popproxy/audit/_trail.py:129)", "audit"),
    (EMIT + ";_closed (popproxy/logs.py:85);meth (structlog/_native.py:172)"
     ";JSONRenderer.__call__ (structlog/processors.py:300);dumps (json/__init__.py:238)",
     "logging"),
    (EMIT + ";_closed (popproxy/logs.py:85)", "logging"),
    (ROOT + ";Proxy.handle (popproxy/server.py:150)"
     ";unbind_contextvars (structlog/contextvars.py:120)", "logging"),
    # everything else
    (ROOT + ";Router.pick (popproxy/routing/router.py:40)", OTHER),
    (ROOT + ";Connection.request (httpcore/_sync/connection.py:70)", OTHER),
    ("_run_module_as_main (<frozen runpy>:198);Thread.run (threading.py:982)", OTHER),
    # full paths as py-spy writes them with --full-filenames
    ("run (/usr/lib/python3/site-packages/trio/_core/_run.py:2532)", "trio"),
    ("Session._flush (/work/tree/popproxy/session.py:454)", "session"),
])
def test_category(stack: str, expected: str) -> None:
    assert category(stack) == expected


def test_the_deciding_frame_is_named() -> None:
    (stack,) = parse_folded(SESSION + ";Session._respond (popproxy/session.py:656)"
                            ";__create_fn__.<locals>.__init__ (<string>:3) 1")
    cat, frame = categorizer().category(stack)
    assert cat == "events"
    assert frame is not None
    assert frame.name.startswith("Response.__init__")
    (stack,) = parse_folded("_run_code (<frozen runpy>:88) 1")
    assert categorizer().category(stack) == (OTHER, None)


def test_without_event_names_a_generated_init_is_its_callers() -> None:
    (stack,) = parse_folded(SESSION + ";Session._respond (popproxy/session.py:656)"
                            ";__create_fn__.<locals>.__init__ (<string>:3) 1")
    assert Categorizer().category(stack)[0] == "session"


def test_parse_frame() -> None:
    assert parse_frame("Relay._pump (popproxy/relay.py:163)") == Frame(
        "Relay._pump", "popproxy/relay.py", 163)
    assert parse_frame("_run_code (<frozen runpy>:88)") == Frame("_run_code", "<frozen runpy>", 88)
    assert parse_frame("meth (structlog/_native.py)") == Frame("meth", "structlog/_native.py")
    assert parse_frame("0x7f13742a3f16") == Frame("0x7f13742a3f16", "")
    assert parse_frame("<lambda> (popproxy/x.py:0)") == Frame("<lambda>", "popproxy/x.py", 0)


def test_parse_folded_sums_and_skips_junk() -> None:
    text = "\n".join([
        "a (popproxy/relay.py:1);b (trio/_core/_run.py:2) 3",
        "a (popproxy/relay.py:1);b (trio/_core/_run.py:2) 4",
        "not a sample line",
        "a (popproxy/relay.py:1) x",
        "",
        "a (popproxy/relay.py:1) 2",
    ])
    stacks = parse_folded(text)
    assert sum(stacks.values()) == 9
    assert stacks[(Frame("a", "popproxy/relay.py", 1), Frame("b", "trio/_core/_run.py", 2))] == 7


def test_shares_add_up_to_100_percent_and_allocate_to_the_cpu() -> None:
    text = "\n".join([
        ROOT + " 30",
        SESSION + " 20",
        EMIT + ";Metrics.observe (popproxy/metrics.py:300) 10",
        EMIT + ";_closed (popproxy/logs.py:85) 5",
        "_run_code (<frozen runpy>:88) 5",
    ])
    b = Breakdown.of(parse_folded(text), categorizer())
    assert b.total == 70
    assert b.samples == Counter({"trio": 30, "session": 20, "metrics": 10, "logging": 5,
                                 OTHER: 5})
    share = shares(b.samples)
    assert set(share) == set(SAMPLED)
    assert math.isclose(sum(share.values()), 1.0)
    assert math.isclose(sum(100 * v for v in share.values()), 100.0)
    assert share["trio"] == pytest.approx(30 / 70)
    assert KERNEL not in share  # measured, not sampled
    assert share["policy"] == 0.0
    us = allocate(share, user=140.0, system=20.0)
    assert list(us) == [key for key, _ in CATEGORIES]
    assert math.isclose(sum(us.values()), 160.0)
    assert us[KERNEL] == 20.0
    assert us["trio"] == pytest.approx(60.0)
    assert b.frames[("trio", "unrolled_run (trio/_core/_run.py)")] == 30


def test_trio_time_is_told_by_the_popproxy_frame_it_ran_for() -> None:
    text = "\n".join([
        ROOT + " 7",
        PUMP + ";receive (popproxy/sockio.py:53);wait_readable (trio/_core/_io_epoll.py:45) 5",
        PUMP + ";send_all (popproxy/sockio.py:79) 2",
        ROOT + ";Proxy.handle (popproxy/server.py:150);__enter__ (trio/_core/_run.py:500) 3",
        SESSION + " 4",
    ])
    b = Breakdown.of(parse_folded(text), categorizer())
    assert b.trio_for == Counter({RUN_LOOP: 7, "Relay._pump (popproxy/relay.py)": 7,
                                  "Proxy.handle (popproxy/server.py)": 3})
    assert sum(b.trio_for.values()) == b.samples["trio"]


def test_shares_of_nothing_and_of_unknown_categories() -> None:
    assert set(shares({}).values()) == {0.0}
    with pytest.raises(ValueError, match="unknown"):
        shares({"trio": 1, "bogus": 2})


FRAMES = [
    "unrolled_run (trio/_core/_run.py:2866)", "Relay._pump (popproxy/relay.py:163)",
    "parse_command (popproxy/pop3/_command.py:86)", "meth (structlog/_native.py:172)",
    "_flush (popproxy/audit/_trail.py:276)", "inc (prometheus_client/metrics.py:310)",
    "__init__ (<string>:3)", "dumps (json/__init__.py:238)", "x (popproxy/routing/r.py:1)",
    "emit (popproxy/observe.py:115)", "_emit (popproxy/server.py:142)",
]


@given(st.lists(st.tuples(st.lists(st.sampled_from(FRAMES), min_size=1, max_size=8),
                          st.integers(1, 1000)), max_size=30))
def test_any_folded_text_categorizes_every_sample(samples: list[tuple[list[str], int]]) -> None:
    text = "\n".join(";".join(stack) + f" {count}" for stack, count in samples)
    stacks = parse_folded(text)
    assert sum(stacks.values()) == sum(count for _, count in samples)
    b = Breakdown.of(stacks, categorizer())
    assert b.total == sum(count for _, count in samples)
    assert set(b.samples) <= set(SAMPLED)
    share = shares(b.samples)
    assert math.isclose(sum(share.values()), 1.0) if samples else sum(share.values()) == 0
    us = allocate(share, 100.0, 25.0)
    assert math.isclose(sum(us.values()), 125.0 if samples else 25.0)


def test_event_class_names_come_from_popproxy_events() -> None:
    names = event_class_names()
    assert "Event" in names
    assert len(names) > 5


def test_source_line_reader(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("one\n    two = Response(x)\n")
    read = _source_line_reader(tmp_path)
    assert read("pkg/m.py", 2) == "    two = Response(x)"
    assert read(str(tmp_path / "pkg" / "m.py"), 1) == "one"
    assert read("pkg/m.py", 3) == ""
    assert read("pkg/m.py", 0) == ""
    assert read("pkg/missing.py", 1) == ""
