"""TLS on both sides, STLS, CAPA rewriting, PROXY protocol and XCLIENT.

Certificates come from trustme; the upstreams are real Dovecots started by
the tests (tests/tls_fixtures.py), the clients Python's poplib, curl and raw
trio streams.
"""

from __future__ import annotations

import json
import poplib
import ssl
import subprocess
from pathlib import Path

import pytest
import trio

from popproxy import proxyproto
from popproxy.app import reload
from popproxy.audit import AuditConfig, open_audit
from popproxy.config import Config, HostPort, ListenConfig, UpstreamConfig
from popproxy.events import (
    CommandSent,
    SessionClosed,
    SessionOpened,
    TlsEstablished,
    UpstreamFailed,
)
from tests.clients import require_program
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox, MailboxFactory
from tests.proxy_fixtures import start_proxy
from tests.tls_fixtures import CertFiles, client_ssl_context, wait_for_login

pytestmark = pytest.mark.dovecot

LOCAL = HostPort("127.0.0.1", 0)


def listener(cert: CertFiles | None, tls: str = "none", **kw: object) -> ListenConfig:
    """A listener as the configuration parser makes it (TLS for logins by default)."""
    kw.setdefault("require_tls_for_auth", tls != "none")
    return ListenConfig(
        (LOCAL,), tls=tls,
        cert=cert.cert if cert else None, key=cert.key if cert else None, **kw,  # type: ignore[arg-type]
    )


def upstream_tls(dovecot: Dovecot, port: int, mode: str, ca: Path,
                 **kw: object) -> UpstreamConfig:
    return UpstreamConfig(HostPort(dovecot.host, port), tls=mode, ca_file=ca, **kw)  # type: ignore[arg-type]


def login_and_stat(p: poplib.POP3, user: str, password: str) -> int:
    p.user(user)
    p.pass_(password)
    count = int(p.stat()[0])
    p.quit()
    return count


async def test_pop3s_client_to_plaintext_dovecot(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox, proxy_cert: CertFiles,
    tmp_path: Path,
) -> None:
    user, messages = mailbox
    proxy = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port),
                              listener=listener(proxy_cert, "implicit"))
    audit = AuditConfig(enabled=True, sink="file", path=tmp_path / "audit.jsonl")
    trail = open_audit(audit)
    assert trail is not None
    proxy.proxy.observers.append(trail.observe)

    def client() -> int:
        p = poplib.POP3_SSL("localhost", proxy.port, context=client_ssl_context(), timeout=20)
        return login_and_stat(p, user, dovecot.users[user])

    assert await trio.to_thread.run_sync(client) == len(messages)
    await proxy.wait_for(SessionClosed)
    (tls,) = proxy.of_type(TlsEstablished)
    assert tls.side == "client"
    assert tls.version in ("TLSv1.2", "TLSv1.3")
    assert tls.sni == "localhost"
    # The handshake came first, so session.open knows how the client is protected.
    (opened,) = proxy.of_type(SessionOpened)
    assert (opened.tls, opened.sni) == (tls.version, "localhost")
    trail.close()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "session.open"
    assert records[0]["tls"] == {"version": tls.version, "cipher": tls.cipher, "sni": "localhost"}


async def test_stls_client_to_tls_only_dovecot(
    nursery: trio.Nursery, dovecot_tls: Dovecot, fresh_mailbox: MailboxFactory,
    proxy_cert: CertFiles, upstream_cert: CertFiles,
) -> None:
    """poplib's stls() at the proxy; the proxy speaks implicit TLS to Dovecot."""
    dovecot = dovecot_tls
    user, messages = Mailbox("alice", dovecot.reset_mailbox("alice"))
    proxy = await start_proxy(
        nursery, HostPort(dovecot.host, dovecot.tls_port),
        listener=listener(proxy_cert, "starttls"),
        upstream_config=upstream_tls(dovecot, dovecot.tls_port, "implicit", upstream_cert.ca),
    )

    def client() -> tuple[dict[str, list[str]], dict[str, list[str]], int]:
        p = poplib.POP3("localhost", proxy.port, timeout=20)
        before = p.capa()
        p.stls(client_ssl_context())
        after = p.capa()
        return before, after, login_and_stat(p, user, dovecot.users[user])

    before, after, count = await trio.to_thread.run_sync(client)
    assert "STLS" in before
    assert "USER" not in before  # TLS is required for logins on this listener
    assert "STLS" not in after
    assert "USER" in after
    assert count == len(messages)
    await proxy.wait_for(SessionClosed)
    assert {t.side for t in proxy.of_type(TlsEstablished)} == {"client", "upstream"}


