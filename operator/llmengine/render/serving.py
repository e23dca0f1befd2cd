"""Serving Deployment and Service: pure functions of the engine, the engine digest to serve and the settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import OperatorConfig
from llmengine.api.v1alpha1 import LLMEngine, RuntimeLimits
from llmengine.plan.pods import resolve
from llmengine.render import common as c
from llmengine.render import pods
from llmengine.render.cache import mount_engine_cache

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


def runtime_args(runtime: RuntimeLimits) -> list[str]:
    """The server flags of the limits the spec sets (a default left unset is the server's default too)."""
    given = runtime.model_dump(by_alias=True, exclude_unset=True, exclude_none=True)
    out: list[str] = []
    for key, flag in RUNTIME_FLAGS.items():
        if key in given:
            out += [flag, str(given[key])]
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
    engine: LLMEngine,
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
    replicas: int | None = None,
    attachments: Sequence[str] = (),
    grant_secret: str | None = None,
) -> dict[str, Any]:
    """The serving Deployment of engine `digest`. `replicas` overrides the spec's (an autoscaler's count);
    `attachments` lists the kinds rendered next to it (an HPA, an Ingress, an HTTPRoute); `grant_secret` names the
    engine grant the download reads through instead of store credentials."""
    serving, target = engine.spec.serving, engine.spec.target
    port = serving.port
    name = c.serving_name(engine.name)
    selector = instance_labels(engine.name)
    labels = {**c.base_labels("server"), **selector}
    pod = resolve(cfg.engine_pods, engine.spec.pods, "serving", c.store_identity(engine.spec))
    env = c.store_env(store_secret, store.endpoint, store.region)
    resources = serving.resources.model_dump(exclude_none=True) if serving.resources is not None else None
    mounts = [{"name": "engine", "mountPath": ENGINE_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    fetch = {
        "name": "fetch-engine",
        "image": image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["llmengine", "serve-engine", "download"],
        "args": [
            "--digest",
            digest,
            "--engine-dir",
            ENGINE_DIR,
            *(["--grant", c.GRANT_FILE] if grant_secret else _store_args(store)),
        ],
        "env": env,
        "volumeMounts": [*mounts, *([c.GRANT_MOUNT] if grant_secret else [])],
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
            *runtime_args(serving.runtime),
        ],
        "env": [],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": c.gpu_resources(gpu_resource, gpu_count, resources),
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
        "affinity": c.node_affinity(product_labels, target.affinity),
        "tolerations": c.tolerations(target.tolerations),
        "initContainers": [fetch],
        "containers": [server],
        "volumes": [
            {"name": "engine", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
            *([c.grant_volume(grant_secret)] if grant_secret else []),
        ],
    }
    if target.node_selector:
        pod_spec["nodeSelector"] = dict(target.node_selector)
    mount_engine_cache(pod_spec, fetch, server, cfg)
    pods.shape_container(fetch, pod)
    pods.shape_container(server, pod, serving.env or [])
    pods.shape_pod(pod_spec, pod)
    annotations = {**(serving.pod_annotations or {}), c.DIGEST_ANNOTATION: digest}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": engine.namespace,
            "labels": {**labels, c.DIGEST_LABEL: short_digest},
            "annotations": {
                c.DIGEST_ANNOTATION: digest,
                **({c.ATTACHMENTS_ANNOTATION: ",".join(attachments)} if attachments else {}),
            },
            "ownerReferences": [c.owner_reference(engine, controller=True)],
        },
        "spec": {
            "replicas": serving.replicas if replicas is None else replicas,
            "selector": {"matchLabels": selector},
            # Old pods keep serving until new ones are Ready: never below the desired count.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": serving.max_surge},
            },
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": pods.pod_metadata(pod, {**labels, c.DIGEST_LABEL: short_digest}, annotations),
                "spec": pod_spec,
            },
        },
    }


def service_url(engine: LLMEngine) -> str:
    """The in-cluster base URL of an engine's Service (OpenAI paths under it)."""
    return f"http://{c.serving_name(engine.name)}.{engine.namespace}.svc:{engine.spec.serving.port}"


def service(engine: LLMEngine) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": c.serving_name(engine.name),
            "namespace": engine.namespace,
            "labels": {**c.base_labels("server"), **instance_labels(engine.name)},
            "ownerReferences": [c.owner_reference(engine, controller=True)],
        },
        "spec": {
            "selector": instance_labels(engine.name),
            "ports": [{"name": "http", "port": engine.spec.serving.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
