"""The deploy files, the dashboard and the provisioning: they parse and agree.

A deploy file that names the wrong port, probe path or config path fails
only in production, so these tests read every file and check that the
pieces name each other correctly: the container's config path and ports,
the compose services and mounts, the Kubernetes probes and selectors, the
Grafana provisioning paths, and that every metric a dashboard panel or an
alert rule uses is one popproxy exports.  Real tools run where available:
``systemd-analyze verify`` and ``security``, ``doveconf``, ``kubectl
kustomize``, and the container's health-check command against a live
endpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from prometheus_client import CollectorRegistry

from popproxy.aggregate import WorkerMetrics
from popproxy.config import Config, HostPort, LimitsConfig, load_config
from popproxy.metrics import Metrics
from tests.proxy_fixtures import RunningProxy
from tests.test_metrics_support import start_metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SYSTEMD_UNIT = DEPLOY / "systemd" / "popproxy.service"
CONTAINERFILE = DEPLOY / "Containerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "dashboards" / "popproxy.json"
PROVISIONING = REPO / "dashboards" / "provisioning"
OPERATIONS = REPO / "docs" / "operations.md"

CONFIG_PATH = "/etc/popproxy/popproxy.toml"
ROWS = ["Traffic", "Latency", "Mailbox activity", "Security", "Health"]


# --------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given (systemd allows repeats)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        k, _, v = line.partition("=")
        settings.setdefault(k.strip(), []).append(v.strip())
    return settings


def test_systemd_unit_is_hardened() -> None:
    s = unit_settings(SYSTEMD_UNIT.read_text())
    one = {k: v[-1] for k, v in s.items()}
    assert one["User"] == "popproxy"
    assert one["ProtectSystem"] == "strict"
    assert one["NoNewPrivileges"] == "yes"
    assert one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert one["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert one["ProtectHome"] == "yes"
    assert one["PrivateTmp"] == "yes"
    assert one["ExecStart"].endswith(f"/popproxy run -c {CONFIG_PATH}")
    assert "-HUP $MAINPID" in one["ExecReload"]
    assert one["KillSignal"] == "SIGTERM"
    # The audit trail's directory is the only writable one.
    assert one["LogsDirectory"] == "popproxy"
    assert "ReadWritePaths" not in one
    # systemd must wait out the drain before it kills.
    stop = one["TimeoutStopSec"]
    assert stop.endswith("s")
    assert float(stop[:-1]) > LimitsConfig().drain_timeout
    # The unit installs the example configuration, which runs a worker
    # process per CPU.
    assert "deploy/popproxy.example.toml /etc/popproxy/popproxy.toml" in SYSTEMD_UNIT.read_text()
    assert load_config(DEPLOY / "popproxy.example.toml").server.workers == "auto"
    sysusers = (DEPLOY / "systemd" / "popproxy.sysusers").read_text()
    assert re.search(r"^u popproxy ", sysusers, re.MULTILINE)


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed here")
    return path


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """The unit with its popproxy binary pointed at an executable that exists."""
    fake = tmp_path / "bin" / "popproxy"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = SYSTEMD_UNIT.read_text()
    execs = [ln for ln in text.splitlines() if ln.startswith(("ExecStart=", "ExecStartPre="))]
    assert len(execs) == 2
    assert all(ln.split("=", 1)[1].startswith("/opt/popproxy/bin/popproxy ") for ln in execs)
    unit = tmp_path / "popproxy.service"
    unit.write_text(text.replace("/opt/popproxy/bin/popproxy", str(fake)))
    return unit


def test_systemd_analyze_verify_accepts_the_unit(runnable_unit: Path) -> None:
    tool = systemd_analyze()
    result = subprocess.run(
        [tool, "verify", str(runnable_unit)], capture_output=True, text=True, timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Misspelt keys are only warnings ("Unknown key ..., ignoring").
    for line in output.splitlines():
        if "popproxy.service" in line:
            assert not re.search(r"Unknown|ignoring|Invalid|Failed to parse", line), line


def test_systemd_analyze_security_rates_the_unit_ok(runnable_unit: Path) -> None:
    tool = systemd_analyze()
    # Exposure is 0-10; "OK" is below 2.  --threshold takes tenths.
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--threshold=20", "--no-pager", str(runnable_unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if "Unknown command verb" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot rate units offline: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------
# The container image
# --------------------------------------------------------------------------


def containerfile_instructions() -> list[tuple[str, str]]:
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def healthcheck_command() -> list[str]:
    checks = [rest for word, rest in containerfile_instructions() if word == "HEALTHCHECK"]
    assert len(checks) == 1
    command = checks[0].split(" CMD ", 1)[1]
    argv: list[str] = json.loads(command)
    return argv


def test_containerfile_is_slim_non_root_and_checks_health() -> None:
    instructions = containerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms
    assert all(re.match(r"python:3\.\d+-slim\b", f) for f in froms), froms
    users = [rest for word, rest in instructions if word == "USER"]
    assert users
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    exposed = {int(p) for word, rest in instructions if word == "EXPOSE" for p in rest.split()}
    assert exposed == {1110, 9110}
    assert "http://127.0.0.1:9110/healthz" in " ".join(healthcheck_command())
    cmd = json.loads(next(rest for word, rest in instructions if word == "CMD"))
    entry = json.loads(next(rest for word, rest in instructions if word == "ENTRYPOINT"))
    assert [*entry, *cmd] == ["popproxy", "run", "-c", CONFIG_PATH]
    # Files the build copies exist.
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), src


async def test_the_container_healthcheck_command_works(
    nursery: trio.Nursery, demo_proxy: RunningProxy
) -> None:
    endpoint = await start_metrics(nursery, demo_proxy)
    argv = [a.replace(":9110/", f":{endpoint.address.port}/") for a in healthcheck_command()]
    assert argv[0] == "python"
    argv[0] = sys.executable
    ok = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert ok.returncode == 0, ok.stderr
    with socket_bound_not_listening() as port:
        argv = [a.replace(":9110/", f":{port}/") for a in healthcheck_command()]
        argv[0] = sys.executable
        bad = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert bad.returncode != 0


@contextlib.contextmanager
def socket_bound_not_listening() -> Iterator[int]:
    """A loopback port that refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


