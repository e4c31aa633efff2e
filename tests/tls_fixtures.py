"""TLS material (a test CA from ``trustme``) and TLS-enabled Dovecot servers.

Load it with ``pytest_plugins = [..., "tests.tls_fixtures"]`` in
tests/conftest.py (it needs ``tests.dovecot_fixtures`` loaded as well).

Certificates (session-scoped, files in a session temp dir):

* ``tls_ca``: the test CA (``trustme.CA``); ``client_ssl_context()`` trusts it.
* ``proxy_cert``: for the proxy's listener: localhost, 127.0.0.1, ::1.
* ``upstream_cert``: for Dovecot: localhost, 127.0.0.1, 127.0.0.2, ::1
  (127.0.0.2 for ``dovecot_tls_required``).
* ``other_ca_cert``: localhost, 127.0.0.1, 127.0.0.2, ::1, issued by
  ANOTHER CA (its ``ca`` file is that CA): a certificate a client trusting
  ``tls_ca`` must refuse.

Each is a ``CertFiles(cert, key, ca)``.

Dovecots (session-scoped, each started on first use; all have STLS on
``port`` and implicit TLS (pop3s) on ``tls_port``, and serve
``DEFAULT_USERS``):

* ``dovecot_tls``: ``upstream_cert``; plaintext logins allowed on ``port``;
  XCLIENT from the tests/proxy is NOT trusted ("+OK You are not from trusted
  IP - ignoring").
* ``dovecot_tls_required``: ``ssl = required`` on 127.0.0.2: no login on
  ``port`` before STLS.  (Dovecot lets a client whose address equals the
  server's log in without TLS, so this one listens on 127.0.0.2; Linux
  connects to it from 127.0.0.1.)
* ``dovecot_trusted``: like ``dovecot_tls`` plus
  ``login_trusted_networks = 127.0.0.0/8 ::1``: the greeting carries
  ``[XCLIENT]`` and ``XCLIENT ADDR=.. PORT=..`` before the login makes Dovecot
  log (and use) that address as ``rip=``.
* ``dovecot_wrong_cert``: serves ``other_ca_cert``.

Log helpers: ``wait_for_login(dovecot, user, since=offset)`` waits (bounded)
for Dovecot's "Login:" line and returns it parsed (``DovecotLogin``: rip,
lip, tls, secured, session).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.dovecot import Dovecot
from tests.dovecot_fixtures import _unavailable, running_dovecot

__all__ = [
    "OTHER_CA_IDENTITIES",
    "PROXY_IDENTITIES",
    "TRUSTED_NETWORKS",
    "UPSTREAM_IDENTITIES",
    "CertFiles",
    "DovecotLogin",
    "client_ssl_context",
    "dovecot_tls",
    "dovecot_tls_required",
    "dovecot_trusted",
    "dovecot_wrong_cert",
    "find_logins",
    "other_ca_cert",
    "proxy_cert",
    "server_ssl_context",
    "session_ca",
    "start_dovecot",
    "tls_ca",
    "tls_dir",
    "upstream_cert",
    "wait_for_log",
    "wait_for_login",
    "write_cert_files",
]

PROXY_IDENTITIES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
UPSTREAM_IDENTITIES: tuple[str, ...] = ("localhost", "127.0.0.1", "127.0.0.2", "::1")
OTHER_CA_IDENTITIES: tuple[str, ...] = UPSTREAM_IDENTITIES
#: login_trusted_networks of ``dovecot_trusted``.
TRUSTED_NETWORKS = "127.0.0.0/8 ::1"


@dataclass(frozen=True)
class CertFiles:
    """PEM files: ``cert`` (the certificate chain, leaf first), its private
    ``key``, and the ``ca`` certificate that issued it."""

    cert: Path
    key: Path
    ca: Path


# --------------------------------------------------------------------------
# Helpers (usable without fixtures)
# --------------------------------------------------------------------------


@functools.cache
def session_ca() -> trustme.CA:
    """The process-wide test CA (what the ``tls_ca`` fixture returns)."""
    return trustme.CA(organization_name="popproxy tests")


def write_cert_files(
    ca: trustme.CA, directory: Path, name: str, identities: tuple[str, ...]
) -> CertFiles:
    """Issue a certificate for ``identities`` from ``ca`` and write
    ``<name>.crt``, ``<name>.key`` and ``<name>-ca.crt`` into ``directory``."""
    leaf = ca.issue_cert(*identities, common_name=identities[0])
    files = CertFiles(
        cert=directory / f"{name}.crt",
        key=directory / f"{name}.key",
        ca=directory / f"{name}-ca.crt",
    )
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    files.key.write_bytes(leaf.private_key_pem.bytes())
    files.key.chmod(0o600)
    ca.cert_pem.write_to_path(str(files.ca))
    for path in (files.cert, files.ca):
        path.chmod(0o644)
    return files


def client_ssl_context(
    trust: trustme.CA | CertFiles | str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A verifying TLS client context (host name checked) for poplib's
    ``POP3_SSL(context=...)`` / ``stls(context=...)`` or trio.

    trust: a ``trustme.CA``, a ``CertFiles`` (trusts its ``ca``), or a CA
    file; default: the test CA (``tls_ca``).  Only that CA is trusted, not
    the system's.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    if trust is None:
        trust = session_ca()
    if isinstance(trust, trustme.CA):
        trust.configure_trust(context)
    elif isinstance(trust, CertFiles):
        context.load_verify_locations(cafile=trust.ca)
    else:
        context.load_verify_locations(cafile=trust)
    return context


def server_ssl_context(files: CertFiles) -> ssl.SSLContext:
    """A TLS server context presenting ``files`` (e.g. for a fake upstream)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    return context


