"""Serving Deployment and Service: pure functions of the engine, the engine digest to serve and the settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import OperatorConfig
from llmengine.render import common as c

ENGINE_DIR = "/engine"
# spec.serving.runtime key -> `llmengine serve-engine run` flag. All are runtime knobs: no rebuild.
RUNTIME_FLAGS = {
    "maxBatchSize": "--max-batch-size",
    "maxNumTokens": "--max-num-tokens",
    "maxSeqLen": "--max-seq-len",
    "kvCacheFreeGpuMemoryFraction": "--kv-cache-free-gpu-memory-fraction",
}


def instance_labels(engine_name: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": engine_name, c.ENGINE_LABEL: engine_name}


def _store_args(store: StoreLocation) -> list[str]:
    args = ["--bucket", store.bucket, "--prefix", store.prefix, "--region", store.region]
    if store.endpoint:
        args += ["--endpoint", store.endpoint]
    return args


def runtime_args(runtime: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, flag in RUNTIME_FLAGS.items():
        if runtime.get(key) is not None:
            out += [flag, str(runtime[key])]
    return out


def image_for(deploy_digest: str, desired_digest: str, desired_image: str, current_image: str | None) -> str:
    """The server image for the engine the Deployment serves: the desired version's for the desired engine; for an
    older engine still serving during a rebuild, the image it already runs (an engine only loads with the release
    that built it, and the desired version's server may be another release)."""
    if deploy_digest == desired_digest or not current_image:
        return desired_image
    return current_image


def server_image(deployment: Mapping[str, Any]) -> str | None:
    """The image of a serving Deployment's server container."""
    for ctr in ((deployment.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []:
        if ctr.get("name") == "server" and ctr.get("image"):
            return str(ctr["image"])
    return None


def deployment(
    *,
    body: Mapping[str, Any],
    digest: str,
    short_digest: str,
    backend: str,
    store: StoreLocation,
    store_secret: str | None,
    product_labels: list[str],
    gpu_resource: str,
    gpu_count: int,
    image: str,
    cfg: OperatorConfig,
) -> dict[str, Any]:
    md, spec = body["metadata"], c.spec_of(body)
    serving: Mapping[str, Any] = spec.get("serving") or {}
    target: Mapping[str, Any] = spec.get("target") or {}
    port = int(serving.get("port") or 8000)
    name = c.serving_name(md["name"])
    selector = instance_labels(md["name"])
    labels = {**c.base_labels("server"), **selector}
    env = c.store_env(store_secret, store.endpoint, store.region)
    user_env = [dict(e) for e in serving.get("env") or []]
    mounts = [{"name": "engine", "mountPath": ENGINE_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    fetch = {
        "name": "fetch-engine",
        "image": image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["llmengine", "serve-engine", "download"],
        "args": ["--digest", digest, "--engine-dir", ENGINE_DIR, *_store_args(store)],
        "env": env,
        "volumeMounts": mounts,
        "securityContext": c.CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    server = {
        "name": "server",
        "image": image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["llmengine", "serve-engine", "run"],
        "args": [
            "--digest",
            digest,
            "--engine-dir",
            ENGINE_DIR,
            "--backend",
            backend,
            "--port",
            str(port),
            *runtime_args(serving.get("runtime") or {}),
        ],
        "env": user_env,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": c.gpu_resources(gpu_resource, gpu_count, serving.get("resources")),
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "startupProbe": {
            # Engine load time grows with size; allow up to 30 minutes before the pod is restarted.
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 180,
        },
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 20, "failureThreshold": 6},
        "volumeMounts": [*mounts, {"name": "shm", "mountPath": "/dev/shm"}],
        "securityContext": c.CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "securityContext": c.POD_SECURITY,
        "automountServiceAccountToken": False,
        "affinity": c.node_affinity(product_labels, target.get("affinity")),
        "tolerations": c.tolerations(target.get("tolerations")),
        "initContainers": [fetch],
        "containers": [server],
        "volumes": [
            {"name": "engine", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if target.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(target["nodeSelector"])
    annotations = {**(serving.get("podAnnotations") or {}), c.DIGEST_ANNOTATION: digest}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": md["namespace"],
            "labels": {**labels, c.DIGEST_LABEL: short_digest},
            "annotations": {c.DIGEST_ANNOTATION: digest},
            "ownerReferences": [c.owner_reference(body, controller=True)],
        },
        "spec": {
            "replicas": int(serving.get("replicas", 1)),
            "selector": {"matchLabels": selector},
            # Old pods keep serving until new ones are Ready: never below the desired count.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": serving.get("maxSurge", 1)},
            },
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": {**labels, c.DIGEST_LABEL: short_digest}, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def service_url(body: Mapping[str, Any]) -> str:
    """The in-cluster base URL of an engine's Service (OpenAI paths under it)."""
    md, spec = body["metadata"], c.spec_of(body)
    port = int((spec.get("serving") or {}).get("port") or 8000)
    return f"http://{c.serving_name(md['name'])}.{md['namespace']}.svc:{port}"


def service(body: Mapping[str, Any]) -> dict[str, Any]:
    md, spec = body["metadata"], c.spec_of(body)
    port = int((spec.get("serving") or {}).get("port") or 8000)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": c.serving_name(md["name"]),
            "namespace": md["namespace"],
            "labels": {**c.base_labels("server"), **instance_labels(md["name"])},
            "ownerReferences": [c.owner_reference(body, controller=True)],
        },
        "spec": {
            "selector": instance_labels(md["name"]),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
