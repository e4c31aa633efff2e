"""More TLS and PROXY-protocol interoperability, with real peers.

* HAProxy (Debian package ``haproxy``) as the load balancer that sends the
  PROXY protocol header (v2 and v1) to the proxy: the session must name the
  client HAProxy saw, and HAProxy's own outgoing address as ``via``.
* Client certificates on an implicit-TLS listener (``client_ca`` +
  ``require_client_cert``): a client with a certificate from that CA logs in
  to Dovecot through the proxy; one without a certificate, or with one from
  another CA, is stopped in the handshake and never reaches Dovecot.

Everything listens on and connects to 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import poplib
import re
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from popproxy.config import HostPort, ListenConfig
from popproxy.events import (
    CommandSent,
    Event,
    SessionClosed,
    SessionOpened,
    TlsEstablished,
    TlsFailed,
    UpstreamConnected,
)
from tests.clients import require_program
from tests.dovecot import Dovecot
from tests.dovecot_fixtures import Mailbox
from tests.proxy_fixtures import RunningProxy, start_proxy
from tests.tls_fixtures import CertFiles, client_ssl_context

pytestmark = pytest.mark.dovecot

LOCAL = HostPort("127.0.0.1", 0)
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)

#: Bounds for the external processes and the network exchanges.
HAPROXY_START_TIMEOUT = 10.0
HAPROXY_STOP_TIMEOUT = 5.0
EXCHANGE_TIMEOUT = 20.0


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (bind 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def local_address(stream: trio.SocketStream) -> str:
    host, port = stream.socket.getsockname()[:2]
    return f"{host}:{port}"


async def receive_lines(stream: trio.abc.ReceiveStream, count: int = 1) -> bytes:
    """Receive until ``count`` CRLF-terminated lines arrived (or EOF)."""
    got = b""
    while got.count(b"\r\n") < count:
        data = await stream.receive_some(4096)
        if not data:
            break
        got += data
    return got


def sessions(running: RunningProxy) -> dict[str, list[Event]]:
    """The recorded events, per session id, in order."""
    by_id: dict[str, list[Event]] = {}
    for info, event in running.events:
        by_id.setdefault(info.id, []).append(event)
    return by_id


# --------------------------------------------------------------------------
# HAProxy as the PROXY protocol sender
# --------------------------------------------------------------------------


@pytest.fixture
def haproxy_binary() -> str:
    """Path of haproxy (apt-get installs it as root); skips loudly, fails on CI."""
    return require_program("haproxy", "haproxy")


@dataclass
class HAProxy:
    process: trio.Process
    port: int  # the frontend's
    log: Path  # its stdout+stderr, including the per-connection log lines

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def haproxy_config(frontend_port: int, backend_port: int, send_proxy: str) -> str:
    """A foreground TCP relay 127.0.0.1:frontend -> 127.0.0.1:backend.

    Each connection is logged to stderr when it ends, with the client's
    address (%ci:%cp) and the source address of HAProxy's own connection to
    the backend (%bi:%bp), so the test can compare both with what the proxy
    reported.
    """
    return (
        "global\n"
        "    log stderr format raw local0\n"
        "    maxconn 64\n"
        "\n"
        "defaults\n"
        "    mode tcp\n"
        "    log global\n"
        '    log-format "conn client=%ci:%cp backend_source=%bi:%bp"\n'
        "    timeout connect 5s\n"
        "    timeout client 30s\n"
        "    timeout server 30s\n"
        "\n"
        "frontend pop3\n"
        f"    bind 127.0.0.1:{frontend_port}\n"
        "    default_backend popproxy\n"
        "\n"
        "backend popproxy\n"
        f"    server p 127.0.0.1:{backend_port} {send_proxy}\n"
    )


@contextlib.asynccontextmanager
async def run_haproxy(
    binary: str, directory: Path, backend_port: int, send_proxy: str
) -> AsyncIterator[HAProxy]:
    """HAProxy in the foreground (``-db``) in front of ``backend_port``;
    terminated (killed if it lingers) on exit."""
    frontend = free_port()
    cfg = directory / "haproxy.cfg"
    cfg.write_text(haproxy_config(frontend, backend_port, send_proxy))
    with trio.fail_after(HAPROXY_START_TIMEOUT):
        check = await trio.run_process(
            [binary, "-c", "-f", str(cfg)], stdin=subprocess.DEVNULL,
            capture_stdout=True, capture_stderr=True, check=False,
        )
    assert check.returncode == 0, (
        f"haproxy -c refused the configuration:\n{cfg.read_text()}\n"
        f"{check.stdout.decode(errors='replace')}{check.stderr.decode(errors='replace')}"
    )
    log = directory / "haproxy.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [binary, "-f", str(cfg), "-db"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield HAProxy(process, frontend, log)
    finally:
        with trio.CancelScope(shield=True):
            if process.poll() is None:
                process.terminate()
                with trio.move_on_after(HAPROXY_STOP_TIMEOUT):
                    await process.wait()
                if process.poll() is None:
                    process.kill()
                    await process.wait()


async def connect_when_listening(haproxy: HAProxy) -> trio.SocketStream:
    """Connect to HAProxy's frontend, retrying (bounded, 50 ms apart) until
    it listens.  The first connection that succeeds is the test's client, so
    no probe connection ever reaches the proxy."""
    try:
        with trio.fail_after(HAPROXY_START_TIMEOUT):
            while True:
                if haproxy.process.poll() is not None:
                    raise AssertionError(
                        f"haproxy exited with status {haproxy.process.returncode}:\n"
                        f"{haproxy.output()}"
                    )
                try:
                    return await trio.open_tcp_stream("127.0.0.1", haproxy.port)
                except OSError:
                    await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(
            f"haproxy did not accept connections on 127.0.0.1:{haproxy.port} within "
            f"{HAPROXY_START_TIMEOUT:.0f}s; its output:\n{haproxy.output()}"
        ) from None


async def haproxy_log_line(haproxy: HAProxy, client: str) -> re.Match[str]:
    """HAProxy's log line for the connection from ``client`` (written when it
    ends, so polled for a few seconds)."""
    pattern = re.compile(rf"conn client={re.escape(client)} backend_source=(\S+)")
    with trio.move_on_after(5):
        while True:
            match = pattern.search(haproxy.output())
            if match is not None:
                return match
            await trio.sleep(0.02)
    raise AssertionError(f"no log line for {client} from haproxy:\n{haproxy.output()}")


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
async def test_haproxy_sends_the_real_client_address(
    nursery: trio.Nursery, dovecot: Dovecot, tmp_path: Path, haproxy_binary: str,
    send_proxy: str,
) -> None:
    """client -> HAProxy -(PROXY header)-> popproxy -> Dovecot: the session
    is opened for the client's own address, via HAProxy's outgoing one."""
    running = await start_proxy(
        nursery, HostPort(dovecot.host, dovecot.port),
        listener=ListenConfig((LOCAL,), proxy_protocol=True, trusted_proxies=LOOPBACK),
    )
    async with run_haproxy(haproxy_binary, tmp_path, running.port, send_proxy) as haproxy:
        stream = await connect_when_listening(haproxy)
        client = local_address(stream)
        with trio.fail_after(EXCHANGE_TIMEOUT):
            async with stream:
                greeting = await receive_lines(stream)
                assert greeting.startswith(b"+OK"), greeting
                await stream.send_all(b"QUIT\r\n")
                assert (await receive_lines(stream)).startswith(b"+OK")
                assert await stream.receive_some(4096) == b""  # closed after QUIT
            await running.wait_for(SessionClosed)
            logged = await haproxy_log_line(haproxy, client)

    (opened,) = running.of_type(SessionOpened)
    assert opened.client == client
    assert opened.via is not None
    via_host, via_port = opened.via.rsplit(":", 1)
    assert via_host == "127.0.0.1"
    assert int(via_port) not in (int(client.rsplit(":", 1)[1]), haproxy.port, running.port)
    # Exactly the source address HAProxy says it connected to the proxy from.
    assert opened.via == logged[1]
    (closed,) = running.of_type(SessionClosed)
    assert closed.reason == "quit", closed


# --------------------------------------------------------------------------
# Client certificates
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCert:
    cert: Path  # chain, leaf first
    key: Path


def issue_client_cert(ca: trustme.CA, directory: Path, name: str, identity: str) -> ClientCert:
    leaf = ca.issue_cert(identity)
    files = ClientCert(directory / f"{name}.crt", directory / f"{name}.key")
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    files.key.write_bytes(leaf.private_key_pem.bytes())
    files.key.chmod(0o600)
    return files


@pytest.fixture
def client_ca_file(tls_ca: trustme.CA, tmp_path: Path) -> Path:
    """The CA the listener checks client certificates against (``tls_ca``)."""
    path = tmp_path / "client-ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def client_cert(tls_ca: trustme.CA, tmp_path: Path) -> ClientCert:
    """A client certificate (rfc822Name client@example.org) from ``tls_ca``."""
    return issue_client_cert(tls_ca, tmp_path, "client", "client@example.org")


def client_context(cert: ClientCert | None, max_version: str | None = None) -> ssl.SSLContext:
    """A client context trusting the proxy's CA, presenting ``cert`` if given."""
    context = client_ssl_context()
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    if max_version == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


