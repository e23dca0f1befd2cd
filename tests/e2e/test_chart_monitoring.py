"""The chart's monitoring objects, rendered offline: the serving PodMonitor selects exactly the pods the operator
renders, the alerts pass promtool's rule checks and its rule unit tests (they page on Available and Stalled, never on
Ready), and the dashboard's queries parse as PromQL and its JSON keeps to Grafana's dashboard schema models."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmengine.dev import prometheus as dev_prometheus
from llmengine.dev import tools
from llmengine.plan import promql
from llmengine.render import common
from llmengine.server.meter import METRICS_PATH
from tests.e2e.chart_harness import CHART, KUBE_VERSION, by_kind, helm, render
from tests.metrics_catalog import defined_metrics

try:
    tools.binary("helm")
    PROMTOOL = str(tools.binary("promtool"))
except tools.ToolMissing as e:
    pytest.skip(str(e), allow_module_level=True)

GOLDEN = Path(__file__).resolve().parents[1] / "unit" / "golden"
DASHBOARD = CHART / "dashboards" / "llmengine.json"
ALL_ON = (
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.servingPodMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.dashboard.enabled=true",
)
RULES_ON = ("--set", "metrics.prometheusRule.enabled=true")
# What the chart's selectors come to for release "llmengine-operator" in namespace "llmengine-system".
OPERATOR = 'job="llmengine-operator-metrics",namespace="llmengine-system"'
OPERATOR_JOB = 'job="llmengine-operator-metrics"'
SERVING = 'job="llmengine-system/llmengine-operator-serving"'
# The alerts on each engine's conditions (llmengine_engine_condition).
ENGINE_ALERTS = {"LLMEngineUnavailable", "LLMEngineStalled", "LLMEngineEnvelopeExceeded"}
ALERTS = ENGINE_ALERTS | {
    "LLMEngineOperatorDown",
    "LLMEngineReconcileErrors",
    "LLMEngineStoreErrors",
    "LLMEngineBuildsFailing",
    "LLMEngineBuildQueueStuck",
    "LLMEngineRequestErrors",
    "LLMEngineServingMetricsDown",
}
# With traffic.source off the operator sets no EnvelopeExceeded condition: refused prompts alert from the serving pods.
TRAFFIC_OFF_ALERTS = ALERTS - {"LLMEngineEnvelopeExceeded"} | {"LLMEngineRequestsTooLong"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def _rule_spec(*sets: str) -> dict[str, Any]:
    (rule,) = by_kind(render(*RULES_ON, *sets), "PrometheusRule")
    return dict(rule["spec"])


def _alerts(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in spec["groups"] for r in g["rules"]}


def _write_rules(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Switches


def test_default_install_renders_no_monitoring_objects() -> None:
    objs = render()
    assert not by_kind(objs, "PodMonitor") and not by_kind(objs, "PrometheusRule")
    assert not [o for o in by_kind(objs, "ConfigMap") if "grafana_dashboard" in o["metadata"].get("labels", {})]


@pytest.mark.parametrize("sets", [ALL_ON, (*ALL_ON, "--set", "watchNamespaces={team-a,team-b}")])
def test_lint_strict_with_every_monitoring_object(sets: tuple[str, ...]) -> None:
    out = helm("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *sets)
    assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out


@pytest.mark.parametrize(
    "bad",
    [
        "metrics.servingPodMonitor.path=llmengine/metrics",
        "metrics.servingPodMonitor.interval=30",
        "metrics.prometheusRule.unavailableFor=soon",
        "metrics.prometheusRule.disabled={LLMEngineReady}",
        "metrics.dashboard.namespace=Grafana",
        "metrics.dashboard.folder=x",
    ],
)
def test_schema_rejects_bad_monitoring_values(bad: str) -> None:
    res = subprocess.run(
        [tools.binary("helm"), "template", "x", str(CHART), "--kube-version", KUBE_VERSION, "--set", bad],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "values don't meet the specifications of the schema" in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------------------------
# The serving PodMonitor


def _sanitized(label: str) -> str:
    """A pod label as Kubernetes service discovery names it."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)


