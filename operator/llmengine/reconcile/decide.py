"""Pure policy: from what is observed, decide what to do and what the status says. No I/O here."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmengine.api import conditions as cond
from llmengine.api.artifacts import BuildResult
from llmengine.reconcile.gate import BENCHMARK_PASSED, GateStep
from llmengine.text import one_line

PENDING, QUEUED, BUILDING, DEPLOYING, READY, DEGRADED, FAILED = (
    "Pending",
    "Queued",
    "Building",
    "Deploying",
    "Ready",
    "Degraded",
    "Failed",
)


@dataclass(frozen=True)
class JobView:
    name: str
    digest: str
    attempt: int
    active: bool
    succeeded: bool
    failed: bool
    message: str | None  # the builder's termination message, when it ended
    reason: str | None  # the Job controller's reason (DeadlineExceeded, BackoffLimitExceeded, ...)
    started_at: str | None
    completed_at: str | None
    problem: str | None = None  # why its pod is not running yet (pod_problem), while the Job has not ended


@dataclass(frozen=True)
class DeploymentView:
    digest: str | None
    generation: int
    observed_generation: int
    replicas: int
    updated: int
    ready: int
    available: int
    total: int | None = None  # status.replicas: pods of every ReplicaSet, old ones included
    problem: str | None = None  # why a pod of the desired engine is not Ready (pod_problem), when one says

    @property
    def rolled_out(self) -> bool:
        """Every pod runs the new template and no old pod is left (availability is judged on its own)."""
        no_old = self.total is None or self.total <= self.updated
        return self.observed_generation >= self.generation and self.updated >= self.replicas and no_old


_WAITING_TROUBLE = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


def _last_line(text: str | None) -> str:
    """The last non-blank line of a termination message. With FallbackToLogsOnError the message is the log's
    tail, whose last line is the error (the builder's and the server's entrypoints end on a one-line summary)."""
    lines = [ln for ln in str(text or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _container_problem(cs: Mapping[str, Any], kind: str) -> str | None:
    state, last = cs.get("state") or {}, cs.get("lastState") or {}
    name, restarts = cs.get("name", "?"), int(cs.get("restartCount") or 0)
    waiting = state.get("waiting") or {}
    # The last run's end explains the state only while the container waits to run again (a crash loop); a container
    # running again after an old crash has no problem to report.
    term = state.get("terminated") or (last.get("terminated") if waiting else None) or {}
    if term and int(term.get("exitCode") or 0) != 0:
        detail = _last_line(term.get("message")) or term.get("reason") or ""
        again = f", {restarts} restart(s)" if restarts else ""
        return f"{kind} {name} failed (exit {term.get('exitCode')}{again}): {one_line(detail, 240)}".rstrip(": ")
    if waiting.get("reason") in _WAITING_TROUBLE:
        return f"{kind} {name} {waiting['reason']}: {one_line(waiting.get('message') or '', 240)}".rstrip(": ")
    return None


def pod_problem(
    pods: Sequence[Mapping[str, Any]], digest: str | None = None, digest_annotation: str = ""
) -> str | None:
    """One line saying why a pod (of engine `digest`, when given) is not Ready, from what the kubelet and the
    scheduler wrote in its status: a failed init container (the engine download or the GPU preflight) with its
    termination message, a container that cannot start or keeps crashing, or a pod no node can take. None when no
    pod says."""
    for pod in sorted(pods, key=lambda p: str(p.get("metadata", {}).get("name", ""))):
        md, st = pod.get("metadata") or {}, pod.get("status") or {}
        if md.get("deletionTimestamp"):
            continue
        if digest is not None and (md.get("annotations") or {}).get(digest_annotation) != digest:
            continue
        conds = {c.get("type"): c for c in st.get("conditions") or []}
        if (conds.get("Ready") or {}).get("status") == "True":
            continue
        name = md.get("name", "?")
        sched = conds.get("PodScheduled") or {}
        if sched.get("status") == "False":
            why = sched.get("message") or sched.get("reason") or "not scheduled"
            return f"pod {name} cannot be scheduled: {one_line(why, 240)}"
        for kind, key in (("init container", "initContainerStatuses"), ("container", "containerStatuses")):
            for cs in st.get(key) or []:
                problem = _container_problem(cs, kind)
                if problem:
                    return f"pod {name}: {problem}"
    return None


@dataclass(frozen=True)
class Observed:
    generation: int
    valid: bool
    errors: list[tuple[str, str]]
    desired_digest: str
    desired_uri: str | None
    gpu: str
    replicas: int
    committed: bool | None  # None: the store could not be asked
    store_error: str | None
    job: JobView | None
    deployment: DeploymentView | None
    queue_position: int  # 0: a build may start now
    status: dict[str, Any]  # the status as it is now
    now: datetime.datetime
    max_attempts: int
    backoff_base: float
    backoff_max: float
    url: str | None = None  # the Service's in-cluster base URL
    selector: str | None = None  # label selector of the serving pods (scale subresource)
    # The benchmark gate's verdict on the committed desired engine (gate.gate over this snapshot), None: no gate.
    gate: GateStep | None = None


@dataclass
class Decision:
    status: dict[str, Any]
    create_job: int | None = None  # attempt number of the Job to create
    delete_job: bool = False
    deploy_digest: str | None = None  # the engine the Deployment should serve; None: no Deployment yet
    requeue_after: float | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


def _iso(t: datetime.datetime) -> str:
    return t.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _parse_iso(s: str | None) -> datetime.datetime | None:
    if not s:
        return None
    try:
        return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


def parse_build_result(message: str | None) -> BuildResult | None:
    """The builder's termination message is a BuildResult; anything else (logs, garbage) yields None."""
    if not message:
        return None
    try:
        # Not json.loads: a deeply nested message would raise RecursionError out of the reconcile loop.
        return BuildResult.model_validate_json(message)
    except ValueError:
        return None


