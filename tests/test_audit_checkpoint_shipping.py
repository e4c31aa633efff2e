"""``deploy/rsyslog/``: the trail and its checkpoints, shipped off the host, unchanged.

Two real rsyslogd: one runs ``deploy/rsyslog/popproxy-audit.conf`` (imfile
following the trail and the checkpoint copy, RFC 5424 over TLS with
octet-counted framing, RFC 5425), the other ``deploy/rsyslog/log-host.conf``
(the receiving side, TLS with client certificates, one file per kind of
line).  Both files are run as they are in the repository, with their paths
and ports pointed at the test's (``tests.rsyslog.render``); certificates
come from a ``trustme`` CA; everything is on loopback.

The trail is written by popproxy's own ``AuditTrail`` while the shipper
follows it, rotating twice, with lines that are long, non-ASCII and full of
JSON escapes.  The log host hands each line on to the test as well (through
the drop-in directory ``log-host.conf`` includes), so the test waits for
the lines themselves, not for time to pass; then both daemons stop and the
log host's files must equal the trail byte for byte and verify with only
the public key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from popproxy.audit import AuditConfig, open_audit
from popproxy.audit._chain import rotated_files
from popproxy.audit._note import Signer
from popproxy.audit.cli import main as audit_main
from tests.rsyslog import Rsyslogd, render, rsyslog_or_skip

REPO = Path(__file__).resolve().parent.parent
SHIPPER = REPO / "deploy" / "rsyslog" / "popproxy-audit.conf"
LOG_HOST = REPO / "deploy" / "rsyslog" / "log-host.conf"


class Info:
    def __init__(self, id: str, client: str) -> None:
        self.id = id
        self.client = client


def write_trail(path: Path, cp_path: Path, signer: Signer, sessions: int) -> list[bytes]:
    """A signed trail written by popproxy's trail (rotating as it goes);
    returns the records' lines in chain order."""
    from popproxy.events import SessionClosed, SessionOpened

    trail = open_audit(AuditConfig(
        enabled=True, sink="file", path=path, fsync="never", rotate_size=8192,
        signer=signer, checkpoint_records=7, checkpoint_path=cp_path, origin="ship/popproxy"))
    assert trail is not None
    for i in range(sessions):
        info = Info(f"s{i:03d}", f"192.0.2.{i % 250}:{40000 + i}")
        trail.observe(info, SessionOpened(info.client, 0.0))
        # Quotes, backslashes, non-ASCII and a long line: all must arrive as written.
        trail.record({"ts": "2026-12-05T12:00:00.000000Z", "event": "test.note",
                      "session": info.id, "text": 'Grüße "aus" C:\\mail\\ — 测试 ' * 40})
        trail.observe(info, SessionClosed("quit", 0.5, 10, 20, 1))
    trail.close()
    files = [*rotated_files(path), path]
    assert len(files) >= 3, "the trail should have rotated at least twice"
    return [line for f in files for line in f.read_bytes().splitlines()]