def test_serving_pod_monitor_selects_the_serving_pods_the_operator_renders() -> None:
    (pm,) = by_kind(render("--set", "metrics.servingPodMonitor.enabled=true"), "PodMonitor")
    serving = yaml.safe_load((GOLDEN / "deployment.yaml").read_text())["spec"]["template"]
    labels = serving["metadata"]["labels"]
    selector = pm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    # Not the build or benchmark pods, which carry the operator's labels too.
    for job in ("build-job.yaml", "bench-job.yaml"):
        pod_labels = yaml.safe_load((GOLDEN / job).read_text())["spec"]["template"]["metadata"]["labels"]
        assert not selector.items() <= pod_labels.items(), job
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for c in serving["spec"]["containers"] for p in c.get("ports", [])}
    assert ep["port"] in ports and ep["path"] == METRICS_PATH
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in ep["relabelings"]}
    assert relabel == {
        "engine": [_sanitized(common.ENGINE_LABEL)],
        "engine_digest": [_sanitized(common.DIGEST_LABEL)],
    }
    assert common.ENGINE_LABEL in labels and common.DIGEST_LABEL in labels


def test_the_prometheus_traffic_source_and_the_dev_prometheus_agree_with_the_serving_pod_monitor() -> None:
    """traffic.source prometheus selects series by the labels the PodMonitor gives them; the dev cluster's Prometheus
    (llmengine.dev.prometheus) selects and relabels the pods as the PodMonitor does."""
    (pm,) = by_kind(render("--set", "metrics.servingPodMonitor.enabled=true"), "PodMonitor")
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    relabelings = [{"source_labels": r["sourceLabels"], "target_label": r["targetLabel"]} for r in ep["relabelings"]]
    assert relabelings == dev_prometheus.POD_MONITOR_RELABELINGS
    assert {r["target_label"] for r in relabelings} == {promql.ENGINE_LABEL, promql.DIGEST_LABEL}
    assert pm["spec"]["selector"]["matchLabels"] == dev_prometheus.SELECTOR
    assert ep["path"] == dev_prometheus.config(Path("t"), 1)["scrape_configs"][0]["metrics_path"]
    # The prometheus-operator's own labels of every PodMonitor target, which the query groups by too.
    assert [r["target_label"] for r in dev_prometheus.OPERATOR_RELABELINGS] == [
        promql.NAMESPACE_LABEL,
        promql.POD_LABEL,
    ]


