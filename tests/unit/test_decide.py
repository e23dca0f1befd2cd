"""The reconcile policy is pure: a snapshot in, status, events and actions out."""

from __future__ import annotations

import datetime
import json
from dataclasses import replace
from typing import Any

from llmengine.plan.planner import invalid_plan
from llmengine.reconcile.decide import backoff_seconds
from llmengine.reconcile.views import DeploymentView, JobView
from tests.unit.passes import NOW, Effects, prune, run, snapshot, status_schema
from tests.unit.passes import job as job_view

D = "a" * 64


def obs(**kw: Any) -> Any:
    """A snapshot, keyed the way these tests name what was observed."""
    if "valid" in kw:
        kw.pop("valid")
        errors = kw.pop("errors")
        from llmengine.api.v1alpha1 import FieldError

        kw["plan"] = invalid_plan([FieldError(f, m) for f, m in errors])
    return snapshot(**kw)


def decide(snap: Any) -> Effects:
    return run(snap)


def job(**kw: Any) -> JobView:
    return job_view(**kw)


def cond(d: Effects, t: str) -> dict[str, Any]:
    return d.condition(t)


def test_invalid_spec_is_failed_and_stalled_and_keeps_what_serves() -> None:
    dep = DeploymentView("old", 1, 1, 2, 2, 2, 2)
    d = decide(obs(valid=False, errors=[("spec.precision.quantization", "fp8 needs SM 8.9")], deployment=dep))
    assert d.status["phase"] == "Failed"
    assert cond(d, "Stalled")["status"] == "True" and cond(d, "Ready")["status"] == "False"
    assert "spec.precision.quantization" in d.status["message"]
    # Nothing is created, deleted or re-rendered: the old engine keeps serving.
    assert not d.decision.actions and cond(d, "Available")["status"] == "True"


def test_missing_engine_starts_first_build() -> None:
    d = decide(obs())
    assert d.create_job == 1 and d.status["phase"] == "Building"
    assert d.status["build"]["attempts"] == 1
    assert d.deploy_digest is None
    assert cond(d, "Reconciling")["status"] == "True"


def test_full_pool_queues_with_position() -> None:
    d = decide(obs(queue_position=2))
    assert d.create_job is None
    assert d.status["phase"] == "Queued" and d.status["build"]["queuePosition"] == 2


def test_running_job_is_building_and_not_duplicated() -> None:
    d = decide(obs(job=job(), status={"desiredEngine": {"digest": D}, "build": {"attempts": 1}}))
    assert d.create_job is None and not d.delete_job
    assert d.status["phase"] == "Building" and d.status["build"]["job"] == "llme-build-x"


def test_permanent_builder_failure_is_not_retried() -> None:
    result = {"engineDigest": D, "succeeded": False, "stage": "fetch", "reason": "no such model", "permanent": True}
    j = job(active=False, failed=True, message=json.dumps(result), reason="BackoffLimitExceeded")
    d = decide(obs(job=j, status={"desiredEngine": {"digest": D}, "build": {"attempts": 1}}))
    assert d.status["phase"] == "Failed" and not d.delete_job and d.create_job is None
    assert d.status["build"]["lastFailure"] == "fetch: no such model"
    assert ("Warning", "BuildFailed", "attempt 1: fetch: no such model") in d.events


def test_transient_failure_backs_off_exponentially_then_retries() -> None:
    j = job(active=False, failed=True, message="Traceback...\nConnectionError: reset", reason="BackoffLimitExceeded")
    d = decide(obs(job=j, status={"desiredEngine": {"digest": D}, "build": {"attempts": 1}}))
    assert d.delete_job and d.status["phase"] == "Building"
    retry = d.status["build"]["nextRetryAt"]
    assert retry == "2026-11-26T12:00:30Z"
    # Job deleted, retry time not reached: wait.
    st = {"desiredEngine": {"digest": D}, "build": d.status["build"]}
    d2 = decide(obs(status=st, now=NOW + datetime.timedelta(seconds=10)))
    assert d2.create_job is None and 19 <= (d2.requeue_after or 0) <= 20
    d3 = decide(obs(status=st, now=NOW + datetime.timedelta(seconds=31)))
    assert d3.create_job == 2
    assert backoff_seconds(1, 30, 3600) == 30 and backoff_seconds(3, 30, 3600) == 120
    assert backoff_seconds(20, 30, 3600) == 3600


def test_gives_up_after_max_attempts() -> None:
    j = job(attempt=3, active=False, failed=True, message="boom")
    d = decide(obs(job=j, status={"desiredEngine": {"digest": D}, "build": {"attempts": 3}}))
    assert d.status["phase"] == "Failed" and not d.delete_job
    assert "gave up after 3 attempts" in d.status["message"]


