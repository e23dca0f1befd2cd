"""Build Job and its request ConfigMap: pure functions of the plan and the operator settings."""

from __future__ import annotations

from typing import Any

from llmengine.api.artifacts import BuildRequest
from llmengine.api.config import OperatorConfig
from llmengine.render import common as c

REQUEST_DIR = "/etc/llmengine/build"
REQUEST_FILE = "request.json"
WORK_DIR = "/work"
TERMINATION_LOG = "/dev/termination-log"


def build_labels(short_digest: str, pool: str) -> dict[str, str]:
    return {**c.base_labels("build"), c.DIGEST_LABEL: short_digest, c.POOL_LABEL: pool}


def request_configmap(
    request: BuildRequest, short_digest: str, pool: str, namespace: str, owners: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": c.build_job_name(short_digest),
            "namespace": namespace,
            "labels": build_labels(short_digest, pool),
            "ownerReferences": owners,
        },
        "data": {REQUEST_FILE: request.to_json()},
    }


def build_job(
    *,
    request: BuildRequest,
    short_digest: str,
    pool: str,
    namespace: str,
    owners: list[dict[str, Any]],
    product_labels: list[str],
    gpu_resource: str,
    gpu_count: int,
    target: dict[str, Any],
    store_secret: str | None,
    hf_token: dict[str, str] | None,
    attempt: int,
    cfg: OperatorConfig,
) -> dict[str, Any]:
    """One Job per engine identity; every resource that wants this engine is an owner (none is the controller)."""
    name = c.build_job_name(short_digest)
    env = c.store_env(store_secret, request.store.endpoint, request.store.region)
    env.append({"name": "LLMENGINE_BUILDER_IMAGE", "value": cfg.builder_image})
    if hf_token:
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hf_token["name"], "key": hf_token["key"]}}}
        )
    container = {
        "name": "build",
        "image": cfg.builder_image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["llmengine", "build-engine"],
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
        ],
    }
    if target.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(target["nodeSelector"])
    labels = build_labels(short_digest, pool)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {c.ATTEMPT_ANNOTATION: str(attempt), c.DIGEST_ANNOTATION: request.engine_digest},
            "ownerReferences": owners,
        },
        "spec": {
            # Retries are the operator's (exponential backoff, count in status), so the Job itself tries once.
            "backoffLimit": 0,
            "activeDeadlineSeconds": cfg.build_active_deadline_seconds,
            "ttlSecondsAfterFinished": cfg.build_ttl_seconds_after_finished,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
