"""HAProxy PROXY protocol codec: byte strings in, headers out (no sockets)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.proxyproto import (
    MAX_TLV_BYTES,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse_header,
)

POP3 = b"USER bob\r\nPASS secret\r\n"
V4 = (("192.0.2.1", 56324), ("198.51.100.7", 110))
V6 = (("2001:db8::1", 40000), ("2001:db8:ffff::110", 995))


def v2(ver_cmd: int, fam: int, payload: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(payload)) + payload


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def parsed(data: bytes) -> tuple[ProxyHeader, int]:
    result = parse_header(data)
    assert result is not None
    return result


class TestV1:
    def test_tcp4(self) -> None:
        line = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 110\r\n"
        header, consumed = parsed(line + POP3)
        assert header == ProxyHeader(1, "PROXY", "TCP4", *V4)
        assert consumed == len(line)
        assert header.client == "192.0.2.1:56324"

    def test_tcp6_is_normalised(self) -> None:
        line = b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 2001:db8:ffff::110 40000 995\r\n"
        header, consumed = parsed(line)
        assert header == ProxyHeader(1, "PROXY", "TCP6", *V6)
        assert consumed == len(line)
        assert header.client == "[2001:db8::1]:40000"

    @pytest.mark.parametrize(
        "line",
        [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:f...f:ffff 1.2.3.4 whatever junk\r\n"],
    )
    def test_unknown_ignores_the_rest(self, line: bytes) -> None:
        header, consumed = parsed(line + POP3)
        assert header == ProxyHeader(1, "PROXY", "UNKNOWN", None, None)
        assert header.client is None
        assert consumed == len(line)

    def test_longest_line_is_accepted(self) -> None:
        """107 bytes, CRLF included, is the spec's maximum."""
        line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
        assert len(line) == V1_MAX_LENGTH
        assert parsed(line)[1] == V1_MAX_LENGTH

    def test_full_width_tcp6(self) -> None:
        a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
        line = f"PROXY TCP6 {a} {a} 65535 65535\r\n".encode()
        header, consumed = parsed(line)
        assert header.source == (a, 65535)
        assert consumed == len(line) <= V1_MAX_LENGTH

    @pytest.mark.parametrize(
        "data",
        [
            pytest.param(b"PROXY UNKNOWN " + b"x" * 100, id="overlong-no-crlf"),
            pytest.param(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", id="108-bytes"),
            pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 70000 110\r\n", id="port-70000"),
            pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 1 -1\r\n", id="port-negative"),
            pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 0110 110\r\n", id="port-zeros"),
            pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 x 110\r\n", id="port-text"),
            pytest.param(b"PROXY TCP4 192.0.2.256 198.51.100.7 1 110\r\n", id="ip-octet"),
            pytest.param(b"PROXY TCP4 192.0.2.01 198.51.100.7 1 110\r\n", id="ip-zeros"),
            pytest.param(b"PROXY TCP4 mail.example 198.51.100.7 1 110\r\n", id="hostname"),
            pytest.param(b"PROXY TCP4 2001:db8::1 198.51.100.7 1 110\r\n", id="v6-in-tcp4"),
            pytest.param(b"PROXY TCP6 192.0.2.1 2001:db8::1 1 110\r\n", id="v4-in-tcp6"),
            pytest.param(b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 110\r\n", id="scope-id"),
            pytest.param(b"PROXY TCP4 192.0.2.1  198.51.100.7 1 110\r\n", id="double-space"),
            pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 1\r\n", id="missing-port"),
            pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 1 110 \r\n", id="trailing-space"),
            pytest.param(b"PROXY UDP4 192.0.2.1 198.51.100.7 1 110\r\n", id="udp4"),
            pytest.param(b"PROXY tcp4 192.0.2.1 198.51.100.7 1 110\r\n", id="lower-case"),
            pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 1 110\n", id="bare-lf"),
            pytest.param(b"PROXY TCP4 192.0.2.1\r198.51.100.7 1 110\r\n", id="bare-cr"),
            pytest.param(b"PROXY\r\n", id="no-space"),
            pytest.param(b"PROXYTCP4", id="prefix"),
        ],
    )
    def test_malformed(self, data: bytes) -> None:
        with pytest.raises(ProxyProtocolError):
            parse_header(data)


class TestV2:
    def test_tcp4_with_tlvs(self) -> None:
        payload = (
            bytes([192, 0, 2, 1, 198, 51, 100, 7])
            + struct.pack("!HH", 56324, 110)
            + tlv(0x05, b"abc")  # UNIQUE_ID
            + tlv(0x04, b"")  # NOOP
        )
        data = v2(0x21, 0x11, payload)
        header, consumed = parsed(data + POP3)
        assert header == ProxyHeader(2, "PROXY", "TCP4", *V4, tlvs=((5, b"abc"), (4, b"")))
        assert consumed == len(data)

    def test_tcp6(self) -> None:
        header, consumed = parsed(encode_v2(*V6) + POP3)
        assert header == ProxyHeader(2, "PROXY", "TCP6", *V6)
        assert consumed == 16 + 36

    def test_local_discards_the_block(self) -> None:
        """LOCAL (health checks): the real endpoints apply; family and block ignored."""
        data = v2(0x20, 0x11, b"\x00" * 12 + tlv(1, b"h2"))
        header, consumed = parsed(data + POP3)
        assert header == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None)
        assert header.client is None
        assert consumed == len(data)

    def test_local_without_block(self) -> None:
        data = v2(0x20, 0x00, b"")
        assert parsed(data + POP3) == (ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), 16)

    def test_unspec_family_keeps_tlvs(self) -> None:
        data = v2(0x21, 0x00, tlv(0x02, b"pop.example"))
        header, consumed = parsed(data)
        assert header == ProxyHeader(2, "PROXY", "UNKNOWN", None, None, ((2, b"pop.example"),))
        assert consumed == len(data)

    @pytest.mark.parametrize(("fam", "addr_len"), [(0x12, 12), (0x22, 36), (0x31, 216)])
    def test_udp_and_unix_are_unknown(self, fam: int, addr_len: int) -> None:
        data = v2(0x21, fam, b"\x01" * addr_len + tlv(0xE0, b"x"))
        header, consumed = parsed(data + POP3)
        assert header == ProxyHeader(2, "PROXY", "UNKNOWN", None, None, ((0xE0, b"x"),))
        assert consumed == len(data)

    def test_largest_tlv_block_is_accepted(self) -> None:
        data = v2(0x21, 0x11, b"\x00" * 12 + tlv(0xEE, b"z" * (MAX_TLV_BYTES - 3)))
        header, _ = parsed(data)
        assert header.tlvs == ((0xEE, b"z" * (MAX_TLV_BYTES - 3)),)

    @pytest.mark.parametrize(
        "data",
        [
            pytest.param(v2(0x11, 0x11, b"\x00" * 12), id="version-1"),
            pytest.param(v2(0x31, 0x11, b"\x00" * 12), id="version-3"),
            pytest.param(v2(0x22, 0x11, b"\x00" * 12), id="command-2"),
            pytest.param(v2(0x2F, 0x11, b"\x00" * 12), id="command-f"),
            pytest.param(v2(0x21, 0x13, b"\x00" * 12), id="family-13"),
            pytest.param(v2(0x21, 0x41, b"\x00" * 12), id="family-41"),
            pytest.param(v2(0x21, 0x11, b"\x00" * 11), id="short-tcp4-block"),
            pytest.param(v2(0x21, 0x21, b"\x00" * 12), id="short-tcp6-block"),
            pytest.param(v2(0x21, 0x31, b"\x00" * 200), id="short-unix-block"),
            pytest.param(v2(0x21, 0x11, b"\x00" * 12 + tlv(1, b"abcd")[:-1]), id="tlv-overrun"),
            pytest.param(v2(0x21, 0x11, b"\x00" * 12 + b"\x01\x00"), id="tlv-header-cut"),
            pytest.param(
                v2(0x21, 0x11, b"\x00" * 12 + tlv(0xEE, b"z" * (MAX_TLV_BYTES - 2))),
                id="tlvs-over-bound",
            ),
        ],
    )
    def test_malformed(self, data: bytes) -> None:
        with pytest.raises(ProxyProtocolError):
            parse_header(data + POP3)

    def test_length_over_bound_fails_before_the_body_arrives(self) -> None:
        """A huge length is rejected from the 16 fixed bytes alone (no buffering)."""
        with pytest.raises(ProxyProtocolError, match="exceeds"):
            parse_header(V2_SIGNATURE + b"\x21\x11\xff\xff")

    @pytest.mark.parametrize(
        "prefix",
        [V2_SIGNATURE + b"\x11", V2_SIGNATURE + b"\x23", V2_SIGNATURE + b"\x21\x99"],
    )
    def test_bad_fixed_fields_fail_early(self, prefix: bytes) -> None:
        with pytest.raises(ProxyProtocolError):
            parse_header(prefix)


