"""Kubernetes-convention conditions: one helper writes them, lastTransitionTime moves only on a status change."""

from __future__ import annotations

import datetime
from typing import Any

READY, RECONCILING, STALLED, ENGINE_BUILT, DEPLOYED = "Ready", "Reconciling", "Stalled", "EngineBuilt", "Deployed"
# True while some engine (the desired one or the one still serving during a rebuild) serves the spec's replicas.
AVAILABLE = "Available"
ENVELOPE_EXCEEDED = "EnvelopeExceeded"


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Return a new list with the condition set; keeps lastTransitionTime when the status value is unchanged."""
    st = status if isinstance(status, str) else ("True" if status else "False")
    old = next((c for c in conditions if c.get("type") == type_), None)
    ltt = old["lastTransitionTime"] if old and old.get("status") == st and old.get("lastTransitionTime") else None
    new = {
        "type": type_,
        "status": st,
        "reason": reason,
        "message": message,
        "lastTransitionTime": ltt or now or now_iso(),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out = [c for c in conditions if c.get("type") != type_]
    out.append(new)
    order = {
        t: i for i, t in enumerate((READY, AVAILABLE, RECONCILING, STALLED, ENGINE_BUILT, DEPLOYED, ENVELOPE_EXCEEDED))
    }
    return sorted(out, key=lambda c: (order.get(c["type"], 99), c["type"]))


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)
