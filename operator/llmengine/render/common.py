"""Pieces shared by the render functions: names, labels, owner references, scheduling, credentials, tool Jobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmengine import GROUP, KIND, PREFIX, VERSION
from llmengine.api.config import OperatorConfig
from llmengine.api.pods import OperandPods
from llmengine.api.v1alpha1 import LLMEngine, LLMEngineSpec, SecretKeySelector, Target
from llmengine.plan.pods import resolve
from llmengine.render.pods import pod_metadata, shape_container, shape_pod

MANAGED_BY = "llmengine-operator"
DIGEST_LABEL = f"{PREFIX}/engine-digest"
ENGINE_LABEL = f"{PREFIX}/engine"
POOL_LABEL = f"{PREFIX}/pool"
COMPONENT_LABEL = "app.kubernetes.io/component"
DIGEST_ANNOTATION = f"{PREFIX}/engine-digest"
ATTEMPT_ANNOTATION = f"{PREFIX}/build-attempt"
# Which store a build Job commits to (store_key): builds of one identity into one store are one build, cluster-wide.
STORE_ANNOTATION = f"{PREFIX}/store"
# A digest of what the operator last rendered into an object: an unchanged render is not written again.
RENDER_HASH_ANNOTATION = f"{PREFIX}/render-hash"
# The kinds of what the operator renders the serving Deployment, besides the Service, listed on the Deployment
# (so that one the spec no longer asks for is found and removed).
ATTACHMENTS_ANNOTATION = f"{PREFIX}/attachments"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# Pods run non-root with nothing to escalate; the engine and scratch space are emptyDirs.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class Kind:
    """A namespaced resource of a named API group, as the API paths name it."""

    kind: str
    group: str
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


HPA = Kind("HorizontalPodAutoscaler", "autoscaling", "v2", "horizontalpodautoscalers")
INGRESS = Kind("Ingress", "networking.k8s.io", "v1", "ingresses")
HTTP_ROUTE = Kind("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes")
ATTACHMENT_KINDS = {k.kind: k for k in (HPA, INGRESS, HTTP_ROUTE)}


def serving_name(engine_name: str) -> str:
    return f"llme-{engine_name}"[:63].rstrip("-")


def pool_name(gpu_class: str, mig_profile: str | None) -> str:
    return (gpu_class + (f"-mig-{mig_profile}" if mig_profile else "")).lower().replace(".", "-")


def owner_reference(engine: LLMEngine, controller: bool) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": engine.name,
        "uid": str(engine.metadata.get("uid", "")),
        "controller": controller,
        "blockOwnerDeletion": controller,
    }


def base_labels(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "llmengine",
        COMPONENT_LABEL: component,
    }


def label_selector(labels: Mapping[str, str]) -> str:
    """The `k=v,k=v` selector string (sorted) that matches objects carrying all of `labels`."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def job_ended(job: Mapping[str, Any]) -> bool:
    """A Job's Complete or Failed condition is True: it holds no slot and runs no pod any more."""
    return any(
        c.get("status") == "True" and c.get("type") in ("Complete", "Failed")
        for c in (job.get("status") or {}).get("conditions") or []
    )


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


