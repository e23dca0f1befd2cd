"""What the pod settings (an engine's spec.pods over the chart's enginePods, merged by plan/pods.py) put into the
operator's pods: environment, mounts, volumes, pod fields and metadata. Pure; nothing changes when they are unset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmengine import PREFIX
from llmengine.api.pods import CaBundle, EnvVar, PodSettings


def container_env(
    own: Sequence[Mapping[str, Any]], pod: PodSettings, container_only: Sequence[EnvVar] = ()
) -> list[dict[str, Any]]:
    """A container's environment: the operator's own variables, the proxy's and the CA bundle's, then the user's
    (the pod's, and `container_only`'s over them). A user variable of a name the operator sets is left out: the
    store, the token, the proxy and the trust stay what the operator made them."""
    env = [dict(e) for e in own]
    env += pod.proxy.env() if pod.proxy is not None else []
    env += CaBundle.env() if pod.ca_bundle is not None else []
    taken = {e["name"] for e in env}
    specific = {e.name for e in container_only}
    users = [e for e in pod.env or [] if e.name not in specific] + list(container_only)
    return env + [e.container_env() for e in users if e.name not in taken]


def container_env_from(pod: PodSettings) -> list[dict[str, Any]]:
    return [e.container_env_from() for e in pod.env_from or []]


def pod_volumes(pod: PodSettings) -> list[dict[str, Any]]:
    """The pod's extra volumes and the CA bundle's, after the operator's own."""
    out = [v.pod_volume() for v in pod.volumes or []]
    return out + ([pod.ca_bundle.pod_volume()] if pod.ca_bundle is not None else [])


def container_mounts(pod: PodSettings) -> list[dict[str, Any]]:
    out = [m.container_mount() for m in pod.volume_mounts or []]
    return out + ([CaBundle.mount()] if pod.ca_bundle is not None else [])


def shape_container(container: dict[str, Any], pod: PodSettings, container_only: Sequence[EnvVar] = ()) -> None:
    """Put the pod settings' environment and mounts into one of the operator's containers, after its own (nothing
    changes when they are unset)."""
    container["env"] = container_env(container["env"], pod, container_only)
    if pod.env_from:
        container["envFrom"] = container_env_from(pod)
    container["volumeMounts"] = [*container["volumeMounts"], *container_mounts(pod)]


def shape_pod(spec: dict[str, Any], pod: PodSettings) -> None:
    """Put the pod-level settings into a pod spec: pull secrets, runtime and priority class, service account, extra
    volumes. The hardened securityContext is the operator's and stays."""
    if pod.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s.name} for s in pod.image_pull_secrets]
    if pod.runtime_class_name:
        spec["runtimeClassName"] = pod.runtime_class_name
    if pod.priority_class_name:
        spec["priorityClassName"] = pod.priority_class_name
    if pod.service_account_name:
        spec["serviceAccountName"] = pod.service_account_name
    if pod.automount_service_account_token is not None:
        spec["automountServiceAccountToken"] = pod.automount_service_account_token
    spec["volumes"] = [*spec["volumes"], *pod_volumes(pod)]


def pod_metadata(pod: PodSettings, labels: Mapping[str, str], annotations: Mapping[str, str]) -> dict[str, Any]:
    """A pod template's metadata: the user's labels and annotations under the operator's (whose keys keep their
    values; the llmengine.io/ ones are all the operator's); no annotations key when there are none."""

    def users(extra: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in extra.items() if not k.startswith(f"{PREFIX}/")}

    # Without extra ones the operator's own objects are kept as they are (the golden files show them shared).
    meta: dict[str, Any] = {"labels": {**users(pod.labels), **labels} if pod.labels else labels}
    if pod.annotations:
        meta["annotations"] = {**users(pod.annotations), **annotations}
    elif annotations:
        meta["annotations"] = annotations
    return meta
