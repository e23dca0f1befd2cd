"""The pod settings one kind of pod gets: the operator's defaults and the engine's spec.pods, merged in layers.

Layers, lowest first: the defaults, the defaults' build or serving, the engine's, the engine's build or serving.
A value a layer sets replaces the one below; maps merge key by key and named lists by name (volumeMounts by
mountPath), an entry of a higher layer taking the place of the lower one's; envFrom entries add up; the proxy merges
field by field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from llmengine.api.pods import OperandPods, PodSettings, Proxy

PodKind = Literal["build", "serving"]
T = TypeVar("T")

_SCALARS = ("runtime_class_name", "priority_class_name", "service_account_name", "automount_service_account_token")


def _by_key(lower: Sequence[T] | None, higher: Sequence[T] | None, key: Callable[[T], str]) -> list[T] | None:
    """Entries of both, in order, a higher entry replacing the lower one with its key (in the lower one's place)."""
    if lower is None and higher is None:
        return None
    out = list(lower or [])
    for item in higher or []:
        at = next((i for i, old in enumerate(out) if key(old) == key(item)), None)
        if at is None:
            out.append(item)
        else:
            out[at] = item
    return out


def _maps(lower: dict[str, str] | None, higher: dict[str, str] | None) -> dict[str, str] | None:
    if lower is None and higher is None:
        return None
    return {**(lower or {}), **(higher or {})}


def _proxy(lower: Proxy | None, higher: Proxy | None) -> Proxy | None:
    if lower is None or higher is None:
        return higher or lower
    return lower.model_copy(update=higher.model_dump(exclude_none=True))


def overlay(lower: PodSettings, higher: PodSettings) -> PodSettings:
    """`higher` over `lower` (only PodSettings' own fields: the build and serving of an OperandPods are layers of
    their own)."""
    env_from = [*(lower.env_from or []), *(e for e in higher.env_from or [] if e not in (lower.env_from or []))]
    return PodSettings(
        **{f: getattr(higher, f) if getattr(higher, f) is not None else getattr(lower, f) for f in _SCALARS},
        image_pull_secrets=_by_key(lower.image_pull_secrets, higher.image_pull_secrets, lambda s: s.name),
        labels=_maps(lower.labels, higher.labels),
        annotations=_maps(lower.annotations, higher.annotations),
        env=_by_key(lower.env, higher.env, lambda e: e.name),
        env_from=env_from if lower.env_from is not None or higher.env_from is not None else None,
        volumes=_by_key(lower.volumes, higher.volumes, lambda v: v.name),
        volume_mounts=_by_key(lower.volume_mounts, higher.volume_mounts, lambda m: m.mount_path),
        proxy=_proxy(lower.proxy, higher.proxy),
        ca_bundle=higher.ca_bundle or lower.ca_bundle,
    )


def layers(defaults: OperandPods, engine: OperandPods | None, kind: PodKind) -> list[PodSettings]:
    """The settings that apply to `kind` of pod, lowest first."""
    out: list[PodSettings] = []
    for pods in (defaults, engine):
        if pods is None:
            continue
        out.append(pods)
        one: PodSettings | None = pods.build if kind == "build" else pods.serving
        if one is not None:
            out.append(one)
    return out


def resolve(
    defaults: OperandPods, engine: OperandPods | None, kind: PodKind, store_identity: str | None = None
) -> PodSettings:
    """The settings of the build and benchmark Job pods (kind build) or of the serving pods (kind serving).

    `store_identity` is spec.store.workloadIdentity's ServiceAccount: the pods run as it (with its token mounted,
    which the cloud's identity webhook exchanges for store credentials) unless spec.pods names another."""
    merged = PodSettings()
    found = layers(defaults, engine, kind)
    if store_identity:
        identity = PodSettings(service_account_name=store_identity, automount_service_account_token=True)
        found.insert(1 if defaults is not None else 0, identity)
    for layer in found:
        merged = overlay(merged, layer)
    return merged
