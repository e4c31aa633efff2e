"""Network endpoints: the one ``host:port`` type, its parsing and formatting.

Every address popproxy reads (configuration, a socket's peer, a PROXY
protocol header) or writes (audit ``client``, logs, XCLIENT, metrics
labels) goes through here, so that the same client is spelled the same
way everywhere and in every Python version:

- IPv6 literals are bracketed (``[2001:db8::1]:110``);
- an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a dual-stack load
  balancer or listener reports for an IPv4 client) is written in its IPv4
  form, ``192.0.2.1``.  Python 3.13 changed ``str()`` of such addresses
  (``::ffff:192.0.2.1`` where 3.11 writes ``::ffff:c000:201``); normalizing
  them makes what the proxy records and decides independent of that, and
  lets a policy rule for ``192.0.2.0/24`` match the client.

No I/O, no name resolution: host names pass through as they are.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "HostPort",
    "host_of",
    "normalize_host",
    "parse_hostport",
    "split_hostport",
]


@lru_cache(maxsize=4096)
def normalize_host(host: str) -> str:
    """An address literal in canonical form (IPv4-mapped IPv6 as IPv4);
    anything else (a host name) unchanged, brackets removed."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return bare
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        if ip.scope_id:
            return bare  # keep the zone a link-local peer came with
    return str(ip)


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (address literal or name) and a port.

    ``str()`` gives ``host:port``, with IPv6 literals in brackets.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def of(cls, host: str, port: int) -> HostPort:
        """An endpoint as a socket or a PROXY header reported it, normalized."""
        return cls(normalize_host(host), port)


def parse_hostport(text: str) -> HostPort:
    """``"127.0.0.1:110"``, ``"[::1]:110"`` or ``"mail.example.org:110"``.

    Strict, for configuration: raises ``ValueError`` with the reason.  The
    host is kept as written (a name is not resolved).
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError('write IPv6 addresses in brackets, as "[::1]:110"')
    if not sep or not host or not (port.isascii() and port.isdigit()) or not (
            0 <= int(port) <= 65535):
        raise ValueError(f'expected "host:port" with a port 0-65535, got {text!r}')
    return HostPort(host, int(port))


def split_hostport(text: str) -> tuple[str, int]:
    """Lenient split of a ``host:port`` this module wrote: (host, port).

    The host comes without brackets; a missing or non-numeric port is 0.
    """
    host, _, port = text.rpartition(":")
    if not host:  # no colon at all: a bare host
        host, port = text, ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port) if port.isascii() and port.isdigit() else 0


def host_of(endpoint: str | None) -> str | None:
    """The host part of a ``host:port`` string (None for None or "")."""
    if not endpoint:
        return None
    return split_hostport(endpoint)[0]
