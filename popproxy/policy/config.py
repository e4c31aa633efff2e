"""The ``[policy]`` section and its ``[[policy.rules]]``."""

from __future__ import annotations

from dataclasses import dataclass

from ..confparse import Section, parse_choice

__all__ = ["PolicyConfig", "parse_policy"]


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    mode: str = "enforce"


def parse_policy(raw: object) -> PolicyConfig:
    s = Section(raw, "policy")
    cfg = PolicyConfig(mode=parse_choice(s.get("mode", "enforce"), s.key("mode"),
                                         ("enforce", "monitor")))
    s.finish()
    return cfg
