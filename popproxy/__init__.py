"""popproxy: a POP3 proxy and mailbox-auditing middlebox on trio."""

__version__ = "0.1.0"
