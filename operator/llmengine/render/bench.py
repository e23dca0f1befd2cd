"""Benchmark Job and its request ConfigMap: pure functions of the bench request, the plan's GPUs and the settings.

The Job runs `llmengine bench-engine` in the builder image (it has trtllm-bench) on the same GPUs the serving pods
get: same product affinity, tolerations, GPU resource and count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmengine.api.bench import BenchRequest
from llmengine.api.config import OperatorConfig
from llmengine.render import common as c

REQUEST_DIR = "/etc/llmengine/bench"
REQUEST_FILE = "request.json"
WORK_DIR = "/work"
TERMINATION_LOG = "/dev/termination-log"
COMPONENT = "benchmark"
DEFAULT_ACTIVE_DEADLINE_SECONDS = 2 * 3600
DEFAULT_TTL_SECONDS_AFTER_FINISHED = 24 * 3600


def bench_job_name(short_digest: str) -> str:
    """llme-bench-<12 hex>: 23 characters, well under the 63 a Job name may have (its pods' job-name label)."""
    return f"llme-bench-{short_digest.removeprefix('e-')}"


def bench_labels(short_digest: str, pool: str) -> dict[str, str]:
    return {**c.base_labels(COMPONENT), c.DIGEST_LABEL: short_digest, c.POOL_LABEL: pool}


def bench_request_configmap(
    request: BenchRequest, short_digest: str, pool: str, namespace: str, owners: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": bench_job_name(short_digest),
            "namespace": namespace,
            "labels": bench_labels(short_digest, pool),
            "ownerReferences": owners,
        },
        "data": {REQUEST_FILE: request.to_json()},
    }


def bench_job(
    *,
    request: BenchRequest,
    short_digest: str,
    pool: str,
    namespace: str,
    owners: list[dict[str, Any]],
    product_labels: list[str],
    gpu_resource: str,
    gpu_count: int,
    target: Mapping[str, Any],
    store_secret: str | None,
    hf_token: Mapping[str, str] | None,
    cfg: OperatorConfig,
    active_deadline_seconds: int = DEFAULT_ACTIVE_DEADLINE_SECONDS,
    ttl_seconds_after_finished: int = DEFAULT_TTL_SECONDS_AFTER_FINISHED,
) -> dict[str, Any]:
    """One Job per engine identity, like the build Job; every resource that wants the engine is an owner."""
    name = bench_job_name(short_digest)
    env = c.store_env(store_secret, request.store.endpoint, request.store.region)
    if hf_token:
        # The tokenizer and config.json of a gated repository need the token the build used.
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hf_token["name"], "key": hf_token["key"]}}}
        )
    container = {
        "name": COMPONENT,
        "image": cfg.builder_image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["llmengine", "bench-engine"],
        "args": [
            "--request",
            f"{REQUEST_DIR}/{REQUEST_FILE}",
            "--work-dir",
            WORK_DIR,
            "--result",
            TERMINATION_LOG,
        ],
        "env": env,
        "resources": c.gpu_resources(
            gpu_resource,
            gpu_count,
            {"requests": {"cpu": cfg.build_cpu, "memory": cfg.build_memory}, "limits": {"memory": cfg.build_memory}},
        ),
        "volumeMounts": [
            {"name": "request", "mountPath": REQUEST_DIR, "readOnly": True},
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            # NCCL and the MPI workers of a multi-GPU engine share memory through /dev/shm, as the server does.
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": c.CONTAINER_SECURITY,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": c.POD_SECURITY,
        "automountServiceAccountToken": False,
        "affinity": c.node_affinity(product_labels, target.get("affinity")),
        "tolerations": c.tolerations(target.get("tolerations")),
        "containers": [container],
        "volumes": [
            {"name": "request", "configMap": {"name": name}},
            {"name": "work", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if target.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(target["nodeSelector"])
    labels = bench_labels(short_digest, pool)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {c.DIGEST_ANNOTATION: request.engine_digest},
            "ownerReferences": owners,
        },
        "spec": {
            # A failed run is the operator's to judge (and retry or not), so the Job itself tries once.
            "backoffLimit": 0,
            "activeDeadlineSeconds": active_deadline_seconds,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