def failure_text(job: JobView) -> tuple[str, bool]:
    """One line saying why a build failed, and whether retrying the same request can never help."""
    result = parse_build_result(job.message)
    if result is not None and not result.succeeded:
        parts = [p.strip() for p in (result.stage, result.reason, result.message) if p and p.strip()]
        return (": ".join(parts) or "build failed")[:1024], result.permanent
    if job.reason == "DeadlineExceeded":
        return "build exceeded its deadline (activeDeadlineSeconds)", False
    if job.message:
        return (_last_line(job.message) or "build failed")[:1024], False
    return f"build Job failed ({job.reason or 'no reason given'})", False


def decide(o: Observed) -> Decision:
    st: dict[str, Any] = {
        k: v for k, v in o.status.items() if k not in ("phase", "message", "observedGeneration", "conditions")
    }
    conditions: list[dict[str, Any]] = list(o.status.get("conditions") or [])
    gen = o.generation
    dep = o.deployment
    build: dict[str, Any] = dict(st.get("build") or {})
    d = Decision(status=st)
    st["gpu"] = o.gpu
    st["replicas"] = o.replicas
    st["readyReplicas"] = dep.ready if dep else 0
    if dep is not None and o.url:
        st["url"] = o.url
    if o.selector:
        st["selector"] = o.selector

    def setc(t: str, s: bool | str, reason: str, msg: str) -> None:
        nonlocal conditions
        conditions = cond.set_condition(conditions, t, s, reason, msg, gen, _iso(o.now))

    # The Deployment keeps whatever it serves unless the desired engine is committed.
    d.deploy_digest = dep.digest if dep else None
    _set_available(dep, o.replicas, setc)

    if not o.valid:
        msg = "; ".join(f"{f}: {m}" for f, m in o.errors)[:2048]
        setc(cond.STALLED, True, "InvalidSpec", msg)
        setc(cond.RECONCILING, False, "InvalidSpec", "the spec can never build; fix it to continue")
        setc(cond.READY, False, "InvalidSpec", msg)
        return _finish(d, o, st, conditions, FAILED, msg)

    digest = o.desired_digest
    if st.get("desiredEngine", {}).get("digest") != digest:
        # A new identity: its build history starts afresh.
        build = {}
    st["desiredEngine"] = {"digest": digest, "uri": o.desired_uri, "short": digest[:12]}

    phase = PENDING
    message = ""
    if o.committed:
        d.deploy_digest = digest
        if o.job and o.job.digest == digest and o.job.succeeded and o.job.started_at and o.job.completed_at:
            s, e = _parse_iso(o.job.started_at), _parse_iso(o.job.completed_at)
            if s and e:
                build["lastDurationSeconds"] = (e - s).total_seconds()
        reason = "BuildSucceeded" if build.get("job") else "StoreHit"
        setc(cond.ENGINE_BUILT, True, reason, f"engine {digest[:12]} is committed in the store")
        build.pop("queuePosition", None)
        build.pop("nextRetryAt", None)
    elif o.committed is None:
        setc(cond.ENGINE_BUILT, "Unknown", "StoreUnreachable", o.store_error or "store unreachable")
        phase, message = (PENDING, f"cannot check the engine store: {o.store_error}")
        d.requeue_after = 30.0
    else:
        phase, message = _build_step(o, d, build, setc)

    st["build"] = {k: v for k, v in build.items() if v is not None}
    if not st["build"]:
        st.pop("build")

    stalled = phase == FAILED
    stall_reason = "BuildFailed"
    # Rollout state of the Deployment.
    deployed = bool(dep and dep.digest == digest and dep.rolled_out and dep.available >= o.replicas)
    if dep and dep.rolled_out and dep.available >= dep.replicas and dep.digest:
        st["servingEngine"] = {
            "digest": dep.digest,
            "uri": _uri_like(o.desired_uri, digest, dep.digest),
            "short": dep.digest[:12],
        }
    if o.committed:
        trouble = f"; {dep.problem}" if dep is not None and dep.digest == digest and dep.problem else ""
        if _rolling_out(dep, digest):
            phase, message = DEPLOYING, f"rolling out engine {digest[:12]}{trouble}"
            setc(cond.DEPLOYED, False, "RollingOut", message)
        elif dep is not None and (dep.available < o.replicas or not dep.rolled_out):
            # Same template, fewer pods (one lost, being replaced): a loss, not a rollout.
            # More replicas asked for than the last pass saw (kubectl scale, an autoscaler): a scale-up, not a loss.
            seen = o.status.get("replicas")
            scaling = isinstance(seen, int) and seen < o.replicas
            was_ready = o.status.get("phase") in (READY, DEGRADED) and not scaling
            phase = DEGRADED if was_ready else DEPLOYING
            message = f"{dep.available}/{o.replicas} serving replicas available{trouble}"
            reason = "Unavailable" if was_ready else ("ScalingUp" if scaling else "RollingOut")
            setc(cond.DEPLOYED, False, reason, message)
        else:
            phase, message = READY, f"serving engine {digest[:12]} on {o.replicas} replica(s)"
            setc(cond.DEPLOYED, True, "Available", message)
        if phase in (DEPLOYING, DEGRADED) and dep is not None and dep.digest == digest and _needs_a_person(dep.problem):
            # A crash loop or an engine that fails verification will not heal by waiting: kstatus Failed, as Argo
            # CD's Degraded already says.
            stalled, stall_reason = True, "ServingPodsFailing"
        if not deployed:
            d.requeue_after = d.requeue_after or 30.0
        if o.gate is not None:
            phase, message = _apply_gate(o.gate, d, st, setc, phase, message, dep.digest if dep else None)
            if phase == FAILED:
                stalled, stall_reason = True, "BenchmarkFailed"
    elif dep is not None:
        setc(cond.DEPLOYED, False, "WaitingForEngine", f"serving the previous engine until {digest[:12]} is built")

    setc(cond.STALLED, stalled, stall_reason if stalled else "Progressing", message if stalled else "")
    setc(cond.RECONCILING, phase not in (READY, FAILED), phase, message if phase not in (READY, FAILED) else "")
    setc(cond.READY, phase == READY, phase, message)
    return _finish(d, o, st, conditions, phase, message)


