"""Whole reconcile passes, one after another, against snapshots of what a cluster shows at each step: every phase
transition, the events each one posts (once), the actions it asks for, and a status the API server keeps whole."""

from __future__ import annotations

import datetime
import json
from dataclasses import replace
from typing import Any

from llmengine.api.bench import BenchNumbers, BenchOutcome
from llmengine.api.v1alpha1 import BenchmarkSpec, BenchmarkThresholds, FieldError, RebuildPolicy
from llmengine.plan.planner import invalid_plan
from llmengine.reconcile.actions import AdoptBuildJob, DeleteBuildJob, Serve, StartBenchmark, StartBuild
from llmengine.reconcile.snapshot import StoreView, TrafficView
from tests.unit.passes import NOW, SERVER_IMAGE, SPEC, D, Passes, bench, deployment, job, plan
from tests.unit.test_traffic import Pod, _snap

D2 = "c" * 64
LATER = NOW + datetime.timedelta(minutes=1)


def reasons(effects: Any) -> list[str]:
    return [reason for _, reason, _ in effects.events]


def test_a_new_engine_builds_rolls_out_and_settles_with_one_event_per_transition() -> None:
    p = Passes()
    first = p()
    assert first.decision.actions == (StartBuild(1),)
    assert first.status["phase"] == "Building" and reasons(first) == ["BuildStarted", "Building"]
    running = p(job=job())
    assert running.decision.actions == () and running.events == [] and running.status["phase"] == "Building"
    done = p(store=StoreView(True, None, f"s3://b/engines/{D}/"), job=job(active=False, succeeded=True))
    assert done.decision.actions == (Serve(D, SERVER_IMAGE, 2),)
    assert done.status["phase"] == "Deploying" and reasons(done) == ["Deploying"]
    assert done.condition("EngineBuilt")["reason"] == "BuildSucceeded"
    rolling = p(committed=True, deployment=deployment(observed_generation=0, updated=0, available=0, ready=0))
    assert rolling.events == [] and rolling.status["phase"] == "Deploying"
    ready = p(committed=True, deployment=deployment())
    assert ready.status["phase"] == "Ready" and reasons(ready) == ["Ready"]
    assert ready.status["servingEngine"]["digest"] == D and ready.status["url"].startswith("http://llme-llama.")
    assert ready.condition("Available")["status"] == "True" and ready.condition("Stalled")["status"] == "False"
    quiet = p(committed=True, deployment=deployment(), now=LATER)
    assert quiet.events == [] and quiet.status == ready.status  # nothing to write
    assert quiet.decision.actions == (Serve(D, SERVER_IMAGE, 2),)  # idempotent: an unchanged render writes nothing


def test_a_slow_rollout_is_looked_at_less_often_the_longer_it_takes() -> None:
    """Pods not yet ready: a look every 5 s at first, then a quarter of the time waited so far, never over 30 s."""
    p = Passes()
    p(committed=True)
    waits = []
    for minutes in (0, 0.25, 1, 2, 10):
        rolling = p(
            committed=True,
            deployment=deployment(observed_generation=0, updated=0, available=0, ready=0),
            now=NOW + datetime.timedelta(minutes=minutes),
        )
        assert rolling.status["phase"] == "Deploying"
        waits.append(rolling.requeue_after)
    assert waits == [5.0, 5.0, 15.0, 30.0, 30.0]
    ready = p(committed=True, deployment=deployment(), now=NOW + datetime.timedelta(minutes=11))
    assert ready.status["phase"] == "Ready"
    lost = p(committed=True, deployment=deployment(available=1, ready=1), now=NOW + datetime.timedelta(minutes=12))
    assert lost.status["phase"] == "Degraded" and lost.requeue_after == 5.0  # a new loss: looked at soon again


def test_a_rollout_after_a_long_build_is_looked_at_every_5_s_at_first() -> None:
    """Deployed has been False since the engine was created; the count starts when the engine is committed."""
    p = Passes()
    assert p().status["phase"] == "Building"
    p(job=job(), now=NOW + datetime.timedelta(minutes=30))
    built = p(
        store=StoreView(True, None, f"s3://b/engines/{D}/"),
        job=job(active=False, succeeded=True),
        now=NOW + datetime.timedelta(hours=1),
    )
    assert built.status["phase"] == "Deploying" and built.requeue_after == 5.0
    rolling = p(
        committed=True,
        deployment=deployment(observed_generation=0, updated=0, available=0, ready=0),
        now=NOW + datetime.timedelta(hours=1, minutes=2),
    )
    assert rolling.status["phase"] == "Deploying" and rolling.requeue_after == 30.0