async def start_mtls_proxy(
    nursery: trio.Nursery, dovecot: Dovecot, proxy_cert: CertFiles, client_ca: Path
) -> RunningProxy:
    return await start_proxy(
        nursery, HostPort(dovecot.host, dovecot.port),
        listener=ListenConfig(
            (LOCAL,), tls="implicit", cert=proxy_cert.cert, key=proxy_cert.key,
            client_ca=client_ca, require_client_cert=True, require_tls_for_auth=True,
        ),
    )


def pop3s_login(port: int, context: ssl.SSLContext, user: str, password: str) -> int | str:
    """Log in over POP3S and STAT: the message count, or (a string) how it
    failed before a login was possible."""
    try:
        p = poplib.POP3_SSL("localhost", port, context=context, timeout=EXCHANGE_TIMEOUT)
    except (ssl.SSLError, OSError, EOFError, poplib.error_proto) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        p.user(user)
        p.pass_(password)
        count = int(p.stat()[0])
        p.quit()
    except (ssl.SSLError, OSError, EOFError, poplib.error_proto) as exc:
        return f"{type(exc).__name__} after the greeting: {exc}"
    finally:
        p.close()
    return count


def assert_refused_in_handshake(running: RunningProxy, outcome: int | str) -> TlsFailed:
    """The attempt failed, the proxy recorded a client-side TlsFailed for
    that session, closed it for that reason and never contacted Dovecot."""
    assert isinstance(outcome, str), f"logged in without an acceptable certificate: {outcome}"
    failed = [events for events in sessions(running).values()
              if any(isinstance(e, TlsFailed) for e in events)]
    assert len(failed) == 1, running.events
    (events,) = failed
    (tls_failed,) = [e for e in events if isinstance(e, TlsFailed)]
    assert tls_failed.side == "client"
    assert not [e for e in events
                if isinstance(e, TlsEstablished | UpstreamConnected | CommandSent)], events
    (closed,) = [e for e in events if isinstance(e, SessionClosed)]
    assert closed.reason == "client TLS handshake failed"
    return tls_failed