class TestNoHeader:
    @pytest.mark.parametrize(
        "data",
        [
            b"USER bob\r\n",
            b"CAPA\r\n",
            b"PROXZ",
            b"proxy TCP4 ...",
            b"\r\n\r\nUSER",
            b"\r\n\r\n\x00\r\nQUIX\n",
            b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
        ],
    )
    def test_not_a_header(self, data: bytes) -> None:
        with pytest.raises(ProxyProtocolError, match="no PROXY protocol header"):
            parse_header(data)

    def test_message_quotes_only_a_few_bytes(self) -> None:
        with pytest.raises(ProxyProtocolError) as info:
            parse_header(b"PASS hunter2-very-long-secret\r\n")
        assert "hunter2" not in str(info.value)

    def test_rejected_at_first_wrong_byte(self) -> None:
        """No guessing and no waiting: one byte that fits neither signature is enough."""
        with pytest.raises(ProxyProtocolError):
            parse_header(b"U")
        with pytest.raises(ProxyProtocolError):
            parse_header(b"\r\n\r\n\x01")

    @pytest.mark.parametrize(
        "prefix", [b"", b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 1.2.3.4", b"\r", b"\r\n\r\n\x00"]
    )
    def test_valid_prefixes_need_more(self, prefix: bytes) -> None:
        assert parse_header(prefix) is None


class TestEncode:
    @pytest.mark.parametrize("endpoints", [V4, V6], ids=["ipv4", "ipv6"])
    def test_v1_round_trip(self, endpoints: tuple[tuple[str, int], tuple[str, int]]) -> None:
        wire = encode_v1(*endpoints)
        assert len(wire) <= V1_MAX_LENGTH
        header, consumed = parsed(wire + POP3)
        assert (header.version, header.command) == (1, "PROXY")
        assert (header.source, header.destination) == endpoints
        assert consumed == len(wire)

    @pytest.mark.parametrize("endpoints", [V4, V6], ids=["ipv4", "ipv6"])
    def test_v2_round_trip(self, endpoints: tuple[tuple[str, int], tuple[str, int]]) -> None:
        tlvs = ((0x05, b"session-42"), (0xE1, b""))
        wire = encode_v2(*endpoints, tlvs=tlvs)
        header, consumed = parsed(wire + POP3)
        assert (header.version, header.command, header.tlvs) == (2, "PROXY", tlvs)
        assert (header.source, header.destination) == endpoints
        assert consumed == len(wire)

    def test_exact_bytes(self) -> None:
        assert encode_v1(*V4) == b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 110\r\n"
        assert encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2)) == (
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
            b"\x0a\x00\x00\x01\x0a\x00\x00\x02\x00\x01\x00\x02"
        )

    def test_families_pick_tcp4_or_tcp6(self) -> None:
        assert encode_v1(*V6).startswith(b"PROXY TCP6 ")
        assert encode_v2(*V4)[13] == 0x11
        assert encode_v2(*V6)[13] == 0x21

    def test_mixed_families_map_ipv4_into_ipv6(self) -> None:
        src, dst = ("192.0.2.1", 1234), ("2001:db8::1", 110)
        for wire in (encode_v1(src, dst), encode_v2(src, dst)):
            header, _ = parsed(wire)
            assert header.family == "TCP6"
            assert header.source is not None
            # The same address however this Python writes it (3.13 writes
            # "::ffff:192.0.2.1", 3.11 and 3.12 "::ffff:c000:201") ...
            assert ipaddress.ip_address(header.source[0]) == ipaddress.ip_address(
                "::ffff:192.0.2.1")
            assert header.source[1] == 1234
            assert header.destination == dst
            # ... and the client the proxy records is the IPv4 one.
            assert header.client == "192.0.2.1:1234"

    def test_scope_id_is_dropped(self) -> None:
        wire = encode_v1(("fe80::1%eth0", 1), ("fe80::2", 2))
        assert wire == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"

    @pytest.mark.parametrize(
        ("source", "destination"),
        [
            (("pop.example", 1), ("192.0.2.1", 110)),
            (("192.0.2.1", 70000), ("192.0.2.1", 110)),
            (("192.0.2.1", -1), ("192.0.2.1", 110)),
        ],
    )
    def test_bad_endpoints(self, source: tuple[str, int], destination: tuple[str, int]) -> None:
        with pytest.raises(ValueError, match="source"):
            encode_v1(source, destination)
        with pytest.raises(ValueError, match="source"):
            encode_v2(source, destination)

    def test_bad_tlvs(self) -> None:
        with pytest.raises(ValueError, match="type"):
            encode_v2(*V4, tlvs=((256, b""),))
        with pytest.raises(ValueError, match="65535"):
            encode_v2(*V4, tlvs=((1, b"x" * 0x10000),))
        with pytest.raises(ValueError, match="65535"):
            encode_v2(*V4, tlvs=((1, b"x" * 0x8000), (2, b"x" * 0x8000)))


