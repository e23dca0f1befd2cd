"""Every object the chart renders, for the default values, every feature on and the namespaced mode, validated by a
real API server: applied as a server-side dry run with strict field validation, so a misspelled or misplaced field
(which a plain apply would silently drop) fails, as does anything the API server's own validation refuses."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llmengine.dev import tools
from llmengine.dev.cluster import ClusterInfo, wait_for
from tests.e2e.chart_harness import ALL_FEATURES, render, values_file

try:
    tools.binary("helm")
    MONITORING_CRDS = tools.monitoring_crds()
except tools.ToolMissing as e:
    pytest.skip(str(e), allow_module_level=True)

pytestmark = pytest.mark.cluster

# cert-manager's kinds are not in the dev cluster; the chart's other kinds all are (monitoring CRDs installed below).
NOT_SERVED = {"Certificate", "Issuer"}


@pytest.fixture(scope="module")
def monitoring_crds(api: Any) -> None:
    ext = client.ApiextensionsV1Api(api)
    for path in MONITORING_CRDS:
        crd = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as e:
            if e.status != 409:
                raise

        def established(name: str = crd["metadata"]["name"]) -> bool:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conds)

        wait_for(f"CRD {crd['metadata']['name']} Established", established, timeout=60, interval=0.5)


@pytest.fixture
def team_namespaces(api: Any) -> Iterator[list[str]]:
    core = client.CoreV1Api(api)
    names = [f"team-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for n in names:
        core.create_namespace({"metadata": {"name": n}})
    yield names
    for n in names:
        core.delete_namespace(n, propagation_policy="Background")


def _dry_run_apply(info: ClusterInfo, objs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    """kubectl apply --server-side --dry-run=server --validate=strict of the objects: nothing is stored; objects
    that exist already (the CRDs) are compared as an update."""
    return subprocess.run(
        [
            str(tools.binary("kubectl")),
            "--kubeconfig",
            info.kubeconfig,
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=chart-validation",
            "--dry-run=server",
            "--validate=strict",
            "-f",
            "-",
        ],
        input=yaml.safe_dump_all(objs),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("value_set", ["defaults", "all-features", "namespaced"])
def test_every_rendered_object_passes_strict_server_side_validation(
    value_set: str,
    dev_cluster: ClusterInfo,
    monitoring_crds: None,
    namespace: str,
    team_namespaces: list[str],
    tmp_path: Path,
) -> None:
    watched = "{" + ",".join(team_namespaces) + "}"
    sets: tuple[str, ...] = {
        "defaults": (),
        "all-features": ("-f", str(values_file(ALL_FEATURES, tmp_path / "all.yaml"))),
        "namespaced": ("--set", f"watchNamespaces={watched}", "--set", "replicaCount=2"),
    }[value_set]
    # A release name of its own: the cluster-scoped objects must not be taken for another release's.
    release = f"chk-{uuid.uuid4().hex[:6]}"
    objs = [o for o in render(*sets, namespace=namespace, release=release) if o["kind"] not in NOT_SERVED]
    kinds = {o["kind"] for o in objs}
    assert {"CustomResourceDefinition", "Deployment", "ValidatingWebhookConfiguration", "Secret"} <= kinds
    if value_set == "all-features":
        assert {"NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds
    res = _dry_run_apply(dev_cluster, objs)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("(server dry run)") == len(objs), res.stdout


def test_a_misplaced_field_is_refused(dev_cluster: ClusterInfo, namespace: str) -> None:
    """The validation above can fail: a NetworkPolicy port rule with a field its schema does not have."""
    (np,) = [
        o
        for o in render("--set", "networkPolicy.enabled=true", namespace=namespace, release="chk-bad")
        if o["kind"] == "NetworkPolicy"
    ]
    np["spec"]["egress"][0]["ports"][0]["portt"] = 53
    res = _dry_run_apply(dev_cluster, [np])
    assert res.returncode != 0 and "portt" in res.stderr, res.stderr
