"""The node-local engine cache on the dev cluster: serving pods run by the pod runner with the real `serve-engine
download` against the real S3 server, the cache a hostPath of each simulated node. A second replica on a node that
holds the engine starts without fetching it; a replica on another node fetches."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import Engines, deployment, jobs, run_operator
from llmengine.dev.runner import node_dir, pod_dir, work_dir
from llmengine.dev.seed import create_store_secret, engine, upload_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("crd")
NODE_A, NODE_B = "h100-80gb-0", "h100-80gb-1"


def _fetch_report(info: ClusterInfo, pod: Any) -> dict[str, Any]:
    """What fetch-engine printed about the start: cache hit or not, bytes fetched (and its whole log, for failures)."""
    md = pod.metadata
    ref = {"metadata": {"namespace": md.namespace, "name": md.name, "uid": md.uid}}
    log = (pod_dir(work_dir(Path(info.state_dir)), ref) / "fetch-engine.log").read_text()
    reports = [json.loads(line) for line in log.splitlines() if line.startswith('{"engineDigest"')]
    assert len(reports) == 1, log
    return {**reports[0], "downloaded": "download started" in log}


def _ready_pods(api: Any, ns: str, name: str, node: str, count: int) -> list[Any]:
    core = client.CoreV1Api(api)

    def ready() -> list[Any] | None:
        pods = core.list_namespaced_pod(ns, label_selector=f"app.kubernetes.io/instance={name}").items
        on_node = [
            p
            for p in pods
            if p.spec.node_name == node
            and not p.metadata.deletion_timestamp
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        return on_node if len(on_node) == count and len(pods) == count else None

    return list(wait_for(f"{count} ready serving pods of {name}, all on {node}", ready, timeout=180, interval=0.5))


def test_a_second_replica_on_the_node_starts_from_the_cache_and_another_node_fetches(
    dev_cluster: ClusterInfo, api: Any, namespace: str, tmp_path: Path
) -> None:
    create_store_secret(api, dev_cluster, namespace)
    model = upload_tiny_checkpoint(dev_cluster, f"models/{uuid.uuid4().hex[:8]}")
    host_path = f"/var/cache/llmengine-{namespace}"  # this test's own cache on every node
    body = engine(
        "cached",
        dev_cluster,
        model,
        f"engines-{uuid.uuid4().hex[:8]}",
        serving={"replicas": 1},
        target={"nodeSelector": {"kubernetes.io/hostname": NODE_A}},
    )
    engines = Engines(api, namespace)
    cache_env = {"LLMENGINE_ENGINE_CACHE_HOST_PATH": host_path, "LLMENGINE_ENGINE_CACHE_SIZE_BUDGET": "1Gi"}
    with run_operator(dev_cluster, namespace, tmp_path, extra_env=cache_env):
        engines.create(body)
        digest = engines.wait_phase("cached", "Ready", timeout=180)["status"]["servingEngine"]["digest"]
        (first,) = _ready_pods(api, namespace, "cached", NODE_A, 1)
        cold = _fetch_report(dev_cluster, first)
        assert (cold["cacheHit"], cold["cached"], cold["downloaded"]) == (False, True, True), cold
        assert cold["fetchedBytes"] > 0
        copy = node_dir(Path(dev_cluster.state_dir), NODE_A) / host_path.lstrip("/") / "engines" / digest
        assert (copy / "manifest.json").is_file()

        # Scale-up on the same node: the new replica links the node's verified copy and fetches nothing.
        engines.patch_spec("cached", {"serving": {"replicas": 2}})
        pods = _ready_pods(api, namespace, "cached", NODE_A, 2)
        (second,) = [p for p in pods if p.metadata.uid != first.metadata.uid]
        warm = _fetch_report(dev_cluster, second)
        assert (warm["cacheHit"], warm["fetchedBytes"], warm["downloaded"]) == (True, 0, False), warm
        assert deployment(api, namespace, "cached").spec.template.spec.init_containers[0].args[-4] == "--cache-dir"

        # Another node holds no copy: its first replica fetches, into that node's own cache.
        engines.patch_spec("cached", {"target": {"nodeSelector": {"kubernetes.io/hostname": NODE_B}}})
        moved = _ready_pods(api, namespace, "cached", NODE_B, 2)
        reports = sorted((_fetch_report(dev_cluster, p) for p in moved), key=lambda r: r["cacheHit"])
        assert [(r["cacheHit"], r["fetchedBytes"] > 0) for r in reports] == [(False, True), (True, False)], reports
        assert (node_dir(Path(dev_cluster.state_dir), NODE_B) / host_path.lstrip("/") / "engines" / digest).is_dir()
        assert len(jobs(api, namespace)) == 1  # the node selector is placement: same engine, no rebuild
