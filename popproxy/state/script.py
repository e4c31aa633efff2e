"""The Lua script every Redis operation runs (``state.lua`` beside this file)."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Final

__all__ = ["SCRIPT", "SCRIPT_SHA"]

SCRIPT: Final = resources.files(__package__).joinpath("state.lua").read_text(encoding="utf-8")
# What EVALSHA names it by; Redis computes the same digest when it loads it.
SCRIPT_SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()
