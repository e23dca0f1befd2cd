"""Render functions are pure: golden files pin their output; properties pin what must always hold."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import ImageCatalog, ImagePair, OperatorConfig
from llmengine.api.v1alpha1 import SecretKeySelector, parse_engine
from llmengine.plan import plan_object
from llmengine.render import build, common, serving

GOLDEN = Path(__file__).parent / "golden"
CFG = OperatorConfig(images=ImageCatalog(versions={"1.2.1": ImagePair(builder="reg/builder:1", server="reg/server:1")}))


def _engine(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "LLMEngine",
        "metadata": {"name": "llama", "namespace": "ml", "uid": "1111-2222", "generation": 1},
        "spec": {
            "model": {
                "source": {"huggingFace": {"repo": "meta-llama/Llama-3.1-8B", "revision": "d04e592"}},
                "catalog": "llama-3.1-8b",
            },
            "precision": {"dtype": "bfloat16"},
            "build": {"maxBatchSize": 64, "maxInputLen": 2048, "maxSeqLen": 4096, "maxNumTokens": 8192},
            "target": {"gpu": "H100-80GB", "tolerations": [{"key": "team", "operator": "Equal", "value": "ml"}]},
            "store": {"bucket": "engines", "credentialsSecretRef": {"name": "s3"}},
            "serving": {"replicas": 2, "runtime": {"maxBatchSize": 32}, "resources": {"limits": {"memory": "64Gi"}}},
        },
    }
    for k, v in spec.items():
        body["spec"][k] = v
    return body


def _where(body: dict[str, Any]) -> common.Placement:
    plan, engine = plan_object(body, images=CFG.images), parse_engine(body)
    return common.Placement(
        namespace="ml",
        owners=[common.owner_reference(engine, controller=False)],
        short_digest=plan.short_digest,
        build_job=plan.build_job,
        bench_job=plan.bench_job,
        pool=common.pool_name(plan.gpu.name, plan.mig_profile),
        product_labels=list(plan.gpu.product_labels),
        gpu_resource=plan.gpu_resource,
        gpu_count=plan.gpu_count,
        target=engine.spec.target,
        store_secret="s3",
        hf_token=SecretKeySelector(name="hf", key="token"),
        pods=engine.spec.pods,
        store_identity=common.store_identity(engine.spec),
    )


def _deployment(body: dict[str, Any], cfg: OperatorConfig = CFG) -> dict[str, Any]:
    """The serving Deployment of `body`'s desired engine under `cfg`, as the operator renders it."""
    plan, engine = plan_object(body, images=cfg.images), parse_engine(body)
    assert plan.valid and plan.build_request is not None, plan.errors
    return serving.deployment(
        engine=engine,
        digest=plan.engine_digest,
        short_digest=plan.short_digest,
        backend="tensorrt",
        store=plan.build_request.store,
        store_secret="s3",
        product_labels=list(plan.gpu.product_labels),
        gpu_resource=plan.gpu_resource,
        gpu_count=plan.gpu_count,
        image=plan.server_image,
        cfg=cfg,
    )


def _render(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    plan = plan_object(body, images=CFG.images)
    assert plan.valid, plan.errors
    assert plan.build_request is not None
    job = build.build_job(request=plan.build_request, where=_where(body), attempt=1, cfg=CFG)
    return job, _deployment(body)


def _golden(name: str, obj: dict[str, Any]) -> None:
    path = GOLDEN / f"{name}.yaml"
    text = yaml.safe_dump(obj, sort_keys=True)
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; rerun with UPDATE_GOLDEN=1 if the change is intended"


def test_build_job_and_deployment_golden() -> None:
    job, dep = _render(_engine())
    _golden("build-job", job)
    _golden("deployment", dep)


@pytest.mark.parametrize(
    "target,resource",
    [
        ({"gpu": "H100-80GB"}, "nvidia.com/gpu"),
        ({"gpu": "H100-80GB", "migProfile": "3g.40gb"}, "nvidia.com/mig-3g.40gb"),
    ],
)
def test_gpu_resources_never_mix_whole_gpus_and_mig(target: dict[str, Any], resource: str) -> None:
    job, dep = _render(_engine(target=target))
    for pod in (job["spec"]["template"]["spec"], dep["spec"]["template"]["spec"]):
        res = pod["containers"][0]["resources"]
        gpu_keys = {k for k in res["limits"] if k.startswith("nvidia.com/")}
        assert gpu_keys == {resource}
        assert res["limits"][resource] == res["requests"][resource] == "1"
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert {
            "key": "nvidia.com/gpu.product",
            "operator": "In",
            "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"],
        } in terms[0]["matchExpressions"]
        assert common.GPU_TOLERATION in pod["tolerations"]