def test_old_engine_keeps_serving_while_new_one_builds() -> None:
    dep = DeploymentView("old", 1, 1, 2, 2, 2, 2)
    d = decide(obs(deployment=dep, job=job()))
    assert d.deploy_digest == "old"
    assert cond(d, "Deployed")["reason"] == "WaitingForEngine"
    assert cond(d, "Ready")["status"] == "False"


def test_committed_engine_rolls_out_then_is_ready() -> None:
    d = decide(obs(committed=True))
    assert d.deploy_digest == D and d.status["phase"] == "Deploying"
    assert cond(d, "EngineBuilt")["reason"] == "StoreHit"
    dep = DeploymentView(D, 2, 2, 2, 2, 2, 2)
    ready = decide(obs(committed=True, deployment=dep, status=d.status))
    assert ready.status["phase"] == "Ready" and cond(ready, "Ready")["status"] == "True"
    assert ready.status["servingEngine"]["digest"] == D
    assert ready.status["servingEngine"]["short"] == ready.status["desiredEngine"]["short"] == D[:12]
    # A later pass with nothing changed keeps lastTransitionTime.
    later = decide(obs(committed=True, deployment=dep, status=ready.status, now=NOW + datetime.timedelta(hours=1)))
    assert cond(later, "Ready")["lastTransitionTime"] == cond(ready, "Ready")["lastTransitionTime"]
    assert not later.events


def test_lost_replicas_after_ready_is_degraded() -> None:
    dep = DeploymentView(D, 2, 2, 2, 2, 1, 1)
    d = decide(obs(committed=True, deployment=dep, status={"phase": "Ready"}))
    assert d.status["phase"] == "Degraded"
    assert ("Warning", "Degraded", "1/2 serving replicas available") in d.events


def test_unreachable_store_never_starts_a_build() -> None:
    d = decide(obs(committed=None, store_error="cannot reach S3 endpoint http://x: check spec.store.endpoint"))
    assert d.create_job is None
    assert cond(d, "EngineBuilt")["status"] == "Unknown"
    assert "spec.store.endpoint" in d.status["message"]


def test_not_ready_while_an_old_pod_is_left() -> None:
    # 3 replicas wanted, 3 updated, 3 available counting the old pod that is still there: still rolling out.
    mid = DeploymentView(D, 2, 2, 3, 3, 3, 3, total=4)
    assert not mid.rolled_out
    d = decide(obs(committed=True, deployment=mid, replicas=3))
    assert d.status["phase"] == "Deploying"
    done = DeploymentView(D, 2, 2, 3, 3, 3, 3, total=3)
    assert decide(obs(committed=True, deployment=done, replicas=3)).status["phase"] == "Ready"


# -- why serving pods are not Ready -----------------------------------------------------------------------------------

ANN = "llmengine.io/engine-digest"


def pod(name: str, digest: str = D, ready: bool = False, **status: Any) -> dict[str, Any]:
    conds = [{"type": "Ready", "status": "True" if ready else "False"}, *status.pop("conditions", [])]
    return {"metadata": {"name": name, "annotations": {ANN: digest}}, "status": {"conditions": conds, **status}}


CRASHING_DOWNLOAD = {
    "initContainerStatuses": [
        {
            "name": "fetch-engine",
            "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
            "lastState": {
                "terminated": {
                    "exitCode": 1,
                    "message": '{"event": "download started"}\n'
                    "serve-engine: 'rank0.engine' failed verification: sha256 1234...  does not match\n\n",
                }
            },
        }
    ]
}


def test_pod_problem_reads_a_crash_looping_download_from_its_last_termination() -> None:
    from llmengine.reconcile.views import pod_problem

    got = pod_problem([pod("s-1", **CRASHING_DOWNLOAD)], D)
    assert got == (
        "pod s-1: init container fetch-engine failed (exit 1, 3 restart(s)): "
        "serve-engine: 'rank0.engine' failed verification: sha256 1234... does not match"
    )