def tolerations(user: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
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


# The engine grant Secret's volume (render/grants.py): where benchmark and serving pods find their presigned URLs.
GRANT_KEY = "grant.json"
GRANT_DIR = "/etc/llmengine/grant"
GRANT_FILE = f"{GRANT_DIR}/{GRANT_KEY}"
GRANT_VOLUME = "engine-grant"


def grant_volume(secret_name: str) -> dict[str, Any]:
    """The grant Secret as a volume: the kubelet keeps its file current as the operator renews it."""
    return {"name": GRANT_VOLUME, "secret": {"secretName": secret_name}}


GRANT_MOUNT = {"name": GRANT_VOLUME, "mountPath": GRANT_DIR, "readOnly": True}


# ---- GPU tool Jobs (build, benchmark) ---------------------------------------------------------------------------
TOOL_WORK_DIR = "/work"
TOOL_REQUEST_FILE = "request.json"
TERMINATION_LOG = "/dev/termination-log"


def store_identity(spec: LLMEngineSpec) -> str | None:
    """The ServiceAccount whose cloud identity reads and writes the engine's store (spec.store.workloadIdentity)."""
    wi = spec.store.workload_identity if spec.store is not None else None
    return wi.service_account_name if wi is not None else None


def hf_token_ref(spec: LLMEngineSpec) -> SecretKeySelector | None:
    """The Secret key of the Hugging Face token the spec references, if any (never its value)."""
    hf = spec.model.source.hugging_face
    return hf.token_secret_ref if hf is not None else None


def hf_token_env(ref: SecretKeySelector | None) -> list[dict[str, Any]]:
    """HF_TOKEN from the Secret the spec names (gated repositories); by reference only."""
    if ref is None:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def request_configmap(
    name: str, namespace: str, labels: dict[str, str], owners: list[dict[str, Any]], request_json: str
) -> dict[str, Any]:
    """The JSON request a tool Job reads, named like the Job."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": owners},
        "data": {TOOL_REQUEST_FILE: request_json},
    }


@dataclass(frozen=True)
class Placement:
    """Where and for whom a GPU tool Job (build, benchmark) of one engine identity runs."""

    namespace: str
    owners: list[dict[str, Any]]  # every engine that wants the identity (none is the controller)
    short_digest: str
    build_job: str  # the identity's build Job (plan.build_job), which names what travels with it
    bench_job: str  # the benchmark Job of the engine in its store (plan.bench_job)
    pool: str  # GPU pool (class, or class + MIG profile)
    product_labels: list[str]
    gpu_resource: str
    gpu_count: int
    target: Target  # the engine's scheduling settings
    store_secret: str | None  # Secret with the store credentials, by reference
    hf_token: SecretKeySelector | None  # Secret key of a Hugging Face token, by reference
    pods: OperandPods | None = None  # the engine's pod settings (spec.pods), merged over the operator's defaults
    store_identity: str | None = None  # spec.store.workloadIdentity's ServiceAccount
    grant_secret: str | None = None  # the engine grant Secret the pod reads the engine through (no store keys)


def tool_job(
    *,
    name: str,
    container: str,
    subcommand: str,
    request_dir: str,
    labels: dict[str, str],
    annotations: dict[str, str],
    env: list[dict[str, Any]],
    where: Placement,
    image: str,
    cfg: OperatorConfig,
    active_deadline_seconds: int,
    ttl_seconds_after_finished: int,
    shared_memory: bool = False,
) -> dict[str, Any]:
    """A Job that runs `llmengine <subcommand>` once in the builder image on the target's GPUs, reading its request
    from the ConfigMap of the same name and reporting through its termination message. Retries are the operator's
    (backoff, count in status), so the Job itself tries once. The pod takes the build pod settings: the operator's
    defaults with the engine's over them."""
    pod = resolve(cfg.engine_pods, where.pods, "build", where.store_identity)
    mounts: list[dict[str, Any]] = [
        {"name": "request", "mountPath": request_dir, "readOnly": True},
        {"name": "work", "mountPath": TOOL_WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "request", "configMap": {"name": name}},
        {"name": "work", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if where.grant_secret:
        mounts.append(GRANT_MOUNT)
        volumes.append(grant_volume(where.grant_secret))
    if shared_memory:
        # NCCL and the MPI workers of a multi-GPU engine share memory through /dev/shm, as the server does.
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": POD_SECURITY,
        "automountServiceAccountToken": False,
        "affinity": node_affinity(where.product_labels, where.target.affinity),
        "tolerations": tolerations(where.target.tolerations),
        "containers": [
            {
                "name": container,
                "image": image,
                "imagePullPolicy": cfg.image_pull_policy,
                "command": ["llmengine", subcommand],
                "args": [
                    "--request",
                    f"{request_dir}/{TOOL_REQUEST_FILE}",
                    "--work-dir",
                    TOOL_WORK_DIR,
                    "--result",
                    TERMINATION_LOG,
                ],
                "env": env,
                "resources": gpu_resources(
                    where.gpu_resource,
                    where.gpu_count,
                    {
                        "requests": {"cpu": cfg.build_cpu, "memory": cfg.build_memory},
                        "limits": {"memory": cfg.build_memory},
                    },
                ),
                "volumeMounts": mounts,
                "terminationMessagePath": TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": CONTAINER_SECURITY,
            }
        ],
        "volumes": volumes,
    }
    if where.target.node_selector:
        spec["nodeSelector"] = dict(where.target.node_selector)
    shape_container(spec["containers"][0], pod)
    shape_pod(spec, pod)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": where.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": where.owners,
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": active_deadline_seconds,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "template": {"metadata": pod_metadata(pod, labels, {}), "spec": spec},
        },
    }
