"""Address pools: failover order, down marks for down_time, the up/down gauge state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.addr import HostPort
from popproxy.routing import Pools

A = HostPort("10.0.1.10", 995)
B = HostPort("10.0.1.11", 995)
C = HostPort("::1", 995)
L = HostPort("10.0.0.5", 110)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pools(clock: FakeClock) -> Pools:
    return Pools({"new": [A, B, C], "legacy": [L]}, down_time=10.0, clock=clock)


def test_all_up_in_configured_order(pools: Pools) -> None:
    assert pools.candidates("new") == (A, B, C)
    assert pools.candidates("legacy") == (L,)


def test_a_down_address_is_skipped_for_down_time(pools: Pools, clock: FakeClock) -> None:
    assert pools.mark_down("new", A) is True  # a transition
    assert pools.candidates("new") == (B, C)
    assert not pools.is_up("new", A)
    clock.now += 9.999
    assert pools.candidates("new") == (B, C)
    clock.now += 0.001
    assert pools.candidates("new") == (A, B, C)
    assert pools.is_up("new", A)


def test_marking_down_again_extends_and_reports_no_transition(
    pools: Pools, clock: FakeClock
) -> None:
    pools.mark_down("new", B)
    clock.now += 5
    assert pools.mark_down("new", B) is False
    clock.now += 9
    assert pools.candidates("new") == (A, C)
    clock.now += 1
    assert pools.candidates("new") == (A, B, C)


def test_all_down_tries_the_first_anyway(pools: Pools) -> None:
    for a in (C, A, B):
        pools.mark_down("new", a)
    assert pools.candidates("new") == (A,)
    pools.mark_down("legacy", L)
    assert pools.candidates("legacy") == (L,)


def test_mark_up_clears_the_mark(pools: Pools) -> None:
    pools.mark_down("new", A)
    assert pools.mark_up("new", A) is True
    assert pools.mark_up("new", A) is False
    assert pools.candidates("new") == (A, B, C)


def test_pools_are_separate(pools: Pools) -> None:
    pools.mark_down("legacy", L)
    assert pools.candidates("new") == (A, B, C)


def test_snapshot_for_the_gauge(pools: Pools, clock: FakeClock) -> None:
    pools.mark_down("new", B)
    assert pools.snapshot() == [
        ("new", A, True), ("new", B, False), ("new", C, True), ("legacy", L, True),
    ]
    clock.now += 10  # expiry needs no event: the snapshot is computed at scrape time
    assert all(up for _, _, up in pools.snapshot())


def test_unknown_names_and_addresses(pools: Pools) -> None:
    with pytest.raises(KeyError):
        pools.candidates("nope")
    with pytest.raises(KeyError):
        pools.mark_down("legacy", A)
    with pytest.raises(ValueError, match="no address"):
        Pools({"x": []}, 10.0)


def test_reconfigure_keeps_marks_of_addresses_kept(pools: Pools, clock: FakeClock) -> None:
    pools.mark_down("new", A)
    pools.mark_down("new", B)
    pools.reconfigure({"new": [B, C, A], "other": [L]}, down_time=30.0)
    assert pools.candidates("new") == (C,)
    assert pools.candidates("other") == (L,)
    with pytest.raises(KeyError):
        pools.candidates("legacy")
    pools.mark_down("other", L)
    clock.now += 10
    assert pools.candidates("new") == (B, C, A)
    assert pools.candidates("other") == (L,)  # all down: the first anyway
    assert not pools.is_up("other", L)  # the new down_time (30 s) applies to new marks
    pools.mark_down("new", A)  # a fresh mark, for 30 s
    pools.reconfigure({"new": [C]}, down_time=30.0)
    pools.reconfigure({"new": [A, C]}, down_time=30.0)
    assert pools.is_up("new", A)  # A left the pool and came back: its old mark is gone


@given(st.lists(st.tuples(st.sampled_from(["down", "up", "tick"]), st.integers(0, 2),
                          st.floats(0, 20)), max_size=40))
def test_candidates_follow_a_simple_model(ops: list[tuple[str, int, float]]) -> None:
    clock = FakeClock()
    addrs = [A, B, C]
    pools = Pools({"new": addrs}, down_time=10.0, clock=clock)
    down_until: dict[HostPort, float] = {}
    for op, i, dt in ops:
        if op == "down":
            pools.mark_down("new", addrs[i])
            down_until[addrs[i]] = clock.now + 10.0
        elif op == "up":
            pools.mark_up("new", addrs[i])
            down_until.pop(addrs[i], None)
        else:
            clock.now += dt
        up = tuple(a for a in addrs if down_until.get(a, clock.now) <= clock.now)
        assert pools.candidates("new") == (up or (A,))
        assert [s[2] for s in pools.snapshot()] == [a in up for a in addrs]
