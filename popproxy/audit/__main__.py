"""``python -m popproxy.audit verify|search|keygen ...``."""

from __future__ import annotations

import sys

from ..exits import quiet_on_closed_pipe
from .cli import main

sys.exit(quiet_on_closed_pipe(main))
