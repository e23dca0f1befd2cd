"""Helpers for the chart tests: helm against the dev cluster, a kubeconfig holding only a ServiceAccount token, and
the operator run locally exactly as the chart's Deployment would run it (kwok nodes run no containers)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from llmengine.dev import proc, tools
from llmengine.dev.cluster import ClusterInfo, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llmengine-operator"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Render against the cluster version the dev cluster runs (helm's offline default is older than kubeVersion).
KUBE_VERSION = "1.35.0"


# Every optional feature of the chart on at once (webhook certificate from the operator, the default): what lint,
# the render checks and the API server's validation take as "all features on".
ALL_FEATURES: dict[str, Any] = {
    "replicaCount": 2,
    "imagePullSecrets": ["regcred", {"name": "mirror-cred"}],
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/llmengine"}},
    "store": {"bucket": "engines", "endpoint": "http://minio.storage:9000", "credentialsSecret": "operator-s3"},
    "metrics": {
        "service": {"annotations": {"prometheus.io/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "servingPodMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "alertLabels": {"team": "ml"}},
        "dashboard": {"enabled": True},
    },
    "extraEnv": [{"name": "NO_PROXY", "value": ".svc,.cluster.local"}],
    "extraArgs": ["--verbose"],
    "extraVolumes": [{"name": "store-ca", "configMap": {"name": "store-ca"}}],
    "extraVolumeMounts": [{"name": "store-ca", "mountPath": "/etc/store-ca", "readOnly": True}],
    "podAnnotations": {"example.com/team": "ml"},
    "podLabels": {"example.com/cost-center": "ml"},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
    ],
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    "engineCache": {"hostPath": "/var/cache/llmengine", "sizeBudget": "500Gi"},
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [443, 6443]},
        "extraEgress": [{"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"port": 3128, "protocol": "TCP"}]}],
    },
}


def values_file(values: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def helm_binary() -> str:
    return str(tools.binary("helm"))


def helm(*args: str, kubeconfig: str | None = None) -> str:
    cmd = [helm_binary(), *(["--kubeconfig", kubeconfig] if kubeconfig else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout


def render(
    *args: str, namespace: str = "llmengine-system", release: str = "llmengine-operator"
) -> list[dict[str, Any]]:
    """`helm template` of the chart: every rendered object, hooks and tests included."""
    out = helm("template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION, *args)
    return [d for d in yaml.safe_load_all(out) if d]


def render_notes(*args: str, namespace: str = "llmengine-system", work: Path) -> str:
    """templates/NOTES.txt as `helm install` would print it, rendered offline: `helm template` leaves NOTES.txt out,
    so a copy of the chart renders it into a ConfigMap through `tpl`."""
    chart = work / "chart"
    shutil.copytree(CHART, chart)
    (chart / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}}\n'
    )
    out = helm(
        "template",
        "llmengine-operator",
        str(chart),
        "-n",
        namespace,
        "--kube-version",
        KUBE_VERSION,
        "-s",
        "templates/zz-notes.yaml",
        *args,
    )
    return str(yaml.safe_load(out)["data"]["notes"])


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def rules_table(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """RBAC rules flattened to (apiGroup, resource) -> verbs; rules limited to named objects are not expected."""
    table: dict[tuple[str, str], set[str]] = {}
    for r in rules:
        assert not r.get("resourceNames") and not r.get("nonResourceURLs"), r
        for g in r["apiGroups"]:
            for res in r["resources"]:
                table.setdefault((g, res), set()).update(r["verbs"])
    return table


def named_rules_table(rules: list[dict[str, Any]]) -> dict[tuple[str, str, str], set[str]]:
    """RBAC rules that each name their objects, flattened to (apiGroup, resource, name) -> verbs."""
    table: dict[tuple[str, str, str], set[str]] = {}
    for r in rules:
        assert r.get("resourceNames") and not r.get("nonResourceURLs"), r
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for name in r["resourceNames"]:
                    table.setdefault((g, res, name), set()).update(r["verbs"])
    return table


@dataclass
class Release:
    """One installed release of the chart in the dev cluster."""

    info: ClusterInfo
    name: str
    namespace: str

    @property
    def fullname(self) -> str:
        return self.name if "llmengine-operator" in self.name else f"{self.name}-llmengine-operator"

    def helm(self, *args: str) -> str:
        return helm(*args, kubeconfig=self.info.kubeconfig)

    def install(self, values: Path, *sets: str) -> str:
        return self.helm("install", self.name, str(CHART), "-n", self.namespace, "-f", str(values), *sets, "--wait")

    def upgrade(self, values: Path, *sets: str) -> str:
        return self.helm("upgrade", self.name, str(CHART), "-n", self.namespace, "-f", str(values), *sets, "--wait")

    def uninstall(self) -> str:
        return self.helm("uninstall", self.name, "-n", self.namespace, "--wait")


def adopt_crds(api: Any, release: Release, names: list[str]) -> None:
    """Hand CRDs that exist already (applied by the integration fixture, or kept by an earlier release) to this
    release, as `helm install` requires of objects it did not create."""
    ext = client.ApiextensionsV1Api(api)
    for name in names:
        try:
            ext.patch_custom_resource_definition(
                name,
                {
                    "metadata": {
                        "labels": {"app.kubernetes.io/managed-by": "Helm"},
                        "annotations": {
                            "meta.helm.sh/release-name": release.name,
                            "meta.helm.sh/release-namespace": release.namespace,
                        },
                    }
                },
            )
        except client.exceptions.ApiException as e:
            if e.status != 404:
                raise


def service_account_kubeconfig(api: Any, info: ClusterInfo, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig whose only credential is a bound token of the ServiceAccount (TokenRequest API)."""
    token = (
        client.CoreV1Api(api)
        .create_namespaced_service_account_token(sa, namespace, {"spec": {"expirationSeconds": 3600}})
        .status.token
    )
    admin = yaml.safe_load(Path(info.kubeconfig).read_text())
    cluster = admin["clusters"][0]
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": cluster["name"], "user": sa, "namespace": namespace}}],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