async def test_upstream_stls(
    nursery: trio.Nursery, dovecot_tls: Dovecot, upstream_cert: CertFiles
) -> None:
    """The proxy upgrades its own upstream connection with STLS."""
    dovecot = dovecot_tls
    messages = dovecot.reset_mailbox("bob")
    proxy = await start_proxy(
        nursery, HostPort(dovecot.host, dovecot.port),
        upstream_config=upstream_tls(dovecot, dovecot.port, "starttls", upstream_cert.ca),
    )

    def client() -> int:
        return login_and_stat(poplib.POP3(proxy.host, proxy.port, timeout=20),
                              "bob", dovecot.users["bob"])

    offset = dovecot.log_offset()
    assert await trio.to_thread.run_sync(client) == len(messages)
    login = await trio.to_thread.run_sync(
        lambda: wait_for_login(dovecot, "bob", since=offset))
    assert login.tls  # Dovecot saw TLS from the proxy


async def test_wrong_upstream_certificate_is_refused(
    nursery: trio.Nursery, dovecot_wrong_cert: Dovecot, upstream_cert: CertFiles
) -> None:
    dovecot = dovecot_wrong_cert
    proxy = await start_proxy(
        nursery, HostPort(dovecot.host, dovecot.tls_port),
        upstream_config=upstream_tls(dovecot, dovecot.tls_port, "implicit", upstream_cert.ca),
    )
    with trio.fail_after(20):
        s = await trio.open_tcp_stream(proxy.host, proxy.port)
        assert await s.receive_some(4096) == b"-ERR [SYS/TEMP] upstream TLS failure\r\n"
    await proxy.wait_for(SessionClosed)
    assert proxy.of_type(UpstreamFailed) == [UpstreamFailed("tls")]
    registry = proxy.app.metrics.registry
    assert registry.get_sample_value("popproxy_upstream_errors_total", {"reason": "tls"}) == 1


async def test_plaintext_login_refused_when_tls_required(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox, proxy_cert: CertFiles
) -> None:
    user, _ = mailbox
    proxy = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port),
                              listener=listener(proxy_cert, "starttls"))
    with trio.fail_after(20):
        s = await trio.open_tcp_stream(proxy.host, proxy.port)
        await s.receive_some(4096)
        await s.send_all(f"USER {user}\r\nPASS {dovecot.users[user]}\r\n".encode())
        got = b""
        while got.count(b"\r\n") < 2:
            got += await s.receive_some(4096)
    refusal = b"-ERR [AUTH] TLS is required to log in: use STLS\r\n"
    assert got == refusal * 2
    assert not [e for e in proxy.of_type(CommandSent) if e.command.verb in ("USER", "PASS")]


async def test_stls_pipelined_commands_are_never_executed(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox, proxy_cert: CertFiles
) -> None:
    user, messages = mailbox
    proxy = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port),
                              listener=listener(proxy_cert, "starttls",
                                                require_tls_for_auth=False))
    injected = f"USER {user}\r\nPASS {dovecot.users[user]}\r\nDELE 1\r\nQUIT\r\n".encode()
    with trio.fail_after(20):
        raw = await trio.open_tcp_stream(proxy.host, proxy.port)
        await raw.receive_some(4096)
        await raw.send_all(b"STLS\r\n" + injected)
        assert await raw.receive_some(4096) == b"+OK Begin TLS negotiation\r\n"
        tls = trio.SSLStream(raw, client_ssl_context(), server_hostname="localhost")
        await tls.do_handshake()
        await tls.send_all(b"CAPA\r\n")
        capa = b""
        while not capa.endswith(b"\r\n.\r\n"):
            capa += await tls.receive_some(4096)
        await tls.send_all(b"QUIT\r\n")
        assert (await tls.receive_some(4096)).startswith(b"+OK")
    await proxy.wait_for(SessionClosed)
    assert [e.command.verb for e in proxy.of_type(CommandSent)] == ["CAPA", "QUIT"]
    assert dovecot.message_count(user) == len(messages)


async def test_curl_pop3s_and_ssl_reqd(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox, proxy_cert: CertFiles
) -> None:
    curl = require_program("curl", "curl")
    user, messages = mailbox
    password = dovecot.users[user]
    upstream = HostPort(dovecot.host, dovecot.port)
    implicit = await start_proxy(nursery, upstream, listener=listener(proxy_cert, "implicit"))
    starttls = await start_proxy(nursery, upstream, listener=listener(proxy_cert, "starttls"))
    for url, extra in (
        (f"pop3s://localhost:{implicit.port}/1", []),
        (f"pop3://localhost:{starttls.port}/1", ["--ssl-reqd"]),
    ):
        with trio.fail_after(30):
            result = await trio.run_process(
                [curl, "-s", "-S", "--cacert", str(proxy_cert.ca), "-u", f"{user}:{password}",
                 *extra, url],
                capture_stdout=True, capture_stderr=True, check=False,
                stdin=subprocess.DEVNULL,
            )
        assert result.returncode == 0, result.stderr
        assert result.stdout == messages[0]