def test_pods_are_hardened_and_secrets_only_by_reference() -> None:
    job, dep = _render(_engine())
    for pod in (job["spec"]["template"]["spec"], dep["spec"]["template"]["spec"]):
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            for e in c.get("env") or []:
                if e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"]


def test_job_identity_naming_and_rollout_strategy() -> None:
    job, dep = _render(_engine())
    plan = plan_object(_engine(), images=CFG.images)
    assert job["metadata"]["name"] == plan.build_job
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] > 0
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert all(o["controller"] is False for o in job["metadata"]["ownerReferences"])
    assert (
        json.loads(build.request_configmap(plan.build_request, _where(_engine()))["data"]["request.json"])[
            "engineDigest"
        ]
        == plan.engine_digest
    )
    strategy = dep["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    assert dep["spec"]["template"]["metadata"]["annotations"][common.DIGEST_ANNOTATION] == plan.engine_digest
    assert "--max-batch-size" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_build_job_name_is_one_per_identity_and_store() -> None:
    """A build Job is named by the identity and the store it commits to: engines of one identity naming different
    stores never share a name, engines naming the same place always do (however the prefix is written, and whether
    it is the default store or their own at the same place), and no name is the identity alone, as earlier
    operators named Jobs."""
    default = StoreLocation(bucket="fleet", prefix="engines")
    body = _engine()
    body["spec"].pop("store")
    shared = plan_object(body, images=CFG.images, default_store=default)
    short = shared.short_digest.removeprefix("e-")
    assert (
        shared.build_job.startswith(f"llme-build-{short}-") and len(shared.build_job) == len(f"llme-build-{short}-") + 8
    )

    def own(store: dict[str, Any]) -> str:
        return plan_object(_engine(store=store), images=CFG.images, default_store=default).build_job

    a = own({"bucket": "engines", "credentialsSecretRef": {"name": "s3"}})
    assert a.startswith(f"llme-build-{short}-") and a != shared.build_job
    assert own({"bucket": "engines", "credentialsSecretRef": {"name": "other-creds"}}) == a  # same place, one build
    assert own({"bucket": "engines", "prefix": "/engines/"}) == a  # the prefix as engines are stored under it
    assert own({"bucket": "fleet", "prefix": "engines"}) == shared.build_job  # its own store at the default's place
    others = {
        own({"bucket": "engines2"}),
        own({"bucket": "engines", "prefix": "team-b"}),
        own({"bucket": "engines", "endpoint": "https://s3.example.com"}),
    }
    assert len(others) == 3 and a not in others
    assert own({"bucket": "engines", "endpoint": "https://s3.example.com/"}) in others
    assert len(max([a, *others], key=len)) + len("-hf") <= 63
    # The benchmark Job of the engine in a store is named alike: one per identity and store.
    assert shared.bench_job == shared.build_job.replace("llme-build-", "llme-bench-", 1)
    mine = plan_object(_engine(store={"bucket": "engines2"}), images=CFG.images, default_store=default)
    assert mine.bench_job != shared.bench_job and mine.bench_job.startswith(f"llme-bench-{short}-")


def test_runtime_only_change_keeps_digest_but_changes_deployment() -> None:
    a = _engine()
    b = _engine(serving={"replicas": 5, "runtime": {"maxBatchSize": 16}})
    (ja, da), (jb, db) = _render(a), _render(b)
    assert ja == jb
    assert da != db and db["spec"]["replicas"] == 5


def test_autoscaler_and_routes_golden_and_only_when_asked() -> None:
    from llmengine.render import attachments, autoscale, routes

    metric = {
        "type": "Pods",
        "pods": {
            "metric": {"name": "llmengine_requests_in_flight"},
            "target": {"type": "AverageValue", "averageValue": "8"},
        },
    }
    body = _engine(
        serving={
            "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "metrics": [metric]},
            "ingress": {"host": "llama.example.com", "className": "nginx", "tlsSecretName": "llama-tls"},
            "httpRoute": {
                "parentRefs": [{"name": "public", "namespace": "gateways"}],
                "hostnames": ["llama.example.com"],
            },
        }
    )
    engine = parse_engine(body)
    assert attachments.wanted(engine.spec) == ("HorizontalPodAutoscaler", "Ingress", "HTTPRoute")
    hpa, ing, route = autoscale.autoscaler(engine), routes.ingress(engine), routes.http_route(engine)
    assert hpa and ing and route
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llme-llama"}
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == {
        "name": "llme-llama",
        "port": {"name": "http"},
    }
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": "llme-llama", "port": 8000}]
    for obj in (hpa, ing, route):
        assert obj["metadata"]["ownerReferences"][0]["controller"] is True
    _golden("autoscaler", hpa)
    _golden("ingress", ing)
    _golden("httproute", route)
    plain = parse_engine(_engine())
    assert attachments.wanted(plain.spec) == ()
    assert autoscale.autoscaler(plain) is None and routes.ingress(plain) is None and routes.http_route(plain) is None
    # The count rendered: the spec's without an autoscaler; with one, its count kept within its bounds.
    assert autoscale.replicas(plain.spec, 5) == 2
    assert [autoscale.replicas(engine.spec, n) for n in (None, 1, 4, 9)] == [2, 2, 4, 6]


def test_autoscaling_bounds_are_checked_with_the_field_named() -> None:
    from llmengine.api.v1alpha1 import InvalidEngine

    body = _engine(serving={"autoscaling": {"minReplicas": 5, "maxReplicas": 2, "metrics": [{"type": "Resource"}]}})
    with pytest.raises(InvalidEngine) as exc:
        parse_engine(body)
    assert "spec.serving.autoscaling" in str(exc.value) and "minReplicas (5) must be at most maxReplicas (2)" in str(
        exc.value
    )


def test_workload_identity_runs_every_engine_pod_as_its_service_account() -> None:
    store = {"bucket": "engines", "workloadIdentity": {"serviceAccountName": "engine-store"}}
    job, dep = _render(_engine(store=store))
    for pod in (job["spec"]["template"]["spec"], dep["spec"]["template"]["spec"]):
        assert pod["serviceAccountName"] == "engine-store" and pod["automountServiceAccountToken"] is True
    # spec.pods names another ServiceAccount: that one wins.
    job, dep = _render(_engine(store=store, pods={"serviceAccountName": "team-sa"}))
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "team-sa"
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "team-sa"
    # Without it, nothing changes (no token in the pods).
    job, dep = _render(_engine())
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_what_the_watch_keeps_of_a_deployment_reads_the_same_as_the_whole() -> None:
    from llmengine.reconcile.views import deployment_essentials, deployment_view

    dep = _deployment(_engine())
    dep["metadata"].update({"generation": 3, "resourceVersion": "42"})
    dep["status"] = {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2}
    kept = deployment_essentials(dep)
    assert deployment_view(kept) == deployment_view(dep) and deployment_view(dep) is not None
    assert kept["spec"]["selector"] == dep["spec"]["selector"]
    assert len(str(kept)) < len(str(dep)) / 3  # the pod template's bulk is not kept


def test_engine_cache_mounts_the_node_directory_into_fetch_engine_and_read_only_into_the_server() -> None:
    cached = CFG.model_copy(
        update={"engine_cache_host_path": "/var/cache/llmengine", "engine_cache_size_budget": 2**40}
    )
    plain, dep = _deployment(_engine()), _deployment(_engine(), cached)
    _golden("deployment-cache", dep)
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "engine-cache", "hostPath": {"path": "/var/cache/llmengine", "type": "DirectoryOrCreate"}} in (
        pod["volumes"]
    )
    (fetch,), (server,) = pod["initContainers"], pod["containers"]
    assert {"name": "engine-cache", "mountPath": "/engine-cache"} in fetch["volumeMounts"]
    assert {"name": "engine-cache", "mountPath": "/engine-cache", "readOnly": True} in server["volumeMounts"]
    assert fetch["args"][-4:] == ["--cache-dir", "/engine-cache", "--cache-budget-bytes", str(2**40)]
    # Still non-root with a read-only root file system; the engine identity (the digest annotation) is untouched.
    assert pod["securityContext"] == plain["spec"]["template"]["spec"]["securityContext"]
    assert fetch["securityContext"]["readOnlyRootFilesystem"] and server["securityContext"]["readOnlyRootFilesystem"]
    assert dep["metadata"]["annotations"] == plain["metadata"]["annotations"]
    # Off by default: no hostPath at all (Pod Security baseline refuses hostPath volumes).
    assert not any("hostPath" in v for v in plain["spec"]["template"]["spec"]["volumes"])
    assert "--cache-dir" not in plain["spec"]["template"]["spec"]["initContainers"][0]["args"]