# --------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (resolved against deploy/) of bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        src, dst = volume.split(":")[:2]
        if src.startswith("."):
            out[dst] = (DEPLOY / src).resolve()
    return out


def test_compose_services_ports_and_mounts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"dovecot", "popproxy", "prometheus", "grafana"}
    for name, service in services.items():
        for path in mounts(service).values():
            assert path.exists(), (name, path)
        if "build" in service:
            build = service["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()

    proxy = services["popproxy"]
    assert (DEPLOY / proxy["build"]["context"] / proxy["build"]["dockerfile"]).resolve() == (
        CONTAINERFILE.resolve())
    config_file = mounts(proxy)[CONFIG_PATH]
    config = load_config(config_file)
    listen_port = _listen_addresses(config)[0].port
    assert config.metrics.address is not None
    metrics_port = config.metrics.address.port
    published = {int(p.rsplit(":", 1)[1]): p for p in proxy["ports"]}
    assert set(published) == {listen_port, metrics_port}
    assert all(p.startswith("127.0.0.1:") for p in proxy["ports"])
    # The proxy talks to the dovecot service on the port dovecot.conf opens.
    assert config.upstream.address.host == "dovecot"
    dovecot_conf = (DEPLOY / "compose" / "dovecot" / "dovecot.conf").read_text()
    assert re.search(rf"port = {config.upstream.address.port}\b", dovecot_conf)
    health = " ".join(proxy["healthcheck"]["test"])
    assert f"127.0.0.1:{metrics_port}/healthz" in health
    assert proxy["read_only"] is True
    assert proxy["cap_drop"] == ["ALL"]
    assert proxy["stop_signal"] == "SIGTERM"
    grace = int(proxy["stop_grace_period"].rstrip("s"))
    assert grace > config.limits.drain_timeout

    # Prometheus scrapes popproxy:<metrics port> and loads alerts.yml.
    prom = services["prometheus"]
    prom_mounts = mounts(prom)
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    prom_config_path = config_arg.split("=", 1)[1]
    prom_config = yaml.safe_load(prom_mounts[prom_config_path].read_text())
    job = next(j for j in prom_config["scrape_configs"] if j["job_name"] == "popproxy")
    assert job["static_configs"][0]["targets"] == [f"popproxy:{metrics_port}"]
    for rule_file in prom_config["rule_files"]:
        assert prom_mounts[rule_file] == ALERTS.resolve()

    # Grafana: provisioning where Grafana reads it, the dashboard where the
    # provider looks, the datasource URL is the prometheus service.
    grafana = services["grafana"]
    g = mounts(grafana)
    assert g["/etc/grafana/provisioning/datasources"] == (PROVISIONING / "datasources").resolve()
    assert g["/etc/grafana/provisioning/dashboards"] == (PROVISIONING / "dashboards").resolve()
    provider = provider_config()
    dash_target = next(dst for dst, src in g.items() if src == DASHBOARD.resolve())
    assert str(Path(dash_target).parent) == provider["options"]["path"]
    assert datasource_config()["url"] == "http://prometheus:9090"
    assert any(p.endswith(":9090") for p in prom["ports"])


def _listen_addresses(config: Config) -> list[HostPort]:
    return [a for listener in config.listeners for a in listener.addresses]


def test_compose_dovecot_config_is_valid() -> None:
    conf = DEPLOY / "compose" / "dovecot" / "dovecot.conf"
    users = (DEPLOY / "compose" / "dovecot" / "users").read_text().split()
    from popproxy.demo import DEMO_USERS

    assert sorted(users) == sorted(f"{u}:{{PLAIN}}{p}" for u, p in DEMO_USERS.items())
    doveconf = shutil.which("doveconf", path="/usr/bin:/usr/sbin:/usr/local/bin:/usr/local/sbin")
    if doveconf is None:
        pytest.skip("doveconf is not installed here")
    result = subprocess.run(
        [doveconf, "-n", "-c", str(conf)], capture_output=True, text=True, timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "protocols = pop3" in result.stdout


# --------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------


def k8s_docs() -> Iterator[dict[str, Any]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield doc


def k8s_by_kind(app: str) -> dict[str, dict[str, Any]]:
    """The manifests labelled ``app.kubernetes.io/name: <app>``, by kind."""
    docs = {}
    for doc in k8s_docs():
        if doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") != app:
            continue
        assert doc["kind"] not in docs, doc["kind"]
        docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """popproxy's own manifests (Valkey's are checked on their own)."""
    return k8s_by_kind("popproxy")


@pytest.fixture(scope="module")
def valkey() -> dict[str, dict[str, Any]]:
    return k8s_by_kind("popproxy-valkey")


def test_every_manifest_is_popproxys_or_valkeys(
    k8s: dict[str, dict[str, Any]], valkey: dict[str, dict[str, Any]]
) -> None:
    assert len(list(k8s_docs())) == len(k8s) + len(valkey)


def test_kubernetes_manifests_agree(k8s: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    assert set(k8s) == {
        "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "PodMonitor",
        "PrometheusRule",
    }
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")

    deployment = k8s["Deployment"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # The configuration comes from the ConfigMap, at the path the args name.
    cm = k8s["ConfigMap"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/popproxy")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert container["args"] == ["run", "-c", CONFIG_PATH]
    toml = cm["data"][Path(CONFIG_PATH).name]
    (tmp_path / "popproxy.toml").write_text(toml)
    config = load_config(tmp_path / "popproxy.toml")
    assert config.metrics.address is not None
    assert ports["metrics"] == config.metrics.address.port
    assert ports["pop3"] == _listen_addresses(config)[0].port
    assert config.metrics.address.host == "0.0.0.0"
    assert config.audit.path is not None
    assert any(m["mountPath"] == str(config.audit.path.parent) for m in container["volumeMounts"])

    # Probes: liveness /healthz, readiness /readyz, on the metrics port.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    # Non-root, read-only, no capabilities, the image's uid.
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    pod_sc = pod["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    image_uid = next(
        rest for word, rest in reversed(containerfile_instructions()) if word == "USER"
    ).split(":")[0]
    assert pod_sc["runAsUser"] == int(image_uid)
    # SIGTERM drains: the grace period covers the preStop pause and the drain.
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.limits.drain_timeout + 5

    # The Service and the PodMonitor find the pods and the named ports.
    service = k8s["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    monitor = k8s["PodMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    # The alerts select job="popproxy": the PodMonitor's jobLabel gives it.
    assert pod_labels[monitor["spec"]["jobLabel"]] == "popproxy"
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        pod_labels.items())


def test_kubernetes_replicas_share_their_limits_through_valkey(
    k8s: dict[str, dict[str, Any]], valkey: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    assert set(valkey) == {"Deployment", "Service", "NetworkPolicy"}
    deployment = k8s["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    (tmp_path / "popproxy.toml").write_text(
        k8s["ConfigMap"]["data"][Path(CONFIG_PATH).name])
    config = load_config(tmp_path / "popproxy.toml")
    # Workers: a number, not "auto" (which would count the node's CPUs),
    # and a core requested for each.
    assert isinstance(config.server.workers, int)
    assert config.server.workers >= 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert float(container["resources"]["requests"]["cpu"]) == config.server.workers
    assert "cpu" not in container["resources"].get("limits", {})
    # [state] names the Valkey Service, on the port it serves.
    assert config.state.backend == "redis"
    service = valkey["Service"]
    assert config.state.target.host == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert config.state.target.port == port["port"]
    vk_pod = valkey["Deployment"]["spec"]["template"]
    vk_labels = vk_pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= vk_labels.items()
    assert valkey["Deployment"]["spec"]["selector"]["matchLabels"].items() <= vk_labels.items()
    (vk,) = vk_pod["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in vk["ports"]}
    assert vk["securityContext"]["readOnlyRootFilesystem"] is True
    assert vk["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert vk_pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # Only popproxy pods may reach it, and popproxy's own selectors (Service,
    # PodMonitor, PDB) do not pick up the Valkey pod.
    policy = valkey["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= vk_labels.items()
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    popproxy_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert source["podSelector"]["matchLabels"].items() <= popproxy_labels.items()
    assert [p["port"] for p in rule["ports"]] == [port["targetPort"]]
    for selector in (k8s["Service"]["spec"]["selector"],
                     k8s["PodMonitor"]["spec"]["selector"]["matchLabels"],
                     k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert not selector.items() <= vk_labels.items()


def test_prometheus_rule_matches_alerts_yml(k8s: dict[str, dict[str, Any]]) -> None:
    assert k8s["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_kustomize_renders_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(kinds) == sorted(d["kind"] for d in k8s_docs())


# --------------------------------------------------------------------------
# Dashboard and provisioning
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    WorkerMetrics(registry, 1)  # the supervisor's own, with [server] workers > 1
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        for suffix in suffixes.get(family.type, [""]):
            names.add(family.name + suffix)
        names.update(sample.name for sample in family.samples)
    return names


_METRIC = re.compile(r"\bpopproxy_[a-z0-9_]+\b")


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "popproxy-overview"
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["datasource"]["uid"] == "${datasource}"
    assert instance["definition"] == "label_values(popproxy_build_info, instance)"
    assert instance["includeAll"] is True

    panels = dashboard["panels"]
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        where = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        assert panel.get("description"), where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", where
            assert 'instance=~"$instance"' in target["expr"], where
    # No two panels overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def test_dashboard_rows_cover_the_issue(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for needle in (
        "popproxy_sessions_active", "rate(popproxy_sessions_total",
        "sum by (command, outcome) (rate(popproxy_commands_total",
        "histogram_quantile(0.5, sum by (le, command)",
        "histogram_quantile(0.95, sum by (le, command)",
        "histogram_quantile(0.99, sum by (le, command)",
        "popproxy_messages_retrieved_total", "popproxy_messages_deleted_total",
        "popproxy_bytes_total", 'popproxy_auth_total{instance=~"$instance", outcome="fail"}',
        'action="deny"', 'action="rate_limit"', "popproxy_upstream_errors_total",
        "popproxy_audit_errors_total", "popproxy_config_reload_total",
    ):
        assert needle in exprs, needle


def test_queries_use_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_metric_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    exprs += [dashboard["templating"]["list"][1]["definition"]]
    exprs += [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    used = {name for expr in exprs for name in _METRIC.findall(expr)}
    assert used
    assert used <= exported, used - exported


def provider_config() -> dict[str, Any]:
    data = yaml.safe_load((PROVISIONING / "dashboards" / "popproxy.yaml").read_text())
    assert data["apiVersion"] == 1
    (provider,) = data["providers"]
    assert provider["type"] == "file"
    result: dict[str, Any] = provider
    return result


def datasource_config() -> dict[str, Any]:
    data = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert data["apiVersion"] == 1
    (source,) = data["datasources"]
    assert source["type"] == "prometheus"
    result: dict[str, Any] = source
    return result


def test_provisioning_files() -> None:
    assert provider_config()["options"]["path"].startswith("/var/lib/grafana/dashboards")
    assert datasource_config()["isDefault"] is True


# --------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------


def test_operations_doc_covers_every_deploy_file() -> None:
    text = OPERATIONS.read_text()
    files = [
        p for p in [*DEPLOY.rglob("*"), *(REPO / "dashboards").rglob("*")]
        if p.is_file() and p.name != "popproxy.example.toml"
        and not p.name.endswith(".dockerignore") and "__pycache__" not in p.parts
    ]
    missing = [str(p.relative_to(REPO)) for p in files if str(p.relative_to(REPO)) not in text]
    assert missing == []
    for alert in (r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"]
                  for r in g["rules"]):
        assert alert in text, alert
    assert shlex.split("promtool test rules deploy/prometheus/alerts_test.yml")[0] in text