class TestProxyProtocol:
    async def test_v1_and_v2_headers_set_the_client_address(
        self, nursery: trio.Nursery, dovecot: Dovecot
    ) -> None:
        import ipaddress

        proxy = await start_proxy(
            nursery, HostPort(dovecot.host, dovecot.port),
            listener=ListenConfig((LOCAL,), proxy_protocol=True,
                                  trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),)),
        )
        headers = [
            proxyproto.encode_v1(("192.0.2.44", 5555), ("198.51.100.1", 110)),
            proxyproto.encode_v2(("2001:db8::7", 6666), ("2001:db8::1", 110)),
        ]
        for header in headers:
            with trio.fail_after(20):
                s = await trio.open_tcp_stream(proxy.host, proxy.port)
                await s.send_all(header + b"QUIT\r\n")  # bytes right behind the header
                got = b""
                while got.count(b"\r\n") < 2:
                    got += await s.receive_some(4096)
                assert got.startswith(b"+OK")
        await proxy.wait_for(SessionClosed, 2)
        opened = proxy.of_type(SessionOpened)
        assert [o.client for o in opened] == ["192.0.2.44:5555", "[2001:db8::7]:6666"]
        assert all(o.via is not None and o.via.startswith("127.0.0.1:") for o in opened)

    @pytest.mark.parametrize("trusted", ["10.0.0.0/8", "127.0.0.0/8"])
    async def test_untrusted_or_malformed_header_is_refused(
        self, nursery: trio.Nursery, dovecot: Dovecot, trusted: str
    ) -> None:
        import ipaddress

        proxy = await start_proxy(
            nursery, HostPort(dovecot.host, dovecot.port),
            listener=ListenConfig((LOCAL,), proxy_protocol=True,
                                  trusted_proxies=(ipaddress.ip_network(trusted),)),
        )
        with trio.fail_after(20):
            s = await trio.open_tcp_stream(proxy.host, proxy.port)
            header = (proxyproto.encode_v1(("192.0.2.44", 5555), ("198.51.100.1", 110))
                      if trusted.startswith("10.") else b"USER mallory\r\n")
            await s.send_all(header)
            assert await s.receive_some(4096) == b""  # closed without a greeting
        assert proxy.of_type(SessionOpened) == []


async def test_xclient_makes_dovecot_see_the_real_client(
    nursery: trio.Nursery, dovecot_trusted: Dovecot
) -> None:
    import ipaddress

    dovecot = dovecot_trusted
    dovecot.reset_mailbox("carol")
    proxy = await start_proxy(
        nursery, HostPort(dovecot.host, dovecot.port),
        listener=ListenConfig((LOCAL,), proxy_protocol=True,
                              trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),)),
        upstream_config=UpstreamConfig(HostPort(dovecot.host, dovecot.port),
                                       forward_client="xclient"),
    )
    offset = dovecot.log_offset()
    with trio.fail_after(20):
        s = await trio.open_tcp_stream(proxy.host, proxy.port)
        await s.send_all(proxyproto.encode_v1(("192.0.2.99", 4242), ("127.0.0.1", 110)))
        greeting = await s.receive_some(4096)
        assert greeting.startswith(b"+OK")
        await s.send_all(f"USER carol\r\nPASS {dovecot.users['carol']}\r\nQUIT\r\n".encode())
        got = b""
        while got.count(b"\r\n") < 3:
            got += await s.receive_some(4096)
    login = await trio.to_thread.run_sync(
        lambda: wait_for_login(dovecot, "carol", since=offset))
    assert login.rip == "192.0.2.99"


async def test_sighup_reload_reads_renewed_certificates(
    nursery: trio.Nursery, dovecot: Dovecot, tmp_path: Path, proxy_cert: CertFiles,
    other_ca_cert: CertFiles,
) -> None:
    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    cert.write_bytes(proxy_cert.cert.read_bytes())
    key.write_bytes(proxy_cert.key.read_bytes())
    lc = ListenConfig((LOCAL,), tls="implicit", cert=cert, key=key)
    proxy = await start_proxy(nursery, HostPort(dovecot.host, dovecot.port), listener=lc)

    def handshake_with(ca: CertFiles) -> bool:
        try:
            poplib.POP3_SSL("localhost", proxy.port, context=client_ssl_context(ca),
                            timeout=20).quit()
        except ssl.SSLCertVerificationError:
            return False
        return True

    assert await trio.to_thread.run_sync(handshake_with, proxy_cert)
    cert.write_bytes(other_ca_cert.cert.read_bytes())  # the renewed certificate
    key.write_bytes(other_ca_cert.key.read_bytes())
    config: Config = proxy.proxy.config
    assert reload(proxy.app, lambda: config)
    assert await trio.to_thread.run_sync(handshake_with, other_ca_cert)
    assert not await trio.to_thread.run_sync(handshake_with, proxy_cert)