def test_serving_pod_monitor_in_namespaced_mode_watches_only_those_namespaces() -> None:
    objs = render("--set", "metrics.servingPodMonitor.enabled=true", "--set", "watchNamespaces={team-a,team-b}")
    (pm,) = by_kind(objs, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    objs = render(
        "--set",
        "metrics.servingPodMonitor.enabled=true",
        "--set",
        "metrics.servingPodMonitor.path=/prometheus/metrics",
        "--set",
        "metrics.servingPodMonitor.labels.release=kps",
    )
    (pm,) = by_kind(objs, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["path"] == "/prometheus/metrics"
    assert pm["metadata"]["labels"]["release"] == "kps"


# ---------------------------------------------------------------------------------------------------------------
# The alerts


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ((), ALERTS),
        (
            ("--set", "watchNamespaces={team-a,team-b}", "--set", "metrics.prometheusRule.alertLabels.team=ml"),
            ALERTS,
        ),
        (("--set", "traffic.source=off"), TRAFFIC_OFF_ALERTS),
    ],
    ids=["default", "namespaced", "traffic-off"],
)
def test_rules_pass_promtool_check(tmp_path: Path, sets: tuple[str, ...], expected: set[str]) -> None:
    spec = _rule_spec(*sets)
    assert set(_alerts(spec)) == expected
    res = _promtool("check", "rules", str(_write_rules(tmp_path, spec)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(expected)} rules found" in res.stdout


def test_rule_switches() -> None:
    spec = _rule_spec("--set", "metrics.prometheusRule.disabled={LLMEngineBuildQueueStuck,LLMEngineStoreErrors}")
    assert set(_alerts(spec)) == ALERTS - {"LLMEngineBuildQueueStuck", "LLMEngineStoreErrors"}
    spec = _rule_spec(
        "--set", "traffic.source=off", "--set", "metrics.prometheusRule.disabled={LLMEngineRequestsTooLong}"
    )
    assert set(_alerts(spec)) == TRAFFIC_OFF_ALERTS - {"LLMEngineRequestsTooLong"}
    spec = _rule_spec(
        "--set",
        "metrics.prometheusRule.alertLabels.team=ml",
        "--set",
        "metrics.prometheusRule.unavailableFor=30m",
        "--set",
        "watchNamespaces={team-a,team-b}",
    )
    alerts = _alerts(spec)
    assert all(a["labels"]["team"] == "ml" and a["labels"]["severity"] for a in alerts.values())
    assert alerts["LLMEngineUnavailable"]["for"] == "30m"
    for name in ENGINE_ALERTS:
        assert 'namespace=~"team-a|team-b"' in alerts[name]["expr"], name


def test_the_schema_names_exactly_the_alerts_the_chart_has() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    rule = schema["properties"]["metrics"]["properties"]["prometheusRule"]["properties"]
    assert set(rule["disabled"]["items"]["enum"]) == ALERTS | TRAFFIC_OFF_ALERTS


def test_the_engine_alerts_read_the_engines_namespace() -> None:
    """The per-engine series carry the engine's namespace: the ServiceMonitor keeps it (honorLabels) instead of
    renaming it exported_namespace, and the alerts on them do not select the operator's namespace."""
    (sm,) = by_kind(render("--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    alerts = _alerts(_rule_spec())
    for name in ENGINE_ALERTS:
        expr = alerts[name]["expr"]
        assert "llmengine_engine_condition{" in expr and 'namespace="llmengine-system"' not in expr, name
        assert 'job="llmengine-operator-metrics"' in expr, name
    assert 'namespace="llmengine-system"' in alerts["LLMEngineReconcileErrors"]["expr"]


def test_dashboard_labels_can_be_emptied() -> None:
    # Helm merges maps with the defaults: a default label goes with null, leaving an empty map.
    objs = render("--set", "metrics.dashboard.enabled=true", "--set", "metrics.dashboard.labels.grafana_dashboard=null")
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    assert "grafana_dashboard" not in cm["metadata"]["labels"]


def test_only_available_pages_and_nothing_reads_ready() -> None:
    alerts = _alerts(_rule_spec())
    assert {n for n, a in alerts.items() if a["labels"]["severity"] == "critical"} == {"LLMEngineUnavailable"}
    for a in alerts.values():
        assert 'type="Ready"' not in a["expr"] and 'phase="Ready"' not in a["expr"], a["alert"]
        assert "Deploying" not in a["expr"] and "Building" not in a["expr"], a["alert"]
    assert {a["alert"] for a in alerts.values() if "for" not in a} == {"LLMEngineStalled", "LLMEngineBuildsFailing"}


# Each engine's state as the operator exports it, one step per change: {"phase": ..., "<condition>": status}.
State = dict[str, str]
SERVING_READY: State = {
    "phase": "Ready",
    "Ready": "True",
    "Available": "True",
    "Reconciling": "False",
    "Stalled": "False",
    "EngineBuilt": "True",
    "Deployed": "True",
    "EnvelopeExceeded": "False",
}


def _engine(name: str, steps: list[tuple[int, State]], until: int, namespace: str = "ml") -> list[dict[str, str]]:
    """The per-engine series of one engine whose state changes at the given minutes, as the operator moves them:
    the series of the current status at 1, the old one removed (a stale marker at the next scrape). Labelled as
    the chart's ServiceMonitor scrapes them: the operator's job and pod, the engine's namespace (honorLabels)."""
    states = [next((s for m, s in reversed(steps) if m <= minute), {}) for minute in range(until + 1)]
    labels = f'{OPERATOR_JOB},namespace="{namespace}",name="{name}",pod="llmengine-operator-5d8f7-x2"'
    series = []
    for key, value in sorted({kv for s in states for kv in s.items()}):
        held = [s.get(key) == value for s in states]
        tokens = ["1" if now else "stale" if i and held[i - 1] else "_" for i, now in enumerate(held)]
        metric = (
            f'llmengine_engine_phase{{phase="{value}"'
            if key == "phase"
            else f'llmengine_engine_condition{{type="{key}",status="{value}"'
        )
        series.append({"series": f"{metric},{labels}}}", "values": " ".join(tokens)})
    return series


def _operator(phases: dict[str, str], extra: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    series = [{"series": f"up{{{OPERATOR}}}", "values": "1x200"}]
    for phase, values in phases.items():
        series.append({"series": f'llmengine_engines{{{OPERATOR},phase="{phase}"}}', "values": values})
    return series + (extra or [])


def _quiet(*times: str, alerts: set[str] = ALERTS) -> list[dict[str, Any]]:
    return [{"eval_time": at, "alertname": name, "exp_alerts": []} for at in times for name in sorted(alerts)]


def _serving(result: str, values: str) -> dict[str, str]:
    return {
        "series": f'llmengine_requests_total{{{SERVING},namespace="ml",engine="chat",pod="llme-chat-1",'
        f'result="{result}"}}',
        "values": values,
    }


def _firing(alerts: dict[str, dict[str, Any]], alert: str, value: str, **labels: str) -> list[dict[str, Any]]:
    """The one alert expected: its labels, and its annotations with the labels and the value filled in."""

    def fill(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        return re.sub(r"\{\{ \$value[^}]*\}\}", value, text)

    severity = alerts[alert]["labels"]["severity"]
    annotations = {k: fill(v) for k, v in alerts[alert]["annotations"].items()}
    return [{"exp_labels": {"severity": severity, **labels}, "exp_annotations": annotations}]


def _scenarios(alerts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """promtool rule unit tests of the default rules: what fires, when, naming which engine."""

    def firing(alert: str, value: str = "1", **labels: str) -> list[dict[str, Any]]:
        return _firing(alerts, alert, value, **labels)

    building = {
        **SERVING_READY,
        "phase": "Building",
        "Ready": "False",
        "Reconciling": "True",
        "EngineBuilt": "False",
        "Deployed": "False",
    }
    first = {"phase": "Pending", "Ready": "False", "Available": "False", "Reconciling": "True", "Stalled": "False"}
    lost = {**SERVING_READY, "phase": "Degraded", "Ready": "False", "Available": "False", "Deployed": "False"}
    return [
        {
            # A rebuild: the desired engine builds for almost two hours and rolls out (Ready is False throughout)
            # while the old engine keeps serving every replica (Available True). Next to it a new engine's first
            # build and rollout: Available False all along, but it never served. Nothing may fire.
            "name": "rebuild and first build",
            "interval": "1m",
            "input_series": _operator({"Building": "1x200", "Ready": "0x200"})
            + _engine(
                "chat",
                [
                    (0, SERVING_READY),
                    (5, building),
                    (105, {**building, "phase": "Deploying", "EngineBuilt": "True"}),
                    (125, SERVING_READY),
                ],
                until=200,
            )
            + _engine(
                "new",
                [
                    (0, first),
                    (1, {**first, "phase": "Queued", "EngineBuilt": "False"}),
                    (20, {**first, "phase": "Building", "EngineBuilt": "False"}),
                    (110, {**first, "phase": "Deploying", "EngineBuilt": "True", "Deployed": "False"}),
                    (120, {**SERVING_READY}),
                ],
                until=200,
            )
            + [
                {"series": f'up{{{SERVING},namespace="ml",engine="chat",pod="llme-chat-1"}}', "values": "1x200"},
                _serving("stop", "0+10x200"),
                _serving("error", "0x200"),
            ],
            "alert_rule_test": _quiet("30m", "1h", "1h50m", "2h", "2h10m", "3h"),
        },
        {
            # A replica lost for good: LLMEngineUnavailable once Available has been False for unavailableFor
            # (15m), naming the engine.
            "name": "replica lost",
            "interval": "1m",
            "input_series": _operator({"Degraded": "0x5 1x60"})
            + _engine("chat", [(0, SERVING_READY), (5, lost)], until=65),
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "LLMEngineUnavailable", "exp_alerts": []},
                {
                    "eval_time": "25m",
                    "alertname": "LLMEngineUnavailable",
                    "exp_alerts": firing("LLMEngineUnavailable", namespace="ml", name="chat"),
                },
                *_quiet("25m", alerts=ALERTS - {"LLMEngineUnavailable"}),
            ],
        },
        {
            # Stalled needs a person and fires at once, one alert per engine: a build that failed for good, then a
            # crash-looping serving pod of another engine (Degraded, and unavailable too after unavailableFor).
            "name": "stalled",
            "interval": "1m",
            "input_series": _operator({"Failed": "0x10 1x30"})
            + _engine(
                "chat",
                [
                    (0, {**first, "phase": "Building", "EngineBuilt": "False"}),
                    (
                        10,
                        {**first, "phase": "Failed", "EngineBuilt": "False", "Reconciling": "False", "Stalled": "True"},
                    ),
                ],
                until=40,
            )
            + _engine("embed", [(0, SERVING_READY), (20, {**lost, "Stalled": "True"})], until=40, namespace="search"),
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "LLMEngineStalled", "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": "LLMEngineStalled",
                    "exp_alerts": firing("LLMEngineStalled", namespace="ml", name="chat"),
                },
                {
                    "eval_time": "20m",
                    "alertname": "LLMEngineStalled",
                    "exp_alerts": firing("LLMEngineStalled", namespace="ml", name="chat")
                    + firing("LLMEngineStalled", namespace="search", name="embed"),
                },
                # The build that failed never served: not unavailable. The crash-looping engine is, 15m on.
                {"eval_time": "30m", "alertname": "LLMEngineUnavailable", "exp_alerts": []},
                {
                    "eval_time": "40m",
                    "alertname": "LLMEngineUnavailable",
                    "exp_alerts": firing("LLMEngineUnavailable", namespace="search", name="embed"),
                },
            ],
        },
        {
            # Traffic beyond the engine's static limits: a ticket once EnvelopeExceeded has been True for 15m.
            "name": "envelope exceeded",
            "interval": "1m",
            "input_series": _operator({"Ready": "1x60"})
            + _engine(
                "chat",
                [
                    (0, {**SERVING_READY, "EnvelopeExceeded": "Unknown"}),
                    (3, SERVING_READY),
                    (5, {**SERVING_READY, "EnvelopeExceeded": "True"}),
                ],
                until=60,
            ),
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "LLMEngineEnvelopeExceeded", "exp_alerts": []},
                {
                    "eval_time": "25m",
                    "alertname": "LLMEngineEnvelopeExceeded",
                    "exp_alerts": firing("LLMEngineEnvelopeExceeded", namespace="ml", name="chat"),
                },
                *_quiet("25m", alerts=ALERTS - {"LLMEngineEnvelopeExceeded"}),
            ],
        },
        {
            # Failing completions, per engine, from the serving pods' own metrics.
            "name": "serving errors",
            "interval": "1m",
            "input_series": _operator({}, [_serving("stop", "0+10x60"), _serving("error", "0+2x60")]),
            "alert_rule_test": [
                {
                    "eval_time": "40m",
                    "alertname": "LLMEngineRequestErrors",
                    "exp_alerts": firing("LLMEngineRequestErrors", "16.67%", namespace="ml", engine="chat"),
                },
            ],
        },
        {
            "name": "operator not scraped",
            "interval": "1m",
            "input_series": [{"series": f'llmengine_engines{{{OPERATOR},phase="Ready"}}', "values": "1x5"}],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "LLMEngineOperatorDown", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "LLMEngineOperatorDown",
                    "exp_alerts": firing("LLMEngineOperatorDown"),
                },
            ],
        },
        {
            "name": "store unreachable and builds failing",
            "interval": "1m",
            "input_series": _operator(
                {},
                [
                    {"series": f"llmengine_store_errors_total{{{OPERATOR}}}", "values": "0+1x60"},
                    {"series": f'llmengine_builds_total{{{OPERATOR},result="failed"}}', "values": "0 1 2 3 4 5x55"},
                    {"series": f'llmengine_build_queue_depth{{{OPERATOR},pool="h100-80gb"}}', "values": "2x180"},
                ],
            ),
            "alert_rule_test": [
                {
                    "eval_time": "30m",
                    "alertname": "LLMEngineStoreErrors",
                    "exp_alerts": firing("LLMEngineStoreErrors"),
                },
                {
                    "eval_time": "10m",
                    "alertname": "LLMEngineBuildsFailing",
                    "exp_alerts": firing("LLMEngineBuildsFailing", "5"),
                },
                {"eval_time": "1h", "alertname": "LLMEngineBuildQueueStuck", "exp_alerts": []},
                {
                    "eval_time": "2h30m",
                    "alertname": "LLMEngineBuildQueueStuck",
                    "exp_alerts": firing("LLMEngineBuildQueueStuck", "2", pool="h100-80gb"),
                },
            ],
        },
    ]


