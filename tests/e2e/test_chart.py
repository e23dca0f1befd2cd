"""The chart rendered offline: lint, hardening, RBAC exactly as the operator needs it, no secret values, peering and
namespaced variants, and every setting the chart passes read back through OperatorConfig.from_env."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

from llmengine.api.config import ImagePair, OperatorConfig
from llmengine.api.pods import OperandPods
from llmengine.dev import tools
from tests.e2e.chart_harness import (
    ALL_FEATURES,
    CHART,
    KUBE_VERSION,
    by_kind,
    helm,
    named_rules_table,
    render,
    render_notes,
    rules_table,
    values_file,
)

try:
    tools.binary("helm")
except tools.ToolMissing as e:
    pytest.skip(str(e), allow_module_level=True)

PEERING = ("--set", "replicaCount=2")
NAMESPACED = ("--set", "watchNamespaces={team-a,team-b}")

# What the operator and Kopf call in a watched namespace (see the comments in templates/rbac.yaml).
NAMESPACED_RULES = {
    ("llmengine.io", "llmengines"): {"list", "watch", "patch"},
    ("llmengine.io", "llmengines/status"): {"patch"},
    ("llmengine.io", "llmengines/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"create", "patch", "delete"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "update"},
    ("", "services"): {"create"},
    ("autoscaling", "horizontalpodautoscalers"): {"get", "create", "update", "delete"},
    ("networking.k8s.io", "ingresses"): {"get", "create", "update", "delete"},
    ("gateway.networking.k8s.io", "httproutes"): {"get", "create", "update", "delete"},
    ("", "pods"): {"list"},
    ("", "secrets"): {"get"},
    ("", "events"): {"create"},
}
CLUSTER_ONLY_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
# The webhook certificate the operator keeps (webhook.certificate.source operator, the default): its Secret and the
# chart's webhook configuration, by name, and nothing else.
WEBHOOK_SECRET_RULES = {("", "secrets", "llmengine-operator-webhook-cert"): {"get", "patch"}}
WEBHOOK_CONFIGURATION_RULES = {
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "llmengine-operator"): {"get", "patch"}
}


def _deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = by_kind(objs, "Deployment")
    return dep


def _container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = _deployment(objs)["spec"]["template"]["spec"]["containers"]
    return c


def _service(objs: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    (svc,) = [s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith(f"-{suffix}")]
    return svc


def _operator_role(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (role,) = [r for r in by_kind(objs, "ClusterRole") if r["metadata"]["name"] == "llmengine-operator"]
    return role


def _named(objs: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [o for o in by_kind(objs, kind) if o["metadata"]["name"] == name]


def _webhook_rbac_is_exact(objs: list[dict[str, Any]]) -> None:
    """The certificate's RBAC: a ClusterRole for the one configuration, a Role in the release namespace for the one
    Secret, each bound to the operator's ServiceAccount only."""
    (crole,) = _named(objs, "ClusterRole", "llmengine-operator-webhook")
    (role,) = _named(objs, "Role", "llmengine-operator-webhook")
    assert role["metadata"]["namespace"] == "llmengine-system"
    assert named_rules_table(crole["rules"]) == WEBHOOK_CONFIGURATION_RULES
    assert named_rules_table(role["rules"]) == WEBHOOK_SECRET_RULES
    for kind, ref in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        (b,) = _named(objs, kind, "llmengine-operator-webhook")
        assert b["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": ref,
            "name": "llmengine-operator-webhook",
        }
        assert b["subjects"] == [
            {"kind": "ServiceAccount", "name": "llmengine-operator", "namespace": "llmengine-system"}
        ]