def _apply_gate(
    step: GateStep, d: Decision, st: dict[str, Any], setc: Any, phase: str, message: str, serving: str | None
) -> tuple[str, str]:
    """The benchmark gate on a committed engine: its status and condition, and while it holds, the serving engine
    stays (nothing new rolls out) and the phase says why: Deploying while it runs, Failed when it said no."""
    st["benchmark"] = step.status
    if step.event:
        d.events.append(step.event)
    if step.condition:
        status_, reason, msg = step.condition
        setc(BENCHMARK_PASSED, status_, reason, msg[:2048])
    if not step.hold:
        return phase, message
    d.deploy_digest = serving
    reason = "BenchmarkFailed" if step.failed else "Benchmarking"
    setc(cond.DEPLOYED, False, reason, step.message[:2048])
    if not step.failed:
        d.requeue_after = min(d.requeue_after or 10.0, 10.0)
    return (FAILED if step.failed else DEPLOYING), step.message[:2048]


def _rolling_out(dep: DeploymentView | None, digest: str) -> bool:
    """A rollout is under way: no Deployment of this engine yet, a template the controller has not acted on, or
    pods of an older template left. A missing pod of the current template is not one."""
    if dep is None or dep.digest != digest:
        return True
    return dep.observed_generation < dep.generation or (dep.total is not None and dep.total > dep.updated)


def _needs_a_person(problem: str | None) -> bool:
    """A pod problem that waiting does not fix: a container failing again and again, or one that cannot start."""
    if not problem:
        return False
    return "restart(s)" in problem or any(reason in problem for reason in _WAITING_TROUBLE)


