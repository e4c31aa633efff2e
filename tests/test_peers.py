"""A missing real peer skips its tests loudly, and fails them under CI=true."""

from __future__ import annotations

import pytest

from tests.peers import MissingPeer


def test_a_missing_peer_skips_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    peer = MissingPeer("REAL THING", "thing test", "apt-get install thing")
    with pytest.raises(pytest.skip.Exception, match="REAL THING NOT AVAILABLE, thing test "
                                                    "NOT run: not installed"):
        peer.unavailable("not installed")
    with pytest.raises(pytest.skip.Exception):
        peer.unavailable("not installed")
    assert peer.reasons == ["not installed"]  # said once in the banner


def test_under_ci_a_missing_peer_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    peer = MissingPeer("REAL THING", "thing test", "apt-get install thing")
    with pytest.raises(pytest.fail.Exception, match="REAL THING NOT AVAILABLE"):
        peer.unavailable("not installed")
