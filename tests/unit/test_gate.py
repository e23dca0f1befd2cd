"""The benchmark gate's decision per pass (pure)."""

from __future__ import annotations

from llmengine.api.bench import BenchNumbers, BenchOutcome
from llmengine.api.v1alpha1 import BenchmarkResult, BenchmarkSpec, BenchmarkStatus, BenchmarkThresholds
from llmengine.reconcile.gate import gate
from llmengine.reconcile.views import BenchView

NEW, OLD = "b" * 64, "a" * 64
RUNNING = BenchmarkStatus(engine_digest=NEW, verdict="Running")
SPEC = BenchmarkSpec(thresholds=BenchmarkThresholds(min_requests_per_second=10), max_regression_percent=10)


def _view(rps: float | None = 20.0, *, ok: bool = True, active: bool = False) -> BenchView:
    outcome = None
    if rps is not None or not ok:
        outcome = BenchOutcome(
            engine_digest=NEW,
            succeeded=ok,
            reason=None if ok else "DatasetExceedsEngine",
            numbers=BenchNumbers(requests_per_second=rps, output_tokens_per_second=100.0) if ok else None,
            test_benchmark=True,
        )
    return BenchView("llme-bench-x", active, not active and ok, not active and not ok, outcome)


def test_no_gate_without_spec_or_when_the_engine_already_serves() -> None:
    assert gate(None, NEW, OLD, None, None) is None
    assert gate(SPEC, NEW, NEW, None, None) is None


def test_first_pass_starts_a_benchmark_and_holds_the_rollout() -> None:
    step = gate(SPEC, NEW, OLD, None, None)
    assert step is not None and step.hold and step.create_job and not step.failed
    assert step.condition and step.condition[:2] == ("Unknown", "Running")
    assert step.status.verdict == "Running" and step.status.engine_digest == NEW


def test_running_job_holds_without_another_job() -> None:
    step = gate(SPEC, NEW, OLD, RUNNING, _view(None, active=True))
    assert step is not None and step.hold and not step.create_job


def test_passing_numbers_let_the_rollout_go() -> None:
    step = gate(SPEC, NEW, OLD, RUNNING, _view(20.0))
    assert step is not None and not step.hold and step.status.verdict == "Passed"
    assert (
        step.status.result
        and step.status.result.requests_per_second == 20.0
        and step.event
        and step.event[1] == "BenchmarkPassed"
    )


def test_failing_threshold_holds_and_names_the_field() -> None:
    step = gate(SPEC, NEW, OLD, None, _view(5.0))
    assert step is not None and step.hold and step.failed
    assert any("minRequestsPerSecond" in r for r in step.status.reasons or [])
    assert step.condition and step.condition[:2] == ("False", "ThresholdsNotMet")


def test_regression_against_the_serving_engine() -> None:
    prev = BenchmarkStatus(
        serving=BenchmarkResult(requests_per_second=30.0, output_tokens_per_second=100.0, test_benchmark=True)
    )
    step = gate(SPEC, NEW, OLD, prev, _view(20.0))
    assert step is not None and step.failed and any("below the serving engine" in r for r in step.status.reasons or [])
    # Real numbers are not compared with test numbers.
    real = BenchmarkStatus(serving=BenchmarkResult(requests_per_second=30.0, test_benchmark=False))
    step = gate(SPEC, NEW, OLD, real, _view(20.0))
    assert step is not None and not step.failed


def test_stored_numbers_are_re_judged_against_new_thresholds_without_a_run() -> None:
    prev = BenchmarkStatus(
        engine_digest=NEW, verdict="Failed", result=BenchmarkResult(requests_per_second=5.0, test_benchmark=True)
    )
    relaxed = BenchmarkSpec(thresholds=BenchmarkThresholds(min_requests_per_second=1))
    step = gate(relaxed, NEW, OLD, prev, None)
    assert step is not None and not step.hold and not step.create_job and step.status.verdict == "Passed"


def test_a_benchmark_that_could_not_run_fails_with_its_reason() -> None:
    step = gate(SPEC, NEW, OLD, None, _view(None, ok=False))
    assert step is not None and step.failed and "DatasetExceedsEngine" in step.message


def test_promotion_makes_the_numbers_the_next_baseline() -> None:
    prev = BenchmarkStatus(engine_digest=NEW, verdict="Passed", result=BenchmarkResult(requests_per_second=20.0))
    step = gate(SPEC, NEW, NEW, prev, None)
    assert step is not None and not step.hold and step.status.serving == BenchmarkResult(requests_per_second=20.0)
    again = gate(SPEC, NEW, NEW, step.status, None)
    assert again is not None and not again.hold and again.status == step.status
    assert again.condition == ("True", "Passed", f"engine {NEW[:12]} passed its benchmark")
    assert gate(SPEC, NEW, NEW, BenchmarkStatus(engine_digest=OLD, verdict="Passed"), None) is None