@dataclass(frozen=True)
class DovecotLogin:
    """One "pop3-login: Info: Login:" line of Dovecot's log, e.g.::

        ... pop3-login: Info: Login: user=<alice>, method=PLAIN, rip=192.0.2.10,
        lip=127.0.0.1, mpid=17155, TLS, session=<nDNy7UJhkhDAAAIK>

    rip: the client address Dovecot believes (XCLIENT ADDR when trusted).
    tls: the connection was TLS (pop3s or after STLS); secured: Dovecot
    counted it as secure without TLS (loopback to itself, or trusted).
    """

    user: str
    method: str
    rip: str
    lip: str
    tls: bool
    secured: bool
    session: str
    line: str


_LOGIN = re.compile(
    r"^.*?pop3-login: Info: Login: user=<(?P<user>[^>]*)>, method=(?P<method>[^,]+), "
    r"rip=(?P<rip>[^,]+), lip=(?P<lip>[^,]+), (?P<rest>.*)$",
    re.MULTILINE,
)
_SESSION = re.compile(r"session=<(?P<session>[^>]*)>")


def find_logins(log_text: str, user: str | None = None) -> list[DovecotLogin]:
    """The "Login:" lines in ``log_text`` (of ``user`` only, if given)."""
    logins: list[DovecotLogin] = []
    for m in _LOGIN.finditer(log_text):
        if user is not None and m["user"] != user:
            continue
        rest = m["rest"]
        flags = [part.strip() for part in rest.split(",")]
        session = _SESSION.search(rest)
        logins.append(
            DovecotLogin(
                user=m["user"],
                method=m["method"],
                rip=m["rip"],
                lip=m["lip"],
                tls="TLS" in flags,
                secured="secured" in flags,
                session=session["session"] if session else "",
                line=m[0],
            )
        )
    return logins


def wait_for_log(
    dovecot: Dovecot,
    pattern: str | re.Pattern[str],
    *,
    since: int = 0,
    timeout: float = 5.0,
) -> re.Match[str]:
    """Poll Dovecot's log (from byte ``since``, see ``log_offset()``) until
    ``pattern`` (a regex, MULTILINE when a str) matches; AssertionError after
    ``timeout`` seconds.  Dovecot's log process writes a line a few ms after
    the event, hence the polling (bounded, 10 ms steps)."""
    regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
    deadline = time.monotonic() + timeout
    while True:
        text = dovecot.read_log_since(since)
        match = regex.search(text)
        if match is not None:
            return match
        if time.monotonic() >= deadline:
            tail = "\n".join(text.splitlines()[-15:])
            raise AssertionError(
                f"no match for {regex.pattern!r} in Dovecot's log within {timeout}s; "
                f"its end:\n{tail}"
            )
        time.sleep(0.01)


def wait_for_login(
    dovecot: Dovecot, user: str, *, since: int = 0, timeout: float = 5.0
) -> DovecotLogin:
    """The first "Login:" of ``user`` in Dovecot's log after byte ``since``
    (take ``dovecot.log_offset()`` before connecting); waits up to
    ``timeout`` seconds for it."""
    match = wait_for_log(
        dovecot,
        rf"^.*pop3-login: Info: Login: user=<{re.escape(user)}>,.*$",
        since=since,
        timeout=timeout,
    )
    (login,) = find_logins(match[0])
    return login


