"""The TLS test infrastructure itself (tests/tls_fixtures.py, TLS in tests/dovecot.py).

Certificates are checked in memory (no sockets); the Dovecot tests talk to
the TLS Dovecots directly with poplib, no proxy involved.
"""

from __future__ import annotations

import poplib
import ssl

import pytest
import trustme
from cryptography import x509

from tests.dovecot import Dovecot
from tests.tls_fixtures import (
    PROXY_IDENTITIES,
    UPSTREAM_IDENTITIES,
    CertFiles,
    client_ssl_context,
    find_logins,
    server_ssl_context,
    wait_for_login,
)

TIMEOUT = 10.0


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """A complete TLS handshake between the two contexts, through memory BIOs.

    Raises what the client raises (``ssl.SSLCertVerificationError`` when it
    refuses the server's certificate).
    """
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for side in (cli, srv):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return
    raise AssertionError("TLS handshake did not finish")


def _names(files: CertFiles) -> set[str]:
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns | ips


def _issuer(files: CertFiles) -> x509.Name:
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).issuer


def _subject(pem: bytes) -> x509.Name:
    return x509.load_pem_x509_certificate(pem).subject


def _command(pop: poplib.POP3, line: str) -> bytes:
    """Send one command poplib has no method for; its one-line reply."""
    pop.sock.sendall(line.encode() + b"\r\n")
    return pop.file.readline().rstrip(b"\r\n")


def _refused_after_stls(server: Dovecot, context: ssl.SSLContext) -> None:
    pop = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    sock = pop.sock
    try:
        assert "STLS" in pop.capa()
        with pytest.raises(ssl.SSLCertVerificationError):
            pop.stls(context)
    finally:
        # A failed stls() leaves poplib holding the socket that wrap_socket()
        # detached: close() would fail with EBADF.
        pop.file.close()
        sock.close()


def _login(pop: poplib.POP3, server: Dovecot, user: str = "alice") -> None:
    assert pop.user(user) == b"+OK"
    assert pop.pass_(server.password(user)).startswith(b"+OK")
    pop.stat()
    assert pop.quit().startswith(b"+OK")


# --------------------------------------------------------------------------
# Certificates (no Dovecot)
# --------------------------------------------------------------------------


def test_cert_files_name_the_right_hosts(
    tls_ca: trustme.CA,
    proxy_cert: CertFiles,
    upstream_cert: CertFiles,
    other_ca_cert: CertFiles,
) -> None:
    for files in (proxy_cert, upstream_cert, other_ca_cert):
        for path in (files.cert, files.key, files.ca):
            assert path.is_file(), path
        assert files.key.read_bytes().startswith(b"-----BEGIN ")
    assert _names(proxy_cert) == set(PROXY_IDENTITIES)
    assert _names(upstream_cert) == set(UPSTREAM_IDENTITIES)
    assert {"localhost", "127.0.0.1", "127.0.0.2", "::1"} <= set(UPSTREAM_IDENTITIES)
    assert _names(other_ca_cert) == _names(upstream_cert)

    ca_subject = _subject(tls_ca.cert_pem.bytes())
    assert proxy_cert.ca.read_bytes() == tls_ca.cert_pem.bytes()
    assert upstream_cert.ca.read_bytes() == tls_ca.cert_pem.bytes()
    assert _issuer(proxy_cert) == ca_subject
    assert _issuer(upstream_cert) == ca_subject
    assert _issuer(other_ca_cert) != ca_subject
    assert _issuer(other_ca_cert) == _subject(other_ca_cert.ca.read_bytes())


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
def test_proxy_cert_verifies_with_client_context(proxy_cert: CertFiles, hostname: str) -> None:
    _handshake(server_ssl_context(proxy_cert), client_ssl_context(), hostname)


def test_client_context_accepts_every_form_of_trust(
    tls_ca: trustme.CA, upstream_cert: CertFiles
) -> None:
    server = server_ssl_context(upstream_cert)
    for trust in (None, tls_ca, upstream_cert, upstream_cert.ca, str(upstream_cert.ca)):
        context = client_ssl_context(trust)
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        _handshake(server, context, "127.0.0.1")


