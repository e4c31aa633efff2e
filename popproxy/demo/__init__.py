"""The built-in demo POP3 mailbox server and its sample mail.

:mod:`popproxy.demo.store` (messages, mailboxes) and :mod:`popproxy.demo.mailbox`
(an RFC 1939 server session) are the sans-IO part; :mod:`popproxy.demo.server`
is the trio shell.
Everything in ``__all__`` is the public API of this package.
"""

from __future__ import annotations

from .mailbox import CAPABILITIES as CAPABILITIES
from .mailbox import IMPLEMENTATION as IMPLEMENTATION
from .mailbox import LINE_LIMIT as LINE_LIMIT
from .mailbox import SASL_LINE_LIMIT as SASL_LINE_LIMIT
from .mailbox import DemoSession as DemoSession
from .mailbox import DemoState as DemoState
from .server import IDLE_TIMEOUT as IDLE_TIMEOUT
from .server import serve_demo as serve_demo
from .store import DEMO_USERS as DEMO_USERS
from .store import Mailbox as Mailbox
from .store import MailStore as MailStore
from .store import Message as Message
from .store import normalize_crlf as normalize_crlf

__all__ = [
    "CAPABILITIES",
    "DEMO_USERS",
    "IDLE_TIMEOUT",
    "IMPLEMENTATION",
    "LINE_LIMIT",
    "SASL_LINE_LIMIT",
    "DemoSession",
    "DemoState",
    "MailStore",
    "Mailbox",
    "Message",
    "normalize_crlf",
    "serve_demo",
]
