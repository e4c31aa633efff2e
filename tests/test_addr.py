"""Addresses: one host:port type, the same spelling in every Python version.

IPv4-mapped IPv6 addresses (what a dual-stack load balancer reports for an
IPv4 client through the PROXY protocol) are recorded and judged in their
IPv4 form, so that a rule for ``192.0.2.0/24`` matches such a client and
the audit does not depend on how ``ipaddress`` writes them (Python 3.13
changed it).
"""

from __future__ import annotations

import ipaddress

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from popproxy import proxyproto
from popproxy.addr import HostPort, host_of, normalize_host, parse_hostport, split_hostport
from popproxy.config import ListenConfig
from popproxy.events import PolicyDecision, SessionClosed, SessionOpened, State
from popproxy.policy import Deny, Facts
from popproxy.policy.config import parse_policy
from popproxy.policy.engine import PolicyEngine
from popproxy.pop3 import Command
from tests.proxy_fixtures import start_proxy

NETWORK_RULE = {"rules": [{"name": "lab", "match": {"networks": ["192.0.2.0/24"],
                                                     "commands": ["DELE"]},
                           "action": "deny", "message": "not from the lab"}]}


class TestNormalize:
    @pytest.mark.parametrize(
        ("host", "normal"),
        [
            ("::ffff:192.0.2.1", "192.0.2.1"),
            ("::ffff:c000:201", "192.0.2.1"),
            ("[::ffff:192.0.2.1]", "192.0.2.1"),
            ("2001:DB8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("192.0.2.1", "192.0.2.1"),
            ("mail.example.org", "mail.example.org"),
        ],
    )
    def test_hosts(self, host: str, normal: str) -> None:
        assert normalize_host(host) == normal

    def test_a_mapped_peer_is_recorded_as_ipv4(self) -> None:
        assert str(HostPort.of("::ffff:192.0.2.1", 4000)) == "192.0.2.1:4000"
        assert str(HostPort.of("2001:db8::1", 110)) == "[2001:db8::1]:110"

    @given(st.ip_addresses(v=4))
    def test_every_mapped_ipv4_address_becomes_itself(
        self, ip: ipaddress.IPv4Address
    ) -> None:
        mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
        for spelling in (str(mapped), mapped.exploded):
            assert normalize_host(spelling) == str(ip)

    @given(st.ip_addresses(), st.integers(0, 65535))
    def test_split_undoes_str(
        self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
    ) -> None:
        endpoint = HostPort.of(str(ip), port)
        assert split_hostport(str(endpoint)) == (endpoint.host, port)
        assert host_of(str(endpoint)) == endpoint.host


class TestParse:
    def test_forms(self) -> None:
        assert parse_hostport("127.0.0.1:110") == HostPort("127.0.0.1", 110)
        assert parse_hostport("[::1]:110") == HostPort("::1", 110)
        assert parse_hostport(" mail.example.org:995 ") == HostPort("mail.example.org", 995)

    @pytest.mark.parametrize(
        ("text", "why"),
        [("::1:110", "brackets"), ("host", "port"), ("host:99999", "port"), (":110", "port"),
         ("host:1e3", "port")],
    )
    def test_errors_say_why(self, text: str, why: str) -> None:
        with pytest.raises(ValueError, match=why):
            parse_hostport(text)


class TestPolicyMatching:
    def facts(self, client: str) -> Facts:
        return Facts(State.TRANSACTION, "alice", client, client_ip=host_of(client))

    @pytest.mark.parametrize("client", ["192.0.2.9:4000", "[::ffff:192.0.2.9]:4000",
                                        "[::ffff:c000:209]:4000"])
    def test_a_rule_for_an_ipv4_network_matches_a_mapped_client(self, client: str) -> None:
        engine = PolicyEngine(parse_policy(NETWORK_RULE))
        decision = engine.decide(self.facts(client), Command("DELE", ("1",)), 0)
        assert isinstance(decision, Deny)

    def test_other_clients_are_not_matched(self) -> None:
        engine = PolicyEngine(parse_policy(NETWORK_RULE))
        for client in ("198.51.100.9:4000", "[::ffff:198.51.100.9]:4000", "[2001:db8::9]:1"):
            decision = engine.decide(self.facts(client), Command("DELE", ("1",)), 0)
            assert not isinstance(decision, Deny), client


async def test_a_mapped_client_through_the_proxy_protocol(
    nursery: trio.Nursery, demo_upstream: HostPort
) -> None:
    """A dual-stack load balancer's IPv4 client: recorded as IPv4, matched by an
    IPv4 rule, in any Python version."""
    proxy = await start_proxy(
        nursery, demo_upstream,
        listener=ListenConfig((HostPort("127.0.0.1", 0),), proxy_protocol=True,
                              trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),)),
        policy=parse_policy(NETWORK_RULE),
    )
    header = proxyproto.encode_v2(("::ffff:192.0.2.77", 5555), ("2001:db8::1", 110))
    with trio.fail_after(20):
        s = await trio.open_tcp_stream(proxy.host, proxy.port)
        await s.send_all(header + b"USER alice\r\nPASS wonderland\r\nDELE 1\r\nQUIT\r\n")
        got = b""
        while got.count(b"\r\n") < 5:
            chunk = await s.receive_some(4096)
            assert chunk, got
            got += chunk
        await proxy.wait_for(SessionClosed)
    assert b"-ERR [SYS/PERM] not from the lab\r\n" in got
    (opened,) = proxy.of_type(SessionOpened)
    assert opened.client == "192.0.2.77:5555"
    assert [d.rule for d in proxy.of_type(PolicyDecision)] == ["lab"]