def _set_available(dep: DeploymentView | None, replicas: int, setc: Any) -> None:
    """Available: the spec's replicas are served, by whichever engine (a rebuild keeps the old one serving), as
    distinct from Ready (the desired engine rolled out)."""
    if dep is None or not dep.digest:
        setc(cond.AVAILABLE, False, "NoServingPods", "no serving Deployment yet")
    elif dep.available >= replicas:
        setc(cond.AVAILABLE, True, "Serving", f"engine {dep.digest[:12]} serves {dep.available}/{replicas} replica(s)")
    else:
        setc(cond.AVAILABLE, False, "Unavailable", f"{dep.available}/{replicas} serving replica(s) available")


def _build_step(o: Observed, d: Decision, build: dict[str, Any], setc: Any) -> tuple[str, str]:
    """The desired engine is not in the store: queue, start, watch or retry its build."""
    digest, job = o.desired_digest, o.job
    attempts = int(build.get("attempts") or 0)
    if job is not None and job.digest == digest:
        build["job"] = job.name
        build["startedAt"] = job.started_at
        attempts = max(attempts, job.attempt)
        build["attempts"] = attempts
        if job.active or not (job.failed or job.succeeded):
            build.pop("queuePosition", None)
            trouble = f"; {job.problem}" if job.problem else ""
            setc(cond.ENGINE_BUILT, False, "Building", f"build Job {job.name} is running (attempt {attempts}){trouble}")
            return BUILDING, f"building engine {digest[:12]} (attempt {attempts}){trouble}"
        text, permanent = (
            failure_text(job) if job.failed else ("the build finished but the store holds no committed manifest", False)
        )
        if build.get("lastFailure") != text or build.get("failedAttempt") != attempts:
            d.events.append(("Warning", "BuildFailed", f"attempt {attempts}: {text}"))
        build["lastFailure"] = text
        build["failedAttempt"] = attempts
        if permanent or attempts >= o.max_attempts:
            why = "not retried: the request can never build" if permanent else f"gave up after {attempts} attempts"
            setc(cond.ENGINE_BUILT, False, "BuildFailed", f"{text} ({why})")
            build.pop("nextRetryAt", None)
            return FAILED, f"build failed: {text} ({why})"
        retry_at = o.now + datetime.timedelta(seconds=backoff_seconds(attempts, o.backoff_base, o.backoff_max))
        build.setdefault("nextRetryAt", _iso(retry_at))
        d.delete_job = True
        d.requeue_after = 1.0
        setc(cond.ENGINE_BUILT, False, "BuildFailed", f"{text}; retry at {build['nextRetryAt']}")
        return BUILDING, f"build attempt {attempts} failed: {text}; retrying at {build['nextRetryAt']}"

    if build.get("lastFailure") and build.get("failedAttempt") == attempts and not build.get("nextRetryAt"):
        return FAILED, f"build failed: {build['lastFailure']}"
    due = _parse_iso(build.get("nextRetryAt"))
    if due and due > o.now:
        d.requeue_after = (due - o.now).total_seconds()
        setc(cond.ENGINE_BUILT, False, "BackingOff", f"{build.get('lastFailure')}; retry at {build['nextRetryAt']}")
        return (
            BUILDING,
            f"build attempt {attempts} failed: {build.get('lastFailure')}; retrying at {build['nextRetryAt']}",
        )
    if o.queue_position > 0:
        build["queuePosition"] = o.queue_position
        d.requeue_after = 15.0
        setc(cond.ENGINE_BUILT, False, "Queued", f"waiting for a build slot (position {o.queue_position})")
        return QUEUED, f"build queued at position {o.queue_position}"
    build.pop("queuePosition", None)
    build.pop("nextRetryAt", None)
    build["attempts"] = attempts + 1
    d.create_job = attempts + 1
    d.requeue_after = 5.0
    setc(cond.ENGINE_BUILT, False, "Building", f"starting build attempt {attempts + 1}")
    return BUILDING, f"building engine {digest[:12]} (attempt {attempts + 1})"


def _uri_like(desired_uri: str | None, desired: str, digest: str) -> str | None:
    return desired_uri.replace(desired, digest) if desired_uri else None


def _finish(
    d: Decision, o: Observed, st: dict[str, Any], conditions: list[dict[str, Any]], phase: str, message: str
) -> Decision:
    st["phase"] = phase
    st["message"] = message
    st["observedGeneration"] = o.generation
    st["conditions"] = conditions
    if o.status.get("phase") != phase:
        kind = "Warning" if phase in (FAILED, DEGRADED) else "Normal"
        d.events.append((kind, phase, message or phase))
    return d