def test_a_full_pool_queues_then_starts_when_a_slot_frees() -> None:
    p = Passes()
    queued = p(queue_position=2)
    assert queued.decision.actions == () and queued.status["build"]["queuePosition"] == 2
    assert reasons(queued) == ["Queued"] and queued.condition("EngineBuilt")["reason"] == "Queued"
    assert p(queue_position=1).events == []
    started = p()
    assert started.decision.actions == (StartBuild(1),) and "queuePosition" not in started.status["build"]
    assert reasons(started) == ["BuildStarted", "Building"]


def test_failures_back_off_retry_and_give_up_with_one_warning_each() -> None:
    p = Passes(max_attempts=2)
    p()
    broken = job(active=False, failed=True, message="Traceback...\nConnectionError: reset")
    failed = p(job=broken)
    assert failed.decision.actions == (DeleteBuildJob(),)
    assert reasons(failed) == ["BuildFailed"] and failed.status["build"]["nextRetryAt"] == "2026-11-26T12:00:30Z"
    waiting = p(now=NOW + datetime.timedelta(seconds=10))
    assert waiting.decision.actions == () and waiting.events == []
    assert waiting.condition("EngineBuilt")["reason"] == "BackingOff"
    retry = p(now=NOW + datetime.timedelta(seconds=31))
    assert retry.decision.actions == (StartBuild(2),) and reasons(retry) == ["BuildStarted"]
    result = {"engineDigest": D, "succeeded": False, "stage": "fetch", "reason": "no such model", "permanent": True}
    final = p(job=job(attempt=2, active=False, failed=True, message=json.dumps(result)))
    assert final.status["phase"] == "Failed" and reasons(final) == ["BuildFailed", "Failed"]
    assert final.condition("Stalled") | {"status": "True", "reason": "BuildFailed"} == final.condition("Stalled")
    # The failed Job expires (its TTL): still Failed, no new build, nothing posted again.
    for minutes in (5, 60, 24 * 60):
        later = p(now=NOW + datetime.timedelta(minutes=minutes))
        assert later.status["phase"] == "Failed" and later.decision.actions == () and later.events == []


def test_a_rebuild_keeps_the_old_engine_serving_and_available_until_the_new_one_is_ready() -> None:
    p = Passes()
    p(committed=True, deployment=deployment())
    assert p.stored["phase"] == "Ready"
    old_image = "registry.example/llmengine-server:1.1.0"
    serving_old = deployment(image=old_image)
    # The spec changed: another identity, not in the store yet.
    building = p(digest=D2, deployment=serving_old)
    assert building.decision.actions == (StartBuild(1), Serve(D, old_image, 2))  # the old engine keeps its image
    assert building.status["phase"] == "Building" and building.condition("Ready")["status"] == "False"
    assert building.condition("Available")["status"] == "True"
    assert building.condition("Deployed")["reason"] == "WaitingForEngine"
    assert building.status["servingEngine"]["digest"] == D and building.status["desiredEngine"]["digest"] == D2
    rolling = p(digest=D2, committed=True, deployment=serving_old)
    assert rolling.decision.actions == (Serve(D2, SERVER_IMAGE, 2),) and reasons(rolling) == ["Deploying"]
    ready = p(digest=D2, committed=True, deployment=deployment(D2))
    assert ready.status["phase"] == "Ready" and ready.status["servingEngine"]["digest"] == D2


def test_a_lost_pod_is_degraded_and_a_crash_loop_stalls_then_both_recover() -> None:
    p = Passes()
    p(committed=True, deployment=deployment())
    lost = p(committed=True, deployment=deployment(available=1, ready=1, updated=1, total=1))
    assert lost.status["phase"] == "Degraded" and lost.events == [("Warning", "Degraded", lost.status["message"])]
    assert lost.condition("Available")["status"] == "False" and lost.condition("Stalled")["status"] == "False"
    crash = "pod llme-llama-1: container server failed (exit 1, 3 restart(s)): engine built for SM 9.0"
    looping = p(committed=True, deployment=deployment(available=1, ready=1, problem=crash))
    assert looping.status["phase"] == "Degraded" and looping.events == []
    assert looping.condition("Stalled")["reason"] == "ServingPodsFailing" and crash in looping.status["message"]
    back = p(committed=True, deployment=deployment())
    assert back.status["phase"] == "Ready" and reasons(back) == ["Ready"]
    assert back.condition("Stalled")["status"] == "False"


