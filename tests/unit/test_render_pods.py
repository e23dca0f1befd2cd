"""What a platform team shapes on the operator's pods (spec.pods over the chart's enginePods) reaches the build,
benchmark and serving pods: pull secrets, runtime and priority class, service account, labels, annotations,
environment, volumes, proxy and CA bundle; secrets only by reference; the operator's own settings stay."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmengine.api.config import OperatorConfig
from llmengine.api.pods import (
    CA_DIR,
    CA_ENV,
    CA_PATH,
    OPERATOR_MOUNT_PATHS,
    OPERATOR_MOUNT_ROOT,
    OPERATOR_VOLUMES,
    OperandPods,
)
from llmengine.api.v1alpha1 import InvalidEngine, parse_engine
from llmengine.plan import plan_object
from llmengine.plan.benchgate import bench_request
from llmengine.plan.planner import compare
from llmengine.plan.pods import resolve
from llmengine.render import bench as render_bench
from llmengine.render import build, common
from tests.unit.test_render import CFG, _deployment, _engine, _golden, _where

# The chart's enginePods: what the platform team sets for every engine.
CHART_PODS: dict[str, Any] = {
    "imagePullSecrets": [{"name": "platform-pull"}],
    "runtimeClassName": "nvidia",
    "priorityClassName": "llm-batch",
    "labels": {"team": "platform", "cost-center": "42"},
    "annotations": {"egress.example.com/allowed": "true"},
    "env": [{"name": "HF_ENDPOINT", "value": "https://hf-mirror.corp.example"}],
    "proxy": {"httpsProxy": "http://proxy.corp.example:3128", "noProxy": ".svc,.cluster.local,10.0.0.0/8"},
    "caBundle": {"configMapKeyRef": {"name": "corp-ca", "key": "ca-bundle.crt"}},
    "serving": {"priorityClassName": "llm-serving"},
}
# One engine's spec.pods over them.
ENGINE_PODS: dict[str, Any] = {
    "imagePullSecrets": [{"name": "team-pull"}],
    "serviceAccountName": "llm-runner",
    "labels": {"team": "search"},
    "env": [
        {"name": "HF_ENDPOINT", "value": "https://hf.search.example"},
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ],
    "envFrom": [{"configMapRef": {"name": "tuning"}}, {"secretRef": {"name": "extra"}, "prefix": "X_"}],
    "volumes": [{"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
    "volumeMounts": [{"name": "hf-cache", "mountPath": "/cache", "readOnly": True}],
    "proxy": {"httpProxy": "http://proxy.search.example:3128"},
    "caBundle": {"secretKeyRef": {"name": "search-ca", "key": "ca.crt"}},
    "build": {"priorityClassName": "llm-build", "annotations": {"stage": "build"}},
    "serving": {"runtimeClassName": "nvidia-cdi", "env": [{"name": "LOG_LEVEL", "value": "debug"}]},
}
SERVING = {
    "replicas": 2,
    "podAnnotations": {"prometheus.io/scrape": "true"},
    "env": [
        {"name": "LOG_LEVEL", "value": "info"},
        {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "api", "key": "key"}}},
    ],
}
CFG_PODS = CFG.model_copy(update={"engine_pods": OperandPods.model_validate(CHART_PODS)})


def _render(
    body: dict[str, Any], cfg: OperatorConfig = CFG_PODS
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The build Job, the benchmark Job and the serving Deployment of `body` under `cfg`."""
    plan, engine = plan_object(body, images=cfg.images), parse_engine(body)
    assert plan.valid and plan.build_request is not None, plan.errors
    where = _where(body)
    job = build.build_job(request=plan.build_request, where=where, attempt=1, cfg=cfg)
    bench = render_bench.bench_job(
        request=bench_request(engine.spec, plan), where=where, image=plan.builder_image, cfg=cfg
    )
    dep = _deployment(body, cfg)
    return job, bench, dep


def _shaped() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    return _render(_engine(pods=ENGINE_PODS, serving=SERVING))


