"""The HorizontalPodAutoscaler of an engine's serving Deployment (spec.serving.autoscaling). Pure."""

from __future__ import annotations

from typing import Any

from llmengine.api.v1alpha1 import LLMEngine, LLMEngineSpec
from llmengine.render import common as c
from llmengine.render.serving import instance_labels


def autoscaler(engine: LLMEngine) -> dict[str, Any] | None:
    """autoscaling/v2 HPA on the Deployment llme-<name>; None when the spec asks for none."""
    auto = engine.spec.serving.autoscaling
    if auto is None:
        return None
    name = c.serving_name(engine.name)
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        "minReplicas": auto.min_replicas,
        "maxReplicas": auto.max_replicas,
        "metrics": [dict(m) for m in auto.metrics],
    }
    if auto.behavior:
        spec["behavior"] = dict(auto.behavior)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": name,
            "namespace": engine.namespace,
            "labels": {**c.base_labels("server"), **instance_labels(engine.name)},
            "ownerReferences": [c.owner_reference(engine, controller=True)],
        },
        "spec": spec,
    }


def replicas(spec: LLMEngineSpec, current: int | None) -> int:
    """The replica count to render: the spec's, or under an autoscaler the count it set (its minimum at first)."""
    auto = spec.serving.autoscaling
    if auto is None:
        return spec.serving.replicas
    if current is None:
        return auto.min_replicas
    return min(max(current, auto.min_replicas), auto.max_replicas)