def test_an_invalid_spec_fails_once_touches_nothing_and_a_fix_builds() -> None:
    p = Passes()
    p(committed=True, deployment=deployment())
    bad = invalid_plan([FieldError("spec.precision.quantization", "fp8 needs SM 8.9 or newer")])
    refused = p(plan=bad, deployment=deployment())
    assert refused.decision.actions == () and refused.status["phase"] == "Failed"
    assert refused.condition("Stalled")["reason"] == "InvalidSpec" and reasons(refused) == ["Failed"]
    assert refused.condition("Available")["status"] == "True"  # the engine built before keeps serving
    assert p(plan=bad, deployment=deployment()).events == []
    fixed = p(digest=D2, deployment=deployment())
    assert StartBuild(1) in fixed.decision.actions and fixed.status["phase"] == "Building"


def test_a_planner_crash_is_an_internal_error_not_an_invalid_spec() -> None:
    p = Passes()
    crashed = replace(invalid_plan([FieldError("spec", "x")]), internal_error="KeyError: 'H100-80GB'")
    d = p(plan=crashed)
    assert d.decision.actions == () and d.condition("Stalled")["reason"] == "InternalError"
    assert "operator fault" in d.status["message"] and "InvalidSpec" not in json.dumps(d.status)
    assert d.requeue_after is not None  # retried, unlike a spec that can never build


def test_an_unreachable_store_starts_nothing_and_says_which_setting() -> None:
    p = Passes()
    why = "cannot reach S3 endpoint http://s3:9000: check spec.store.endpoint"
    d = p(store=StoreView(None, why, None))
    assert d.decision.actions == () and d.status["phase"] == "Pending" and why in d.status["message"]
    assert d.condition("EngineBuilt")["status"] == "Unknown"


def test_a_build_made_by_another_engine_of_the_identity_is_joined() -> None:
    p = Passes()
    theirs = job(owners=("uid-other",))
    joined = p(job=theirs)
    assert joined.decision.actions == (AdoptBuildJob("llme-build-x"),)
    assert p(job=replace(theirs, owners=("uid-other", "uid-llama"))).decision.actions == ()


def test_the_benchmark_gate_holds_the_rollout_until_the_numbers_pass() -> None:
    gated = SPEC.model_copy(
        update={"benchmark": BenchmarkSpec(thresholds=BenchmarkThresholds(min_requests_per_second=10))}
    )
    p = Passes(spec=gated)
    p(committed=True, deployment=deployment())
    start = p(digest=D2, committed=True, deployment=deployment())
    assert start.decision.actions == (StartBenchmark(), Serve(D, SERVER_IMAGE, 2))
    assert reasons(start) == ["BenchmarkStarted", "Deploying"]
    fast = BenchOutcome(
        engine_digest=D2, succeeded=True, numbers=BenchNumbers(requests_per_second=20.0), test_benchmark=True
    )
    passed = p(
        digest=D2, committed=True, deployment=deployment(), bench=bench(active=False, succeeded=True, outcome=fast)
    )
    assert passed.decision.actions == (Serve(D2, SERVER_IMAGE, 2),) and reasons(passed) == ["BenchmarkPassed"]
    ready = p(digest=D2, committed=True, deployment=deployment(D2))
    assert ready.status["phase"] == "Ready" and ready.status["benchmark"]["serving"]["requestsPerSecond"] == 20.0


def _traffic(prompt: int, n: int = 200) -> TrafficView:
    pod = Pod()
    older = _snap(0, a=pod)
    pod.serve(n, prompt, 100, 2)
    return TrafficView(_snap(600, a=pod), older, ("http://10.0.0.1:8000/llmengine/metrics",), True)


def test_no_metrics_says_why_the_source_read_nothing() -> None:
    p = Passes(committed=True, deployment=deployment())
    p()
    pods = p(traffic=TrafficView(None, None, ("http://10.0.0.1:8000/llmengine/metrics",), False))
    assert pods.condition("EnvelopeExceeded")["reason"] == "NoMetrics"
    assert pods.condition("EnvelopeExceeded")["message"].startswith("no serving pod answered at http://10.0.0.1")
    down = "cannot read traffic from Prometheus at http://prometheus:9090: connection refused"
    prom = p(traffic=TrafficView(None, None, (), False, down))
    assert (prom.condition("EnvelopeExceeded")["reason"], prom.condition("EnvelopeExceeded")["message"]) == (
        "NoMetrics",
        down,
    )
    # A reading that arrives judges as the pods source's does.
    assert p(traffic=_traffic(300)).condition("EnvelopeExceeded")["reason"] == "WithinEnvelope"