# -- byte-at-a-time and arbitrary splits ------------------------------------

VALID_HEADERS = [
    pytest.param(encode_v1(*V4), id="v1-tcp4"),
    pytest.param(encode_v1(*V6), id="v1-tcp6"),
    pytest.param(b"PROXY UNKNOWN\r\n", id="v1-unknown"),
    pytest.param(encode_v2(*V4, tlvs=((5, b"id"),)), id="v2-tcp4"),
    pytest.param(encode_v2(*V6), id="v2-tcp6"),
    pytest.param(v2(0x20, 0x00, b""), id="v2-local"),
]


@pytest.mark.parametrize("wire", VALID_HEADERS)
def test_byte_at_a_time(wire: bytes) -> None:
    """None until the last header byte arrives; the POP3 bytes after it are not touched."""
    data = wire + POP3
    for n in range(len(wire)):
        assert parse_header(data[:n]) is None, n
    expected = parsed(wire)
    for n in range(len(wire), len(data) + 1):
        header, consumed = parsed(data[:n])
        assert (header, consumed) == expected
        assert data[consumed:n] == POP3[: n - len(wire)]


ip4 = st.ip_addresses(v=4).map(str)
ip6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)
tlv_list = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4).map(tuple)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    ip = draw(st.sampled_from([ip4, ip6]))
    src, dst = (draw(ip), draw(port)), (draw(ip), draw(port))
    family = "TCP4" if "." in src[0] and ":" not in src[0] else "TCP6"
    if draw(st.booleans()):
        return encode_v1(src, dst), ProxyHeader(1, "PROXY", family, src, dst)
    tlvs = draw(tlv_list)
    return encode_v2(src, dst, tlvs=tlvs), ProxyHeader(2, "PROXY", family, src, dst, tlvs)


