"""``[[routing.rules]]`` matching: the first rule whose globs match wins."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from .config import RoutingRule

__all__ = ["RuleSet"]


class RuleSet:
    """Rules compiled once: one regex per rule, tried in config order.

    User names are matched case-insensitively (as ``mapfile`` does, and for
    the same reason: the upstream treats ``Alice`` and ``alice`` alike).
    """

    __slots__ = ("_compiled", "rules")

    def __init__(self, rules: Iterable[RoutingRule]) -> None:
        self.rules = tuple(rules)
        self._compiled: tuple[tuple[Callable[[str], object], RoutingRule], ...] = tuple(
            (re.compile("|".join(f"(?:{fnmatch.translate(g.lower())})" for g in r.users)).match,
             r)
            for r in self.rules
        )

    def match(self, user: str) -> RoutingRule | None:
        """The first rule with a glob matching ``user``, or None."""
        key = user.lower()
        for matches, rule in self._compiled:
            if matches(key):
                return rule
        return None

    def __len__(self) -> int:
        return len(self.rules)
