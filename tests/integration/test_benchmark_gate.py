"""The benchmark gate on the dev cluster: the real bench-engine entrypoint runs as a Job through the pod runner, with
the TEST BENCHMARKER in place of trtllm-bench (it writes a report in trtllm-bench's JSON format, which goes through
the same parser). A failing gate keeps the serving engine; relaxing the threshold re-judges without a re-run."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import Engines, jobs, run_operator, served_digest
from llmengine.dev.seed import create_store_secret, engine, upload_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("crd")


def _cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj["status"].get("conditions") or [] if c["type"] == type_), {})


def test_failing_benchmark_keeps_the_serving_engine(
    dev_cluster: ClusterInfo, api: Any, namespace: str, tmp_path: Path
) -> None:
    create_store_secret(api, dev_cluster, namespace)
    model = upload_tiny_checkpoint(dev_cluster, f"models/{uuid.uuid4().hex[:8]}")
    body = engine("gated", dev_cluster, model, f"engines-{uuid.uuid4().hex[:8]}", serving={"replicas": 2})
    body["spec"]["benchmark"] = {"numRequests": 16, "thresholds": {"minRequestsPerSecond": 1}}
    engines = Engines(api, namespace)
    with run_operator(dev_cluster, namespace, tmp_path) as op:
        engines.create(body)
        first = engines.wait_phase("gated", "Ready", timeout=180)
        bench = first["status"]["benchmark"]
        old = first["status"]["servingEngine"]["digest"]
        assert bench["verdict"] == "Passed" and bench["engineDigest"] == old
        assert bench["result"]["requestsPerSecond"] > 1 and bench["result"]["testBenchmark"] is True
        assert bench["serving"] == bench["result"]  # promoted: the baseline of the next engine
        assert _cond(first, "BenchmarkPassed")["status"] == "True"
        names = sorted(j.metadata.name for j in jobs(api, namespace))
        # Build and benchmark Jobs are named by the identity and the store (its key after the identity).
        built = first["status"]["build"]["job"]
        assert names == [built.replace("llme-build-", "llme-bench-"), built]  # the benchmark Job is named alike
        assert built.startswith(f"llme-build-{old[:12]}-")

        # A new engine that can not meet its bound: built and benchmarked, never rolled out.
        engines.patch_spec(
            "gated", {"build": {"maxSeqLen": 2048}, "benchmark": {"thresholds": {"minRequestsPerSecond": 1e9}}}
        )
        failed = engines.wait_phase("gated", "Failed", timeout=180)
        new = failed["status"]["desiredEngine"]["digest"]
        assert new != old and failed["status"]["benchmark"]["verdict"] == "Failed"
        reasons = failed["status"]["benchmark"]["reasons"]
        assert any("minRequestsPerSecond" in r for r in reasons), reasons
        assert _cond(failed, "BenchmarkPassed")["status"] == "False"
        assert _cond(failed, "Stalled")["status"] == "True"
        assert served_digest(api, namespace, "gated") == old
        assert failed["status"]["servingEngine"]["digest"] == old and failed["status"]["readyReplicas"] == 2
        assert _cond(failed, "Deployed")["reason"] == "BenchmarkFailed"
        # Resyncs while the gate holds announce no rollout (each pass used to post a Normal "Deploying" event).
        time.sleep(12)  # more than two 5 s resyncs
        deploying = [
            e
            for e in client.CoreV1Api(api).list_namespaced_event(namespace).items
            if e.involved_object.name == "gated" and e.reason == "Deploying"
        ]
        assert sum(e.count or 1 for e in deploying) <= 2, [(e.message, e.count) for e in deploying]
        assert engines.get("gated")["status"]["phase"] == "Failed"

        # Relax the bound: judged again from the stored numbers (no second benchmark Job), then rolled out.
        engines.patch_spec("gated", {"benchmark": {"thresholds": {"minRequestsPerSecond": 1}}})
        done = engines.wait_phase("gated", "Ready", timeout=180)
        assert done["status"]["servingEngine"]["digest"] == new
        wait_for("new engine served", lambda: served_digest(api, namespace, "gated") == new, timeout=60)
        bench_jobs = [j for j in jobs(api, namespace) if j.metadata.name.startswith("llme-bench-")]
        assert sorted(j.metadata.name[: len("llme-bench-") + 12] for j in bench_jobs) == sorted(
            [f"llme-bench-{old[:12]}", f"llme-bench-{new[:12]}"]
        )
        assert "Traceback" not in op.logs()
