"""What the operator renders next to an engine's serving Deployment, as the spec asks: an HPA, an Ingress, an
HTTPRoute. Pure."""

from __future__ import annotations

from typing import Any

from llmengine.api.v1alpha1 import LLMEngine, LLMEngineSpec
from llmengine.render import autoscale, routes
from llmengine.render.common import HPA, HTTP_ROUTE, INGRESS


def wanted(spec: LLMEngineSpec) -> tuple[str, ...]:
    """The kinds the spec asks for, in a fixed order."""
    serving = spec.serving
    asked = ((HPA, serving.autoscaling), (INGRESS, serving.ingress), (HTTP_ROUTE, serving.http_route))
    return tuple(kind.kind for kind, setting in asked if setting is not None)


def render(engine: LLMEngine, kind: str) -> dict[str, Any] | None:
    renderers = {HPA.kind: autoscale.autoscaler, INGRESS.kind: routes.ingress, HTTP_ROUTE.kind: routes.http_route}
    return renderers[kind](engine)
