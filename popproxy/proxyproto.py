"""Sans-IO HAProxy PROXY protocol (v1 text and v2 binary): bytes in, typed values out.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt.  A listener
behind a load balancer receives the header *before* any POP3 byte (POP3 is
server-speaks-first, so the greeting must wait for a complete, valid header);
the proxy itself may send one to its upstream to forward the client address.

No sockets, no clock: :func:`parse_header` is a pure function of the bytes
received so far, so the caller simply re-calls it with a growing buffer until
it returns a header (and how many bytes to drop) or raises.  The receiver
"MUST NOT try to guess whether the protocol header is present": bytes that can
no longer become a v1 or v2 header raise at once.  Timeouts (the spec suggests
at least 3 s) and the decision to accept headers only from trusted peers belong
to the caller.

Choices the spec leaves open, made here:

* v2 ``PROXY`` over UDP (``0x12``/``0x22``) or UNIX sockets (``0x31``/``0x32``)
  and the ``UNSPEC`` family (``0x00``) are *accepted* with ``family="UNKNOWN"``
  and no addresses (as HAProxy does: the real connection endpoints apply).
  Their address block is still length-checked and any TLVs after it parsed.
  Any other family byte is rejected, as the spec requires.
* v2 ``LOCAL`` (health checks from the proxy itself): the whole block,
  family included, is discarded as the spec says; the header has
  ``family="UNKNOWN"``, no addresses and no TLVs.
* Parsed addresses are normalised (``ipaddress`` text form: IPv6 compressed,
  lower case); v1 rejects IPv4 octets with leading zeros, IPv6 scope ids and
  ports with leading zeros, signs or spaces.
* v2 TLVs are split into ``(type, value)`` pairs but not interpreted; the
  bytes after the address block may hold at most :data:`MAX_TLV_BYTES`.
* Encoding with endpoints of different families (one IPv4, one IPv6) maps the
  IPv4 one to its IPv4-mapped IPv6 form (``::ffff:a.b.c.d``) and sends TCP6 in
  both versions, as HAProxy does, so the client address is never lost.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import TypeAlias

from .addr import HostPort

__all__ = [
    "MAX_TLV_BYTES",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "encode_v1",
    "encode_v2",
    "parse_header",
]

V1_PREFIX = b"PROXY "
# The longest v1 line, CRLF included ("PROXY UNKNOWN" + two full IPv6
# addresses and ports): a receiver may reject anything longer.
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, ver_cmd, fam, 2-byte length
# Bound on the v2 bytes following the address block (TLVs).  The wire format
# allows 65535; real senders (AWS, GCP, HAProxy with SSL TLVs) stay far below.
MAX_TLV_BYTES = 4096

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
# fam byte -> (family name, address block length).  Only TCP over IPv4/IPv6
# yields addresses; the others are accepted as "UNKNOWN" (see module doc).
_V2_FAMILIES: dict[int, tuple[str, int]] = {
    0x00: ("UNKNOWN", 0),  # UNSPEC
    0x11: ("TCP4", 12),
    0x12: ("UNKNOWN", 12),  # UDP over IPv4
    0x21: ("TCP6", 36),
    0x22: ("UNKNOWN", 36),  # UDP over IPv6
    0x31: ("UNKNOWN", 216),  # UNIX stream
    0x32: ("UNKNOWN", 216),  # UNIX datagram
}
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")

Address: TypeAlias = tuple[str, int]


class ProxyProtocolError(ValueError):
    """The bytes are not (or can no longer become) a valid PROXY header.

    The message names the rule that was broken and quotes at most a few
    bytes of input, so it is safe to log.
    """


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed (or to-be-sent) PROXY protocol header.

    ``version`` is 1 or 2; ``command`` is ``"PROXY"`` or ``"LOCAL"`` (v2
    only); ``family`` is ``"TCP4"``, ``"TCP6"`` or ``"UNKNOWN"``.  ``source``
    and ``destination`` are ``(address, port)`` for TCP4/TCP6 and ``None``
    otherwise.  ``tlvs`` are the v2 ``(type, value)`` extensions in wire order.
    """

    version: int
    command: str
    family: str
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def client(self) -> str | None:
        """The source as ``"addr:port"`` (``"[v6]:port"`` for IPv6), or None.

        An IPv4-mapped IPv6 source (a dual-stack load balancer's IPv4
        client) is written in its IPv4 form (see ``addr``).
        """
        if self.source is None:
            return None
        return str(HostPort.of(*self.source))


