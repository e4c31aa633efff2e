"""``python -m popproxy.audit verify|search|keygen ...``."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
