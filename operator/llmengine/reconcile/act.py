"""Act: carry out a decision idempotently, then write the status (one merge patch of what changed) and post its
events. Nothing here decides; what a pass does is in the Decision."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from llmengine.api.config import OperatorConfig
from llmengine.api.v1alpha1 import LLMEngineStatus
from llmengine.clients.kube import Kube, merge_patch
from llmengine.clock import seconds_between
from llmengine.plan.benchgate import bench_request
from llmengine.reconcile import metrics
from llmengine.reconcile.actions import AdoptBuildJob, DeleteBuildJob, Serve, StartBenchmark, StartBuild
from llmengine.reconcile.decide import Decision
from llmengine.reconcile.gather import Memory, Target
from llmengine.reconcile.queue import BuildQueue
from llmengine.reconcile.snapshot import Snapshot
from llmengine.render import bench as render_bench
from llmengine.render import build as render_build
from llmengine.render import common, serving

EventSink = Callable[[Mapping[str, Any], str, str, str], None]


def status_document(status: LLMEngineStatus) -> dict[str, Any]:
    """The status as the API server stores it: camelCase, unset fields absent."""
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


class Actor:
    def __init__(self, kube: Kube, cfg: OperatorConfig, queue: BuildQueue, memory: Memory, events: EventSink) -> None:
        self.kube = kube
        self.cfg = cfg
        self.queue = queue
        self.memory = memory
        self.events = events

    async def act(self, snap: Snapshot, target: Target, d: Decision) -> None:
        body, ns = target.body, snap.namespace
        for action in d.actions:
            if isinstance(action, DeleteBuildJob):
                await self.kube.delete_job(ns, common.build_job_name(snap.plan.short_digest))
            elif isinstance(action, StartBuild):
                await self._start_build(snap, target, action.attempt)
            elif isinstance(action, AdoptBuildJob):
                owner = common.owner_reference(body, controller=False)
                await self.kube.add_owner("Job", ns, action.job, [], owner)
                await self.kube.add_owner("ConfigMap", ns, action.job, [], owner)
            elif isinstance(action, Serve):
                await self._serve(snap, target, action)
            elif isinstance(action, StartBenchmark):
                await self._start_bench(snap, target)
        patch = merge_patch(status_document(snap.status), status_document(d.status))
        if patch:
            stored = await self.kube.patch_status(ns, snap.name, patch)
            rv = (stored.get("metadata") or {}).get("resourceVersion")
            if rv and isinstance(stored.get("status"), dict):
                self.memory.written[(ns, snap.name)] = (str(rv), stored["status"])
        for type_, reason, message in d.events:
            self.events(body, type_, reason, message)
        self._count(snap, d)

    def _count(self, snap: Snapshot, d: Decision) -> None:
        """The operator's metrics move with what this pass saw and decided."""
        key = (snap.namespace, snap.name)
        phase = d.status.phase or "Pending"
        metrics.move_engine(self.memory.phases.get(key), phase)
        self.memory.phases[key] = phase
        digest = snap.plan.engine_digest
        build = d.status.build
        hit = snap.store is not None and snap.store.committed and (build is None or not build.job)
        if hit and self.memory.hits.get(key) != digest:
            self.memory.hits[key] = digest  # committed and never built by us for this engine: a build avoided
            metrics.STORE_HITS.inc()
        job = snap.job
        if job is not None and job.ended:
            marker = f"{job.name}/{job.attempt}/{job.started_at}"
            if self.memory.finished.get(key) != marker:
                self.memory.finished[key] = marker
                metrics.BUILDS.labels("succeeded" if job.succeeded else "failed").inc()
                took = seconds_between(job.started_at, job.completed_at) if job.succeeded else None
                if took is not None:
                    metrics.BUILD_SECONDS.observe(took)

    async def _ensure_configmap(self, cm: dict[str, Any], owner: dict[str, Any]) -> None:
        """Create the request ConfigMap, or join it as an owner when another engine of the same identity made it."""
        if not await self.kube.create(cm):
            await self.kube.add_owner("ConfigMap", cm["metadata"]["namespace"], cm["metadata"]["name"], [], owner)

    async def _start_build(self, snap: Snapshot, target: Target, attempt: int) -> None:
        plan, access = snap.plan, target.access
        if plan.build_request is None or access is None:
            return
        body, ns = target.body, snap.namespace
        owner = common.owner_reference(body, controller=False)
        await self._ensure_configmap(
            render_build.request_configmap(plan.build_request, plan.short_digest, target.pool, ns, [owner]), owner
        )
        job = render_build.build_job(
            request=plan.build_request,
            short_digest=plan.short_digest,
            pool=target.pool,
            namespace=ns,
            owners=[owner],
            product_labels=list(plan.gpu.product_labels),
            gpu_resource=plan.gpu_resource,
            gpu_count=plan.gpu_count,
            target=dict(common.spec_of(body).get("target") or {}),
            store_secret=access.pod_secret,
            hf_token=_hf_token(common.spec_of(body)),
            attempt=attempt,
            cfg=self.cfg,
        )
        self.queue.reserve(target.pool, target.build_key)
        await self.kube.create(job)
        self.queue.started(target.pool, target.build_key)

    async def _start_bench(self, snap: Snapshot, target: Target) -> None:
        plan, access, spec = snap.plan, target.access, snap.spec
        if access is None or spec is None:
            return
        body, ns = target.body, snap.namespace
        raw = common.spec_of(body)
        owner = common.owner_reference(body, controller=False)
        request = bench_request(spec, plan)
        await self._ensure_configmap(
            render_bench.bench_request_configmap(request, plan.short_digest, target.pool, ns, [owner]), owner
        )
        job = render_bench.bench_job(
            request=request,
            short_digest=plan.short_digest,
            pool=target.pool,
            namespace=ns,
            owners=[owner],
            product_labels=list(plan.gpu.product_labels),
            gpu_resource=plan.gpu_resource,
            gpu_count=plan.gpu_count,
            target=dict(raw.get("target") or {}),
            store_secret=access.pod_secret,
            hf_token=_hf_token(raw),
            image=plan.builder_image,
            cfg=self.cfg,
        )
        await self.kube.create(job)

    async def _serve(self, snap: Snapshot, target: Target, action: Serve) -> None:
        plan, access, body = snap.plan, target.access, target.body
        if access is None:
            return
        desired = serving.deployment(
            body=body,
            digest=action.digest,
            short_digest=action.digest[:12],
            backend=str(common.spec_of(body).get("backend") or "tensorrt"),
            store=access.location,
            store_secret=access.pod_secret,
            product_labels=list(plan.gpu.product_labels),
            gpu_resource=plan.gpu_resource,
            gpu_count=plan.gpu_count,
            image=action.image,
            cfg=self.cfg,
        )
        h = hashlib.sha256(json.dumps(desired, sort_keys=True).encode()).hexdigest()[:16]
        desired["metadata"]["annotations"][common.RENDER_HASH_ANNOTATION] = h
        current = snap.deployment
        changed = current is None or current.render_hash != h
        if current is None:
            await self.kube.create(desired)
        elif changed and current.resource_version:
            await self.kube.replace_deployment(desired, current.resource_version)
        if changed or snap.status.url is None:
            # With the Deployment it fronts; not looked up on every pass (a create of an existing one is a no-op).
            await self.kube.create(serving.service(body))


def _hf_token(spec: Mapping[str, Any]) -> dict[str, str] | None:
    """The Secret key of the Hugging Face token the spec references, if any (never its value)."""
    hf = ((spec.get("model") or {}).get("source") or {}).get("huggingFace") or {}
    ref = hf.get("tokenSecretRef")
    return {"name": ref["name"], "key": ref.get("key", "token")} if ref else None
