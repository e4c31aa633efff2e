"""popproxy: a POP3 proxy and mailbox-auditing middlebox on trio."""

__version__ = "0.1.0"

from ._compiled import install_guard as _install_guard

_install_guard()
