"""The whole lifecycle on the real control plane: build Jobs run by the pod runner with the real builder entrypoint
(test compiler), engines committed to the real S3 server, serving Deployments rolled out by the real controllers."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import Engines, deployment, jobs, run_operator, served_digest
from llmengine.dev.nodes import POOL_LABEL
from llmengine.dev.seed import create_store_secret as store_secret
from llmengine.dev.seed import engine, upload_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("crd")


@pytest.fixture
def env(dev_cluster: ClusterInfo, api: Any, namespace: str, tmp_path: Path) -> Any:
    class Env:
        info = dev_cluster
        ns = namespace
        engines = Engines(api, namespace)
        prefix = f"engines-{uuid.uuid4().hex[:8]}"
        model = upload_tiny_checkpoint(dev_cluster, f"models/{uuid.uuid4().hex[:8]}")
        logs = tmp_path

        def body(self, name: str, **kw: Any) -> dict[str, Any]:
            return engine(name, dev_cluster, self.model, self.prefix, **kw)

    store_secret(api, dev_cluster, namespace)
    return Env()


def _committed(info: ClusterInfo, prefix: str, digest: str) -> bool:
    s3 = info.s3().client()
    return "Contents" in s3.list_objects_v2(Bucket=info.s3_bucket, Prefix=f"{prefix}/{digest}/manifest.json")


def test_full_lifecycle_build_deploy_scale_rebuild_delete(env: Any, api: Any) -> None:
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    with run_operator(env.info, env.ns, env.logs):
        env.engines.create(env.body("tiny"))
        obj = env.engines.wait_phase("tiny", "Ready", timeout=180)
        st = obj["status"]
        digest = st["desiredEngine"]["digest"]
        assert st["servingEngine"]["digest"] == digest and st["servingEngine"]["short"] == digest[:12]
        assert _committed(env.info, env.prefix, digest)
        conds = {c["type"]: c for c in st["conditions"]}
        assert conds["Ready"]["status"] == "True" and conds["EngineBuilt"]["status"] == "True"
        assert conds["Stalled"]["status"] == "False"
        # The build's duration is recorded even though the engine was committed before its Job completed.
        wait_for(
            "build duration in status",
            lambda: (env.engines.get("tiny")["status"].get("build") or {}).get("lastDurationSeconds") is not None,
            60,
        )
        # The build ran on the H100 pool, with whole GPUs and required affinity on the product.
        (job,) = jobs(api, env.ns)
        pod = core.list_namespaced_pod(env.ns, label_selector=f"job-name={job.metadata.name}").items[0]
        assert core.read_node(pod.spec.node_name).metadata.labels[POOL_LABEL] == "h100-80gb"
        res = pod.spec.containers[0].resources
        assert res.limits["nvidia.com/gpu"] == res.requests["nvidia.com/gpu"] == "1"
        dep = deployment(api, env.ns, "tiny")
        assert dep.status.available_replicas == 2
        assert served_digest(api, env.ns, "tiny") == digest

        # Replicas only, through the scale subresource (what kubectl scale and an HPA use): no build, the
        # Deployment follows spec.serving.replicas.
        co = client.CustomObjectsApi(api)
        scale = co.get_namespaced_custom_object_scale("llmengine.io", "v1alpha1", env.ns, "llmengines", "tiny")
        assert scale["spec"]["replicas"] == 2 and scale["status"]["replicas"] == 2
        pods = core.list_namespaced_pod(env.ns, label_selector=scale["status"]["selector"]).items
        assert len(pods) == 2 and all(p.metadata.name.startswith("llme-tiny-") for p in pods)
        co.patch_namespaced_custom_object_scale(
            "llmengine.io", "v1alpha1", env.ns, "llmengines", "tiny", {"spec": {"replicas": 3}}
        )
        assert env.engines.get("tiny")["spec"]["serving"]["replicas"] == 3
        env.engines.wait_phase("tiny", "Ready")
        wait_for("3 replicas", lambda: deployment(api, env.ns, "tiny").status.available_replicas == 3, 60)
        assert len(jobs(api, env.ns)) == 1

        # maxSeqLen: a new engine; the old one keeps serving with never fewer than 3 available.
        low = {"min": 99}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                d = apps.read_namespaced_deployment("llme-tiny", env.ns)
                low["min"] = min(low["min"], d.status.available_replicas or 0)
                stop.wait(0.2)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        env.engines.patch_spec("tiny", {"build": {"maxSeqLen": 2048}})
        obj = env.engines.wait_phase("tiny", "Ready", timeout=180)
        stop.set()
        t.join()
        new = obj["status"]["desiredEngine"]["digest"]
        assert new != digest and obj["status"]["servingEngine"]["digest"] == new
        assert served_digest(api, env.ns, "tiny") == new
        assert len(jobs(api, env.ns)) == 2
        assert low["min"] >= 3, f"available replicas dropped to {low['min']} during the rollout"

        # Delete: children are garbage-collected, engines stay in the store.
        env.engines.delete("tiny")
        wait_for("deployment gone", lambda: not apps.list_namespaced_deployment(env.ns).items, 60)
        wait_for("jobs gone", lambda: not jobs(api, env.ns), 60)
        assert _committed(env.info, env.prefix, digest) and _committed(env.info, env.prefix, new)


def test_same_identity_joins_one_build_and_store_hit_skips_build(env: Any, api: Any, namespace: str) -> None:
    with run_operator(env.info, env.ns, env.logs):
        env.engines.create(env.body("a"))
        env.engines.create(env.body("b"))
        a = env.engines.wait_phase("a", "Ready", timeout=180)
        b = env.engines.wait_phase("b", "Ready", timeout=180)
        assert a["status"]["desiredEngine"]["digest"] == b["status"]["desiredEngine"]["digest"]
        (job,) = jobs(api, env.ns)
        assert {o.name for o in job.metadata.owner_references} == {"a", "b"}
        # Same identity again, later: the store has it; no Job at all.
        env.engines.create(env.body("c", serving={"replicas": 1}))
        c = env.engines.wait_phase("c", "Ready", timeout=120)
        cond = next(x for x in c["status"]["conditions"] if x["type"] == "EngineBuilt")
        assert cond["reason"] == "StoreHit"
        assert len(jobs(api, env.ns)) == 1


def test_one_identity_into_two_stores_in_one_namespace_builds_each_store_once(env: Any, api: Any) -> None:
    """Two LLMEngines of one identity in one namespace, each with a store of its own: each store gets its own build
    Job and its own commit, first time (neither takes the other's Job for its own and retries on finding nothing
    committed); a third engine naming the first one's store shares that store's build."""
    other = f"{env.prefix}-b"
    with run_operator(env.info, env.ns, env.logs):
        env.engines.create(env.body("a", serving={"replicas": 1}))
        env.engines.create(engine("b", env.info, env.model, other, serving={"replicas": 1}))
        env.engines.create(env.body("c", serving={"replicas": 1}))
        a, b, c = (env.engines.wait_phase(n, "Ready", timeout=180) for n in ("a", "b", "c"))
        digest = a["status"]["desiredEngine"]["digest"]
        assert b["status"]["desiredEngine"]["digest"] == c["status"]["desiredEngine"]["digest"] == digest
        assert _committed(env.info, env.prefix, digest) and _committed(env.info, other, digest)
        built = {j.metadata.name: {o.name for o in j.metadata.owner_references} for j in jobs(api, env.ns)}
        assert len(built) == 2 and sorted(built.values(), key=len) == [{"b"}, {"a", "c"}], built
        assert a["status"]["build"]["job"] != b["status"]["build"]["job"]
        for obj in (a, b):
            assert obj["status"]["build"]["attempts"] == 1, obj["status"]["build"]


def test_one_identity_in_two_namespaces_is_built_once(env: Any, api: Any) -> None:
    """Two LLMEngines of one identity into one store, in two namespaces, applied together: one build Job in the
    whole cluster; the other engine waits for its commit and serves the same engine."""
    core = client.CoreV1Api(api)
    other = f"{env.ns}-b"
    core.create_namespace({"metadata": {"name": other}})
    try:
        store_secret(api, env.info, other)
        there = Engines(api, other)
        with run_operator(env.info, env.ns, env.logs, extra_args=["--namespace", other]):
            body = env.body("a", serving={"replicas": 1}, build={"maxSeqLen": 768})
            env.engines.create(body)
            there.create({**body, "metadata": {"name": "a", "namespace": other}})
            a = env.engines.wait_phase("a", "Ready", timeout=180)
            b = there.wait_phase("a", "Ready", timeout=180)
            assert a["status"]["desiredEngine"]["digest"] == b["status"]["desiredEngine"]["digest"]
            built = jobs(api, env.ns) + jobs(api, other)
            assert len(built) == 1, f"the identity was built {len(built)} times"
    finally:
        core.delete_namespace(other, propagation_policy="Background")


def test_an_engine_failing_verification_is_quarantined_rebuilt_once_then_stalls(env: Any, api: Any) -> None:
    """A committed engine whose bytes no longer match its manifest: the serving pod's download refuses it and its
    init container crash-loops. The operator takes the store's copy out of service (kept under quarantine/, with a
    Warning), builds the identity once more, and the pod serves the new commit; nobody touches the store. The same
    damage again stalls the engine instead of rebuilding in a loop."""
    core = client.CoreV1Api(api)
    s3, bucket = env.info.s3().client(), env.info.s3_bucket

    def damage(digest: str) -> str:
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{env.prefix}/{digest}/manifest.json")["Body"].read())
        biggest = max(manifest["files"], key=lambda f: f["size"])
        key = f"{env.prefix}/{digest}/{manifest.get('filesPrefix', '')}{biggest['path']}"
        good = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(b ^ 0xFF for b in good[:4096]) + good[4096:])
        return str(manifest["buildId"])

    with run_operator(env.info, env.ns, env.logs):
        env.engines.create(env.body("rot", serving={"replicas": 0}))
        digest = env.engines.wait_phase("rot", "Ready", timeout=180)["status"]["desiredEngine"]["digest"]
        first = damage(digest)
        env.engines.patch_spec("rot", {"serving": {"replicas": 1}})

        def quarantined() -> Any:
            st = env.engines.get("rot")["status"]
            return st if (st.get("build") or {}).get("quarantinedAt") else None

        st = wait_for("the engine quarantined", quarantined, timeout=120)
        assert "failed verification" in st["build"]["quarantineReason"], st
        events = core.list_namespaced_event(env.ns, field_selector="reason=EngineQuarantined").items
        assert events and "quarantined" in events[0].message
        ready = env.engines.wait_phase("rot", "Ready", timeout=180)
        assert ready["status"]["desiredEngine"]["digest"] == digest and ready["status"]["build"]["quarantinedAt"]
        second = json.loads(s3.get_object(Bucket=bucket, Key=f"{env.prefix}/{digest}/manifest.json")["Body"].read())
        assert second["buildId"] != first, "the same (damaged) build was committed again"
        kept = s3.list_objects_v2(Bucket=bucket, Prefix=f"{env.prefix}/{digest}/quarantine/")["Contents"]
        assert any(o["Key"].endswith(f"{first}-manifest.json") for o in kept)

        # The rebuilt engine damaged too, and a pod restarts: stalled with the reason, not quarantined again.
        damage(digest)
        for pod in core.list_namespaced_pod(env.ns, label_selector="app.kubernetes.io/instance=rot").items:
            core.delete_namespaced_pod(pod.metadata.name, env.ns)

        def stalled() -> Any:
            st = env.engines.get("rot")["status"]
            c = next((c for c in st.get("conditions") or [] if c["type"] == "Stalled"), {})
            return st if c.get("status") == "True" and c.get("reason") == "ServingPodsFailing" else None

        st = wait_for("stalled on the second damage", stalled, timeout=120)
        assert "failed verification" in st["message"]
        assert len(core.list_namespaced_event(env.ns, field_selector="reason=EngineQuarantined").items) == 1


def test_builder_failure_reports_reason_and_fixed_spec_recovers(env: Any, api: Any) -> None:
    with run_operator(env.info, env.ns, env.logs, {"LLMENGINE_BUILD_MAX_ATTEMPTS": "2"}):
        bad = f"s3://{env.info.s3_bucket}/models/does-not-exist-{uuid.uuid4().hex[:6]}/"
        env.engines.create(env.body("broken", model={"source": {"s3": {"uri": bad}}}))
        obj = env.engines.wait_phase("broken", "Failed", timeout=180)
        st = obj["status"]
        assert "fetch" in st["build"]["lastFailure"]
        assert st["build"]["attempts"] >= 1
        stalled = next(x for x in st["conditions"] if x["type"] == "Stalled")
        assert stalled["status"] == "True"
        events = client.CoreV1Api(api).list_namespaced_event(env.ns).items
        ours = [e for e in events if e.reason == "BuildFailed" and e.involved_object.name == "broken"]
        assert ours and all(e.source.component == "llmengine-operator" for e in ours), [e.source for e in ours]
        env.engines.patch_spec("broken", {"model": {"source": {"s3": {"uri": env.model}}}})
        env.engines.wait_phase("broken", "Ready", timeout=180)


def test_invalid_spec_fails_with_planner_message_and_no_job(env: Any, api: Any) -> None:
    with run_operator(env.info, env.ns, env.logs):
        cal = {"dataset": {"s3": {"uri": "s3://unused/calibration/"}}}
        precision = {"quantization": "fp8", "calibration": cal}
        env.engines.create(env.body("fp8a100", precision=precision, target={"gpu": "A100-80GB"}))
        obj = env.engines.wait_phase("fp8a100", "Failed", timeout=60)
        assert "spec.precision.quantization" in obj["status"]["message"]
        assert not jobs(api, env.ns)


def test_a_build_pod_no_node_can_take_is_named_in_the_status(env: Any) -> None:
    """A node selector no node matches: the scheduler's reason reaches the engine's message while it builds."""
    with run_operator(env.info, env.ns, env.logs):
        target = {"gpu": "H100-80GB", "nodeSelector": {"example.com/rack": "nowhere"}}
        env.engines.create(env.body("nowhere", target=target))

        def explained() -> Any:
            st = env.engines.get("nowhere").get("status") or {}
            return st if "cannot be scheduled" in st.get("message", "") else None

        st = wait_for("the status names the unschedulable build pod", explained, timeout=90)
        assert st["phase"] == "Building", st
        assert st["message"].startswith(f"building engine {st['desiredEngine']['short']} (attempt 1); pod llme-build-")
        assert "didn't match Pod's node affinity/selector" in st["message"], st["message"]


def test_operator_killed_mid_build_makes_no_duplicate_job(env: Any, api: Any) -> None:
    with run_operator(env.info, env.ns, env.logs) as op:
        env.engines.create(env.body("k"))
        wait_for("build job", lambda: jobs(api, env.ns), 60)
        op.kill9()
        op.restart()
        env.engines.wait_phase("k", "Ready", timeout=180)
        assert len(jobs(api, env.ns)) == 1


def test_mig_engine_builds_and_serves_on_mig_slice_only(env: Any, api: Any) -> None:
    core = client.CoreV1Api(api)
    with run_operator(env.info, env.ns, env.logs):
        env.engines.create(env.body("mig", target={"gpu": "H100-80GB", "migProfile": "3g.40gb"}))
        env.engines.wait_phase("mig", "Ready", timeout=180)
        for pod in core.list_namespaced_pod(env.ns).items:
            limits = pod.spec.containers[0].resources.limits
            assert limits.get("nvidia.com/mig-3g.40gb") == "1"
            assert "nvidia.com/gpu" not in limits
            assert core.read_node(pod.spec.node_name).metadata.labels[POOL_LABEL] == "h100-mig"


def test_autoscaler_and_ingress_are_rendered_never_fought_and_removed_with_the_spec(env: Any, api: Any) -> None:
    apps, autoscaling = client.AppsV1Api(api), client.AutoscalingV2Api(api)
    net, core = client.NetworkingV1Api(api), client.CoreV1Api(api)
    metric = {"type": "Pods", "pods": {"metric": {"name": "llmengine_requests_in_flight"}}}
    metric["pods"]["target"] = {"type": "AverageValue", "averageValue": "8"}
    serving = {
        "replicas": 1,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "metrics": [metric]},
        "ingress": {"host": "tiny.example.com", "className": "nginx"},
        # No Gateway API in this cluster: the route can not be written, and nothing else may suffer for it.
        "httpRoute": {"parentRefs": [{"name": "public"}]},
    }
    with run_operator(env.info, env.ns, env.logs):
        env.engines.create(env.body("tiny", serving=serving))
        env.engines.wait_phase("tiny", "Ready", timeout=180)
        hpa = autoscaling.read_namespaced_horizontal_pod_autoscaler("llme-tiny", env.ns)
        assert hpa.spec.scale_target_ref.name == "llme-tiny" and hpa.spec.max_replicas == 3
        ing = net.read_namespaced_ingress("llme-tiny", env.ns)
        assert ing.spec.rules[0].host == "tiny.example.com"
        assert all(o.controller for o in (*hpa.metadata.owner_references, *ing.metadata.owner_references))
        events = core.list_namespaced_event(env.ns, field_selector="reason=AttachFailed").items
        assert events and "gateway.networking.k8s.io/v1" in events[0].message

        # The autoscaler scales the Deployment: the operator keeps its count and judges availability by it.
        apps.patch_namespaced_deployment_scale("llme-tiny", env.ns, {"spec": {"replicas": 2}})
        wait_for("2 replicas", lambda: deployment(api, env.ns, "tiny").status.available_replicas == 2, 60)
        wait_for("status follows", lambda: env.engines.get("tiny")["status"].get("replicas") == 2, 30)
        # The pass that saw the scale-up may have come before the new pod was available (ScalingUp): then Ready.
        env.engines.wait_phase("tiny", "Ready", timeout=30)
        assert deployment(api, env.ns, "tiny").spec.replicas == 2

        # Autoscaling and the routes taken out of the spec: the HPA and the Ingress go, spec.serving.replicas rules.
        plain = {"replicas": 1, "autoscaling": None, "ingress": None, "httpRoute": None}
        env.engines.patch_spec("tiny", {"serving": plain})

        def gone() -> bool:
            try:
                autoscaling.read_namespaced_horizontal_pod_autoscaler("llme-tiny", env.ns)
            except client.ApiException as e:
                return e.status == 404
            return False

        wait_for("HPA deleted", gone, 60)
        wait_for("Ingress deleted", lambda: not net.list_namespaced_ingress(env.ns).items, 60)
        wait_for("spec's replicas", lambda: deployment(api, env.ns, "tiny").spec.replicas == 1, 60)
