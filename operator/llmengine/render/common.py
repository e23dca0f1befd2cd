"""Pieces shared by the render functions: names, labels, owner references, scheduling, credentials."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmengine import GROUP, KIND, PREFIX, VERSION

MANAGED_BY = "llmengine-operator"
DIGEST_LABEL = f"{PREFIX}/engine-digest"
ENGINE_LABEL = f"{PREFIX}/engine"
POOL_LABEL = f"{PREFIX}/pool"
COMPONENT_LABEL = "app.kubernetes.io/component"
DIGEST_ANNOTATION = f"{PREFIX}/engine-digest"
ATTEMPT_ANNOTATION = f"{PREFIX}/build-attempt"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# Pods run non-root with nothing to escalate; the engine and scratch space are emptyDirs.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def build_job_name(short_digest: str) -> str:
    return f"llme-build-{short_digest.removeprefix('e-')}"


def serving_name(engine_name: str) -> str:
    return f"llme-{engine_name}"[:63].rstrip("-")


def pool_name(gpu_class: str, mig_profile: str | None) -> str:
    return (gpu_class + (f"-mig-{mig_profile}" if mig_profile else "")).lower().replace(".", "-")


def owner_reference(body: Mapping[str, Any], controller: bool) -> dict[str, Any]:
    md = body["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": md["name"],
        "uid": md["uid"],
        "controller": controller,
        "blockOwnerDeletion": controller,
    }


def base_labels(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "llmengine",
        COMPONENT_LABEL: component,
    }


def spec_of(body: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = body.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def node_affinity(product_labels: list[str], user_affinity: Mapping[str, Any] | None) -> dict[str, Any]:
    """Required affinity on the GPU product, merged into the user's affinity (their terms are AND-ed in)."""
    product = {"key": "nvidia.com/gpu.product", "operator": "In", "values": sorted(product_labels)}
    affinity: dict[str, Any] = {k: v for k, v in (user_affinity or {}).items()}
    na = dict(affinity.get("nodeAffinity") or {})
    req = dict(na.get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = [dict(t) for t in req.get("nodeSelectorTerms") or [{}]]
    # Node selector terms are OR-ed; the product requirement must hold in each of them.
    for t in terms:
        t["matchExpressions"] = [*(t.get("matchExpressions") or []), product]
    req["nodeSelectorTerms"] = terms
    na["requiredDuringSchedulingIgnoredDuringExecution"] = req
    affinity["nodeAffinity"] = na
    return affinity


def tolerations(user: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    out = [GPU_TOLERATION]
    out += [dict(t) for t in user or [] if dict(t) != GPU_TOLERATION]
    return out


def gpu_resources(resource: str, count: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """GPU (or one MIG slice) with limits equal to requests; never nvidia.com/gpu on top of a MIG resource."""
    extra = extra or {}
    requests = {k: str(v) for k, v in (extra.get("requests") or {}).items() if not k.startswith("nvidia.com/")}
    limits = {k: str(v) for k, v in (extra.get("limits") or {}).items() if not k.startswith("nvidia.com/")}
    requests[resource] = str(count)
    limits[resource] = str(count)
    return {"requests": requests, "limits": limits}


def store_env(store_secret: str | None, endpoint: str | None, region: str) -> list[dict[str, Any]]:
    """S3 settings for a pod: credentials only as references to a Secret, never as values."""
    env: list[dict[str, Any]] = [{"name": "AWS_REGION", "value": region}]
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": endpoint})
    if store_secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": store_secret, "key": key}}})
    return env
