"""How clients outside the cluster reach an engine: an Ingress or a Gateway API HTTPRoute to its Service. Pure."""

from __future__ import annotations

from typing import Any

from llmengine.api.v1alpha1 import LLMEngine
from llmengine.render import common as c
from llmengine.render.serving import instance_labels


def _metadata(engine: LLMEngine, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {
        "name": c.serving_name(engine.name),
        "namespace": engine.namespace,
        "labels": {**c.base_labels("server"), **instance_labels(engine.name)},
        "ownerReferences": [c.owner_reference(engine, controller=True)],
    }
    if annotations:
        md["annotations"] = dict(annotations)
    return md


def ingress(engine: LLMEngine) -> dict[str, Any] | None:
    route = engine.spec.serving.ingress
    if route is None:
        return None
    backend = {"service": {"name": c.serving_name(engine.name), "port": {"name": "http"}}}
    spec: dict[str, Any] = {
        "rules": [
            {
                "host": route.host,
                "http": {"paths": [{"path": route.path, "pathType": "Prefix", "backend": backend}]},
            }
        ]
    }
    if route.class_name:
        spec["ingressClassName"] = route.class_name
    if route.tls_secret_name:
        spec["tls"] = [{"hosts": [route.host], "secretName": route.tls_secret_name}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _metadata(engine, route.annotations),
        "spec": spec,
    }


def http_route(engine: LLMEngine) -> dict[str, Any] | None:
    route = engine.spec.serving.http_route
    if route is None:
        return None
    spec: dict[str, Any] = {
        "parentRefs": [dict(p) for p in route.parent_refs],
        "rules": [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": route.path}}],
                "backendRefs": [{"name": c.serving_name(engine.name), "port": engine.spec.serving.port}],
            }
        ],
    }
    if route.hostnames:
        spec["hostnames"] = list(route.hostnames)
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": _metadata(engine),
        "spec": spec,
    }