@pytest.mark.parametrize("max_version", ["1.3", "1.2"])
async def test_client_certificate_required(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox, proxy_cert: CertFiles,
    client_ca_file: Path, client_cert: ClientCert, max_version: str,
) -> None:
    """With a certificate from client_ca the login reaches Dovecot; without
    one the handshake is refused.

    What the client sees is a bare EOF, not the TLS alert: trio's SSLStream
    drops the alert OpenSSL queued when the handshake fails (python-trio/trio
    PR #3413).  With TLS 1.3 the client's side of the handshake has already
    completed, so poplib reports "-ERR EOF" on reading the greeting; with
    TLS 1.2 the handshake itself ends in SSLEOFError.
    """
    user, messages = mailbox
    password = dovecot.users[user]
    running = await start_mtls_proxy(nursery, dovecot, proxy_cert, client_ca_file)

    with trio.fail_after(EXCHANGE_TIMEOUT * 2):
        count = await trio.to_thread.run_sync(
            pop3s_login, running.port, client_context(client_cert, max_version), user, password)
        assert count == len(messages)
        await running.wait_for(SessionClosed)
        (established,) = running.of_type(TlsEstablished)
        assert established.side == "client"
        assert established.version == ("TLSv1.2" if max_version == "1.2" else "TLSv1.3")

        refused = await trio.to_thread.run_sync(
            pop3s_login, running.port, client_context(None, max_version), user, password)
        await running.wait_for(SessionClosed, 2)
    assert_refused_in_handshake(running, refused)


async def test_client_certificate_from_another_ca_is_refused(
    nursery: trio.Nursery, dovecot: Dovecot, mailbox: Mailbox, proxy_cert: CertFiles,
    client_ca_file: Path, tmp_path: Path,
) -> None:
    user, _ = mailbox
    running = await start_mtls_proxy(nursery, dovecot, proxy_cert, client_ca_file)
    stranger = issue_client_cert(trustme.CA(organization_name="not the client CA"),
                                 tmp_path, "stranger", "mallory@example.org")
    with trio.fail_after(EXCHANGE_TIMEOUT * 2):
        refused = await trio.to_thread.run_sync(
            pop3s_login, running.port, client_context(stranger), user, dovecot.users[user])
        await running.wait_for(SessionClosed)
    tls_failed = assert_refused_in_handshake(running, refused)
    assert "certificate" in tls_failed.error.lower(), tls_failed