def _template(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(obj["spec"]["template"])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"{container['name']}: a variable twice: {names}"
    return {e["name"]: e for e in container["env"]}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers") or []) + list(pod["containers"])


def test_all_settings_golden() -> None:
    job, bench, dep = _shaped()
    _golden("build-job-pods", job)
    _golden("bench-job-pods", bench)
    _golden("deployment-pods", dep)


def test_every_pod_carries_every_setting_merged_over_the_chart() -> None:
    job, bench, dep = _shaped()
    priority = {"build": "llm-build", "benchmark": "llm-build", "server": "llm-serving"}
    runtime = {"build": "nvidia", "benchmark": "nvidia", "server": "nvidia-cdi"}
    for obj in (job, bench, dep):
        meta, pod = _template(obj)["metadata"], _template(obj)["spec"]
        component = meta["labels"][common.COMPONENT_LABEL]
        # Named lists add up, the chart's first; a value set by the engine replaces the chart's.
        assert pod["imagePullSecrets"] == [{"name": "platform-pull"}, {"name": "team-pull"}]
        assert pod["runtimeClassName"] == runtime[component]
        assert pod["priorityClassName"] == priority[component]
        assert pod["serviceAccountName"] == "llm-runner" and pod["automountServiceAccountToken"] is False
        assert meta["labels"]["team"] == "search" and meta["labels"]["cost-center"] == "42"
        assert meta["annotations"]["egress.example.com/allowed"] == "true"
        assert ("stage" in meta["annotations"]) == (component != "server")
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["hf-cache"] == {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}
        # The engine's CA bundle replaces the chart's; whatever its key, it is mounted as ca.crt.
        assert volumes["llmengine-ca"] == {
            "name": "llmengine-ca",
            "secret": {"secretName": "search-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
        }
        # The hardened pod stays.
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in _containers(pod):
            env = _env(c)
            assert env["HF_ENDPOINT"] == {"name": "HF_ENDPOINT", "value": "https://hf.search.example"}
            assert env["DB_PASSWORD"] == {
                "name": "DB_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}},
            }
            assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
            # The proxy merges field by field: the engine's http, the chart's https and exceptions.
            for name, value in (
                ("HTTP_PROXY", "http://proxy.search.example:3128"),
                ("HTTPS_PROXY", "http://proxy.corp.example:3128"),
                ("NO_PROXY", ".svc,.cluster.local,10.0.0.0/8"),
            ):
                assert env[name]["value"] == env[name.lower()]["value"] == value
            for name in CA_ENV:
                assert env[name] == {"name": name, "value": CA_PATH}
            assert c["envFrom"] == [
                {"configMapRef": {"name": "tuning"}},
                {"prefix": "X_", "secretRef": {"name": "extra"}},
            ]
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/cache"] == {"name": "hf-cache", "mountPath": "/cache", "readOnly": True}
            assert mounts[CA_DIR] == {"name": "llmengine-ca", "mountPath": CA_DIR, "readOnly": True}
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False


def test_serving_env_is_the_server_containers_and_wins_there() -> None:
    _, _, dep = _shaped()
    pod = _template(dep)["spec"]
    fetch, server = _env(pod["initContainers"][0]), _env(pod["containers"][0])
    assert server["LOG_LEVEL"] == {"name": "LOG_LEVEL", "value": "info"}  # spec.serving.env
    assert server["API_KEY"] == {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "api", "key": "key"}}}
    assert fetch["LOG_LEVEL"] == {"name": "LOG_LEVEL", "value": "debug"}  # spec.pods.serving.env
    assert "API_KEY" not in fetch
    annotations = _template(dep)["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations[common.DIGEST_ANNOTATION] == dep["metadata"]["annotations"][common.DIGEST_ANNOTATION]


def test_the_operators_own_settings_stay() -> None:
    own = {
        "env": [
            {"name": "AWS_ENDPOINT_URL_S3", "value": "http://elsewhere"},
            {"name": "HF_TOKEN", "value": "leaked"},
            {"name": "HTTPS_PROXY", "value": "http://other:1"},
            {"name": "AWS_CA_BUNDLE", "value": "/other.pem"},
        ],
        "labels": {common.COMPONENT_LABEL: "other", "app.kubernetes.io/managed-by": "someone"},
        "annotations": {common.DIGEST_ANNOTATION: "forged"},
        "automountServiceAccountToken": True,
        "serviceAccountName": "robot",
        "proxy": {"httpsProxy": "http://proxy:3128"},
        "caBundle": {"configMapKeyRef": {"name": "ca", "key": "ca.crt"}},
    }
    body = _engine(
        pods=own, store={"bucket": "engines", "endpoint": "https://s3.corp", "credentialsSecretRef": {"name": "s3"}}
    )
    job, bench, dep = _render(body, CFG)
    for obj in (job, bench, dep):
        meta, pod = _template(obj)["metadata"], _template(obj)["spec"]
        assert meta["labels"][common.COMPONENT_LABEL] in ("build", "benchmark", "server")
        assert meta["labels"]["app.kubernetes.io/managed-by"] == common.MANAGED_BY
        assert "forged" not in meta.get("annotations", {}).values()
        # Asked for explicitly, the token is mounted (for a ServiceAccount the pods use).
        assert pod["automountServiceAccountToken"] is True and pod["serviceAccountName"] == "robot"
        for c in _containers(pod):
            env = _env(c)
            assert env["HTTPS_PROXY"]["value"] == "http://proxy:3128"
            assert env["AWS_CA_BUNDLE"]["value"] == CA_PATH
            if "AWS_ENDPOINT_URL_S3" in env and c["name"] != "server":
                assert env["AWS_ENDPOINT_URL_S3"]["value"] == "https://s3.corp"
            if c["name"] in ("build", "benchmark"):
                assert "value" not in env["HF_TOKEN"] and "secretKeyRef" in env["HF_TOKEN"]["valueFrom"]


def test_secrets_only_by_reference() -> None:
    job, bench, dep = _shaped()
    for obj in (job, bench, dep):
        pod = _template(obj)["spec"]
        for c in _containers(pod):
            for e in c["env"]:
                if e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "DB_PASSWORD", "API_KEY"):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
        # The CA bundle and pull secrets are named, never copied.
        assert {"secret"} & set(next(v for v in pod["volumes"] if v["name"] == "llmengine-ca"))
        assert all(set(s) == {"name"} for s in pod["imagePullSecrets"])


