"""The chart's monitoring objects validated by a real API server: the prometheus-operator CRDs (ServiceMonitor,
PodMonitor, PrometheusRule, as released) installed in the dev cluster, and every object the chart renders with
monitoring on created there as a server-side dry run with strict field validation, so an unknown or misspelled field
is refused instead of silently pruned."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llmengine.dev import tools
from llmengine.dev.cluster import wait_for
from tests.e2e.chart_harness import render

try:
    tools.binary("helm")
    CRD_FILES = tools.monitoring_crds()
except tools.ToolMissing as e:
    pytest.skip(str(e), allow_module_level=True)

pytestmark = pytest.mark.cluster

MONITORING = (
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.servingPodMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.dashboard.enabled=true",
)
PLURALS = {"ServiceMonitor": "servicemonitors", "PodMonitor": "podmonitors", "PrometheusRule": "prometheusrules"}


def _established(ext: Any, name: str) -> bool:
    conds = ext.read_custom_resource_definition(name).status.conditions or []
    return any(c.type == "Established" and c.status == "True" for c in conds)


@pytest.fixture(scope="module")
def monitoring_crds(api: Any) -> Iterator[list[str]]:
    """The CRDs created (or left as an earlier run created them) and Established."""
    ext = client.ApiextensionsV1Api(api)
    names = []
    for path in CRD_FILES:
        crd = yaml.safe_load(path.read_text())
        names.append(crd["metadata"]["name"])
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as e:
            if e.status != 409:
                raise
    for name in names:
        wait_for(f"CRD {name} Established", lambda n=name: _established(ext, n), timeout=60, interval=0.5)
    yield names


def _dry_run(api: Any, obj: dict[str, Any]) -> dict[str, Any]:
    """Create the object as a server-side dry run: admission, schema and strict field validation, nothing stored."""
    ns = obj["metadata"]["namespace"]
    if obj["kind"] == "ConfigMap":
        created = client.CoreV1Api(api).create_namespaced_config_map(ns, obj, dry_run="All", field_validation="Strict")
        return dict(api.sanitize_for_serialization(created))
    group, version = obj["apiVersion"].split("/")
    return dict(
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            group, version, ns, PLURALS[obj["kind"]], obj, dry_run="All", field_validation="Strict"
        )
    )


@pytest.mark.parametrize("namespaced", [False, True], ids=["cluster-wide", "namespaced"])
def test_monitoring_objects_pass_server_side_validation(
    api: Any, monitoring_crds: list[str], namespace: str, namespaced: bool
) -> None:
    sets = (*MONITORING, "--set", f"watchNamespaces={{{namespace}}}") if namespaced else MONITORING
    objs = [
        o
        for o in render(*sets, "--set", "metrics.prometheusRule.alertLabels.team=ml", namespace=namespace)
        if o["kind"] in PLURALS or o["metadata"]["name"].endswith("-dashboard")
    ]
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "PodMonitor", "PrometheusRule", "ServiceMonitor"]
    for obj in objs:
        created = _dry_run(api, obj)
        # What the API server would store holds all that the chart rendered (defaults added): nothing pruned.
        key = "spec" if "spec" in obj else "data"
        assert _pruned(obj[key], created[key]) == [], obj["kind"]


def _pruned(ours: Any, stored: Any, path: str = "") -> list[str]:
    """Where what the chart rendered differs from what the API server kept (fields it defaulted are not counted)."""
    if isinstance(ours, dict) and isinstance(stored, dict):
        return [p for k, v in ours.items() for p in _pruned(v, stored.get(k, _MISSING), f"{path}.{k}")]
    if isinstance(ours, list) and isinstance(stored, list) and len(ours) == len(stored):
        return [p for i, (a, b) in enumerate(zip(ours, stored, strict=True)) for p in _pruned(a, b, f"{path}[{i}]")]
    return [] if ours == stored else [path]


_MISSING = object()


def test_a_misspelled_field_is_refused(api: Any, monitoring_crds: list[str], namespace: str) -> None:
    """The validation above can fail: a PodMonitor with a field its CRD does not declare is refused."""
    (pm,) = [
        o
        for o in render("--set", "metrics.servingPodMonitor.enabled=true", namespace=namespace)
        if o["kind"] == "PodMonitor"
    ]
    pm["spec"]["podMetricsEndpoints"][0]["scrapeIntervall"] = "30s"
    with pytest.raises(ApiException) as exc:
        _dry_run(api, pm)
    assert exc.value.status in (400, 422) and "scrapeIntervall" in str(exc.value.body)
    pm["spec"]["podMetricsEndpoints"][0].pop("scrapeIntervall")
    pm["spec"]["podMetricsEndpoints"][0]["interval"] = "thirty seconds"
    with pytest.raises(ApiException) as exc:
        _dry_run(api, pm)
    assert exc.value.status == 422 and "interval" in str(exc.value.body)