def test_traffic_beyond_the_envelope_warns_once_and_auto_raises_the_shapes_in_camel_case() -> None:
    auto = SPEC.model_copy(update={"rebuild_policy": RebuildPolicy(mode="Auto", cooldown="1h", min_requests=100)})
    p = Passes(spec=auto, committed=True, deployment=deployment(), fits=lambda shapes: None)
    p()
    within = p(traffic=_traffic(300))
    assert within.condition("EnvelopeExceeded")["status"] == "False" and within.events == []
    assert within.status["traffic"]["requests"] == 200 and within.status["envelope"]["maxInputLen"] == 512
    over = p(traffic=_traffic(900))
    assert over.condition("EnvelopeExceeded")["status"] == "True"
    assert reasons(over) == ["AutoRebuild", "EnvelopeExceeded"] and over.requeue_after == 0.05
    raised = over.status["envelope"]["autoShapes"]
    assert set(raised) <= {"maxBatchSize", "maxInputLen", "maxSeqLen", "maxNumTokens"} and raised["maxInputLen"] > 512
    again = p(traffic=_traffic(900), now=LATER)
    assert again.events == [] and again.status["envelope"]["autoShapes"] == raised  # once per cool-down
    # No scrape this pass (the interval): what the last one said stands.
    assert p(traffic=None, now=LATER).status["envelope"] == again.status["envelope"]


def test_statuses_written_from_stored_snake_case_auto_shapes_read_as_camel_case() -> None:
    from llmengine.api.v1alpha1 import LLMEngineStatus
    from llmengine.plan.envelope import shape_floor

    old = LLMEngineStatus.model_validate({"envelope": {"autoShapes": {"max_input_len": 3840}}})
    assert old.envelope is not None and old.envelope.auto_shapes == {"maxInputLen": 3840}
    auto = SPEC.model_copy(update={"rebuild_policy": RebuildPolicy(mode="Auto")})
    assert shape_floor(auto, old) == {"max_input_len": 3840}
    assert shape_floor(SPEC, old) is None  # Manual serves the spec's own shapes


def test_plan_helper_is_what_the_passes_use() -> None:
    assert plan().engine_digest == D and plan(D2).short_digest == f"e-{D2[:12]}"


def test_an_autoscaled_engine_serves_the_autoscalers_count_and_drops_what_the_spec_no_longer_asks_for() -> None:
    from llmengine.api.v1alpha1 import Autoscaling, IngressRoute
    from llmengine.reconcile.actions import Attach, Detach
    from llmengine.reconcile.views import AttachmentView

    metric = {"type": "Pods", "pods": {"metric": {"name": "llmengine_requests_in_flight"}}}
    serving = SPEC.serving.model_copy(
        update={
            "autoscaling": Autoscaling(min_replicas=1, max_replicas=4, metrics=[metric]),
            "ingress": IngressRoute(host="llama.example.com"),
        }
    )
    auto = SPEC.model_copy(update={"serving": serving})
    # The autoscaler set 3 replicas on the Deployment: gather hands that count to the decision.
    scaled = deployment(replicas=3, updated=3, ready=3, available=3, total=3)
    p = Passes(spec=auto, committed=True)
    ready = p(deployment=scaled, replicas=3)
    assert ready.status["phase"] == "Ready" and ready.status["replicas"] == 3
    assert ready.decision.actions == (Serve(D, SERVER_IMAGE, 3), Attach("HorizontalPodAutoscaler"), Attach("Ingress"))
    # One of the autoscaler's pods is lost: judged against its count, not spec.serving.replicas (2).
    short = p(deployment=replace(scaled, available=2, ready=2, updated=2, total=2), replicas=3)
    assert short.status["phase"] == "Degraded" and short.status["message"].startswith("2/3 serving replicas")
    # Autoscaling and the Ingress taken out of the spec: both are removed, the spec's count comes back.
    hpa = AttachmentView("HorizontalPodAutoscaler", "h1", "10")
    ing = AttachmentView("Ingress", "h2", "11")
    plain = p(spec=SPEC, deployment=scaled, attachments={"HorizontalPodAutoscaler": hpa, "Ingress": ing})
    assert plain.decision.actions == (
        Serve(D, SERVER_IMAGE, 2),
        Detach("HorizontalPodAutoscaler"),
        Detach("Ingress"),
    )


