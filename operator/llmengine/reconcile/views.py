"""What a pass observes, read from the objects as the API server returns them. Pure: recorded objects in, views out.

The views are the parts of a Job, a Deployment and their pods that the decision reads; everything else stays in
the objects. Reading is forgiving: a missing or malformed field reads as "not yet", never as an exception.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from llmengine.api.artifacts import EngineGrant
from llmengine.api.bench import BenchOutcome
from llmengine.clock import parse_iso
from llmengine.render import common, grants, serving
from llmengine.text import one_line

Obj = Mapping[str, Any]


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
    owners: tuple[str, ...] = ()  # uids of its owners: every engine of its identity joins them

    @property
    def ended(self) -> bool:
        return self.succeeded or self.failed


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
    render_hash: str | None = None  # what the operator last rendered into it
    resource_version: str | None = None
    image: str | None = None  # the server image it runs
    attachments: tuple[str, ...] = ()  # kinds rendered next to it at its last render (HPA, Ingress, HTTPRoute)

    @property
    def rolled_out(self) -> bool:
        """Every pod runs the new template and no old pod is left (availability is judged on its own)."""
        no_old = self.total is None or self.total <= self.updated
        return self.observed_generation >= self.generation and self.updated >= self.replicas and no_old


@dataclass(frozen=True)
class BenchView:
    """The benchmark Job of the desired engine."""

    name: str
    active: bool
    succeeded: bool
    failed: bool
    outcome: BenchOutcome | None


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


def last_line(text: str | None) -> str:
    """The last non-blank line of a termination message. With FallbackToLogsOnError the message is the log's
    tail, whose last line is the error (the builder's and the server's entrypoints end on a one-line summary)."""
    lines = [ln for ln in str(text or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _container_problem(cs: Obj, kind: str) -> str | None:
    state, last = cs.get("state") or {}, cs.get("lastState") or {}
    name, restarts = cs.get("name", "?"), int(cs.get("restartCount") or 0)
    waiting = state.get("waiting") or {}
    # The last run's end explains the state only while the container waits to run again (a crash loop); a container
    # running again after an old crash has no problem to report.
    term = state.get("terminated") or (last.get("terminated") if waiting else None) or {}
    if term and int(term.get("exitCode") or 0) != 0:
        detail = last_line(term.get("message")) or term.get("reason") or ""
        again = f", {restarts} restart(s)" if restarts else ""
        return f"{kind} {name} failed (exit {term.get('exitCode')}{again}): {one_line(detail, 240)}".rstrip(": ")
    if waiting.get("reason") in _WAITING_TROUBLE:
        return f"{kind} {name} {waiting['reason']}: {one_line(waiting.get('message') or '', 240)}".rstrip(": ")
    return None


def pod_problem(pods: Sequence[Obj], digest: str | None = None) -> str | None:
    """One line saying why a pod (of engine `digest`, when given) is not Ready, from what the kubelet and the
    scheduler wrote in its status: a failed init container (the engine download or the GPU preflight) with its
    termination message, a container that cannot start or keeps crashing, or a pod no node can take. None when no
    pod says."""
    for pod in sorted(pods, key=lambda p: str(p.get("metadata", {}).get("name", ""))):
        md, st = pod.get("metadata") or {}, pod.get("status") or {}
        if md.get("deletionTimestamp"):
            continue
        if digest is not None and (md.get("annotations") or {}).get(common.DIGEST_ANNOTATION) != digest:
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


def needs_a_person(problem: str | None) -> bool:
    """A pod problem that waiting does not fix: a container failing again and again, or one that cannot start."""
    if not problem:
        return False
    return "restart(s)" in problem or any(reason in problem for reason in _WAITING_TROUBLE)


# What the serving pods' download says when the store's bytes do not match the manifest (clients/store).
_CORRUPTION = ("failed verification", "truncated or replaced", "is listed in the manifest but missing")


def corrupt_engine(problem: str | None) -> bool:
    """A pod problem that says the committed engine in the store is damaged, not the pod or its node."""
    return bool(problem) and any(text in str(problem) for text in _CORRUPTION)


def termination_message(pods: Sequence[Obj]) -> str | None:
    """The first termination message a container of these pods left (a Job's result envelope)."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term.get("message"):
                return str(term["message"])
    return None


def _true_conditions(obj: Obj) -> dict[str, Obj]:
    st = obj.get("status") or {}
    return {c["type"]: c for c in st.get("conditions") or [] if c.get("status") == "True" and "type" in c}


def job_view(job: Obj | None, pods: Sequence[Obj] = ()) -> JobView | None:
    """A build Job and its pods: its attempt, its end and the builder's result, or why its pod does not run."""
    if job is None:
        return None
    md, st = job.get("metadata") or {}, job.get("status") or {}
    conds = _true_conditions(job)
    failed, succeeded = "Failed" in conds, "Complete" in conds
    ann = md.get("annotations") or {}
    try:
        attempt = int(ann.get(common.ATTEMPT_ANNOTATION, "1"))
    except ValueError:
        attempt = 1
    running = not failed and not succeeded and not st.get("ready")
    return JobView(
        name=str(md.get("name", "")),
        digest=str(ann.get(common.DIGEST_ANNOTATION, "")),
        attempt=attempt,
        active=bool(st.get("active")),
        succeeded=succeeded,
        failed=failed,
        message=termination_message(pods) if failed else None,
        reason=conds["Failed"].get("reason") if failed else None,
        started_at=st.get("startTime"),
        completed_at=st.get("completionTime"),
        # Not running yet: say why (no node with free GPUs of the class, an image that does not pull, ...).
        problem=pod_problem(pods) if running else None,
        owners=tuple(str(o.get("uid", "")) for o in md.get("ownerReferences") or []),
    )


def deployment_view(dep: Obj | None, pods: Sequence[Obj] = (), desired: str | None = None) -> DeploymentView | None:
    """The serving Deployment; with its pods, why a pod of engine `desired` is not Ready."""
    if dep is None:
        return None
    md, spec, st = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
    template = spec.get("template") or {}
    return DeploymentView(
        digest=((template.get("metadata") or {}).get("annotations") or {}).get(common.DIGEST_ANNOTATION),
        generation=int(md.get("generation") or 0),
        observed_generation=int(st.get("observedGeneration") or 0),
        replicas=int(spec.get("replicas") or 0),
        updated=int(st.get("updatedReplicas") or 0),
        ready=int(st.get("readyReplicas") or 0),
        available=int(st.get("availableReplicas") or 0),
        total=int(st.get("replicas") or 0),
        problem=pod_problem(pods, desired) if pods else None,
        render_hash=(md.get("annotations") or {}).get(common.RENDER_HASH_ANNOTATION),
        resource_version=md.get("resourceVersion"),
        image=serving.server_image(dep),
        attachments=tuple(
            k for k in str((md.get("annotations") or {}).get(common.ATTACHMENTS_ANNOTATION, "")).split(",") if k
        ),
    )


@dataclass(frozen=True)
class AttachmentView:
    """An object the operator rendered next to the serving Deployment (an HPA, an Ingress, an HTTPRoute)."""

    kind: str
    render_hash: str | None
    resource_version: str | None


def attachment_view(kind: str, obj: Obj | None) -> AttachmentView | None:
    if obj is None:
        return None
    md = obj.get("metadata") or {}
    return AttachmentView(
        kind, (md.get("annotations") or {}).get(common.RENDER_HASH_ANNOTATION), md.get("resourceVersion")
    )


def deployment_essentials(dep: Obj) -> dict[str, Any]:
    """The parts of a serving Deployment a pass reads (deployment_view, the pod selector): what the operator's watch
    keeps of each one, instead of the whole object."""
    md, spec = dep.get("metadata") or {}, dep.get("spec") or {}
    template = spec.get("template") or {}
    containers = [
        {"name": c.get("name"), "image": c.get("image")} for c in (template.get("spec") or {}).get("containers") or []
    ]
    keep = ("name", "namespace", "annotations", "generation", "resourceVersion")
    return {
        "metadata": {k: md[k] for k in keep if k in md},
        "spec": {
            "replicas": spec.get("replicas"),
            "selector": spec.get("selector"),
            "template": {
                "metadata": {"annotations": (template.get("metadata") or {}).get("annotations")},
                "spec": {"containers": containers},
            },
        },
        "status": dict(dep.get("status") or {}),
    }


def bench_view(job: Obj | None, pods: Sequence[Obj] = ()) -> BenchView | None:
    if job is None:
        return None
    conds = _true_conditions(job)
    ended = bool(conds.keys() & {"Complete", "Failed"})
    message = termination_message(pods) if ended else None
    return BenchView(
        name=str((job.get("metadata") or {}).get("name", "")),
        active=bool((job.get("status") or {}).get("active")),
        succeeded="Complete" in conds,
        failed="Failed" in conds,
        outcome=BenchOutcome.parse(message) if message else None,
    )


@dataclass(frozen=True)
class GrantView:
    """The engine grant in the engine's namespace: which engines its URLs read, and until when."""

    digests: tuple[str, ...]
    expires_at: datetime.datetime


def grant_view(data: Mapping[str, str] | None) -> GrantView | None:
    """The grant Secret's engines and expiry (None: no Secret, or one that does not parse: it is written anew)."""
    if not data or grants.KEY not in data:
        return None
    try:
        grant = EngineGrant.model_validate_json(data[grants.KEY])
    except ValidationError:
        return None
    expires = parse_iso(grant.expires_at)
    return GrantView(tuple(sorted(grant.engines)), expires) if expires is not None else None
