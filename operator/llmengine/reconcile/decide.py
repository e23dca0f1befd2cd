"""The one decision of a pass: from a snapshot, the new status, the events and the actions. Pure: no I/O, no clock.

Plan, build and queue, rollout, the benchmark gate and the traffic envelope are judged here, in that order, on one
status object; nothing edits the decision afterwards.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmengine.api import conditions as cond
from llmengine.api.artifacts import BuildResult
from llmengine.api.conditions import Status
from llmengine.api.v1alpha1 import BuildStatus, Condition, EngineRef, LLMEngineStatus
from llmengine.clock import iso, parse_iso, seconds_between
from llmengine.reconcile import traffic
from llmengine.reconcile.actions import (
    Action,
    AdoptBuildJob,
    Attach,
    DeleteBuildJob,
    Detach,
    Grant,
    Quarantine,
    Serve,
    StartBenchmark,
    StartBuild,
)
from llmengine.reconcile.gate import GateStep, gate
from llmengine.reconcile.snapshot import Snapshot
from llmengine.reconcile.views import DeploymentView, JobView, corrupt_engine, last_line, needs_a_person
from llmengine.render import attachments
from llmengine.render.serving import image_for

PENDING, QUEUED, BUILDING, DEPLOYING, READY, DEGRADED, FAILED = (
    "Pending",
    "Queued",
    "Building",
    "Deploying",
    "Ready",
    "Degraded",
    "Failed",
)

Event = tuple[str, str, str]  # (type, reason, message)


def _has(actions: Sequence[Action], kind: type[Action]) -> bool:
    return any(isinstance(a, kind) for a in actions)


@dataclass(frozen=True)
class Decision:
    status: LLMEngineStatus
    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None  # seconds until the next pass is due; None: only on events

    def has(self, kind: type[Action]) -> bool:
        return _has(self.actions, kind)

    def serves(self) -> str | None:
        """The engine the Deployment is to serve; None: no Deployment yet."""
        return next((a.digest for a in self.actions if isinstance(a, Serve)), None)


@dataclass
class _Pass:
    """The decision being made: one status, the conditions, what to do. Local to decide()."""

    snap: Snapshot
    st: LLMEngineStatus
    conditions: list[Condition]
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue: float | None = None
    serve: str | None = None  # digest the Deployment serves after this pass

    def setc(self, type_: str, status: bool | Status, reason: str, message: str) -> None:
        self.conditions = cond.set_condition(
            self.conditions, type_, status, reason, message[:2048], self.snap.generation, iso(self.snap.now)
        )

    def has(self, kind: type[Action]) -> bool:
        return _has(self.actions, kind)

    def soon(self, seconds: float) -> None:
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


def failure_text(job: JobView) -> tuple[str, bool]:
    """One line saying why a build failed, and whether retrying the same request can never help."""
    result = BuildResult.parse(job.message) if job.message else None
    if result is not None and not result.succeeded:
        return (result.failure_line() or "build failed")[:1024], result.permanent
    if job.reason == "DeadlineExceeded":
        return "build exceeded its deadline (activeDeadlineSeconds)", False
    if job.message:
        return (last_line(job.message) or "build failed")[:1024], False
    return f"build Job failed ({job.reason or 'no reason given'})", False


def decide(snap: Snapshot) -> Decision:
    old = snap.status
    st = old.model_copy(deep=True)
    p = _Pass(snap, st, list(old.conditions or []))
    dep = snap.deployment
    st.gpu = _gpu_text(snap)
    st.replicas = snap.replicas
    st.ready_replicas = dep.ready if dep else 0
    st.url = snap.url if dep is not None else old.url
    st.selector = snap.selector
    # The Deployment keeps whatever it serves unless the desired engine is committed (and the gate lets it go).
    p.serve = dep.digest if dep else None
    _set_available(p, dep)

    plan = snap.plan
    if plan.internal_error:
        msg = f"the operator could not plan this engine: {plan.internal_error} (an operator fault, not the spec's)"
        p.setc(cond.STALLED, True, "InternalError", msg)
        p.setc(cond.RECONCILING, False, "InternalError", "retrying with backoff")
        p.setc(cond.READY, False, "InternalError", msg)
        p.soon(300.0)
        return _finish(p, PENDING, msg)
    if not plan.valid or snap.store is None:
        msg = "; ".join(f"{e.field}: {e.message}" for e in plan.errors)[:2048] or "spec: invalid"
        p.setc(cond.STALLED, True, "InvalidSpec", msg)
        p.setc(cond.RECONCILING, False, "InvalidSpec", "the spec can never build; fix it to continue")
        p.setc(cond.READY, False, "InvalidSpec", msg)
        return _finish(p, FAILED, msg)

    digest = plan.engine_digest
    build = st.build.model_copy() if st.build is not None else BuildStatus()
    if st.desired_engine is None or st.desired_engine.digest != digest:
        build = BuildStatus()  # a new identity: its build history starts afresh
    st.desired_engine = EngineRef(digest=digest, uri=snap.store.uri, short=digest[:12])

    store = snap.store
    phase, message = PENDING, ""
    if store.committed:
        p.serve = digest
        job = snap.job
        if job is not None and job.digest == digest and job.succeeded:
            took = seconds_between(job.started_at, job.completed_at)
            if took is not None:
                build.last_duration_seconds = took
        reason = "BuildSucceeded" if build.job else "StoreHit"
        p.setc(cond.ENGINE_BUILT, True, reason, f"engine {digest[:12]} is committed in the store")
        build.queue_position = None
        build.next_retry_at = None
        build.stage = build.stage_started_at = None
    elif store.committed is None:
        p.setc(cond.ENGINE_BUILT, "Unknown", "StoreUnreachable", store.error or "store unreachable")
        phase, message = PENDING, f"cannot check the engine store: {store.error}"
        p.soon(30.0)
    else:
        phase, message = _build_step(p, build)
    st.build = build if build.model_dump(exclude_none=True) else None
    job = snap.job
    if job is not None and snap.build_owned and snap.uid not in job.owners and not p.has(DeleteBuildJob):
        p.actions.append(AdoptBuildJob(job.name))

    stalled, stall_reason = phase == FAILED, "BuildFailed"
    if dep and dep.rolled_out and dep.available >= dep.replicas and dep.digest:
        uri = store.uri.replace(digest, dep.digest) if store.uri else None
        st.serving_engine = EngineRef(digest=dep.digest, uri=uri, short=dep.digest[:12])
    if store.committed:
        phase, message = _rollout_step(p, dep, digest)
        if phase in (DEPLOYING, DEGRADED) and dep is not None and dep.digest == digest and needs_a_person(dep.problem):
            if corrupt_engine(dep.problem) and not build.quarantined_at:
                # The store's copy is damaged: take it out of service (kept for inspection) and build it again,
                # once. The pods' downloads retry and take the new commit of the same identity.
                phase, message = _quarantine(p, build, digest, dep.problem or "")
                st.build = build
            else:
                # A crash loop, or an engine that failed verification again after its rebuild, will not heal by
                # waiting: kstatus Failed, as Argo CD's Degraded already says.
                stalled, stall_reason = True, "ServingPodsFailing"
        step = _gate(snap, dep)
        if step is not None:
            phase, message = _apply_gate(p, step, phase, message, dep.digest if dep else None)
            if phase == FAILED:
                stalled, stall_reason = True, "BenchmarkFailed"
    elif dep is not None:
        p.setc(cond.DEPLOYED, False, "WaitingForEngine", f"serving the previous engine until {digest[:12]} is built")
    if build.quarantined_at and not store.committed and not stalled:
        # Rebuilding a quarantined engine needs a person's attention until the new one commits.
        stalled, stall_reason = True, "EngineQuarantined"
        message = f"{message}; engine {digest[:12]} was quarantined ({build.quarantine_reason}): rebuilding it once"

    if p.serve is not None:
        current = dep.image if dep is not None else None
        p.actions.append(Serve(p.serve, image_for(p.serve, digest, plan.server_image, current), snap.replicas))
        _attachments(p)
    p.setc(cond.STALLED, stalled, stall_reason if stalled else "Progressing", message if stalled else "")
    p.setc(cond.RECONCILING, phase not in (READY, FAILED), phase, message if phase not in (READY, FAILED) else "")
    p.setc(cond.READY, phase == READY, phase, message)
    if phase == READY and snap.spec is not None and snap.traffic_on:
        st.conditions = p.conditions
        if traffic.judge(snap, st, p.events):
            p.soon(0.05)  # plan again at once with the raised shapes
        p.conditions = list(st.conditions or [])
    _grant(p, dep)
    return _finish(p, phase, message)


def _grant(p: _Pass, dep: DeploymentView | None) -> None:
    """Without store keys in the namespace, the pods read through a grant: before anything starts a pod, it covers
    the committed desired engine and the one the Deployment serves, and has at least half its lifetime left."""
    snap = p.snap
    if snap.grant_seconds is None or snap.store is None or not snap.store.committed:
        return
    wanted = tuple(sorted({snap.plan.engine_digest, *([dep.digest] if dep is not None and dep.digest else [])}))
    grant = snap.grant
    if grant is not None and grant.digests == wanted:
        left = (grant.expires_at - snap.now).total_seconds()
        if left >= snap.grant_seconds / 2:
            return
    p.actions.insert(0, Grant(wanted))


def _attachments(p: _Pass) -> None:
    """Next to a served Deployment: what the spec asks for (HPA, Ingress, HTTPRoute) as rendered, nothing else."""
    wanted = attachments.wanted(p.snap.spec) if p.snap.spec is not None else ()
    p.actions += [Attach(kind) for kind in wanted]
    p.actions += [Detach(kind) for kind, view in sorted(p.snap.attachments.items()) if view and kind not in wanted]


def _quarantine(p: _Pass, build: BuildStatus, digest: str, problem: str) -> tuple[str, str]:
    reason = problem[:512]
    p.actions.append(Quarantine(digest, reason))
    if p.snap.job is not None:
        p.actions.append(DeleteBuildJob())  # the build that made it: the rebuild takes the name
    build.quarantined_at, build.quarantine_reason = iso(p.snap.now), reason
    build.attempts = build.failed_attempt = build.last_failure = build.job = build.next_retry_at = None
    build.last_duration_seconds = build.stage = build.stage_started_at = None
    message = f"engine {digest[:12]} failed verification in the store and was quarantined; rebuilding it: {reason}"
    p.events.append(("Warning", "EngineQuarantined", message))
    p.setc(cond.ENGINE_BUILT, False, "Quarantined", message)
    p.soon(1.0)
    return BUILDING, message


def _rollout_step(p: _Pass, dep: DeploymentView | None, digest: str) -> tuple[str, str]:
    """The desired engine is committed: roll it out, or say how far the Deployment is from serving it."""
    snap = p.snap
    trouble = f"; {dep.problem}" if dep is not None and dep.digest == digest and dep.problem else ""
    deployed = bool(dep and dep.digest == digest and dep.rolled_out and dep.available >= snap.replicas)
    if not deployed:
        # A pod that can not start changes nothing the Deployment reports: look again soon, so that its problem
        # (a crash loop, a failed download, no node) reaches the status within seconds. Every pod that gets ready
        # moves the Deployment's status, and that event wakes the engine at once: the look is for what no event says.
        p.soon(_pod_look_seconds(p))
    if _rolling_out(dep, digest):
        message = f"rolling out engine {digest[:12]}{trouble}"
        p.setc(cond.DEPLOYED, False, "RollingOut", message)
        return DEPLOYING, message
    assert dep is not None
    if dep.available < snap.replicas or not dep.rolled_out:
        # Same template, fewer pods (one lost, being replaced): a loss, not a rollout.
        # More replicas asked for than the last pass saw (kubectl scale, an autoscaler): a scale-up, not a loss.
        seen = snap.status.replicas
        scaling = seen is not None and seen < snap.replicas
        was_ready = snap.status.phase in (READY, DEGRADED) and not scaling
        message = f"{dep.available}/{snap.replicas} serving replicas available{trouble}"
        reason = "Unavailable" if was_ready else ("ScalingUp" if scaling else "RollingOut")
        p.setc(cond.DEPLOYED, False, reason, message)
        return (DEGRADED if was_ready else DEPLOYING), message
    message = f"serving engine {digest[:12]} on {snap.replicas} replica(s)"
    p.setc(cond.DEPLOYED, True, "Available", message)
    return READY, message


# How often a pass looks at the pods of an engine that is not yet served by all its replicas: every 5 s at first,
# then a quarter of the time it has been so, up to 30 s. A problem at the start shows within seconds; a long rollout
# (1,000 engines at once, large engines downloading) is not looked at 12 times a minute per engine for its whole length.
POD_LOOK_FIRST_S, POD_LOOK_MAX_S = 5.0, 30.0


def _pod_look_seconds(p: _Pass) -> float:
    """Counted from when this rollout could start: the later of Deployed turning False and EngineBuilt turning True
    (this pass's conditions), so that an engine that built for an hour is still looked at every 5 s as it rolls out.
    Deployed not False yet: this pass is the start (a new loss, a new rollout)."""
    deployed = cond.get_condition(p.conditions, cond.DEPLOYED)
    if deployed is None or deployed.status != "False":
        return POD_LOOK_FIRST_S
    built = cond.get_condition(p.conditions, cond.ENGINE_BUILT)
    starts = [deployed.last_transition_time, built.last_transition_time if built and built.status == "True" else None]
    since = max((t for t in map(parse_iso, starts) if t is not None), default=p.snap.now)
    waited = (p.snap.now - since).total_seconds()
    return min(POD_LOOK_MAX_S, max(POD_LOOK_FIRST_S, waited / 4))


def _gate(snap: Snapshot, dep: DeploymentView | None) -> GateStep | None:
    bench = snap.spec.benchmark if snap.spec is not None else None
    return gate(bench, snap.plan.engine_digest, dep.digest if dep else None, snap.status.benchmark, snap.bench)


def _apply_gate(p: _Pass, step: GateStep, phase: str, message: str, serving: str | None) -> tuple[str, str]:
    """The benchmark gate on a committed engine: its status and condition, and while it holds, the serving engine
    stays (nothing new rolls out) and the phase says why: Deploying while it runs, Failed when it said no."""
    p.st.benchmark = step.status
    if step.event:
        p.events.append(step.event)
    if step.condition:
        status_, reason, msg = step.condition
        p.setc(cond.BENCHMARK_PASSED, status_, reason, msg)
    if step.create_job:
        p.actions.append(StartBenchmark())
    if not step.hold:
        return phase, message
    p.serve = serving
    p.setc(cond.DEPLOYED, False, "BenchmarkFailed" if step.failed else "Benchmarking", step.message)
    if not step.failed:
        p.soon(10.0)
    return (FAILED if step.failed else DEPLOYING), step.message[:2048]


def _rolling_out(dep: DeploymentView | None, digest: str) -> bool:
    """A rollout is under way: no Deployment of this engine yet, a template the controller has not acted on, or
    pods of an older template left. A missing pod of the current template is not one."""
    if dep is None or dep.digest != digest:
        return True
    return dep.observed_generation < dep.generation or (dep.total is not None and dep.total > dep.updated)


def _set_available(p: _Pass, dep: DeploymentView | None) -> None:
    """Available: the spec's replicas are served, by whichever engine (a rebuild keeps the old one serving), as
    distinct from Ready (the desired engine rolled out)."""
    replicas = p.snap.replicas
    if dep is None or not dep.digest:
        p.setc(cond.AVAILABLE, False, "NoServingPods", "no serving Deployment yet")
    elif dep.available >= replicas:
        p.setc(
            cond.AVAILABLE, True, "Serving", f"engine {dep.digest[:12]} serves {dep.available}/{replicas} replica(s)"
        )
    else:
        p.setc(cond.AVAILABLE, False, "Unavailable", f"{dep.available}/{replicas} serving replica(s) available")


def _build_step(p: _Pass, build: BuildStatus) -> tuple[str, str]:
    """The desired engine is not in the store: queue, start, watch or retry its build."""
    snap = p.snap
    digest, job, now = snap.plan.engine_digest, snap.job, snap.now
    attempts = build.attempts or 0
    if job is not None and job.digest == digest:
        build.job = job.name
        build.started_at = job.started_at
        attempts = max(attempts, job.attempt)
        build.attempts = attempts
        if not job.ended:
            build.queue_position = None
            progress = snap.progress if snap.progress and snap.progress.engine_digest == digest else None
            if progress is not None:
                build.stage, build.stage_started_at = progress.stage, progress.since
            stage = f": {build.stage}" if build.stage else ""
            trouble = f"; {job.problem}" if job.problem else ""
            running = f"build Job {job.name} is running (attempt {attempts}){stage}{trouble}"
            p.setc(cond.ENGINE_BUILT, False, "Building", running)
            p.soon(15.0)  # the stage moves and a build pod's trouble shows without any Job event
            return BUILDING, f"building engine {digest[:12]} (attempt {attempts}){stage}{trouble}"
        build.stage = build.stage_started_at = None
        text, permanent = (
            failure_text(job) if job.failed else ("the build finished but the store holds no committed manifest", False)
        )
        if build.last_failure != text or build.failed_attempt != attempts:
            p.events.append(("Warning", "BuildFailed", f"attempt {attempts}: {text}"))
        build.last_failure = text
        build.failed_attempt = attempts
        if permanent or attempts >= snap.limits.max_attempts:
            why = "not retried: the request can never build" if permanent else f"gave up after {attempts} attempts"
            p.setc(cond.ENGINE_BUILT, False, "BuildFailed", f"{text} ({why})")
            build.next_retry_at = None
            return FAILED, f"build failed: {text} ({why})"
        wait = backoff_seconds(attempts, snap.limits.backoff_base, snap.limits.backoff_max)
        build.next_retry_at = build.next_retry_at or iso(now + datetime.timedelta(seconds=wait))
        p.actions.append(DeleteBuildJob())
        p.soon(1.0)
        p.setc(cond.ENGINE_BUILT, False, "BuildFailed", f"{text}; retry at {build.next_retry_at}")
        return BUILDING, f"build attempt {attempts} failed: {text}; retrying at {build.next_retry_at}"

    if build.last_failure and build.failed_attempt == attempts and not build.next_retry_at:
        return FAILED, f"build failed: {build.last_failure}"
    due = parse_iso(build.next_retry_at)
    if due and due > now:
        p.soon((due - now).total_seconds())
        p.setc(cond.ENGINE_BUILT, False, "BackingOff", f"{build.last_failure}; retry at {build.next_retry_at}")
        return BUILDING, f"build attempt {attempts} failed: {build.last_failure}; retrying at {build.next_retry_at}"
    if snap.building_elsewhere:
        build.queue_position = None
        p.soon(15.0)
        why = f"engine {digest[:12]} is being built by Job {snap.building_elsewhere} (another engine of this identity)"
        p.setc(cond.ENGINE_BUILT, False, "BuildingElsewhere", why)
        return BUILDING, why
    if snap.queue_position > 0:
        build.queue_position = snap.queue_position
        p.soon(15.0)
        p.setc(cond.ENGINE_BUILT, False, "Queued", f"waiting for a build slot (position {snap.queue_position})")
        return QUEUED, f"build queued at position {snap.queue_position}"
    build.queue_position = None
    build.next_retry_at = None
    build.attempts = attempts + 1
    p.actions.append(StartBuild(attempts + 1))
    name = snap.plan.build_job
    p.events.append(("Normal", "BuildStarted", f"build Job {name} (attempt {attempts + 1})"))
    p.soon(5.0)
    p.setc(cond.ENGINE_BUILT, False, "Building", f"starting build attempt {attempts + 1}")
    return BUILDING, f"building engine {digest[:12]} (attempt {attempts + 1})"


def _gpu_text(snap: Snapshot) -> str:
    plan = snap.plan
    if plan.mig_profile:
        return f"{plan.gpu.name}/{plan.mig_profile}"
    return f"{plan.gpu.name} x{plan.gpu_count}"


def _finish(p: _Pass, phase: str, message: str) -> Decision:
    st = p.st
    st.phase = phase  # type: ignore[assignment]
    st.message = message
    st.observed_generation = p.snap.generation
    st.conditions = p.conditions
    if p.snap.status.phase != phase:
        kind = "Warning" if phase in (FAILED, DEGRADED) else "Normal"
        p.events.append((kind, phase, message or phase))
    return Decision(status=st, actions=tuple(p.actions), events=tuple(p.events), requeue_after=p.requeue)