def test_client_context_refuses_the_other_ca(
    upstream_cert: CertFiles, other_ca_cert: CertFiles
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(server_ssl_context(other_ca_cert), client_ssl_context(), "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ssl_context(upstream_cert), client_ssl_context(other_ca_cert), "::1")
    # ... and trusting the other CA is what it takes.
    _handshake(server_ssl_context(other_ca_cert), client_ssl_context(other_ca_cert), "127.0.0.1")


def test_client_context_checks_the_host_name(proxy_cert: CertFiles) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(server_ssl_context(proxy_cert), client_ssl_context(), "127.0.0.3")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(server_ssl_context(proxy_cert), client_ssl_context(), "pop.example.org")


def test_find_logins_parses_dovecot_login_lines() -> None:
    log = (
        "Nov 27 14:32:19 pop3-login: Info: Disconnected: Aborted login by logging out "
        "(no auth attempts in 0 secs): user=<>, rip=127.0.0.1, lip=127.0.0.1, secured, "
        "session=<Bp9x7UJhzN5/AAAB>\n"
        "Nov 27 14:32:19 pop3-login: Info: Login: user=<alice>, method=PLAIN, "
        "rip=192.0.2.10, lip=127.0.0.1, mpid=17155, secured, session=<nDNy7UJhkhDAAAIK>\n"
        "Nov 27 14:32:19 pop3(alice)<17155><nDNy7UJhkhDAAAIK>: Info: Disconnected: "
        "Logged out top=0/0, retr=0/0, del=0/0, size=0\n"
        "Nov 27 14:32:20 pop3-login: Info: Login: user=<bob>, method=PLAIN, "
        "rip=2001:db8::7, lip=127.0.0.1, mpid=17157, TLS, session=<abcdefgh1234>\n"
    )
    alice, bob = find_logins(log)
    assert (alice.user, alice.method, alice.rip, alice.lip) == (
        "alice",
        "PLAIN",
        "192.0.2.10",
        "127.0.0.1",
    )
    assert alice.secured
    assert not alice.tls
    assert alice.session == "nDNy7UJhkhDAAAIK"
    assert (bob.rip, bob.tls, bob.secured, bob.session) == (
        "2001:db8::7",
        True,
        False,
        "abcdefgh1234",
    )
    assert find_logins(log, "bob") == [bob]
    assert find_logins(log, "carol") == []


# --------------------------------------------------------------------------
# Against Dovecot with TLS
# --------------------------------------------------------------------------


@pytest.mark.dovecot
def test_dovecot_pop3s_login(dovecot_tls: Dovecot) -> None:
    server = dovecot_tls
    assert server.tls_port
    assert server.tls_port != server.port
    offset = server.log_offset()
    pop = poplib.POP3_SSL(
        server.host, server.tls_port, context=client_ssl_context(), timeout=TIMEOUT
    )
    assert pop.getwelcome().startswith(b"+OK ")
    assert server.greeting_text.encode() in pop.getwelcome()
    assert b"[XCLIENT]" not in pop.getwelcome()
    assert "STLS" not in pop.capa()  # already TLS
    _login(pop, server)
    login = wait_for_login(server, "alice", since=offset)
    assert login.tls
    assert login.rip == "127.0.0.1"


@pytest.mark.dovecot
def test_dovecot_plaintext_port_offers_stls(dovecot_tls: Dovecot) -> None:
    server = dovecot_tls
    offset = server.log_offset()
    pop = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    capa = pop.capa()
    assert "STLS" in capa
    assert "USER" in capa
    assert capa["SASL"] == ["PLAIN", "LOGIN"]
    # ssl = yes: plaintext logins stay allowed (and 127.0.0.1 -> 127.0.0.1
    # counts as "secured" to Dovecot anyway).
    _login(pop, server)
    login = wait_for_login(server, "alice", since=offset)
    assert not login.tls
    assert login.secured


@pytest.mark.dovecot
def test_dovecot_stls_login(dovecot_tls: Dovecot) -> None:
    server = dovecot_tls
    offset = server.log_offset()
    pop = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    assert pop.stls(client_ssl_context()) == b"+OK Begin TLS negotiation now."
    assert isinstance(pop.sock, ssl.SSLSocket)
    assert "STLS" not in pop.capa()
    _login(pop, server)
    assert wait_for_login(server, "alice", since=offset).tls


@pytest.mark.dovecot
def test_dovecot_refused_when_trusting_another_ca(
    dovecot_tls: Dovecot, other_ca_cert: CertFiles
) -> None:
    server = dovecot_tls
    wrong = client_ssl_context(other_ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(server.host, server.tls_port, context=wrong, timeout=TIMEOUT)
    _refused_after_stls(server, wrong)


@pytest.mark.dovecot
def test_dovecot_with_wrong_cert_is_refused(
    dovecot_wrong_cert: Dovecot, other_ca_cert: CertFiles
) -> None:
    server = dovecot_wrong_cert
    offset = server.log_offset()
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(server.host, server.tls_port, context=client_ssl_context(), timeout=TIMEOUT)
    _refused_after_stls(server, client_ssl_context())
    # The certificate itself is fine for a client that trusts its CA.
    pop = poplib.POP3_SSL(
        server.host, server.tls_port, context=client_ssl_context(other_ca_cert), timeout=TIMEOUT
    )
    _login(pop, server)
    assert wait_for_login(server, "alice", since=offset).tls


@pytest.mark.dovecot
def test_dovecot_tls_required_refuses_login_before_stls(dovecot_tls_required: Dovecot) -> None:
    server = dovecot_tls_required
    assert server.host == "127.0.0.2"
    offset = server.log_offset()
    pop = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    capa = pop.capa()
    assert "STLS" in capa
    assert capa["SASL"] == []  # no mechanism offered before TLS
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Plaintext authentication"):
        pop.user("alice")
    assert pop.stls(client_ssl_context()).startswith(b"+OK")
    assert pop.capa()["SASL"] == ["PLAIN", "LOGIN"]
    _login(pop, server)
    login = wait_for_login(server, "alice", since=offset)
    assert login.tls
    assert (login.rip, login.lip) == ("127.0.0.1", "127.0.0.2")


@pytest.mark.dovecot
def test_untrusted_dovecot_ignores_xclient(dovecot_tls: Dovecot) -> None:
    server = dovecot_tls
    offset = server.log_offset()
    pop = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    assert b"[XCLIENT]" not in pop.getwelcome()
    # Note: "+OK", although nothing was changed.
    reply = _command(pop, "XCLIENT ADDR=192.0.2.10 PORT=4242")
    assert reply == b"+OK You are not from trusted IP - ignoring"
    _login(pop, server)
    assert wait_for_login(server, "alice", since=offset).rip == "127.0.0.1"


@pytest.mark.dovecot
def test_trusted_dovecot_takes_the_address_from_xclient(dovecot_trusted: Dovecot) -> None:
    server = dovecot_trusted
    assert b"[XCLIENT]" in server.greeting
    offset = server.log_offset()
    pop = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    welcome = pop.getwelcome()
    assert welcome.startswith(b"+OK [XCLIENT] " + server.greeting_text.encode())
    assert "XCLIENT" not in pop.capa()  # advertised only in the greeting
    assert _command(pop, "XCLIENT ADDR=192.0.2.10 PORT=4242") == b"+OK Updated"
    _login(pop, server)
    login = wait_for_login(server, "alice", since=offset)
    assert login.rip == "192.0.2.10"
    assert "rip=192.0.2.10, lip=127.0.0.1" in login.line
    assert login.secured  # trusted networks count as secured


@pytest.mark.dovecot
def test_trusted_dovecot_xclient_over_tls_with_session(dovecot_trusted: Dovecot) -> None:
    server = dovecot_trusted
    offset = server.log_offset()
    pop = poplib.POP3_SSL(
        server.host, server.tls_port, context=client_ssl_context(), timeout=TIMEOUT
    )
    assert pop.getwelcome().startswith(b"+OK [XCLIENT] ")
    reply = _command(pop, "XCLIENT ADDR=2001:db8::7 PORT=4243 SESSION=popproxy-test-1")
    assert reply == b"+OK Updated"
    _login(pop, server, "bob")
    login = wait_for_login(server, "bob", since=offset)
    assert (login.rip, login.tls, login.session) == ("2001:db8::7", True, "popproxy-test-1")