def _unusable_host(host: str) -> str | None:
    """None if we can bind ``host`` (e.g. 127.0.0.2), else why not."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
    except OSError as exc:
        return f"cannot bind {host}: {exc}"
    return None


@contextlib.contextmanager
def start_dovecot(cert: CertFiles, **options: Any) -> Iterator[Dovecot]:
    """A running TLS Dovecot serving ``cert`` (``tls_port`` verified against
    ``cert.ca`` at start), stopped afterwards.  ``options`` go to ``Dovecot``
    (``ssl_required``, ``trusted_networks``, ``host``, ``users``, ...).

    Skips (fails with CI=true) the test, like the ``dovecot`` fixture, when
    Dovecot cannot be set up or started; depend on ``dovecot_available``.
    """
    host = options.get("host", "127.0.0.1")
    reason = _unusable_host(host)
    if reason is not None:
        _unavailable(f"no address for a TLS Dovecot: {reason}")
    with running_dovecot(
        lambda: Dovecot(ssl_cert=cert.cert, ssl_key=cert.key, verify_ca=cert.ca, **options),
        " with TLS",
    ) as server:
        yield server


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """The test CA: issued ``proxy_cert`` and ``upstream_cert``;
    ``client_ssl_context()`` trusts it (and nothing else)."""
    return session_ca()


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session directory for the certificate files."""
    directory = tmp_path_factory.mktemp("tls")
    # Readable for Dovecot's processes when not root (root reads anything).
    directory.chmod(0o755)
    return directory


@pytest.fixture(scope="session")
def proxy_cert(tls_ca: trustme.CA, tls_dir: Path) -> CertFiles:
    """The proxy's server certificate (localhost, 127.0.0.1, ::1) from ``tls_ca``."""
    return write_cert_files(tls_ca, tls_dir, "proxy", PROXY_IDENTITIES)


@pytest.fixture(scope="session")
def upstream_cert(tls_ca: trustme.CA, tls_dir: Path) -> CertFiles:
    """Dovecot's certificate (localhost, 127.0.0.1, 127.0.0.2, ::1) from ``tls_ca``."""
    return write_cert_files(tls_ca, tls_dir, "upstream", UPSTREAM_IDENTITIES)


@pytest.fixture(scope="session")
def other_ca_cert(tls_dir: Path) -> CertFiles:
    """A certificate for the same names from a different CA (``.ca``): one a
    client trusting only ``tls_ca`` must refuse."""
    other = trustme.CA(organization_name="popproxy tests, an untrusted CA")
    return write_cert_files(other, tls_dir, "other-ca", OTHER_CA_IDENTITIES)


@pytest.fixture(scope="session")
def dovecot_tls(dovecot_available: None, upstream_cert: CertFiles) -> Iterator[Dovecot]:
    """Dovecot with TLS (``upstream_cert``): STLS on ``port`` (plaintext login
    allowed too), implicit TLS on ``tls_port``.  XCLIENT is not trusted."""
    with start_dovecot(upstream_cert) as server:
        yield server


@pytest.fixture(scope="session")
def dovecot_tls_required(dovecot_available: None, upstream_cert: CertFiles) -> Iterator[Dovecot]:
    """Like ``dovecot_tls`` but ``ssl = required``, on 127.0.0.2: on ``port``,
    USER (and AUTH) before STLS get "-ERR [AUTH] Plaintext authentication
    disallowed on non-secure (SSL/TLS) connections." and CAPA lists no SASL
    mechanism."""
    with start_dovecot(upstream_cert, host="127.0.0.2", ssl_required=True) as server:
        yield server


@pytest.fixture(scope="session")
def dovecot_trusted(dovecot_available: None, upstream_cert: CertFiles) -> Iterator[Dovecot]:
    """Like ``dovecot_tls`` plus ``login_trusted_networks = 127.0.0.0/8 ::1``:
    greeting "+OK [XCLIENT] ...", and XCLIENT ADDR=/PORT=/SESSION= is obeyed."""
    with start_dovecot(upstream_cert, trusted_networks=TRUSTED_NETWORKS) as server:
        yield server


@pytest.fixture(scope="session")
def dovecot_wrong_cert(dovecot_available: None, other_ca_cert: CertFiles) -> Iterator[Dovecot]:
    """Dovecot presenting ``other_ca_cert`` (not from ``tls_ca``) on STLS and
    pop3s: a client trusting ``tls_ca`` must refuse it."""
    with start_dovecot(other_ca_cert) as server:
        yield server
