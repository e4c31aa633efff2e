"""The load generator's pure parts: issue 16's bars and their verdicts, the
table and the tally over runs, the order of targets in a round, the
proxy's production configuration, and reading the proxy's log."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import _bars
from benchmarks._ab import Figure, render_figures, render_spread
from benchmarks._bars import Bar, Row, render_bars_over_runs, render_table
from benchmarks._procs import ProxyProcess
from benchmarks.run import (
    LABELS,
    bare_config,
    log_problems,
    metrics_address,
    production_config,
    turns,
)
from popproxy.addr import HostPort
from popproxy.config import load_config


class TestBar:
    def test_an_upper_bar_is_met_at_its_limit_and_missed_above(self) -> None:
        bar = Bar("≤ 90 µs", 90.0, upper=True)
        assert bar.judge(89.9) is True
        assert bar.judge(90.0) is True
        assert bar.judge(90.1) is False

    def test_a_lower_bar_is_met_at_its_limit_and_missed_below(self) -> None:
        bar = Bar("≥ 0.60x direct", 0.6, upper=False)
        assert bar.judge(0.61) is True
        assert bar.judge(0.6) is True
        assert bar.judge(0.59) is False

    @pytest.mark.parametrize("upper", [True, False])
    def test_a_figure_not_measured_gets_no_verdict(self, upper: bool) -> None:
        assert Bar("x", 1.0, upper).judge(math.nan) is None

    @pytest.mark.parametrize(("bar", "limit", "upper", "today"), [
        # Issue 16's bars, with the figures it measured before ("today").
        (_bars.NOOP_CPU, 90.0, True, 136.0),      # µs of proxy CPU per NOOP
        (_bars.SESSION_CPU, 1.0, True, 1.58),     # ms of proxy CPU per full session
        (_bars.NOOP_P50, 25.0, True, 57.0),       # µs of NOOP p50 over the relay's
        (_bars.PIPELINE, 3.0, True, 7.8),         # 1,000 pipelined, x direct
        (_bars.SESSION_RATE, 0.6, False, 0.40),   # sessions/s with 50 clients, x direct
        # The bars it keeps.
        (_bars.RETR, 0.9, False, 0.89),
        (_bars.RSS_STREAMING, 10.0, True, 10.5),
        (_bars.STALLS, 0.0, True, 1.0),
        (_bars.IDLE_KIB, 32.0, True, 48.0),
    ])
    def test_the_limits_issue_16_states(self, bar: Bar, limit: float, upper: bool,
                                        today: float) -> None:
        assert (bar.limit, bar.upper) == (limit, upper)
        assert bar.judge(limit) is True
        assert bar.judge(today) is False

class TestRatioAndVerdict:
    def test_ratio(self) -> None:
        assert _bars.ratio(3.0, 2.0) == 1.5

    @pytest.mark.parametrize(("value", "base"), [(1.0, 0.0), (math.nan, 1.0), (1.0, math.nan)])
    def test_ratio_without_a_base_is_nan(self, value: float, base: float) -> None:
        assert math.isnan(_bars.ratio(value, base))

    def test_verdicts(self) -> None:
        assert [_bars.verdict(x) for x in (True, False, None)] == ["met", "MISSED", "—"]
        assert Row("f", "1", "2", "2.00x", "≤ 3.00x direct", False).verdict == "MISSED"


def _row(key: str, ok: bool | None, judged: str = "", bar: str = "≤ 1") -> Row:
    return Row(f"figure {key}", "d", "p", "c", bar, ok, floor="r", vs_floor="v", key=key,
               judged=judged)


class TestTable:
    def test_without_the_relay_every_line_has_six_cells(self) -> None:
        text = render_table([_row("a", True)], "Proxy")
        lines = text.splitlines()
        assert lines[0] == "| Figure | Direct | Proxy | Proxy vs direct | Bar | Result |"
        assert lines[2] == "| figure a | d | p | c | ≤ 1 | met |"

    def test_with_the_relay_its_column_and_the_proxy_against_it(self) -> None:
        text = render_table([_row("a", False)], "Proxy", "trio-sockio relay")
        lines = text.splitlines()
        assert lines[0] == ("| Figure | Direct | Proxy | trio-sockio relay | Proxy vs direct "
                            "| Proxy vs relay | Bar | Result |")
        assert lines[2] == "| figure a | d | p | r | c | v | ≤ 1 | MISSED |"
        assert all(line.count("|") == 9 for line in lines)


class TestBarsOverRuns:
    def test_met_in_k_of_n(self) -> None:
        runs = [[_row("cpu", False, "95 µs")], [_row("cpu", True, "88 µs")],
                [_row("cpu", True, "80 µs")]]
        lines = render_bars_over_runs(runs).splitlines()
        assert lines[2] == "| ≤ 1 | figure cpu | 2 of 3 | 95 µs MISSED, 88 µs met, 80 µs met |"

    def test_a_row_missing_from_a_run_and_one_without_a_verdict(self) -> None:
        """A scenario that failed in one run, and a bar that had nothing to
        judge (NaN) in another, count in neither the met nor the judged."""
        runs = [[_row("p50", None, "—"), _row("rate", True)], [_row("rate", False)]]
        lines = render_bars_over_runs(runs).splitlines()
        assert lines[2] == "| ≤ 1 | figure p50 | 0 of 0 | — —, — |"
        assert lines[3] == "| ≤ 1 | figure rate | 1 of 2 | p met, p MISSED |"

    def test_rows_without_a_key_or_a_bar_are_left_out(self) -> None:
        runs = [[_row("", True), _row("info", None, bar="—")]]
        assert render_bars_over_runs(runs) == ""


class TestTurns:
    def test_the_proxy_and_the_relay_swap_places_every_other_round(self) -> None:
        assert [turns(["proxy", "floor"], r) for r in range(3)] == [
            ["proxy", "floor"], ["floor", "proxy"], ["proxy", "floor"]]

    def test_in_an_ab_run_the_two_proxies_stay_adjacent_and_swap(self) -> None:
        names = ["baseline", "proxy", "floor"]
        for r in range(4):
            order = turns(names, r)
            assert sorted(order) == sorted(names)
            assert abs(order.index("baseline") - order.index("proxy")) == 1
        assert turns(names, 0).index("baseline") < turns(names, 0).index("proxy")
        assert turns(names, 1).index("baseline") > turns(names, 1).index("proxy")


class TestFiguresWithTheRelay:
    def test_ratios_against_direct_and_against_the_relay(self) -> None:
        f = Figure("noop_p50", "NOOP p50 (µs)", {"direct": 50.0, "proxy": 150.0,
                                                  "floor": 100.0}, 1,
                   {"direct": [50.0, 50.0], "proxy": [150.0, 160.0], "floor": [100.0, 80.0]})
        names = ("direct", "proxy", "floor")
        lines = render_figures([f], names, LABELS).splitlines()
        assert "Proxy / trio-sockio relay" in lines[0]
        # proxy / direct 3.00x (paired 3.10x), proxy / relay 1.50x (paired (1.5 + 2) / 2).
        assert lines[2].endswith("| 3.00x | 3.10x | 1.50x | 1.75x |")
        spread = render_spread([[f], [f]], names, LABELS).splitlines()
        assert spread[2].count("1.50x") == 3  # the span and both runs

    def test_an_ab_run_compares_current_with_baseline_and_with_the_relay(self) -> None:
        f = Figure("x", "x", {"direct": 1.0, "baseline": 2.0, "proxy": 3.0, "floor": 1.5})
        labels = LABELS | {"proxy": "Current"}
        head = render_figures([f], ("direct", "baseline", "proxy", "floor"),
                              labels).splitlines()[0]
        assert "Current / Baseline" in head
        assert "Current / trio-sockio relay" in head


class TestProductionConfig:
    def test_the_proxy_runs_with_the_observers_of_production(self, tmp_path: Path) -> None:
        """The generated file, observers included, is what ``popproxy run``
        loads: the audit to a hash-chained file in the run's directory,
        synced per session, and the metrics endpoint on a free port."""
        proxy = ProxyProcess(110, tmp_path, extra_config=production_config(tmp_path),
                             log_level="info")
        proxy.config_path.write_text(proxy.config_text())
        config = load_config(proxy.config_path)
        audit = config.audit
        assert (audit.enabled, audit.sink) == (True, "file")
        assert audit.path == tmp_path / "audit.jsonl"
        assert (audit.hash_chain, audit.fsync, audit.commands) == (True, "session", "all")
        assert config.metrics.address == HostPort("127.0.0.1", 0)
        assert config.log.level == "info"

    def test_bare_has_neither(self, tmp_path: Path) -> None:
        proxy = ProxyProcess(110, tmp_path, extra_config=bare_config(tmp_path))
        proxy.config_path.write_text(proxy.config_text())
        config = load_config(proxy.config_path)
        assert not config.audit.enabled
        assert config.metrics.address is None
        assert config.log.level == "warning"

    def test_a_path_that_needs_escaping_stays_one_string(self, tmp_path: Path) -> None:
        odd = tmp_path / 'with "quotes" and \\ backslash'
        proxy = ProxyProcess(110, tmp_path, extra_config=production_config(odd))
        proxy.config_path.write_text(proxy.config_text())
        assert load_config(proxy.config_path).audit.path == odd / "audit.jsonl"


def _log(level: str, event: str, **fields: str) -> str:
    return json.dumps({"event": event, "level": level, "timestamp": "t", **fields})


class TestProxyLog:
    def test_only_what_is_above_info_or_not_a_record_is_a_problem(self) -> None:
        lines = [_log("info", "session.open"), _log("debug", "command"),
                 _log("warning", "upstream.refused"), "Traceback (most recent call last):",
                 _log("error", "audit.sink_failed"), "[1, 2]"]
        assert log_problems(lines) == [lines[2], lines[3], lines[4], lines[5]]

    def test_the_metrics_address_comes_from_its_log_record(self) -> None:
        lines = [_log("info", "listening", address="127.0.0.1:4000"),
                 _log("info", "metrics.listening", address="127.0.0.1:39123")]
        assert metrics_address(lines) == "127.0.0.1:39123"
        assert metrics_address(lines[:1]) is None
        assert metrics_address(['{"event": "metrics.listening"']) is None