def test_no_settings_render_exactly_what_they_always_did() -> None:
    plain = _render(_engine(), CFG)
    assert _render(_engine(pods={}), CFG) == plain
    assert _render(_engine(pods={"build": {}, "serving": {}}), CFG) == plain
    # The chart's defaults alone shape the pods too.
    job, _, dep = _render(_engine(), CFG_PODS)
    assert _template(job)["spec"]["priorityClassName"] == "llm-batch"
    assert _template(dep)["spec"]["priorityClassName"] == "llm-serving"
    assert _template(dep)["spec"]["volumes"][-1]["configMap"] == {
        "name": "corp-ca",
        "items": [{"key": "ca-bundle.crt", "path": "ca.crt"}],
    }


def test_resolve_layers_lowest_first() -> None:
    chart = OperandPods.model_validate(CHART_PODS)
    engine = OperandPods.model_validate(ENGINE_PODS)
    b, s = resolve(chart, engine, "build"), resolve(chart, engine, "serving")
    assert (b.priority_class_name, s.priority_class_name) == ("llm-build", "llm-serving")
    assert (b.runtime_class_name, s.runtime_class_name) == ("nvidia", "nvidia-cdi")
    assert [e.name for e in b.env or []] == ["HF_ENDPOINT", "DB_PASSWORD", "POD_IP"]
    assert [e.name for e in s.env or []] == ["HF_ENDPOINT", "DB_PASSWORD", "POD_IP", "LOG_LEVEL"]
    # Only the chart's: nothing of an engine that sets nothing.
    assert resolve(chart, None, "build") == resolve(chart, OperandPods(), "build")
    assert resolve(OperandPods(), None, "serving").model_dump(exclude_none=True) == {}


def test_operator_volumes_and_paths_are_reserved_and_refused_with_the_field_named() -> None:
    _, bench, dep = _render(_engine(), CFG_PODS)
    rendered = [bench, dep]
    for obj in rendered:
        pod = _template(obj)["spec"]
        assert {v["name"] for v in pod["volumes"]} <= OPERATOR_VOLUMES
        for c in _containers(pod):
            for m in c["volumeMounts"]:
                assert m["mountPath"] in OPERATOR_MOUNT_PATHS or m["mountPath"].startswith(OPERATOR_MOUNT_ROOT + "/")
    for pods, field in [
        ({"volumes": [{"name": "work", "emptyDir": {}}]}, "spec.pods.volumes[0]"),
        ({"serving": {"volumeMounts": [{"name": "x", "mountPath": "/engine"}]}}, "spec.pods.serving.volumeMounts[0]"),
        ({"volumeMounts": [{"name": "x", "mountPath": CA_DIR}]}, "spec.pods.volumeMounts[0]"),
        ({"env": [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "a"}}}]}, "spec.pods.env[0]"),
        ({"env": [{"name": "A", "valueFrom": {}}]}, "spec.pods.env[0].valueFrom"),
        ({"envFrom": [{"prefix": "A"}]}, "spec.pods.envFrom[0]"),
        ({"caBundle": {}}, "spec.pods.caBundle"),
        ({"imagePullSecret": [{"name": "a"}]}, "spec.pods.imagePullSecret"),
    ]:
        with pytest.raises(InvalidEngine) as exc:
            parse_engine(_engine(pods=pods))
        assert [e.field for e in exc.value.errors] == [field], exc.value


def test_pod_settings_roll_out_the_serving_pods_and_build_settings_change_nothing_running() -> None:
    def action(old: dict[str, Any], new: dict[str, Any]) -> str:
        return compare(
            plan_object(old, images=CFG.images),
            plan_object(new, images=CFG.images),
            parse_engine(old),
            parse_engine(new),
        )

    base = _engine()
    assert action(base, _engine(pods={"priorityClassName": "high"})) == "rollout"
    assert action(base, _engine(pods={"serving": {"labels": {"a": "b"}}})) == "rollout"
    assert action(base, _engine(pods={"build": {"priorityClassName": "low"}})) == "nothing"
    assert action(base, _engine(serving={"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]})) == (
        "rollout"
    )


def test_the_charts_defaults_travel_as_json_in_the_environment() -> None:
    cfg = OperatorConfig.from_env({"LLMENGINE_ENGINE_PODS": json.dumps(CHART_PODS)})
    assert cfg.engine_pods == OperandPods.model_validate(CHART_PODS)
    assert OperatorConfig.from_env({}).engine_pods == OperandPods()
    with pytest.raises(ValueError, match="LLMENGINE_ENGINE_PODS is not JSON"):
        OperatorConfig.from_env({"LLMENGINE_ENGINE_PODS": "{nope"})
    with pytest.raises(ValueError, match="the operator's"):
        OperatorConfig.from_env({"LLMENGINE_ENGINE_PODS": json.dumps({"volumes": [{"name": "tmp", "emptyDir": {}}]})})
