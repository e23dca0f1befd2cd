"""The benchmark gate: a committed engine is benchmarked before traffic moves to it. Pure.

Applied after the lifecycle decision, only when spec.benchmark is set and the desired engine is not the one
serving. The measured numbers are kept in status.benchmark, so the verdict is worked out again on every pass from
them and the current thresholds: changing a threshold re-judges without re-running. A failed gate keeps the
serving engine (the Deployment is not touched) and says why; a passed one lets the rollout go ahead, and once
that engine serves, its numbers become the baseline for the next one (maxRegressionPercent).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmengine.api.bench import BenchOutcome
from llmengine.api.v1alpha1 import BenchmarkResult, BenchmarkSpec
from llmengine.plan.benchgate import evaluate

BENCHMARK_PASSED = "BenchmarkPassed"


@dataclass(frozen=True)
class BenchView:
    """The benchmark Job of the desired engine, as observed."""

    name: str
    active: bool
    succeeded: bool
    failed: bool
    outcome: BenchOutcome | None


@dataclass
class GateStep:
    hold: bool = False  # keep serving what serves now
    create_job: bool = False
    failed: bool = False  # the gate said no (or the benchmark could not run): Stalled
    message: str = ""
    condition: tuple[str, str, str] | None = None  # status, reason, message of BenchmarkPassed
    status: dict[str, Any] = field(default_factory=dict)  # status.benchmark
    event: tuple[str, str, str] | None = None


def _result(d: Mapping[str, Any] | None) -> BenchmarkResult | None:
    return BenchmarkResult.model_validate(d) if d else None


def gate(
    bench: BenchmarkSpec | None,
    desired: str,
    serving: str | None,
    previous: Mapping[str, Any],
    view: BenchView | None,
) -> GateStep | None:
    """What the gate does this pass; None when it has nothing to say (no gate, or nothing to gate)."""
    if bench is None:
        return None
    prev = dict(previous)
    same = prev.get("engineDigest") == desired
    if serving == desired:
        if not (same and prev.get("verdict") == "Passed"):
            return None
        passed = ("True", "Passed", f"engine {desired[:12]} passed its benchmark")
        if prev.get("result") and prev.get("serving") != prev["result"]:
            # Promoted: its numbers are the baseline of the next engine.
            return GateStep(condition=passed, status={**prev, "serving": prev["result"]})
        return GateStep(condition=passed, status=prev)

    st: dict[str, Any] = {"engineDigest": desired, "serving": prev.get("serving")}
    result = _result(prev.get("result")) if same else None
    if result is None and view is not None and view.outcome is not None and view.outcome.succeeded:
        result = view.outcome.benchmark_result()
    if view is not None:
        st["job"] = view.name
    elif same and prev.get("job"):
        st["job"] = prev["job"]
    short = desired[:12]

    if result is not None:
        st["result"] = result.model_dump(by_alias=True, exclude_none=True)
        baseline = _result(prev.get("serving"))
        if baseline is not None and bool(baseline.test_benchmark) != bool(result.test_benchmark):
            baseline = None  # test numbers are not comparable with trtllm-bench's
        verdict = evaluate(result, bench.thresholds, baseline, bench.max_regression_percent)
        if verdict.passed:
            st["verdict"] = "Passed"
            msg = f"engine {short} passed its benchmark"
            ev = ("Normal", "BenchmarkPassed", msg) if prev.get("verdict") != "Passed" or not same else None
            return GateStep(condition=("True", "Passed", msg), status=_clean(st), event=ev)
        st["verdict"], st["reasons"] = "Failed", verdict.reasons
        msg = f"engine {short} failed its benchmark: " + "; ".join(verdict.reasons)
        ev = ("Warning", "BenchmarkFailed", msg) if prev.get("verdict") != "Failed" or not same else None
        return GateStep(True, False, True, msg, ("False", "ThresholdsNotMet", msg), _clean(st), ev)

    if view is None:
        st["verdict"] = "Running"
        msg = f"benchmarking engine {short} before rollout"
        return GateStep(
            True, True, False, msg, ("Unknown", "Running", msg), _clean(st), ("Normal", "BenchmarkStarted", msg)
        )
    if view.failed or (view.succeeded and (view.outcome is None or not view.outcome.succeeded)):
        o = view.outcome
        why = ": ".join(p for p in ((o.stage, o.reason, o.message) if o else ()) if p) or "no result"
        st["verdict"], st["reasons"] = "Failed", [f"benchmark Job {view.name} failed: {why}"]
        msg = f"engine {short} could not be benchmarked: {why}"
        ev = ("Warning", "BenchmarkFailed", msg) if prev.get("verdict") != "Failed" or not same else None
        return GateStep(True, False, True, msg, ("False", "BenchmarkFailed", msg), _clean(st), ev)
    st["verdict"] = "Running"
    msg = f"benchmarking engine {short} before rollout (Job {view.name})"
    return GateStep(True, False, False, msg, ("Unknown", "Running", msg), _clean(st))


def _clean(st: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in st.items() if v is not None}