async def read_frames(stream: trio.SocketStream, want: int) -> list[tuple[str, bytes]]:
    """RFC 6587 octet-counted frames ("LEN SP MSG") of "APP-NAME SP LINE"."""
    buf = b""
    got: list[tuple[str, bytes]] = []
    while len(got) < want:
        while True:
            space = buf.find(b" ")
            if space > 0 and len(buf) >= space + 1 + int(buf[:space]):
                size = int(buf[:space])
                frame, buf = buf[space + 1:space + 1 + size], buf[space + 1 + size:]
                app, _, line = frame.partition(b" ")
                got.append((app.decode(), line))
                break
            chunk = await stream.receive_some(65536)
            assert chunk, f"the log host closed the connection after {len(got)} lines"
            buf += chunk
    return got


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA(organization_name="popproxy shipping tests")
    d = tmp_path / "tls"
    d.mkdir()
    log_host = ca.issue_cert("logs.example.org")
    client = ca.issue_cert("popproxy-host.example.org")
    files = {"ca": d / "ca.pem", "log_host": d / "log-host.pem",
             "log_host_key": d / "log-host-key.pem", "client": d / "client.pem",
             "client_key": d / "client-key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    log_host.cert_chain_pems[0].write_to_path(str(files["log_host"]))
    log_host.private_key_pem.write_to_path(str(files["log_host_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return files


async def test_rsyslog_ships_the_trail_and_its_checkpoints_unchanged_over_tls(
    tmp_path: Path, certs: dict[str, Path], nursery: trio.Nursery
) -> None:
    rsyslog_or_skip()
    logs = tmp_path / "popproxy"
    logs.mkdir()
    trail_path, cp_path = logs / "audit.jsonl", logs / "audit.checkpoints"
    received = tmp_path / "received"
    dropins = tmp_path / "log-host.d"
    dropins.mkdir()

    # The test's ear on the log host: every line, as it is written there.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    ear_port = listeners[0].socket.getsockname()[1]
    (dropins / "to-test.conf").write_text(
        f'action(type="omfwd" target="127.0.0.1" port="{ear_port}" protocol="tcp"\n'
        '       TCP_Framing="octet-counted" template="test-app-and-line")\n')
    test_template = tmp_path / "test-template.conf"
    test_template.write_text(
        'template(name="test-app-and-line" type="string" string="%app-name% %msg%")\n')

    port_file = tmp_path / "log-host.port"
    log_host_conf = render(LOG_HOST, tmp_path / "log-host.conf", {
        'port="6514"': f'port="0" listenPortFileName="{port_file}"',
        "/etc/rsyslog-tls/ca.pem": str(certs["ca"]),
        "/etc/rsyslog-tls/log-host.pem": str(certs["log_host"]),
        "/etc/rsyslog-tls/log-host-key.pem": str(certs["log_host_key"]),
        "/srv/popproxy-audit/": f"{received}/",
        "/etc/rsyslog.d/popproxy-log-host.d/": f"{dropins}/",
    })
    log_host = Rsyslogd("log-host", [test_template, log_host_conf])
    log_host.check()
    await log_host.start()
    try:
        port = int(port_file.read_text())
        shipper_conf = render(SHIPPER, tmp_path / "popproxy-audit.conf", {
            "/var/log/popproxy/audit.jsonl": str(trail_path),
            "/var/log/popproxy/audit.checkpoints": str(cp_path),
            'target="logs.example.org" port="6514"': f'target="127.0.0.1" port="{port}"',
            "/etc/popproxy/shipping/ca.pem": str(certs["ca"]),
            "/etc/popproxy/shipping/client.pem": str(certs["client"]),
            "/etc/popproxy/shipping/client-key.pem": str(certs["client_key"]),
        })
        shipper = Rsyslogd("shipper", [shipper_conf])
        shipper.check()
        await shipper.start()
        try:
            # The trail is written while rsyslog follows it (and its rotations).
            signer = Signer.generate("ship-test")
            lines = await trio.to_thread.run_sync(write_trail, trail_path, cp_path, signer, 30)
            copies = cp_path.read_bytes().splitlines()
            assert copies, "the trail wrote no checkpoint copies"
            with trio.fail_after(60):
                stream = await listeners[0].accept()
                got = await read_frames(stream, len(lines) + len(copies))
        finally:
            await shipper.stop()
    finally:
        await log_host.stop()
        for listener in listeners:
            await listener.aclose()

    # In order, unchanged: what the trail wrote, and the checkpoint copies.
    assert [line for app, line in got if app == "popproxy-audit"] == lines
    assert [line for app, line in got if app == "popproxy-checkpoints"] == copies
    # The log host's files hold the same bytes, and verify with the public key.
    (host_dir,) = received.iterdir()
    shipped_trail = host_dir / "audit.jsonl"
    shipped_cps = host_dir / "audit.checkpoints"
    assert shipped_trail.read_bytes() == b"".join(line + b"\n" for line in lines)
    assert shipped_cps.read_bytes() == cp_path.read_bytes()
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]
    assert any("测试" in str(r.get("text")) for r in records)
    status = audit_main(["verify", "--key", str(signer.verifier), "--checkpoints",
                         str(shipped_cps), str(shipped_trail)])
    assert status == 0
    shipper.remove()
    log_host.remove()
