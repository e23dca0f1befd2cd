"""The admission verdict on an LLMEngine create or update: the planner's checks, before anything is stored.

The validating webhook calls `review`; it is pure so that the same rules are tested without an API server. It
refuses only what the planner would fail, and only when the spec changes, so that metadata updates (finalizer
removal, labels, Kopf's own annotations) on an object stored before the webhook existed are never blocked and
deletion can not wedge on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import ImageCatalog
from llmengine.api.v1alpha1 import FieldError, parse_engine
from llmengine.plan.planner import Plan, differences, plan_object

# Kubernetes shows the message in `kubectl apply` output; keep it to a readable size.
_MAX_ERRORS = 8


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    errors: list[FieldError] = field(default_factory=list)


def _spec(obj: Mapping[str, Any] | None) -> Any:
    return None if obj is None else obj.get("spec")


def _deleting(obj: Mapping[str, Any] | None) -> bool:
    md = obj.get("metadata") if obj is not None else None
    return isinstance(md, Mapping) and bool(md.get("deletionTimestamp"))


def _name(obj: Mapping[str, Any]) -> str:
    md = obj.get("metadata")
    if not isinstance(md, Mapping):
        return "LLMEngine"
    ns, name = md.get("namespace"), md.get("name") or md.get("generateName") or "?"
    return f"LLMEngine {ns}/{name}" if ns else f"LLMEngine {name}"


def rejection_message(obj: Mapping[str, Any], errors: list[FieldError]) -> str:
    """One message naming every field and its fix, e.g. `spec.precision.quantization: FP8 needs ...`."""
    shown = [str(e) for e in errors[:_MAX_ERRORS]]
    if len(errors) > _MAX_ERRORS:
        shown.append(f"... and {len(errors) - _MAX_ERRORS} more (run `llmengine plan -f FILE` for all)")
    return f"{_name(obj)} is invalid: " + "; ".join(shown)


def review(
    new: Mapping[str, Any] | None,
    old: Mapping[str, Any] | None,
    operation: str,
    *,
    compiler: str = "tensorrt-llm",
    default_store: StoreLocation | None = None,
    test_engine_bytes: int | None = None,
    images: ImageCatalog | None = None,
    isolated_builds: bool = False,
) -> Verdict:
    """Allow or refuse one admission request (operation CREATE, UPDATE, DELETE or CONNECT)."""
    if operation not in ("CREATE", "UPDATE") or new is None:
        return Verdict(allowed=True)
    if operation == "UPDATE" and (_deleting(new) or _spec(new) == _spec(old)):
        return Verdict(allowed=True)

    def plan(obj: Mapping[str, Any]) -> Plan:
        return plan_object(
            dict(obj),
            compiler=compiler,
            default_store=default_store,
            test_engine_bytes=test_engine_bytes,
            images=images,
            isolated_builds=isolated_builds,
        )

    p = plan(new)
    if p.internal_error:
        # No field is to blame: let the object in; its status says the operator failed (and it retries).
        return Verdict(allowed=True, warnings=[f"the operator could not plan this engine: {p.internal_error}"])
    if not p.valid:
        return Verdict(allowed=False, message=rejection_message(new, p.errors), errors=list(p.errors))
    warnings = list(p.warnings)
    if operation == "UPDATE" and old is not None:
        before = plan(old)
        if before.valid and before.engine_digest != p.engine_digest:
            why = differences(before, p, parse_engine(dict(old)), parse_engine(dict(new)))
            shown = "; ".join(why[:3]) + (f"; and {len(why) - 3} more" if len(why) > 3 else "")
            warnings.append(
                f"this change builds a new engine ({before.short_digest} -> {p.short_digest}); the current engine "
                f"keeps serving until the new one is ready. Changed: {shown}"
            )
    return Verdict(allowed=True, warnings=warnings)