@pytest.mark.parametrize(
    "sets",
    [
        (),
        PEERING,
        NAMESPACED,
        (*PEERING, *NAMESPACED),
        ("--set", "metrics.serviceMonitor.enabled=true"),
        ("--set", "webhook.enabled=false"),
        ("--set", "webhook.certificate.source=certManager"),
        ("--set", "webhook.certificate.source=helm"),
    ],
    ids=[
        "default",
        "peering",
        "namespaced",
        "namespaced-peering",
        "servicemonitor",
        "no-webhook",
        "cert-manager",
        "helm-certificate",
    ],
)
def test_helm_lint_strict(sets: tuple[str, ...]) -> None:
    out = helm("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *sets)
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out


@pytest.fixture(scope="module")
def all_features(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return ("-f", str(values_file(ALL_FEATURES, tmp_path_factory.mktemp("values") / "all.yaml")))


@pytest.mark.parametrize("extra", [(), NAMESPACED, ("--set", "webhook.certificate.source=certManager")])
def test_helm_lint_strict_with_every_feature_on(all_features: tuple[str, str], extra: tuple[str, ...]) -> None:
    out = helm("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *all_features, *extra)
    assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out


def test_default_render_is_hardened_and_cluster_wide() -> None:
    objs = render()
    dep = _deployment(objs)
    pod = dep["spec"]["template"]["spec"]
    c = _container(objs)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert c["command"] == ["llmengine", "operator"]
    assert "--all-namespaces" in c["args"] and not any(a.startswith("--peering") for a in c["args"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}} in pod["volumes"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081, "webhook": 9443}
    assert "--liveness=http://0.0.0.0:8081/healthz" in c["args"]
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    (sa,) = by_kind(objs, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == "llmengine-operator"
    svc = _service(objs, "metrics")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert not by_kind(objs, "ServiceMonitor")
    (crd,) = by_kind(objs, "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "llmengines.llmengine.io"
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_default_rbac_is_exactly_what_the_operator_calls() -> None:
    objs = render()
    role = _operator_role(objs)
    assert rules_table(role["rules"]) == {**NAMESPACED_RULES, **CLUSTER_ONLY_RULES}
    (binding,) = _named(objs, "ClusterRoleBinding", "llmengine-operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "llmengine-operator", "namespace": "llmengine-system"}
    ]
    # Besides, only what the webhook certificate needs, by name.
    _webhook_rbac_is_exact(objs)
    assert len(by_kind(objs, "Role")) == len(by_kind(objs, "RoleBinding")) == 1
    assert len(by_kind(objs, "ClusterRoleBinding")) == 2
    # Nothing anywhere grants a wildcard, and Secrets are never listable.
    for r in by_kind(objs, "ClusterRole"):
        for rule in r["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    assert "list" not in rules_table(role["rules"])[("", "secrets")]
    # User-facing aggregation roles touch LLMEngines only.
    aggregated = [
        r for r in by_kind(objs, "ClusterRole") if r is not role and not r["metadata"]["name"].endswith("-webhook")
    ]
    assert {r["metadata"]["name"] for r in aggregated} == {"llmengine-operator-edit", "llmengine-operator-view"}
    for r in aggregated:
        assert {g for g, _ in rules_table(r["rules"])} == {"llmengine.io"}


def test_peering_adds_crds_peering_object_rbac_and_flag() -> None:
    objs = render(*PEERING)
    c = _container(objs)
    assert "--peering=llmengine-operator" in c["args"]
    assert "strategy" not in _deployment(objs)["spec"]
    crds = {o["metadata"]["name"]: o for o in by_kind(objs, "CustomResourceDefinition")}
    assert set(crds) == {"llmengines.llmengine.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for name, scope, kind in [
        ("clusterkopfpeerings.kopf.dev", "Cluster", "ClusterKopfPeering"),
        ("kopfpeerings.kopf.dev", "Namespaced", "KopfPeering"),
    ]:
        spec = crds[name]["spec"]
        assert spec["group"] == "kopf.dev" and spec["scope"] == scope and spec["names"]["kind"] == kind
        (v,) = spec["versions"]
        assert v["name"] == "v1" and v["served"] and v["storage"]
        status = v["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    # The peering object is the operator's to create (a Helm hook would make Argo CD apply it after everything else).
    assert not by_kind(objs, "ClusterKopfPeering") and not by_kind(objs, "KopfPeering")
    assert not [o for o in objs if "helm.sh/hook" in (o["metadata"].get("annotations") or {}) and o["kind"] != "Pod"]
    table = rules_table(_operator_role(objs)["rules"])
    assert table[("kopf.dev", "clusterkopfpeerings")] == {"create", "list", "watch", "patch"}
    assert ("kopf.dev", "kopfpeerings") not in table
    assert "kopf.dev" not in {g for g, _ in rules_table(_operator_role(render())["rules"])}


def test_namespaced_mode_uses_roles_per_namespace() -> None:
    objs = render(*NAMESPACED, *PEERING)
    c = _container(objs)
    assert "--namespace=team-a" in c["args"] and "--namespace=team-b" in c["args"]
    assert "--all-namespaces" not in c["args"]
    roles = {r["metadata"]["namespace"]: r for r in _named(objs, "Role", "llmengine-operator")}
    assert set(roles) == {"team-a", "team-b"}
    for role in roles.values():
        assert rules_table(role["rules"]) == {
            **NAMESPACED_RULES,
            ("kopf.dev", "kopfpeerings"): {"create", "list", "watch", "patch"},
        }
    bindings = {b["metadata"]["namespace"]: b for b in _named(objs, "RoleBinding", "llmengine-operator")}
    assert set(bindings) == {"team-a", "team-b"}
    assert all(b["subjects"][0]["namespace"] == "llmengine-system" for b in bindings.values())
    # Cluster-wide, only what cannot be namespaced: CRD and namespace observation, and the build queue's count
    # of running build Jobs across namespaces.
    assert rules_table(_operator_role(objs)["rules"]) == {
        **CLUSTER_ONLY_RULES,
        ("", "namespaces"): {"list", "watch"},
        ("batch", "jobs"): {"list"},
    }
    assert not by_kind(objs, "KopfPeering") and not by_kind(objs, "ClusterKopfPeering")
    # The webhook certificate's Secret lives in the release namespace, whatever the operator watches.
    _webhook_rbac_is_exact(objs)


def test_secrets_only_by_reference() -> None:
    objs = render("--set", "store.bucket=engines", "--set", "store.credentialsSecret=operator-s3")
    # The only Secret the chart writes is the one the operator keeps the webhook certificate in, rendered empty:
    # never a credential, nothing that changes from one render to the next.
    assert [(s["metadata"]["name"], s["type"], s.get("data")) for s in by_kind(objs, "Secret")] == [
        ("llmengine-operator-webhook-cert", "Opaque", None)
    ]
    env = {e["name"]: e for e in _container(objs)["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "operator-s3", "key": key}}
    # The engine pods' Secret defaults to the same name; only the name travels.
    assert env["LLMENGINE_STORE_SECRET"]["value"] == "operator-s3"
    assert all("value" not in e for name, e in env.items() if name.startswith("AWS_"))


def test_settings_reach_operator_config() -> None:
    objs = render(
        "--set",
        "operator.compiler=test",
        "--set-json",
        'images.trtllm={"1.2.1": {"builder": "reg/b:1", "server": "reg/s:1"}, '
        '"1.2.0": {"builder": "reg/b:0", "server": "reg/s:0"}}',
        "--set",
        "images.defaultTrtllmVersion=1.2.0",
        "--set",
        "build.concurrencyPerPool=3",
        "--set",
        "operator.jsonLogs=false",
        "--set",
        "store.bucket=engines",
        "--set",
        "store.endpoint=http://minio.storage:9000",
        "--set",
        "store.prefix=p",
        "--set",
        "store.access=engineNamespace",
        "--set",
        "store.engineSecret=engine-s3",
        "--set",
        "metrics.port=9090",
        "--set",
        "health.port=9091",
        "--set",
        "engineCache.hostPath=/var/cache/llmengine",
        "--set",
        "engineCache.sizeBudget=500Gi",
    )
    env = {e["name"]: e["value"] for e in _container(objs)["env"] if "value" in e}
    llm = {k: v for k, v in env.items() if k.startswith("LLMENGINE_")}
    known = (
        {"LLMENGINE_" + f.upper() for f in OperatorConfig.model_fields}
        | {f"LLMENGINE_STORE_{k}" for k in ("BUCKET", "PREFIX", "ENDPOINT", "REGION", "SECRET")}
        | {"LLMENGINE_DEFAULT_TRTLLM_VERSION"}
    )
    assert set(llm) <= known, set(llm) - known
    cfg = OperatorConfig.from_env(llm)
    assert cfg.compiler == "test" and cfg.images.default_version == "1.2.0"
    assert cfg.images.versions == {
        "1.2.1": ImagePair(builder="reg/b:1", server="reg/s:1"),
        "1.2.0": ImagePair(builder="reg/b:0", server="reg/s:0"),
    }
    assert cfg.build_concurrency_per_pool == 3 and cfg.json_logs is False
    assert cfg.metrics_port == 9090 and cfg.health_port == 9091
    assert cfg.default_store is not None
    assert (cfg.default_store.bucket, cfg.default_store.prefix) == ("engines", "p")
    assert cfg.default_store.endpoint == "http://minio.storage:9000"
    assert cfg.default_store_secret == "engine-s3"
    assert (cfg.engine_cache_host_path, cfg.engine_cache_size_budget) == ("/var/cache/llmengine", 500 * 2**30)
    assert OperatorConfig.from_env({k: v for k, v in llm.items() if "CACHE" not in k}).engine_cache_host_path is None
    ports = {p["name"]: p["containerPort"] for p in _container(objs)["ports"]}
    assert ports == {"metrics": 9090, "health": 9091, "webhook": 9443}


def test_isolated_store_access_is_the_default_and_grants_only_what_it_needs() -> None:
    store = ("--set", "store.bucket=engines", "--set", "store.credentialsSecret=operator-s3")
    objs = render(*store, "--set", "store.engineSecret=engine-s3")
    env = {e["name"]: e["value"] for e in _container(objs)["env"] if "value" in e}
    cfg = OperatorConfig.from_env({k: v for k, v in env.items() if k.startswith("LLMENGINE_")})
    # Builds in the release namespace with the operator's own Secret; engineSecret is not used.
    assert cfg.isolated and cfg.build_namespace == "llmengine-system" and cfg.grant_seconds == 43200
    assert cfg.default_store_secret == "operator-s3"
    table = rules_table(_operator_role(objs)["rules"])
    assert table[("", "secrets")] == {"get", "create", "update"}
    # engineNamespace: the Secret in every engine namespace, and no Secret writes at all.
    shared = render(*store, "--set", "store.access=engineNamespace", "--set", "store.engineSecret=engine-s3")
    env = {e["name"]: e["value"] for e in _container(shared)["env"] if "value" in e}
    cfg = OperatorConfig.from_env({k: v for k, v in env.items() if k.startswith("LLMENGINE_")})
    assert not cfg.isolated and cfg.default_store_secret == "engine-s3"
    assert rules_table(_operator_role(shared)["rules"])[("", "secrets")] == {"get"}
    # Watching namespaces: the builds still run in the release namespace, with a Role there for exactly that.
    watched = render(*store, *NAMESPACED)
    (builds,) = _named(watched, "Role", "llmengine-operator-builds")
    assert builds["metadata"]["namespace"] == "llmengine-system"
    assert rules_table(builds["rules"]) == {
        ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
        ("", "configmaps"): {"create", "delete"},
        ("", "secrets"): {"create"},
        ("", "pods"): {"list"},
    }
    (binding,) = _named(watched, "RoleBinding", "llmengine-operator-builds")
    assert binding["roleRef"]["name"] == "llmengine-operator-builds"
    for role in _named(watched, "Role", "llmengine-operator"):
        assert rules_table(role["rules"])[("", "secrets")] == {"get", "create", "update"}


ENGINE_PODS = {
    "imagePullSecrets": [{"name": "regcred"}],
    "runtimeClassName": "nvidia",
    "priorityClassName": "",
    "labels": {"team": "platform"},
    "env": [{"name": "HF_ENDPOINT", "value": "https://hf-mirror.corp.example"}],
    "envFrom": [{"secretRef": {"name": "hub"}, "prefix": "HUB_"}],
    "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
    "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
    "proxy": {"httpProxy": "", "httpsProxy": "http://proxy.corp.example:3128", "noProxy": ".svc,.cluster.local"},
    "caBundle": {"configMapKeyRef": {"name": "corp-ca", "key": "ca-bundle.crt"}},
    "build": {"priorityClassName": "batch-low"},
    "serving": {"priorityClassName": "serving-high"},
}


def test_engine_pod_defaults_reach_operator_config_and_the_operator_trusts_their_ca() -> None:
    objs = render("--set-json", f"enginePods={json.dumps(ENGINE_PODS)}")
    c, pod = _container(objs), _deployment(objs)["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    cfg = OperatorConfig.from_env({k: v for k, v in env.items() if k.startswith("LLMENGINE_")})
    # Empty settings are left out; everything else is the engine pods' defaults, as spec.pods spells them.
    expected = {k: v for k, v in ENGINE_PODS.items() if v and k != "proxy"}
    expected["proxy"] = {"httpsProxy": "http://proxy.corp.example:3128", "noProxy": ".svc,.cluster.local"}
    assert cfg.engine_pods == OperandPods.model_validate(expected)
    # The operator verifies the store with the same bundle, from the release namespace, mounted read-only.
    assert cfg.ca_bundle == "/etc/llmengine/ca/ca.crt"
    assert {"name": "ca-bundle", "mountPath": "/etc/llmengine/ca", "readOnly": True} in c["volumeMounts"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "ca-bundle"]
    assert vol == {
        "name": "ca-bundle",
        "configMap": {"name": "corp-ca", "items": [{"key": "ca-bundle.crt", "path": "ca.crt"}]},
    }
    secret = render("--set-json", 'enginePods={"caBundle": {"secretKeyRef": {"name": "corp-ca", "key": "ca.crt"}}}')
    (vol,) = [v for v in _deployment(secret)["spec"]["template"]["spec"]["volumes"] if v["name"] == "ca-bundle"]
    assert vol["secret"] == {"secretName": "corp-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    # The pods read what the settings name; the operator reads nothing new.
    assert rules_table(_operator_role(objs)["rules"]) == {**NAMESPACED_RULES, **CLUSTER_ONLY_RULES}
    assert all("value" not in e for e in c["env"] if e["name"].startswith("AWS_"))
    # Nothing set: nothing of it in the operator's pod.
    plain = render()
    names = {e["name"] for e in _container(plain)["env"]}
    assert not names & {"LLMENGINE_ENGINE_PODS", "LLMENGINE_CA_BUNDLE"}
    assert "ca-bundle" not in {v["name"] for v in _deployment(plain)["spec"]["template"]["spec"]["volumes"]}


def test_crd_and_monitoring_switches() -> None:
    assert not by_kind(render("--set", "crds.install=false"), "CustomResourceDefinition")
    # Kept by Helm on uninstall and never pruned nor deleted by Argo CD (which ignores Helm's policy when pruning).
    for crd in by_kind(render(*PEERING), "CustomResourceDefinition"):
        assert crd["metadata"]["annotations"] == {
            "helm.sh/resource-policy": "keep",
            "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
            "argocd.argoproj.io/sync-wave": "-1",
        }
    for crd in by_kind(render(*PEERING, "--set", "crds.keep=false"), "CustomResourceDefinition"):
        assert crd["metadata"]["annotations"] == {"argocd.argoproj.io/sync-wave": "-1"}
    (sm,) = by_kind(render("--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["spec"]["endpoints"][0]["port"] == "metrics"


def test_helm_test_pod_fetches_metrics_through_the_service() -> None:
    objs = render()
    (pod,) = by_kind(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    svc = _service(objs, "metrics")
    assert f"http://{svc['metadata']['name']}.llmengine-system.svc:8080/metrics" in c["args"]
    assert c["securityContext"]["runAsNonRoot"] is True
    # The test pod must not be picked up by the metrics Service's selector.
    assert not svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


# What gates LLMEngines: applied by Argo CD in an earlier wave than theirs, so that they meet a Ready operator.
GATING = {
    "CustomResourceDefinition",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Secret",
    "Service",
    "Deployment",
    "ValidatingWebhookConfiguration",
    "Issuer",
    "Certificate",
}


def test_operator_objects_come_in_an_argo_cd_sync_wave_before_user_objects() -> None:
    for sets in [(), (*PEERING, *NAMESPACED), ("--set", "webhook.certificate.source=certManager")]:
        objs = render(*sets)
        gating = [o for o in objs if o["kind"] in GATING]
        assert {o["kind"] for o in gating} >= {
            "CustomResourceDefinition",
            "Deployment",
            "ValidatingWebhookConfiguration",
        }
        for o in gating:
            assert (o["metadata"].get("annotations") or {}).get("argocd.argoproj.io/sync-wave") == "-1", o["metadata"]
    # Annotations of the values are kept beside it.
    objs = render("--set", "serviceAccount.annotations.a=b", "--set", "metrics.service.annotations.c=d")
    (sa,) = by_kind(objs, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {"a": "b", "argocd.argoproj.io/sync-wave": "-1"}
    assert _service(objs, "metrics")["metadata"]["annotations"] == {"c": "d", "argocd.argoproj.io/sync-wave": "-1"}
    # An integer from --set works; empty leaves the annotation out (and an object with no other one, annotations).
    assert _deployment(render("--set", "argocd.syncWave=-3"))["metadata"]["annotations"] == {
        "argocd.argoproj.io/sync-wave": "-3"
    }
    objs = render("--set", "argocd.syncWave=")
    assert "annotations" not in _deployment(objs)["metadata"]
    assert not any("argocd.argoproj.io/sync-wave" in (o["metadata"].get("annotations") or {}) for o in objs)


@pytest.mark.parametrize(
    "bad",
    [
        "unknown=1",
        "operator.compiler=gcc",
        "image.pullPolicy=Sometimes",
        "watchNamespaces={Bad_NS}",
        "store.endpoint=s3",
        "webhook.failurePolicy=Sometimes",
        "webhook.timeoutSeconds=60",
        "webhook.url=http://127.0.0.1:9443",
        "webhook.certificate.source=selfmade",
        "enginePods.runtimeClass=nvidia",
        "enginePods.proxy.httpsProxy=proxy.corp:3128",
        "enginePods.volumes[0].name=work",
        "enginePods.volumeMounts[0].name=x,enginePods.volumeMounts[0].mountPath=/etc/llmengine/ca",
        "enginePods.caBundle.configMapKeyRef.name=corp-ca",
        "enginePods.env[0].name=A,enginePods.env[0].value=x,enginePods.env[0].valueFrom.fieldRef.fieldPath=y",
        "enginePods.serving.imagePullSecrets[0]=regcred",
        "argocd.syncWave=soon",
        "imagePullSecrets[0].nam=regcred",
        "imagePullSecrets[0]=Not_A_Name",
        "podDisruptionBudget.maxUnavailable=half",
        "networkPolicy.apiServer.ports={0}",
        "networkPolicy.store.cidrs={10.0.0.0}",
        "topologySpreadConstraints[0].maxSkew=1",
        "engineCache.hostPath=var/cache/llmengine",
        "engineCache.sizeBudget=lots",
        "enginePods.volumes[0].name=engine-cache",
    ],
)
def test_schema_rejects_bad_values(bad: str) -> None:
    res = subprocess.run(
        [tools.binary("helm"), "template", "x", str(CHART), "--kube-version", KUBE_VERSION, "--set", bad],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "values don't meet the specifications of the schema" in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------------------------
# The validating webhook


def _webhook_parts(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    (conf,) = by_kind(objs, "ValidatingWebhookConfiguration")
    (hook,) = conf["webhooks"]
    return conf, hook, _service(objs, "webhook")


def _cert(pem_b64: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(pem_b64))


HELM_CERT = ("--set", "webhook.certificate.source=helm")


def _check_service_and_rules(objs: list[dict[str, Any]]) -> dict[str, Any]:
    _, hook, svc = _webhook_parts(objs)
    assert svc["spec"]["ports"] == [{"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}]
    assert svc["spec"]["selector"].items() <= _deployment(objs)["spec"]["template"]["metadata"]["labels"].items()
    assert hook["name"] == "validate-llmengine.llmengine.io"
    assert hook["clientConfig"]["service"] == {
        "name": svc["metadata"]["name"],
        "namespace": "llmengine-system",
        "path": "/validate-llmengine",
        "port": 443,
    }
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    assert hook["rules"] == [
        {
            "apiGroups": ["llmengine.io"],
            "apiVersions": ["v1alpha1"],
            "resources": ["llmengines"],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Namespaced",
        }
    ]
    assert "namespaceSelector" not in hook
    return hook


def test_webhook_by_default_gets_its_certificate_from_the_operator_through_its_service() -> None:
    objs = render()
    hook = _check_service_and_rules(objs)
    conf, _, svc = _webhook_parts(objs)
    c = _container(objs)
    pod = _deployment(objs)["spec"]["template"]["spec"]
    # No caBundle and no certificate in the render: the operator issues them into its Secret and writes the CA into
    # this configuration, told which by its arguments.
    assert "caBundle" not in hook["clientConfig"]
    assert "cert-manager.io/inject-ca-from" not in conf["metadata"]["annotations"]
    (secret,) = by_kind(objs, "Secret")
    assert "--webhook-port=9443" in c["args"]
    assert f"--webhook-cert-secret=llmengine-system/{secret['metadata']['name']}" in c["args"]
    assert f"--webhook-service=llmengine-system/{svc['metadata']['name']}" in c["args"]
    assert f"--webhook-configuration={conf['metadata']['name']}" in c["args"]
    assert "--webhook-cert-days=3650" in c["args"]
    assert not any(a.startswith(("--webhook-cert-dir", "--webhook-host")) for a in c["args"])
    # No Secret volume: the operator writes the files under /tmp (the root file system is read-only).
    assert [m["name"] for m in c["volumeMounts"]] == ["tmp"] and [v["name"] for v in pod["volumes"]] == ["tmp"]


def test_webhook_with_a_helm_generated_certificate_serves_it_from_a_secret_volume() -> None:
    objs = render(*HELM_CERT)
    hook = _check_service_and_rules(objs)
    c = _container(objs)
    pod = _deployment(objs)["spec"]["template"]["spec"]
    assert "--webhook-port=9443" in c["args"] and "--webhook-cert-dir=/etc/llmengine/webhook" in c["args"]
    assert not any(a.startswith("--webhook-cert-secret") for a in c["args"])
    assert {"name": "webhook-tls", "mountPath": "/etc/llmengine/webhook", "readOnly": True} in c["volumeMounts"]
    (secret,) = by_kind(objs, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    vol = next(v for v in pod["volumes"] if v["name"] == "webhook-tls")
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    # The serving certificate is signed by the CA the API server is told to trust, for the Service's DNS name.
    ca, leaf = _cert(hook["clientConfig"]["caBundle"]), _cert(secret["data"]["tls.crt"])
    assert secret["data"]["ca.crt"] == hook["clientConfig"]["caBundle"]
    assert leaf.issuer == ca.subject
    ca.public_key().verify(  # type: ignore[union-attr,call-arg]
        leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), leaf.signature_hash_algorithm
    )
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    svc = _service(objs, "webhook")
    assert f"{svc['metadata']['name']}.llmengine-system.svc" in names.get_values_for_type(x509.DNSName)
    # Helm writes the Secret and the caBundle itself: the operator gets no RBAC for them.
    assert not _named(objs, "ClusterRole", "llmengine-operator-webhook") and not by_kind(objs, "Role")


def test_webhook_url_for_an_operator_outside_the_cluster_gets_its_host_in_the_certificate() -> None:
    url = ("--set", "webhook.url=https://127.0.0.1:19443/")
    objs = render(*url)
    _, hook, _ = _webhook_parts(objs)
    assert hook["clientConfig"]["url"] == "https://127.0.0.1:19443/validate-llmengine"
    assert "service" not in hook["clientConfig"]
    assert "--webhook-host=127.0.0.1" in _container(objs)["args"]
    objs = render(*url, *HELM_CERT)
    (secret,) = by_kind(objs, "Secret")
    names = _cert(secret["data"]["tls.crt"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def _template(*sets: str) -> str:
    return helm(
        "template", "llmengine-operator", str(CHART), "-n", "llmengine-system", "--kube-version", KUBE_VERSION, *sets
    )


@pytest.mark.parametrize(
    "sets",
    [(), ("--set", "webhook.certificate.source=certManager"), (*NAMESPACED, *PEERING), ("all-features",)],
    ids=["default", "cert-manager", "namespaced-peering", "all-features"],
)
def test_rendering_twice_gives_the_same_bytes(sets: tuple[str, ...], all_features: tuple[str, str]) -> None:
    """What Argo CD compares on every refresh: a render that changes by itself keeps an app OutOfSync and rotates
    the certificate on every sync."""
    sets = all_features if sets == ("all-features",) else sets
    assert _template(*sets) == _template(*sets)


def test_helm_generated_certificate_changes_from_one_render_to_the_next() -> None:
    """Why source helm is not the default: without a cluster to look up (helm template), each render makes a new CA."""
    assert _template(*HELM_CERT) != _template(*HELM_CERT)


def test_webhook_in_namespaced_mode_only_sees_watched_namespaces() -> None:
    _, hook, _ = _webhook_parts(render(*NAMESPACED))
    assert hook["namespaceSelector"] == {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]
    }


def test_webhook_with_cert_manager_uses_a_certificate_and_ca_injection() -> None:
    objs = render("--set", "webhook.certificate.source=certManager", "--set", "webhook.failurePolicy=Ignore")
    conf, hook, svc = _webhook_parts(objs)
    (cert,) = by_kind(objs, "Certificate")
    (issuer,) = by_kind(objs, "Issuer")
    assert not by_kind(objs, "Secret")
    assert conf["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"llmengine-system/{cert['metadata']['name']}"
    )
    assert cert["spec"]["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer"}
    assert f"{svc['metadata']['name']}.llmengine-system.svc" in cert["spec"]["dnsNames"]
    assert "caBundle" not in hook["clientConfig"] and hook["failurePolicy"] == "Ignore"
    objs = render(
        "--set",
        "webhook.certificate.source=certManager",
        "--set",
        "webhook.certificate.issuerRef.name=corp-ca",
        "--set",
        "webhook.certificate.issuerRef.kind=ClusterIssuer",
    )
    assert not by_kind(objs, "Issuer")
    assert by_kind(objs, "Certificate")[0]["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}
    # cert-manager writes the Secret and the caBundle: the operator reads the mounted files only.
    assert "--webhook-cert-dir=/etc/llmengine/webhook" in _container(objs)["args"]
    assert not _named(objs, "ClusterRole", "llmengine-operator-webhook") and not by_kind(objs, "Role")


def test_webhook_with_an_existing_secret_needs_its_ca() -> None:
    res = subprocess.run(
        [
            tools.binary("helm"),
            "template",
            "x",
            str(CHART),
            "--kube-version",
            KUBE_VERSION,
            "--set",
            "webhook.certificate.source=secret",
            "--set",
            "webhook.certificate.secretName=my-tls",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "webhook.certificate.caBundle" in res.stderr, res.stderr
    objs = render(
        "--set",
        "webhook.certificate.source=secret",
        "--set",
        "webhook.certificate.secretName=my-tls",
        "--set",
        "webhook.certificate.caBundle=Q0E=",
    )
    _, hook, _ = _webhook_parts(objs)
    assert hook["clientConfig"]["caBundle"] == "Q0E=" and not by_kind(objs, "Secret")
    vol = next(v for v in _deployment(objs)["spec"]["template"]["spec"]["volumes"] if v["name"] == "webhook-tls")
    assert vol["secret"]["secretName"] == "my-tls"


def test_webhook_disabled_leaves_no_trace() -> None:
    objs = render("--set", "webhook.enabled=false")
    assert not by_kind(objs, "ValidatingWebhookConfiguration") and not by_kind(objs, "Secret")
    assert not by_kind(objs, "Role") and not _named(objs, "ClusterRole", "llmengine-operator-webhook")
    assert [s["metadata"]["name"] for s in by_kind(objs, "Service")] == ["llmengine-operator-metrics"]
    c = _container(objs)
    assert not any(a.startswith("--webhook") for a in c["args"])
    assert {p["name"] for p in c["ports"]} == {"metrics", "health"}


# ---------------------------------------------------------------------------------------------------------------
# Pod settings, disruption budget, network policy, notes


def test_image_pull_secrets_take_names_and_the_pod_spec_form() -> None:
    pod = _deployment(render("--set-json", 'imagePullSecrets=["regcred", {"name": "mirror"}]'))["spec"]["template"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert "imagePullSecrets" not in _deployment(render())["spec"]["template"]["spec"]


def test_extra_args_volumes_and_spread_reach_the_pod(all_features: tuple[str, str]) -> None:
    objs = render(*all_features)
    pod = _deployment(objs)["spec"]["template"]["spec"]
    c = _container(objs)
    assert c["args"][-1] == "--verbose" and c["args"][0] == "--all-namespaces"
    assert {"name": "store-ca", "mountPath": "/etc/store-ca", "readOnly": True} in c["volumeMounts"]
    assert {"name": "store-ca", "configMap": {"name": "store-ca"}} in pod["volumes"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # the chart's own stay
    assert {"name": "NO_PROXY", "value": ".svc,.cluster.local"} in c["env"]
    # A constraint without a labelSelector gets the operator pods' labels; one with its own keeps it.
    (tsc,) = pod["topologySpreadConstraints"]
    assert tsc["topologyKey"] == "topology.kubernetes.io/zone"
    assert tsc["labelSelector"] == {"matchLabels": _deployment(objs)["spec"]["selector"]["matchLabels"]}
    own = {"matchLabels": {"x": "y"}}
    pod = _deployment(
        render(
            "--set-json",
            'topologySpreadConstraints=[{"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", '
            '"whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"x": "y"}}}]',
        )
    )["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"][0]["labelSelector"] == own
    assert "topologySpreadConstraints" not in _deployment(render())["spec"]["template"]["spec"]


def test_disruption_budget_only_with_several_replicas() -> None:
    assert not by_kind(render(), "PodDisruptionBudget")  # one replica: a budget would block every drain
    objs = render(*PEERING)
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == _deployment(objs)["spec"]["selector"]["matchLabels"]
    assert pdb["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "-1"
    (pdb,) = by_kind(render(*PEERING, "--set", "podDisruptionBudget.maxUnavailable=50%"), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == "50%"
    assert not by_kind(render(*PEERING, "--set", "podDisruptionBudget.enabled=false"), "PodDisruptionBudget")


def _egress_ports(np: dict[str, Any]) -> dict[tuple[int | str, str], list[dict[str, Any]]]:
    out: dict[tuple[int | str, str], list[dict[str, Any]]] = {}
    for rule in np["spec"]["egress"]:
        for p in rule["ports"]:
            out.setdefault((p["port"], p["protocol"]), []).append(rule)
    return out


def test_network_policy_allows_the_operators_traffic_only(all_features: tuple[str, str]) -> None:
    assert not by_kind(render(), "NetworkPolicy")
    objs = render(*all_features)
    (np,) = by_kind(objs, "NetworkPolicy")
    spec = np["spec"]
    assert spec["podSelector"]["matchLabels"] == _deployment(objs)["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    # In: the webhook (from anywhere: the API server) and the metrics port (from the monitoring namespace), by the
    # container's port names.
    webhook, metrics = spec["ingress"]
    assert webhook == {"ports": [{"port": "webhook", "protocol": "TCP"}]}
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"] == ALL_FEATURES["networkPolicy"]["metricsFrom"]
    assert {"webhook", "metrics"} <= {p["name"] for p in _container(objs)["ports"]}
    # Out: DNS, the API server (its CIDR), the store (443 and the endpoint's 9000), the serving pods' 8000, the proxy.
    ports = _egress_ports(np)
    assert set(ports) == {
        (53, "UDP"),
        (53, "TCP"),
        (443, "TCP"),
        (6443, "TCP"),
        (9000, "TCP"),
        (8000, "TCP"),
        (3128, "TCP"),
    }
    (api_rule,) = ports[(6443, "TCP")]
    assert api_rule["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    (store_rule,) = ports[(9000, "TCP")]
    assert "to" not in store_rule  # any address
    (serving,) = ports[(8000, "TCP")]
    assert serving["to"] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/managed-by": "llmengine-operator",
                    "app.kubernetes.io/name": "llmengine",
                    "app.kubernetes.io/component": "server",
                }
            },
            "namespaceSelector": {},
        }
    ]


def test_network_policy_follows_watched_namespaces_traffic_and_webhook_switches() -> None:
    on = ("--set", "networkPolicy.enabled=true")
    (np,) = by_kind(render(*on, *NAMESPACED, "--set", "store.endpoint=https://s3.example.com"), "NetworkPolicy")
    (serving,) = _egress_ports(np)[(8000, "TCP")]
    assert serving["to"][0]["namespaceSelector"] == {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]
    }
    assert (9000, "TCP") not in _egress_ports(np)  # https with no port: 443, already there
    (np,) = by_kind(render(*on, "--set", "traffic.source=off", "--set", "webhook.enabled=false"), "NetworkPolicy")
    assert (8000, "TCP") not in _egress_ports(np)
    assert [r["ports"][0]["port"] for r in np["spec"]["ingress"]] == ["metrics"]
    (np,) = by_kind(render(*on, "--set", "networkPolicy.dns=false"), "NetworkPolicy")
    assert (53, "UDP") not in _egress_ports(np)


def test_the_prometheus_traffic_source_is_configured_by_reference_and_reaches_only_prometheus() -> None:
    prom = ("--set", "traffic.source=prometheus", "--set", "traffic.prometheus.url=https://prom.monitoring:9091")
    refs = (
        "--set",
        "traffic.prometheus.bearerTokenSecret.name=prom-token",
        "--set",
        "traffic.prometheus.caConfigMap.name=prom-ca",
    )
    objs = render(
        *prom, *refs, "--set", 'traffic.prometheus.selector=cluster="a"', "--set", "networkPolicy.enabled=true"
    )
    c = _container(objs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    cfg = OperatorConfig.from_env({k: v for k, v in env.items() if v is not None})
    assert (cfg.traffic_source, cfg.traffic_prometheus_url) == ("prometheus", "https://prom.monitoring:9091")
    assert cfg.traffic_prometheus_selector == 'cluster="a"' and cfg.traffic_prometheus_timeout_seconds == 10
    assert cfg.traffic_prometheus_bearer_token_file == "/etc/llmengine/prometheus/token/token"
    assert cfg.traffic_prometheus_ca_file == "/etc/llmengine/prometheus/ca/ca.crt"
    assert not any("valueFrom" in e for e in c["env"] if e["name"].startswith("LLMENGINE_TRAFFIC"))  # no token in env
    volumes = {v["name"]: v for v in _deployment(objs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["prometheus-token"]["secret"] == {
        "secretName": "prom-token",
        "items": [{"key": "token", "path": "token"}],
    }
    assert volumes["prometheus-ca"]["configMap"] == {"name": "prom-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    (np,) = by_kind(objs, "NetworkPolicy")
    ports = _egress_ports(np)
    assert (9091, "TCP") in ports and (8000, "TCP") not in ports  # Prometheus, not the serving pods
    # Without a URL the chart refuses to render, naming the value.
    with pytest.raises(
        AssertionError, match=r"traffic\.prometheus\.url is required when traffic\.source is prometheus"
    ):
        render("--set", "traffic.source=prometheus")
    # The other sources render nothing of it.
    assert not [e for e in _container(render()).get("env", []) if "PROMETHEUS" in e["name"]]


def test_notes_say_how_to_check_the_install_and_where_the_docs_are(tmp_path: Path) -> None:
    notes = render_notes(work=tmp_path / "a")
    assert "kubectl -n llmengine-system rollout status deploy/llmengine-operator" in notes
    assert "helm test llmengine-operator -n llmengine-system" in notes
    assert "kubectl get validatingwebhookconfiguration llmengine-operator" in notes
    assert "watching\nevery namespace" in notes and "No default store" in notes
    assert "https://github.com/llmengine/llmengine-operator/tree/main/docs" in notes and "gitops.md" in notes
    notes = render_notes(*NAMESPACED, "--set", "store.bucket=b", "--set", "webhook.enabled=false", work=tmp_path / "b")
    assert "the namespaces team-a, team-b" in notes and "No default store" not in notes
    assert "validatingwebhookconfiguration" not in notes
    assert "makes a new one on every render" in render_notes(*HELM_CERT, work=tmp_path / "c")