@given(headers(), st.binary(max_size=64), st.data())
def test_any_split_point_gives_the_same_result(
    case: tuple[bytes, ProxyHeader], trailer: bytes, data: st.DataObject
) -> None:
    wire, expected = case
    stream = wire + trailer
    split = data.draw(st.integers(0, len(stream)), label="split")
    result = parse_header(stream[:split])
    if split < len(wire):
        assert result is None
    else:
        assert result == (expected, len(wire))
    assert parse_header(stream) == (expected, len(wire))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    """Garbage gives None, a header, or ProxyProtocolError — never another exception."""
    try:
        result = parse_header(data)
    except ProxyProtocolError:
        return
    if result is not None:
        header, consumed = result
        assert 0 < consumed <= len(data)
        assert header.version in (1, 2)


@given(st.binary(min_size=1, max_size=40))
def test_prefix_decisions_are_final(tail: bytes) -> None:
    """Once a prefix is an error, or a header, every extension of it says the same."""
    for start in (b"PROXY ", V2_SIGNATURE + b"\x21\x11\x00\x0c"):
        data = start + tail
        decided: tuple[ProxyHeader, int] | None = None
        failed = False
        for n in range(len(data) + 1):
            try:
                result = parse_header(data[:n])
            except ProxyProtocolError:
                assert decided is None
                failed = True
                continue
            assert not failed, f"prefix of {n - 1} bytes failed but {n} bytes did not"
            if decided is not None:
                assert result == decided
            decided = result