def _resolve_env(api: Any, pod_ns: str, pod_name: str, container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would build it (values, Secret keys, the pod name)."""
    core = client.CoreV1Api(api)
    env: dict[str, str] = {}
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        vf = e["valueFrom"]
        if "fieldRef" in vf:
            assert vf["fieldRef"]["fieldPath"] == "metadata.name", vf
            env[e["name"]] = pod_name
        elif "secretKeyRef" in vf:
            ref = vf["secretKeyRef"]
            data = core.read_namespaced_secret(ref["name"], pod_ns).data or {}
            env[e["name"]] = base64.b64decode(data[ref["key"]]).decode()
        else:
            raise AssertionError(f"unexpected env source {vf}")
    return env


@dataclass
class OperatorProcess:
    popen: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]
    metrics_port: int
    health_port: int

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[str]:
        return self.logs().splitlines()


def _secret_mounts(api: Any, ns: str, spec: dict[str, Any], container: dict[str, Any], root: Path) -> dict[str, str]:
    """Secret volumes written to local directories as the kubelet would mount them: {mountPath: local dir}."""
    core = client.CoreV1Api(api)
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes") or [] if "secret" in v}
    out: dict[str, str] = {}
    for m in container.get("volumeMounts") or []:
        if m["name"] not in secrets:
            continue
        local = root / f"{m['name']}-{uuid.uuid4().hex[:5]}"
        local.mkdir(parents=True)
        for key, val in (core.read_namespaced_secret(secrets[m["name"]], ns).data or {}).items():
            (local / key).write_bytes(base64.b64decode(val))
        out[m["mountPath"]] = str(local)
    return out


def _listening(port: int, p: subprocess.Popen[bytes]) -> bool:
    if p.poll() is not None:
        raise AssertionError(f"operator exited with {p.returncode} before its webhook listened")
    return proc.port_open(port)


@contextmanager
def run_as_deployment(
    api: Any, release: Release, kubeconfig: Path, log_dir: Path, webhook_port: int | None = None
) -> Iterator[OperatorProcess]:
    """Run the installed Deployment's container locally: its command, args and environment as installed (Secret
    references and Secret volumes resolved), with only the ports moved (metrics and health to free ones, the
    webhook to `webhook_port`, where the chart's webhook.url points) and the API reached through `kubeconfig`."""
    dep = client.AppsV1Api(api).read_namespaced_deployment(release.fullname, release.namespace)
    spec = api.sanitize_for_serialization(dep.spec.template.spec)
    (container,) = spec["containers"]
    assert container["command"][0] == "llmengine", container["command"]
    metrics_port, health_port = proc.free_port(), proc.free_port()
    mounts = _secret_mounts(api, release.namespace, spec, container, log_dir)
    args: list[str] = []
    for a in container["command"][1:] + container.get("args", []):
        a = re.sub(r"^--metrics-port=\d+$", f"--metrics-port={metrics_port}", a)
        a = re.sub(r"^--liveness=http://[^/]+/", f"--liveness=http://127.0.0.1:{health_port}/", a)
        if webhook_port is not None:
            a = re.sub(r"^--webhook-port=\d+$", f"--webhook-port={webhook_port}", a)
        for mount, local in mounts.items():
            a = a.replace(f"={mount}", f"={local}")
        args.append(a)
    argv = [sys.executable, "-m", "llmengine.cli", *args]
    env = _resolve_env(api, release.namespace, f"{release.fullname}-{uuid.uuid4().hex[:5]}", container)
    env.update(
        {
            "LLMENGINE_METRICS_PORT": str(metrics_port),
            "LLMENGINE_HEALTH_PORT": str(health_port),
            "KUBECONFIG": str(kubeconfig),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
    )
    log = log_dir / f"operator-{uuid.uuid4().hex[:6]}.log"
    with open(log, "ab") as f:
        p = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    handle = OperatorProcess(p, log, argv, metrics_port, health_port)
    try:
        if webhook_port is not None and any(a.startswith("--webhook-port=") for a in args):
            # The webhook configuration is installed already: engines are admitted only once the webhook listens.
            wait_for("operator webhook listening", lambda: _listening(webhook_port, p), timeout=60, interval=0.2)
        yield handle
    finally:
        proc.stop_child(p, 15)
        # Shown by pytest when the test fails.
        print(f"----- operator log {log} -----\n" + "\n".join(handle.log_lines()[-80:]))


# An HTTP 403 (not the milliseconds of a timestamp like "12:00:01,403"), Forbidden, or Kopf's "Not enough
# permissions" fallbacks (which it logs instead of failing when it may not watch CRDs or namespaces).
_DENIED = re.compile(r"(?<![\d,.:])\b403\b|forbidden|permission", re.IGNORECASE)


def forbidden_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if _DENIED.search(ln)]


def save_fixture(name: str, obj: dict[str, Any]) -> None:
    """Store a live object as a test fixture (only when LLMENGINE_UPDATE_FIXTURES=1)."""
    md = {k: v for k, v in obj["metadata"].items() if k not in ("managedFields", "uid", "resourceVersion")}
    clean = {**obj, "metadata": md}
    FIXTURES.mkdir(exist_ok=True)
    (FIXTURES / name).write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")


def load_fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))
