"""Kubernetes-convention conditions: one helper writes them, lastTransitionTime moves only on a status change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from llmengine.api.v1alpha1 import Condition

READY, RECONCILING, STALLED, ENGINE_BUILT, DEPLOYED = "Ready", "Reconciling", "Stalled", "EngineBuilt", "Deployed"
# True while some engine (the desired one or the one still serving during a rebuild) serves the spec's replicas.
AVAILABLE = "Available"
ENVELOPE_EXCEEDED = "EnvelopeExceeded"
BENCHMARK_PASSED = "BenchmarkPassed"
ORDER = (READY, AVAILABLE, RECONCILING, STALLED, ENGINE_BUILT, DEPLOYED, BENCHMARK_PASSED, ENVELOPE_EXCEEDED)

Status = Literal["True", "False", "Unknown"]


def status_of(value: bool | Status) -> Status:
    if isinstance(value, bool):
        return "True" if value else "False"
    return value


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: bool | Status,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Condition]:
    """A new list with the condition set; lastTransitionTime is kept while the status value does not change."""
    st = status_of(status)
    old = get_condition(conditions, type_)
    kept = old.last_transition_time if old is not None and old.status == st else None
    new = Condition(
        type=type_,
        status=st,
        reason=reason,
        message=message,
        last_transition_time=kept or now,
        observed_generation=generation,
    )
    order = {t: i for i, t in enumerate(ORDER)}
    out = [c for c in conditions if c.type != type_] + [new]
    return sorted(out, key=lambda c: (order.get(c.type, 99), c.type))


def get_condition(conditions: Sequence[Condition] | None, type_: str) -> Condition | None:
    return next((c for c in conditions or () if c.type == type_), None)