def test_per_engine_state_series_move_with_the_engine_and_go_with_it() -> None:
    """The series are read from the engines' state when Prometheus scrapes: a moved state moves them, a gone engine
    has none."""
    from prometheus_client import REGISTRY

    from llmengine.reconcile import metrics

    def value(phase: str) -> float | None:
        return REGISTRY.get_sample_value("llmengine_engine_phase", {"namespace": "ml", "name": "m1", "phase": phase})

    def cond(type_: str, status: str) -> float | None:
        labels = {"namespace": "ml", "name": "m1", "type": type_, "status": status}
        return REGISTRY.get_sample_value("llmengine_engine_condition", labels)

    states: dict[tuple[str, str], dict[str, str]] = {}
    before = metrics.ENGINE_STATES.states
    metrics.ENGINE_STATES.states = states
    try:
        states[("ml", "m1")] = {"phase": "Building", "Ready": "False", "Available": "False"}
        states[("ml", "m2")] = {"phase": "Ready", "Ready": "True"}
        assert value("Building") == 1 and cond("Available", "False") == 1
        states[("ml", "m1")] = {"phase": "Ready", "Ready": "True", "Available": "True"}
        assert value("Building") is None and value("Ready") == 1
        assert cond("Available", "False") is None and cond("Available", "True") == 1
        del states[("ml", "m1")]
        assert value("Ready") is None and cond("Ready", "True") is None
        labels = {"namespace": "ml", "name": "m2", "phase": "Ready"}
        assert REGISTRY.get_sample_value("llmengine_engine_phase", labels) == 1
    finally:
        metrics.ENGINE_STATES.states = before


def test_a_running_build_shows_its_stage_and_a_committed_one_none() -> None:
    from llmengine.api.artifacts import BuildProgress

    p = Passes()
    p()
    at = BuildProgress(engine_digest=D, stage="compile", since="2026-11-26T11:05:00Z")
    compiling = p(job=job(), progress=at)
    build = compiling.status["build"]
    assert (build["stage"], build["stageStartedAt"]) == ("compile", "2026-11-26T11:05:00Z")
    assert compiling.status["message"].endswith("(attempt 1): compile") and compiling.events == []
    # Another identity's note (a stale one under a reused Job name) is not this build's.
    other = BuildProgress(engine_digest="f" * 64, stage="upload", since="2026-11-26T11:06:00Z")
    assert p(job=job(), progress=other).status["build"]["stage"] == "compile"
    done = p(committed=True, job=job(active=False, succeeded=True))
    assert "stage" not in done.status["build"] and "stageStartedAt" not in done.status["build"]


def test_an_identity_built_in_another_namespace_is_waited_for_not_built_again() -> None:
    p = Passes()
    waiting = p(building_elsewhere="team-b/llme-build-aaaaaaaaaaaa")
    assert waiting.decision.actions == () and waiting.status["phase"] == "Building"
    assert "being built by Job team-b/llme-build-aaaaaaaaaaaa" in waiting.status["message"]
    assert waiting.condition("EngineBuilt")["reason"] == "BuildingElsewhere" and waiting.requeue_after == 15.0
    # That build commits: a store hit here, rolled out like any other.
    hit = p(committed=True)
    assert hit.condition("EngineBuilt")["reason"] == "StoreHit" and Serve(D, SERVER_IMAGE, 2) in hit.decision.actions


def test_a_committed_engine_failing_verification_is_quarantined_and_rebuilt_once() -> None:
    from llmengine.reconcile.actions import DeleteBuildJob, Quarantine

    damaged = (
        "pod llme-llama-1: init container fetch-engine failed (exit 1, 2 restart(s)): "
        "serve-engine: 'rank0.engine' failed verification: sha256 12ab... does not match the manifest's 34cd..."
    )
    p = Passes()
    p(committed=True, deployment=deployment())
    rolling = deployment(available=1, ready=1, problem=damaged)
    q = p(committed=True, deployment=rolling, job=job(active=False, succeeded=True))
    assert Quarantine(D, damaged) in q.decision.actions and DeleteBuildJob() in q.decision.actions
    assert Serve(D, SERVER_IMAGE, 2) in q.decision.actions  # the Deployment is left alone: its pods retry
    assert reasons(q)[0] == "EngineQuarantined" and q.status["build"]["quarantinedAt"] == "2026-11-26T12:00:00Z"
    assert q.status["phase"] == "Building" and "attempts" not in q.status["build"]
    rebuild = p(deployment=rolling)  # the manifest is gone: not committed
    assert StartBuild(1) in rebuild.decision.actions
    assert rebuild.condition("Stalled")["reason"] == "EngineQuarantined" and "quarantined" in rebuild.status["message"]
    healed = p(committed=True, deployment=deployment())
    assert healed.status["phase"] == "Ready" and healed.condition("Stalled")["status"] == "False"
    # Damaged again: no second quarantine, a person is needed.
    again = p(committed=True, deployment=rolling)
    assert not again.decision.has(Quarantine) and again.condition("Stalled")["reason"] == "ServingPodsFailing"
    assert again.status["build"]["quarantinedAt"] == "2026-11-26T12:00:00Z"
