"""The benchmark gate: a committed engine is benchmarked before traffic moves to it. Pure.

Part of the one decision, only when spec.benchmark is set and the desired engine is not the one serving. The
measured numbers are kept in status.benchmark, so the verdict is worked out again on every pass from them and the
current thresholds: changing a threshold re-judges without re-running. A failed gate keeps the serving engine (the
Deployment is not touched) and says why; a passed one lets the rollout go ahead, and once that engine serves, its
numbers become the baseline for the next one (maxRegressionPercent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmengine.api.conditions import Status
from llmengine.api.v1alpha1 import BenchmarkSpec, BenchmarkStatus
from llmengine.plan.benchgate import evaluate
from llmengine.reconcile.views import BenchView

Event = tuple[str, str, str]


@dataclass(frozen=True)
class GateStep:
    hold: bool = False  # keep serving what serves now
    create_job: bool = False
    failed: bool = False  # the gate said no (or the benchmark could not run): Stalled
    message: str = ""
    condition: tuple[Status, str, str] | None = None  # status, reason, message of BenchmarkPassed
    status: BenchmarkStatus = field(default_factory=BenchmarkStatus)  # status.benchmark
    event: Event | None = None


def gate(
    bench: BenchmarkSpec | None,
    desired: str,
    serving: str | None,
    previous: BenchmarkStatus | None,
    view: BenchView | None,
) -> GateStep | None:
    """What the gate does this pass; None when it has nothing to say (no gate, or nothing to gate)."""
    if bench is None:
        return None
    prev = previous or BenchmarkStatus()
    same = prev.engine_digest == desired
    if serving == desired:
        if not (same and prev.verdict == "Passed"):
            return None
        passed: tuple[Status, str, str] = ("True", "Passed", f"engine {desired[:12]} passed its benchmark")
        if prev.result is not None and prev.serving != prev.result:
            # Promoted: its numbers are the baseline of the next engine.
            return GateStep(condition=passed, status=prev.model_copy(update={"serving": prev.result}))
        return GateStep(condition=passed, status=prev)

    st = BenchmarkStatus(engine_digest=desired, serving=prev.serving)
    result = prev.result if same else None
    if result is None and view is not None and view.outcome is not None and view.outcome.succeeded:
        result = view.outcome.benchmark_result()
    if view is not None:
        st.job = view.name
    elif same and prev.job:
        st.job = prev.job
    short = desired[:12]
    announce = prev.verdict if same else None

    if result is not None:
        st.result = result
        baseline = prev.serving
        if baseline is not None and bool(baseline.test_benchmark) != bool(result.test_benchmark):
            baseline = None  # test numbers are not comparable with trtllm-bench's
        verdict = evaluate(result, bench.thresholds, baseline, bench.max_regression_percent)
        if verdict.passed:
            st.verdict = "Passed"
            msg = f"engine {short} passed its benchmark"
            ev = ("Normal", "BenchmarkPassed", msg) if announce != "Passed" else None
            return GateStep(condition=("True", "Passed", msg), status=st, event=ev)
        st.verdict, st.reasons = "Failed", list(verdict.reasons)
        msg = f"engine {short} failed its benchmark: " + "; ".join(verdict.reasons)
        ev = ("Warning", "BenchmarkFailed", msg) if announce != "Failed" else None
        return GateStep(True, False, True, msg, ("False", "ThresholdsNotMet", msg), st, ev)

    if view is None:
        st.verdict = "Running"
        msg = f"benchmarking engine {short} before rollout"
        return GateStep(True, True, False, msg, ("Unknown", "Running", msg), st, ("Normal", "BenchmarkStarted", msg))
    if view.failed or (view.succeeded and (view.outcome is None or not view.outcome.succeeded)):
        why = (view.outcome.failure_line() if view.outcome else "") or "no result"
        st.verdict, st.reasons = "Failed", [f"benchmark Job {view.name} failed: {why}"]
        msg = f"engine {short} could not be benchmarked: {why}"
        ev = ("Warning", "BenchmarkFailed", msg) if announce != "Failed" else None
        return GateStep(True, False, True, msg, ("False", "BenchmarkFailed", msg), st, ev)
    st.verdict = "Running"
    msg = f"benchmarking engine {short} before rollout (Job {view.name})"
    return GateStep(True, False, False, msg, ("Unknown", "Running", msg), st)
