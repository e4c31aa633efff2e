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

Kubernetes (``deploy/kubernetes/audit-shipping``): Fluent Bit does not run
here, so the log host is fed what Fluent Bit's syslog output writes (its
framing and byte order mark, over TLS), and the component's files are
checked against each other, the base manifests and the rsyslog files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import ssl
import subprocess
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
import yaml

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


def write_trail(path: Path, cp_path: Path, signer: Signer, sessions: int,
                after_session: Callable[[int], None] | None = None) -> list[bytes]:
    """A signed trail written by popproxy's trail (rotating as it goes);
    returns the records' lines in chain order.

    ``after_session(n)``, if given, is called after each session's records
    are written, with the number of lines written so far: a follower can be
    waited for there, so that a file is never rotated before the follower
    has read it.  In production a file is rotated at ``rotate_size``,
    megabytes after the follower first opened it; here it is 8 KiB, and
    imfile cannot ship a file that was renamed before it ever opened it.
    """
    from popproxy.events import EndReason, SessionClosed, SessionOpened

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
        trail.observe(info, SessionClosed(EndReason.QUIT, 0.5, 10, 20, 1))
        if after_session is not None:
            after_session(sum(len(f.read_bytes().splitlines())
                              for f in [*rotated_files(path), path]))
    trail.close()
    files = [*rotated_files(path), path]
    assert len(files) >= 3, "the trail should have rotated at least twice"
    return [line for f in files for line in f.read_bytes().splitlines()]


def take_frames(buf: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """RFC 6587 octet-counted frames ("LEN SP MSG") of "APP-NAME SP LINE"
    complete in ``buf``, and what is left of it."""
    got: list[tuple[str, bytes]] = []
    while (space := buf.find(b" ")) > 0 and len(buf) >= space + 1 + int(buf[:space]):
        size = int(buf[:space])
        frame, buf = buf[space + 1:space + 1 + size], buf[space + 1 + size:]
        app, _, line = frame.partition(b" ")
        got.append((app.decode(), line))
    return got, buf


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


@dataclass
class LogHost:
    """``deploy/rsyslog/log-host.conf`` running, with the test's ear on it:
    every line it writes, as (app name, line), in ``lines``."""

    port: int
    received: Path
    daemon: Rsyslogd
    lines: list[tuple[str, bytes]] = field(default_factory=list)
    _more: trio.Event = field(default_factory=trio.Event)

    async def listen(self, ear: trio.SocketListener) -> None:
        """Take the log host's connection to the ear and keep reading it."""
        stream = await ear.accept()
        buf = b""
        async with stream:
            while chunk := await stream.receive_some(65536):
                buf += chunk
                frames, buf = take_frames(buf)
                if frames:
                    self.lines += frames
                    self._more.set()
                    self._more = trio.Event()

    async def heard(self, count: int, app: str | None = None) -> list[tuple[str, bytes]]:
        """Once the log host wrote ``count`` lines (of ``app``): all it wrote."""
        with trio.fail_after(60):
            while sum(1 for a, _ in self.lines if app in (None, a)) < count:
                await self._more.wait()
        return list(self.lines)

    def files(self) -> tuple[Path, Path]:
        """The trail and the checkpoint copy the log host wrote (one sender)."""
        (host_dir,) = self.received.iterdir()
        return host_dir / "audit.jsonl", host_dir / "audit.checkpoints"


@contextlib.asynccontextmanager
async def log_host_running(tmp_path: Path, certs: dict[str, Path]) -> AsyncIterator[LogHost]:
    received = tmp_path / "received"
    dropins = tmp_path / "log-host.d"
    dropins.mkdir()
    # The test's ear on the log host: every line, as it writes it, goes to
    # the test too (octet-counted: exact), through the drop-in directory.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    ear_port = listeners[0].socket.getsockname()[1]
    (dropins / "to-test.conf").write_text(
        f'action(type="omfwd" target="127.0.0.1" port="{ear_port}" protocol="tcp"\n'
        '       TCP_Framing="octet-counted" template="test-app-and-line")\n')
    test_template = tmp_path / "test-template.conf"
    test_template.write_text(
        'template(name="test-app-and-line" type="string" string="%app-name% %$.line%")\n')
    port_file = tmp_path / "log-host.port"
    conf = render(LOG_HOST, tmp_path / "log-host.conf", {
        'port="6514"': f'port="0" listenPortFileName="{port_file}"',
        "/etc/rsyslog-tls/ca.pem": str(certs["ca"]),
        "/etc/rsyslog-tls/log-host.pem": str(certs["log_host"]),
        "/etc/rsyslog-tls/log-host-key.pem": str(certs["log_host_key"]),
        "/srv/popproxy-audit/": f"{received}/",
        "/etc/rsyslog.d/popproxy-log-host.d/": f"{dropins}/",
    })
    daemon = Rsyslogd("log-host", [test_template, conf])
    daemon.check()
    await daemon.start()
    try:
        host = LogHost(int(port_file.read_text()), received, daemon)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.listen, listeners[0])
            yield host
            nursery.cancel_scope.cancel()
    finally:
        await daemon.stop()  # its files are complete once it has stopped
        for listener in listeners:
            await listener.aclose()
    daemon.remove()