def test_pod_problem_reads_scheduling_image_and_ignores_ready_old_and_deleting_pods() -> None:
    from llmengine.reconcile.views import pod_problem

    unsched = {"conditions": [{"type": "PodScheduled", "status": "False", "message": "0/7 nodes: Insufficient gpu"}]}
    pull = {"containerStatuses": [{"name": "server", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}
    assert pod_problem([pod("a", **unsched)], D) == "pod a cannot be scheduled: 0/7 nodes: Insufficient gpu"
    assert pod_problem([pod("b", **pull)], D) == "pod b: container server ImagePullBackOff"
    deleting = pod("d", **CRASHING_DOWNLOAD)
    deleting["metadata"]["deletionTimestamp"] = "2026-11-26T12:00:00Z"
    quiet = [pod("r", ready=True, **CRASHING_DOWNLOAD), pod("o", "b" * 64, **CRASHING_DOWNLOAD), deleting, pod("p")]
    assert pod_problem(quiet, D) is None
    # Running again after an old crash (an OOM kill, say) while it loads: nothing to report.
    recovered = {
        "containerStatuses": [
            {
                "name": "server",
                "restartCount": 1,
                "state": {"running": {"startedAt": "2026-11-26T12:00:00Z"}},
                "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            }
        ]
    }
    assert pod_problem([pod("loading", **recovered)], D) is None


def test_status_message_carries_the_pod_problem_while_rolling_out_and_when_degraded() -> None:
    why = "pod s-1: init container fetch-engine failed (exit 1): boom"
    rolling = DeploymentView(D, 2, 2, 2, 1, 0, 0, total=2, problem=why)
    d = decide(obs(committed=True, deployment=rolling))
    assert d.status["phase"] == "Deploying"
    assert d.status["message"] == f"rolling out engine {D[:12]}; {why}"
    short = DeploymentView(D, 2, 2, 2, 2, 1, 1, total=2, problem=why)
    d = decide(obs(committed=True, deployment=short, status={"phase": "Ready"}))
    assert d.status["phase"] == "Degraded"
    assert d.status["message"] == f"1/2 serving replicas available; {why}"
    # The problem of another engine's pods is not this rollout's.
    other = DeploymentView("b" * 64, 2, 2, 2, 2, 2, 2, problem=why)
    assert why not in decide(obs(committed=True, deployment=other)).status["message"]


def test_building_message_carries_why_the_build_pod_does_not_run() -> None:
    from llmengine.reconcile.views import pod_problem

    unsched = {"conditions": [{"type": "PodScheduled", "status": "False", "message": "0/7 nodes are available"}]}
    why = pod_problem([pod("llme-build-x-abcde", digest="", **unsched)])  # no digest given: any pod counts
    assert why == "pod llme-build-x-abcde cannot be scheduled: 0/7 nodes are available"
    d = decide(obs(job=job(problem=why)))
    assert d.status["phase"] == "Building"
    assert d.status["message"] == f"building engine {D[:12]} (attempt 1); {why}"
    assert cond(d, "EngineBuilt")["message"].endswith(f"(attempt 1); {why}")
    assert decide(obs(job=job())).status["message"] == f"building engine {D[:12]} (attempt 1)"


def test_a_permanent_failure_stays_failed_after_the_api_server_prunes_the_status_and_the_job_expires() -> None:
    result = {"engineDigest": D, "succeeded": False, "stage": "fetch", "reason": "no such model", "permanent": True}
    j = job(active=False, failed=True, message=json.dumps(result), reason="BackoffLimitExceeded")
    first = decide(obs(job=j, status={"desiredEngine": {"digest": D}, "build": {"attempts": 1}}))
    stored = prune(first.status, status_schema())
    assert stored["build"] == first.status["build"], "the status schema drops build fields decide() relies on"
    # The failed Job is gone (its TTL): the engine stays Failed, no new build, no repeated warning.
    again = decide(obs(job=None, status=stored))
    assert again.status["phase"] == "Failed" and again.create_job is None
    assert not [e for e in again.events if e[1] == "BuildFailed"]


def test_available_while_the_old_engine_serves_a_rebuild_and_ready_only_once_the_new_one_does() -> None:
    old = DeploymentView("b" * 64, 1, 1, replicas=2, updated=2, ready=2, available=2, total=2)
    url = "http://llme-llama.ml.svc:8000"
    building = decide(obs(deployment=old, job=job(), url=url))
    assert cond(building, "Available")["status"] == "True" and cond(building, "Ready")["status"] == "False"
    assert building.status["url"] == url and "bbbbbbbbbbbb" in cond(building, "Available")["message"]
    new = DeploymentView(D, 1, 1, replicas=2, updated=2, ready=2, available=2, total=2)
    ready = decide(obs(deployment=new, committed=True, url=url))
    assert cond(ready, "Available")["status"] == "True" and cond(ready, "Ready")["status"] == "True"
    down = decide(obs(deployment=replace(new, available=1, ready=1), committed=True, url=url))
    assert cond(down, "Available")["status"] == "False" and cond(down, "Available")["reason"] == "Unavailable"
    none = decide(obs())
    assert cond(none, "Available")["reason"] == "NoServingPods" and "url" not in none.status


def test_a_failed_benchmark_gate_keeps_the_old_engine_and_announces_no_rollout() -> None:
    """The gate's verdict is part of the one decision: no Normal "Deploying ... rolling out" event on every pass
    while the old engine keeps serving, and Deployed does not claim a rollout."""
    from llmengine.api.bench import BenchNumbers, BenchOutcome
    from llmengine.api.v1alpha1 import BenchmarkSpec, BenchmarkThresholds
    from tests.unit.passes import SPEC, bench

    gated = SPEC.model_copy(
        update={"benchmark": BenchmarkSpec(thresholds=BenchmarkThresholds(min_requests_per_second=10))}
    )
    old = DeploymentView("b" * 64, 1, 1, replicas=2, updated=2, ready=2, available=2, total=2)
    slow = BenchOutcome(
        engine_digest=D, succeeded=True, numbers=BenchNumbers(requests_per_second=5.0), test_benchmark=True
    )
    done = bench(active=False, succeeded=True, outcome=slow)
    prior: dict[str, Any] = {"desiredEngine": {"digest": D}, "phase": "Deploying"}
    for i in range(3):  # every resync
        d = decide(obs(deployment=old, committed=True, status=prior, spec=gated, bench=done))
        assert d.status["phase"] == "Failed" and d.deploy_digest == "b" * 64 and not d.benchmarks
        assert not [e for e in d.events if e[1] == "Deploying"], d.events
        assert len([e for e in d.events if e[1] == "BenchmarkFailed"]) == (1 if i == 0 else 0), d.events
        assert cond(d, "Deployed")["reason"] == "BenchmarkFailed" and cond(d, "Stalled")["status"] == "True"
        assert cond(d, "BenchmarkPassed")["status"] == "False" and cond(d, "Available")["status"] == "True"
        prior = d.status
    first = decide(
        obs(deployment=old, committed=True, status={"desiredEngine": {"digest": D}, "phase": "Building"}, spec=gated)
    )
    assert first.benchmarks and first.status["benchmark"]["verdict"] == "Running"
    assert first.status["phase"] == "Deploying" and first.deploy_digest == "b" * 64
    assert cond(first, "Deployed")["reason"] == "Benchmarking"
    running = decide(obs(deployment=old, committed=True, status=first.status, spec=gated, bench=bench()))
    assert not running.benchmarks and running.status["phase"] == "Deploying" and not running.events


def test_an_engine_moving_between_phases_moves_one_count() -> None:
    from llmengine.reconcile.metrics import ENGINES, move_engine

    def n(phase: str) -> float:
        return float(ENGINES.labels(phase)._value.get())

    ready, building = n("Ready"), n("Building")
    move_engine(None, "Building")
    move_engine("Building", "Ready")
    move_engine("Ready", "Ready")
    assert (n("Building"), n("Ready")) == (building, ready + 1)
    move_engine("Ready", None)
    assert (n("Building"), n("Ready")) == (building, ready)


def test_losing_a_serving_pod_reports_degraded_every_time_and_a_crash_loop_stalls() -> None:
    ready = {"desiredEngine": {"digest": D}, "phase": "Ready"}
    # The moments of a lost pod the Deployment reports: the pod gone (fewer updated), then its replacement not
    # ready yet. Neither is a rollout.
    for updated, ready_, total in ((1, 1, 1), (2, 1, 2)):
        dep = DeploymentView(D, 1, 1, replicas=2, updated=updated, ready=ready_, available=ready_, total=total)
        d = decide(obs(deployment=dep, committed=True, status=ready))
        assert d.status["phase"] == "Degraded", (updated, d.status["message"])
        assert cond(d, "Deployed")["reason"] == "Unavailable" and cond(d, "Stalled")["status"] == "False"
    # More replicas asked for than the last pass saw is a scale-up, not a loss.
    scaled = DeploymentView(D, 2, 2, replicas=3, updated=2, ready=2, available=2, total=2)
    up = decide(obs(deployment=scaled, committed=True, status={**ready, "replicas": 2}, replicas=3))
    assert up.status["phase"] == "Deploying" and cond(up, "Deployed")["reason"] == "ScalingUp"
    # A new template is a rollout.
    rolling = DeploymentView(D, 2, 1, replicas=2, updated=0, ready=2, available=2, total=2)
    assert decide(obs(deployment=rolling, committed=True, status=ready)).status["phase"] == "Deploying"
    # The replacement crash-loops: waiting will not fix it.
    crash = "pod llme-x-1: container server failed (exit 1, 3 restart(s)): engine built for SM 9.0, GPU reports 8.0"
    dep = DeploymentView(D, 1, 1, replicas=2, updated=2, ready=1, available=1, total=2, problem=crash)
    d = decide(obs(deployment=dep, committed=True, status=ready))
    assert d.status["phase"] == "Degraded"
    assert cond(d, "Stalled")["status"] == "True" and cond(d, "Stalled")["reason"] == "ServingPodsFailing"
    assert crash in d.status["message"]