def _snippet(data: bytes) -> str:
    """At most 8 bytes of input, for error messages."""
    return repr(data[:8]) + ("..." if len(data) > 8 else "")


def parse_header(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY header at the start of ``data``.

    Returns ``(header, consumed)`` once the header is complete — the bytes
    after ``data[:consumed]`` belong to the proxied protocol and are not
    looked at — or ``None`` if ``data`` is a valid prefix that needs more
    bytes.  Raises :class:`ProxyProtocolError` as soon as ``data`` cannot be
    (the beginning of) a valid v1 or v2 header.
    """
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    if data[:1] == V1_PREFIX[:1]:
        return _parse_v1(data)
    if not data:
        return None
    raise ProxyProtocolError(f"no PROXY protocol header: data starts with {_snippet(data)}")


# -- v1 ---------------------------------------------------------------------


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyProtocolError(f"no PROXY protocol header: data starts with {_snippet(data)}")
    if len(data) < len(V1_PREFIX):
        return None
    lf = data.find(b"\n", 0, V1_MAX_LENGTH)
    if lf < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(
                f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes without CRLF"
            )
        return None
    if data[lf - 1 : lf] != b"\r":
        raise ProxyProtocolError("PROXY v1 line ends with a bare LF, not CRLF")
    line = data[: lf - 1]
    consumed = lf + 1
    if b"\r" in line:
        raise ProxyProtocolError("PROXY v1 line contains a bare CR")
    # The spec: "PROXY UNKNOWN" may be followed by anything up to the CRLF,
    # which the receiver must ignore.
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None), consumed
    parts = line.split(b" ")
    if len(parts) != 6:
        raise ProxyProtocolError(
            "PROXY v1 line must be 'PROXY TCP4|TCP6 src dst sport dport' "
            f"with single spaces, got {len(parts)} fields"
        )
    _, proto, src, dst, sport, dport = parts
    if proto == b"TCP4":
        family, version = "TCP4", 4
    elif proto == b"TCP6":
        family, version = "TCP6", 6
    else:
        raise ProxyProtocolError(f"PROXY v1 unknown protocol {_snippet(proto)}")
    source = (_v1_address(src, version, "source"), _v1_port(sport, "source"))
    destination = (_v1_address(dst, version, "destination"), _v1_port(dport, "destination"))
    return ProxyHeader(1, "PROXY", family, source, destination), consumed


def _v1_address(raw: bytes, version: int, which: str) -> str:
    try:
        text = raw.decode("ascii")
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
        )
    except ValueError:
        raise ProxyProtocolError(
            f"PROXY v1 {which} is not an IPv{version} address: {_snippet(raw)}"
        ) from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise ProxyProtocolError(f"PROXY v1 {which} address has a scope id")
    return str(addr)


def _v1_port(raw: bytes, which: str) -> int:
    text = raw.decode("ascii", "replace")
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyProtocolError(
            f"PROXY v1 {which} port is not a decimal in 0..65535: {_snippet(raw)}"
        )
    return int(text)


# -- v2 ---------------------------------------------------------------------


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    sig = V2_SIGNATURE
    if data[: len(sig)] != sig[: len(data)]:
        raise ProxyProtocolError(f"no PROXY protocol header: data starts with {_snippet(data)}")
    if len(data) < len(sig) + 1:
        return None
    ver_cmd = data[12]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header has version {ver_cmd >> 4}, expected 2")
    command = ver_cmd & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"PROXY v2 unknown command 0x{command:x}")
    if len(data) < _V2_FIXED:
        # Reject a bad family byte early too, rather than waiting for the length.
        if len(data) > 13 and command == _CMD_PROXY and data[13] not in _V2_FAMILIES:
            raise ProxyProtocolError(f"PROXY v2 unknown address family 0x{data[13]:02x}")
        return None
    fam = data[13]
    (length,) = struct.unpack_from("!H", data, 14)
    if command == _CMD_PROXY:
        if fam not in _V2_FAMILIES:
            raise ProxyProtocolError(f"PROXY v2 unknown address family 0x{fam:02x}")
        family, addr_len = _V2_FAMILIES[fam]
    else:
        family, addr_len = "UNKNOWN", _V2_FAMILIES.get(fam, ("", 0))[1]
    if length > addr_len + MAX_TLV_BYTES:
        raise ProxyProtocolError(
            f"PROXY v2 length {length} exceeds the limit of {addr_len + MAX_TLV_BYTES}"
        )
    consumed = _V2_FIXED + length
    if len(data) < consumed:
        return None
    if command == _CMD_LOCAL:
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), consumed
    if length < addr_len:
        raise ProxyProtocolError(
            f"PROXY v2 address block is {length} bytes, family 0x{fam:02x} needs {addr_len}"
        )
    block = data[_V2_FIXED:consumed]
    source: Address | None = None
    destination: Address | None = None
    if family == "TCP4":
        src4, dst4, sport, dport = struct.unpack_from("!4s4sHH", block)
        source = (str(ipaddress.IPv4Address(src4)), sport)
        destination = (str(ipaddress.IPv4Address(dst4)), dport)
    elif family == "TCP6":
        src6, dst6, sport, dport = struct.unpack_from("!16s16sHH", block)
        source = (str(ipaddress.IPv6Address(src6)), sport)
        destination = (str(ipaddress.IPv6Address(dst6)), dport)
    tlvs = _parse_tlvs(block[addr_len:])
    return ProxyHeader(2, "PROXY", family, source, destination, tlvs), consumed


def _parse_tlvs(raw: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < 3:
            raise ProxyProtocolError(
                f"PROXY v2 TLV header at offset {pos} is cut off by the header length"
            )
        kind, size = struct.unpack_from("!BH", raw, pos)
        end = pos + 3 + size
        if end > len(raw):
            raise ProxyProtocolError(
                f"PROXY v2 TLV 0x{kind:02x} of {size} bytes overruns the header length"
            )
        tlvs.append((kind, raw[pos + 3 : end]))
        pos = end
    return tuple(tlvs)


# -- encoding ---------------------------------------------------------------

_IP: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def _endpoints(source: Address, destination: Address) -> tuple[_IP, int, _IP, int]:
    """Validate and normalise both endpoints to the same IP version."""
    addrs: list[_IP] = []
    ports: list[int] = []
    for which, (host, port) in (("source", source), ("destination", destination)):
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{which} {host!r} is not an IP address") from None
        if isinstance(addr, ipaddress.IPv6Address):
            addr = ipaddress.IPv6Address(addr.packed)  # drop any %scope
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"{which} port {port!r} is not in 0..65535")
        addrs.append(addr)
        ports.append(port)
    src, dst = addrs
    if src.version != dst.version:
        src, dst = (
            a if isinstance(a, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{a}")
            for a in (src, dst)
        )
    return src, ports[0], dst, ports[1]


def encode_v1(source: Address, destination: Address) -> bytes:
    """A v1 ``PROXY TCP4|TCP6 src dst sport dport\\r\\n`` line (at most 107 bytes).

    Addresses must be IP literals (ValueError otherwise); mixed families are
    sent as TCP6 with the IPv4 endpoint IPv4-mapped.
    """
    src, sport, dst, dport = _endpoints(source, destination)
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def encode_v2(
    source: Address,
    destination: Address,
    *,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 binary ``PROXY`` header over TCP, with optional ``(type, value)`` TLVs.

    Raises ValueError for non-IP addresses, ports outside 0..65535, TLV types
    outside 0..255 or a header longer than the 16-bit length field allows.
    Mixed families are sent as TCP6 with the IPv4 endpoint IPv4-mapped.
    """
    src, sport, dst, dport = _endpoints(source, destination)
    fam = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    parts = [body]
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV type {kind!r} is not in 0..255")
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV 0x{kind:02x} value is longer than 65535 bytes")
        parts.append(struct.pack("!BH", kind, len(value)) + bytes(value))
    payload = b"".join(parts)
    if len(payload) > 0xFFFF:
        raise ValueError("PROXY v2 header is longer than 65535 bytes")
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _CMD_PROXY, fam, len(payload)) + payload