def _promtool_test(
    tmp_path: Path, spec: dict[str, Any], tests: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    rules = _write_rules(tmp_path, spec)
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}))
    return _promtool("test", "rules", str(path))


def test_alerts_fire_on_available_and_stalled_and_stay_quiet_through_a_rebuild(tmp_path: Path) -> None:
    spec = _rule_spec()
    res = _promtool_test(tmp_path, spec, _scenarios(_alerts(spec)))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("alert", "old", "new", "scenario"),
    [
        ("LLMEngineUnavailable", 'type="Available"', 'type="Ready"', "rebuild and first build"),
        ("LLMEngineUnavailable", 'type="Deployed"', 'type="Available"', "rebuild and first build"),
        ("LLMEngineUnavailable", 'status="False"', 'status="True"', "replica lost"),
        ("LLMEngineStalled", 'status="True"', 'status="False"', "stalled"),
        ("LLMEngineEnvelopeExceeded", 'type="EnvelopeExceeded"', 'type="Envelope"', "envelope exceeded"),
    ],
    ids=["reads-ready", "pages-first-builds", "inverted", "stalled-inverted", "envelope-misspelled"],
)
def test_a_broken_alert_fails_its_scenario(tmp_path: Path, alert: str, old: str, new: str, scenario: str) -> None:
    """The scenarios above can fail: each broken expression is caught by the scenario that guards it."""
    spec = _rule_spec()
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                assert old in rule["expr"]
                rule["expr"] = rule["expr"].replace(old, new)
    res = _promtool_test(tmp_path, spec, _scenarios(_alerts(_rule_spec())))
    assert res.returncode != 0
    assert f"name: {scenario}," in res.stdout + res.stderr, res.stdout + res.stderr