async def test_rsyslog_ships_the_trail_and_its_checkpoints_unchanged_over_tls(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    rsyslog_or_skip()
    logs = tmp_path / "popproxy"
    logs.mkdir()
    trail_path, cp_path = logs / "audit.jsonl", logs / "audit.checkpoints"
    async with log_host_running(tmp_path, certs) as log_host:
        shipper_conf = render(SHIPPER, tmp_path / "popproxy-audit.conf", {
            "/var/log/popproxy/audit.jsonl": str(trail_path),
            "/var/log/popproxy/audit.checkpoints": str(cp_path),
            'target="logs.example.org" port="6514"':
                f'target="127.0.0.1" port="{log_host.port}"',
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

            def shipped(count: int) -> None:
                trio.from_thread.run(log_host.heard, count, "popproxy-audit")

            lines = await trio.to_thread.run_sync(write_trail, trail_path, cp_path, signer, 30,
                                                  shipped)
            copies = cp_path.read_bytes().splitlines()
            assert copies, "the trail wrote no checkpoint copies"
            got = await log_host.heard(len(lines) + len(copies))
        finally:
            await shipper.stop()
    shipper.remove()

    # In order, unchanged: what the trail wrote, and the checkpoint copies.
    assert [line for app, line in got if app == "popproxy-audit"] == lines
    assert [line for app, line in got if app == "popproxy-checkpoints"] == copies
    # The log host's files hold the same bytes, and verify with the public key.
    shipped_trail, shipped_cps = log_host.files()
    assert shipped_trail.read_bytes() == b"".join(line + b"\n" for line in lines)
    assert shipped_cps.read_bytes() == cp_path.read_bytes()
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]
    assert any("测试" in str(r.get("text")) for r in records)
    status = audit_main(["verify", "--key", str(signer.verifier), "--checkpoints",
                         str(shipped_cps), str(shipped_trail)])
    assert status == 0


# --------------------------------------------------------------------------
# Kubernetes: the Fluent Bit sidecar (Fluent Bit itself does not run here).

K8S = REPO / "deploy" / "kubernetes"
COMPONENT = K8S / "audit-shipping"


def fluent_bit_message(app: str, line: bytes) -> bytes:
    """One message as Fluent Bit's syslog output writes it over TCP/TLS
    (plugins/out_syslog: RFC 5424 header, a UTF-8 BOM before the text,
    newline framing)."""
    return (b"<134>1 2026-12-05T12:00:00.000000Z popproxy-6c9f7d-x2x7q " + app.encode()
            + b" - - - \xef\xbb\xbf" + line + b"\n")


async def test_the_log_host_takes_what_fluent_bit_sends(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    """The Kubernetes path's far end: Fluent Bit's framing and byte order
    mark, over TLS with a client certificate, land as the lines themselves."""
    rsyslog_or_skip()
    logs = tmp_path / "popproxy"
    logs.mkdir()
    trail_path, cp_path = logs / "audit.jsonl", logs / "audit.checkpoints"
    signer = Signer.generate("k8s-test")
    lines = write_trail(trail_path, cp_path, signer, 12)
    copies = cp_path.read_bytes().splitlines()
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    context.load_cert_chain(str(certs["client"]), str(certs["client_key"]))
    async with log_host_running(tmp_path, certs) as log_host:
        tcp = await trio.open_tcp_stream("127.0.0.1", log_host.port)
        stream = trio.SSLStream(tcp, context, server_hostname="logs.example.org")
        await stream.do_handshake()
        data = b"".join(fluent_bit_message("popproxy-audit", x) for x in lines)
        data += b"".join(fluent_bit_message("popproxy-checkpoints", x) for x in copies)
        await stream.send_all(data)
        got = await log_host.heard(len(lines) + len(copies))
        await stream.aclose()
    assert [line for app, line in got if app == "popproxy-audit"] == lines
    shipped_trail, shipped_cps = log_host.files()
    assert shipped_trail.parent.name == "popproxy-6c9f7d-x2x7q"
    assert shipped_trail.read_bytes() == b"".join(line + b"\n" for line in lines)
    assert shipped_cps.read_bytes() == cp_path.read_bytes()
    assert audit_main(["verify", "--key", str(signer.verifier), "--checkpoints",
                       str(shipped_cps), str(shipped_trail)]) == 0


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_the_fluent_bit_sidecar_ships_the_files_popproxy_writes() -> None:
    """The component's pieces agree with each other, with the base
    manifests and with the rsyslog files: paths, mounts, tags, TLS."""
    kustomization = _yaml(COMPONENT / "kustomization.yaml")
    assert kustomization["kind"] == "Component"
    (generated,) = kustomization["configMapGenerator"]
    assert generated["files"] == ["fluent-bit.yaml"]
    patch = _yaml(COMPONENT / "sidecar.yaml")
    base = _yaml(K8S / "deployment.yaml")
    assert (patch["kind"], patch["metadata"]["name"]) == (base["kind"], base["metadata"]["name"])
    pod = patch["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    base_pod = base["spec"]["template"]["spec"]
    (base_container,) = base_pod["containers"]
    assert base_container["name"] in containers
    base_volumes = {v["name"] for v in base_pod["volumes"]}

    sidecar = containers["audit-shipper"]
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert set(mounts) <= set(volumes) | base_volumes
    audit_dir = next(m["mountPath"] for m in base_container["volumeMounts"]
                     if m["name"] == "audit")
    assert mounts["audit"] == {"name": "audit", "mountPath": audit_dir, "readOnly": True}
    assert volumes["audit-shipper-config"]["configMap"]["name"] == generated["name"]

    # popproxy's configuration (configmap.yaml) writes the trail where the sidecar reads it.
    toml = _yaml(K8S / "configmap.yaml")["data"]["popproxy.toml"]
    audit = tomllib.loads(toml)["audit"]
    config = _yaml(COMPONENT / "fluent-bit.yaml")
    inputs = {i["tag"]: i for i in config["pipeline"]["inputs"]}
    assert inputs["popproxy-audit"]["path"] == audit["path"]
    assert Path(inputs["popproxy-checkpoints"]["path"]).parent == Path(audit_dir)
    comment = (COMPONENT / "kustomization.yaml").read_text()
    assert f'checkpoint_path = "{inputs["popproxy-checkpoints"]["path"]}"' in comment
    key_mount = next(m for m in containers["popproxy"]["volumeMounts"]
                     if m["name"] == "audit-signing-key")
    assert f'sign_key = "{key_mount["mountPath"]}/audit-signing.key"' in comment
    assert volumes["audit-signing-key"]["secret"]["defaultMode"] & 0o007 == 0
    for tail in inputs.values():
        assert tail["name"] == "tail"
        assert tail["read_from_head"] is True
        assert tail["skip_long_lines"] is False  # a long record is shipped, never skipped
        assert Path(tail["db"]).parent == Path(mounts["audit-shipper-state"]["mountPath"])
    # Each file goes out under the name the rsyslog files use for it.
    rsyslog_tags = set(re.findall(r'tag="([^"]+)"', SHIPPER.read_text()))
    log_host_apps = set(re.findall(r'\$app-name == "([^"]+)"', LOG_HOST.read_text()))
    assert set(inputs) == rsyslog_tags == log_host_apps
    tls_dir = Path(mounts["audit-shipper-tls"]["mountPath"])
    outputs = config["pipeline"]["outputs"]
    assert {o["match"] for o in outputs} == set(inputs)
    for out in outputs:
        assert out["name"] == "syslog"
        assert out["syslog_appname_preset"] == out["match"]
        assert out["syslog_format"] == "rfc5424"
        assert out["syslog_message_key"] == "log"  # tail's key for the whole line
        assert out["syslog_maxsize"] >= 65536  # the default, 2048, would cut records
        assert (out["tls"], out["tls.verify"], out["port"]) == (True, True, 6514)
        for key in ("tls.ca_file", "tls.crt_file", "tls.key_file"):
            assert Path(out[key]).parent == tls_dir
        assert out["retry_limit"] == "no_limits"


def test_the_component_builds_with_kustomize(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    # kustomize takes relative paths only.
    base, component = (os.path.relpath(p, overlay) for p in (K8S, COMPONENT))
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {base}\ncomponents:\n  - {component}\n")
    done = subprocess.run([kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone",
                           str(overlay)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    names = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert names == ["popproxy", "audit-shipper"]
