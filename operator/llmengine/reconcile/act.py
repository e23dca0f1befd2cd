"""Act: carry out a decision idempotently, then write the status (one merge patch of what changed) and post its
events. Nothing here decides; what a pass does is in the Decision."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from llmengine import KIND
from llmengine.api.config import OperatorConfig
from llmengine.api.v1alpha1 import API_VERSION, LLMEngine, LLMEngineStatus, SecretKeySelector
from llmengine.clients.kube import ApiError, Kube, merge_patch
from llmengine.clock import parse_iso, seconds_between
from llmengine.plan.benchgate import bench_request
from llmengine.reconcile import metrics
from llmengine.reconcile.actions import (
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
from llmengine.reconcile.decide import Decision
from llmengine.reconcile.gather import Memory, Target
from llmengine.reconcile.queue import BuildQueue
from llmengine.reconcile.snapshot import Snapshot
from llmengine.reconcile.stores import StoreAccess, Stores
from llmengine.reconcile.views import GrantView, deployment_essentials
from llmengine.render import attachments, common, grants, serving
from llmengine.render import bench as render_bench
from llmengine.render import build as render_build
from llmengine.render.common import Placement

log = logging.getLogger("llmengine.operator")

EventSink = Callable[[Mapping[str, Any], str, str, str], None]


def render_hash(obj: Mapping[str, Any], without_replicas: bool = False) -> str:
    """A digest of what the operator renders into an object, kept on it: an unchanged render is not written."""
    if without_replicas:
        obj = {**obj, "spec": {k: v for k, v in obj["spec"].items() if k != "replicas"}}
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def status_document(status: LLMEngineStatus) -> dict[str, Any]:
    """The status as the API server stores it: camelCase, unset fields absent."""
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


class Actor:
    def __init__(
        self, kube: Kube, cfg: OperatorConfig, queue: BuildQueue, memory: Memory, stores: Stores, events: EventSink
    ) -> None:
        self.kube = kube
        self.cfg = cfg
        self.queue = queue
        self.memory = memory
        self.stores = stores
        self.events = events

    async def act(self, snap: Snapshot, target: Target, d: Decision) -> None:
        engine, ns = target.engine, snap.namespace
        if target.claim is not None and (engine is None or not any(isinstance(a, StartBuild) for a in d.actions)):
            self.queue.release(target.claim, target.build_key)
        for action in d.actions if engine is not None else ():
            if isinstance(action, Grant) and target.access and engine is not None and snap.grant_seconds is not None:
                await self._grant(snap, engine, target.access, action, snap.grant_seconds)
            elif isinstance(action, DeleteBuildJob):
                bns = target.access.build_namespace if target.access is not None else None
                await self.kube.delete_job(bns or ns, snap.plan.build_job)
            elif isinstance(action, StartBuild):
                await self._start_build(snap, target, action.attempt)
            elif isinstance(action, AdoptBuildJob) and engine is not None:
                owner = common.owner_reference(engine, controller=False)
                await self.kube.add_owner("Job", ns, action.job, [], owner)
                await self.kube.add_owner("ConfigMap", ns, action.job, [], owner)
            elif isinstance(action, Serve):
                await self._serve(snap, target, action)
            elif isinstance(action, Attach) and engine is not None:
                await self._attach(snap, engine, action.kind)
            elif isinstance(action, Detach):
                k = common.ATTACHMENT_KINDS[action.kind]
                await self.kube.delete_object(k.group, k.version, k.plural, ns, common.serving_name(snap.name))
            elif isinstance(action, Quarantine) and target.access is not None:
                await self.stores.quarantine(ns, target.access, action.digest, action.reason)
            elif isinstance(action, StartBenchmark):
                await self._start_bench(snap, target)
        patch = merge_patch(status_document(snap.status), status_document(d.status))
        if patch:
            stored = await self.kube.patch_status(ns, snap.name, patch)
            rv = (stored.get("metadata") or {}).get("resourceVersion")
            if rv and isinstance(stored.get("status"), dict):
                self.memory.written[(ns, snap.name)] = (str(rv), stored["status"])
        ref = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"namespace": ns, "name": snap.name, "uid": snap.uid},
        }
        for type_, reason, message in d.events:
            self.events(ref, type_, reason, message)
        self._count(snap, d)

    def _count(self, snap: Snapshot, d: Decision) -> None:
        """The operator's metrics move with what this pass saw and decided."""
        key = (snap.namespace, snap.name)
        phase = d.status.phase or "Pending"
        metrics.move_engine(self.memory.phases.get(key), phase)
        self.memory.phases[key] = phase
        state: dict[str, str] = {"phase": phase, **{c.type: str(c.status) for c in d.status.conditions or []}}
        self.memory.state[key] = state
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

    async def _attach(self, snap: Snapshot, engine: LLMEngine, kind: str) -> None:
        desired = attachments.render(engine, kind)
        if desired is None:
            return
        h = render_hash(desired)
        desired["metadata"].setdefault("annotations", {})[common.RENDER_HASH_ANNOTATION] = h
        k = common.ATTACHMENT_KINDS[kind]
        current = snap.attachments.get(kind)
        try:
            if current is None:
                await self.kube.create_object(k.group, k.version, k.plural, desired)
            elif current.render_hash != h and current.resource_version:
                await self.kube.replace_object(k.group, k.version, k.plural, desired, current.resource_version)
        except ApiError as e:
            # An API the cluster does not serve (no Gateway API installed) must not stop the rest of the pass.
            why = f"{kind} {desired['metadata']['name']} could not be written ({e.status} {e.reason})"
            if e.status == 404:
                why += f": does this cluster serve {k.api_version}?"
            log.warning("%s/%s: %s", snap.namespace, snap.name, why)
            self.events(_ref(snap), "Warning", "AttachFailed", why)

    async def _ensure_configmap(self, cm: dict[str, Any], owner: dict[str, Any]) -> None:
        """Create the request ConfigMap, or join it as an owner when another engine of the same identity made it."""
        if not await self.kube.create(cm):
            await self.kube.add_owner("ConfigMap", cm["metadata"]["namespace"], cm["metadata"]["name"], [], owner)

    async def _grant(self, snap: Snapshot, engine: LLMEngine, access: StoreAccess, action: Grant, seconds: int) -> None:
        grant = await self.stores.grant(snap.namespace, access, action.digests, seconds)
        await self.kube.put_secret(grants.secret(engine, grant))
        expires = parse_iso(grant.expires_at)
        if expires is not None:
            self.memory.grants[(snap.namespace, snap.name)] = GrantView(action.digests, expires)

    def _placement(
        self, snap: Snapshot, target: Target, engine: LLMEngine, access: StoreAccess, build: bool = False
    ) -> Placement:
        """Where a tool Job runs. Isolated store access: the build in the operator's namespace with its store Secret,
        owned by none (engines of every namespace share it); the benchmark in the engine's, through its grant."""
        plan = snap.plan
        bns = access.build_namespace
        isolated = bns is not None
        return Placement(
            namespace=bns if bns is not None and build else snap.namespace,
            owners=[] if isolated and build else [common.owner_reference(engine, controller=False)],
            short_digest=plan.short_digest,
            build_job=plan.build_job,
            bench_job=plan.bench_job,
            pool=target.pool,
            product_labels=list(plan.gpu.product_labels),
            gpu_resource=plan.gpu_resource,
            gpu_count=plan.gpu_count,
            target=engine.spec.target,
            store_secret=access.pod_secret if build or not isolated else None,
            hf_token=common.hf_token_ref(engine.spec),
            # A build in the operator's namespace takes the chart's pod settings only (plan refuses spec.pods.build).
            pods=None if isolated and build else engine.spec.pods,
            store_identity=common.store_identity(engine.spec),
            grant_secret=grants.secret_name(engine.name) if isolated and not build else None,
        )

    async def _start_build(self, snap: Snapshot, target: Target, attempt: int) -> None:
        request, access, engine = snap.plan.build_request, target.access, target.engine
        if request is None or access is None or engine is None:
            return
        where = self._placement(snap, target, engine, access, build=True)
        if not where.owners:
            await self._start_shared_build(snap, target, engine, where, attempt)
            return
        await self._ensure_configmap(render_build.request_configmap(request, where), where.owners[0])
        job = render_build.build_job(request=request, where=where, attempt=attempt, cfg=self.cfg)
        self.queue.reserve(target.pool, target.build_key)
        await self.kube.create(job)
        self.queue.started(target.pool, target.build_key)

    async def _start_shared_build(
        self, snap: Snapshot, target: Target, engine: LLMEngine, where: Placement, attempt: int
    ) -> None:
        """A build in the operator's namespace: the Job first, then what travels with it (its request and a copy of
        the engine's Hugging Face token), owned by the Job so that they go when it goes."""
        request = snap.plan.build_request
        assert request is not None
        token = where.hf_token
        if token is not None:
            copy = SecretKeySelector(name=render_build.token_copy_name(where.build_job), key=render_build.TOKEN_KEY)
            where = dataclasses.replace(where, hf_token=copy)
        job = render_build.build_job(request=request, where=where, attempt=attempt, cfg=self.cfg)
        self.queue.reserve(target.pool, target.build_key)
        stored = await self.kube.create_job(job)
        self.queue.started(target.pool, target.build_key)
        if stored is None:
            return  # another engine of this identity started it a moment ago: it brings its own
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": stored["metadata"]["name"],
            "uid": stored["metadata"]["uid"],
            "controller": False,
        }
        cm = render_build.request_configmap(request, dataclasses.replace(where, owners=[owner]))
        await self.kube.create(cm)
        if token is not None:
            data = await self.kube.get_secret_data(snap.namespace, token.name)
            value = (data or {}).get(token.key)
            if value is None:
                why = f"Secret {token.name!r} (key {token.key!r}) not found in namespace {snap.namespace!r}"
                self.events(_ref(snap), "Warning", "TokenNotFound", f"the build of {snap.plan.short_digest}: {why}")
                return
            await self.kube.create(render_build.token_copy(where, owner, value))

    async def _start_bench(self, snap: Snapshot, target: Target) -> None:
        access, engine = target.access, target.engine
        if access is None or engine is None:
            return
        where = self._placement(snap, target, engine, access)
        request = bench_request(engine.spec, snap.plan)
        if where.grant_secret:
            request = request.model_copy(update={"grant_file": common.GRANT_FILE})
        await self._ensure_configmap(render_bench.bench_request_configmap(request, where), where.owners[0])
        job = render_bench.bench_job(request=request, where=where, image=snap.plan.builder_image, cfg=self.cfg)
        await self.kube.create(job)

    async def _serve(self, snap: Snapshot, target: Target, action: Serve) -> None:
        plan, access, engine = snap.plan, target.access, target.engine
        if access is None or engine is None:
            return
        desired = serving.deployment(
            engine=engine,
            digest=action.digest,
            short_digest=action.digest[:12],
            backend=engine.spec.backend,
            store=access.location,
            store_secret=None if access.isolated else access.pod_secret,
            grant_secret=grants.secret_name(engine.name) if access.isolated else None,
            product_labels=list(plan.gpu.product_labels),
            gpu_resource=plan.gpu_resource,
            gpu_count=plan.gpu_count,
            image=action.image,
            cfg=self.cfg,
            replicas=action.replicas,
            attachments=attachments.wanted(engine.spec),
        )
        # Under an autoscaler the replica count is its to change: a scale is not a new render.
        h = render_hash(desired, without_replicas=engine.spec.serving.autoscaling is not None)
        desired["metadata"]["annotations"][common.RENDER_HASH_ANNOTATION] = h
        current = snap.deployment
        changed = current is None or current.render_hash != h
        stored = None
        if current is None:
            stored = await self.kube.create_deployment(desired)
        elif changed and current.resource_version:
            stored = await self.kube.replace_deployment(desired, current.resource_version)
        if stored is not None:
            # What the next pass reads until the watch (the operator's cache of Deployments) has caught up; only
            # what a pass reads of it, as the watch keeps.
            self.memory.deployments[(snap.namespace, snap.name)] = (time.monotonic(), deployment_essentials(stored))
        if changed or snap.status.url is None:
            # With the Deployment it fronts; not looked up on every pass (a create of an existing one is a no-op).
            await self.kube.create(serving.service(engine))


def _ref(snap: Snapshot) -> dict[str, Any]:
    """What Events are about: the object reference kopf.event builds from a body."""
    meta = {"namespace": snap.namespace, "name": snap.name, "uid": snap.uid}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta}