def test_refused_prompts_alert_with_traffic_off(tmp_path: Path) -> None:
    """Where the operator reads no traffic (no EnvelopeExceeded condition), refused prompts alert from the serving
    pods' metrics."""
    spec = _rule_spec("--set", "traffic.source=off")
    alerts = _alerts(spec)
    tests = [
        {
            "name": "refused prompts",
            "interval": "1m",
            "input_series": _operator({}, [_serving("stop", "0+10x60"), _serving("too_long", "0+1x60")]),
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "LLMEngineRequestsTooLong", "exp_alerts": []},
                {
                    "eval_time": "40m",
                    "alertname": "LLMEngineRequestsTooLong",
                    "exp_alerts": _firing(alerts, "LLMEngineRequestsTooLong", "0.017", namespace="ml", engine="chat"),
                },
            ],
        }
    ]
    res = _promtool_test(tmp_path, spec, tests)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------------------------
# The dashboard


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, and the selector of every label_values() variable query."""
    out = [
        (f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
        for p in dash["panels"]
        for t in p.get("targets", [])
    ]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), *(\w+)\)", v["query"]["query"])
            assert m, v["query"]
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def _as_promql(expr: str) -> str:
    """Grafana's variables replaced by what they expand to."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "6h")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def test_dashboard_configmap_for_the_grafana_sidecar() -> None:
    objs = render("--set", "metrics.dashboard.enabled=true")
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "llmengine-system"
    assert json.loads(cm["data"]["llmengine.json"]) == _dashboard()
    objs = render(
        "--set",
        "metrics.dashboard.enabled=true",
        "--set",
        "metrics.dashboard.namespace=monitoring",
        "--set",
        "metrics.dashboard.annotations.grafana_folder=LLM",
    )
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}


def test_dashboard_queries_pass_promtool(tmp_path: Path) -> None:
    queries = _queries(_dashboard())
    assert len(queries) > 20
    rules = [{"record": f"dashboard:query_{i}", "expr": _as_promql(q)} for i, (_, q) in enumerate(queries)]
    path = _write_rules(tmp_path, {"groups": [{"name": "dashboard", "rules": rules}]})
    res = _promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr + "\n".join(f"{i}: {w}" for i, (w, _) in enumerate(queries))


def test_a_broken_query_fails_the_promtool_check(tmp_path: Path) -> None:
    """The check above can fail: promtool parses the expressions."""
    path = _write_rules(tmp_path, {"groups": [{"name": "d", "rules": [{"record": "x:y", "expr": "sum(rate(a[5m])"}]}]})
    assert _promtool("check", "rules", str(path)).returncode != 0


def _dropped_keys(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Keys of ours that the round trip through Grafana's models lost (defaults it added are not counted)."""
    if isinstance(ours, dict):
        return [
            p
            for k, v in ours.items()
            for p in ([f"{path}/{k}"] if k not in theirs else _dropped_keys(v, theirs[k], f"{path}/{k}"))
        ]
    if isinstance(ours, list):
        if len(ours) != len(theirs):
            return [f"{path}[] ({len(ours)} -> {len(theirs)} items)"]
        return [
            p for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for p in _dropped_keys(a, b, f"{path}[{i}]")
        ]
    return [] if ours == theirs else [f"{path} ({ours!r} -> {theirs!r})"]


def test_dashboard_keeps_to_grafanas_dashboard_schema() -> None:
    """Grafana's foundation SDK models are generated from Grafana's own dashboard schema: a key they do not know is
    lost in the round trip, a value of a wrong enum raises. (They check keys and enums, not every value's type.)"""
    models = pytest.importorskip("grafana_foundation_sdk.models.dashboard")
    encoder = pytest.importorskip("grafana_foundation_sdk.cog.encoder")
    ours = _dashboard()
    theirs = json.loads(json.dumps(models.Dashboard.from_json(ours), cls=encoder.JSONEncoder))
    assert _dropped_keys(ours, theirs) == []
    # And the comparison sees a key that is not Grafana's.
    bad = {**ours, "panels": [{**ours["panels"][1], "querries": []}]}
    back = json.loads(json.dumps(models.Dashboard.from_json(bad), cls=encoder.JSONEncoder))
    assert _dropped_keys(bad, back) == ["/panels[0]/querries"]


# The model of each panel plugin's options and custom field config, where the SDK has one.
PANEL_MODELS = {
    "stat": ("stat", None),
    "timeseries": ("timeseries", "timeseries.FieldConfig"),
    "state-timeline": ("statetimeline", "statetimeline.FieldConfig"),
    "table": ("table", "common.TableFieldOptions"),
}


def test_panel_options_keep_to_their_plugins_models() -> None:
    """The dashboard model leaves a panel's options and custom field config to the panel plugin: check them
    against the plugin's own model (a key it does not know is lost in the round trip)."""
    models = pytest.importorskip("grafana_foundation_sdk.models")
    encoder = pytest.importorskip("grafana_foundation_sdk.cog.encoder")

    def round_trip(model: Any, ours: dict[str, Any]) -> Any:
        return json.loads(json.dumps(model.from_json(ours), cls=encoder.JSONEncoder))

    def model(dotted: str) -> Any:
        module, name = dotted.split(".")
        return getattr(importlib.import_module(f"{models.__name__}.{module}"), name)

    panels = [p for p in _dashboard()["panels"] if p["type"] != "row"]
    assert {p["type"] for p in panels} <= set(PANEL_MODELS)
    for p in panels:
        options_model, custom_model = PANEL_MODELS[p["type"]]
        options = model(f"{options_model}.Options")
        assert _dropped_keys(p.get("options", {}), round_trip(options, p.get("options", {}))) == [], p["title"]
        custom = p["fieldConfig"]["defaults"].get("custom")
        if custom is not None:
            assert custom_model, p["title"]
            assert _dropped_keys(custom, round_trip(model(custom_model), custom)) == [], p["title"]
    # And the comparison sees a key that is not the plugin's.
    bad = {"showHeader": True, "showHeaderr": True}
    assert _dropped_keys(bad, round_trip(model("table.Options"), bad)) == ["/showHeaderr"]


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]
    )


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["uid"] and len(dash["uid"]) <= 40 and dash["title"] and dash["schemaVersion"] >= 36
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "namespace", "engine"}
    for i, p in enumerate(panels):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert not [q["title"] for q in panels[:i] if _overlap(q["gridPos"], g)], p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat", "state-timeline", "table") and p["description"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", t["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= variables, (p["title"], used)
            assert t["datasource"] == p["datasource"]
            # A table shows the state now: one instant query in table format, not a range per series.
            assert (p["type"] == "table") == (t.get("format") == "table" and t["instant"] and not t["range"]), p[
                "title"
            ]


def _metric_names(expr: str) -> set[str]:
    """The series a PromQL expression names: identifiers left once strings, label matchers, grouping clauses and
    function calls are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", re.sub(r"\[[^]]*\]", "", expr))) - {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
    }


def test_metric_names_are_read_from_queries() -> None:
    assert _metric_names(
        'sum by (le, engine) (rate(llmengine_x_bucket{a="b",c=~"$d"}[5m])) / on(engine) max(up{e="f(g)"}) > 0'
    ) == {"llmengine_x_bucket", "up"}


def test_dashboard_and_alerts_name_only_metrics_that_exist() -> None:
    """Every llmengine_* series a query names is exported by the code; the others come from trtllm-serve
    (trtllm_*), kube-state-metrics (kube_*) or Prometheus itself (up)."""
    metrics = defined_metrics()
    exported = {s for m in metrics.values() for s in m.series()}
    exprs = [q for _, q in _queries(_dashboard())] + [a["expr"] for a in _alerts(_rule_spec()).values()]
    named = {n for e in exprs for n in _metric_names(e)} - {"0", "1"}
    named = {n for n in named if not re.fullmatch(r"[0-9.e+-]+", n)}
    ours = {n for n in named if n.startswith("llmengine_")}
    assert ours and ours <= exported, ours - exported
    # Every metric the code exports is on the dashboard.
    shown = {re.sub(r"_(bucket|count|sum)$", "", n) for n in ours}
    assert set(metrics) <= shown, set(metrics) - shown
    assert {n for n in named - ours if not n.startswith(("trtllm_", "kube_"))} == {"up"}


def test_the_example_queries_of_the_metrics_page_pass_promtool(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    examples = [
        row.rsplit("|", 2)[1].strip().strip("`")
        for row in page.splitlines()
        if re.match(r"\|\s*`(llmengine|trtllm)_", row)
    ]
    assert len(examples) >= len(defined_metrics())
    rules = [{"record": f"doc:example_{i}", "expr": e} for i, e in enumerate(examples)]
    res = _promtool("check", "rules", str(_write_rules(tmp_path, {"groups": [{"name": "doc", "rules": rules}]})))
    assert res.returncode == 0, res.stdout + res.stderr
