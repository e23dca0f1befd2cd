"""Reconcile one LLMEngine: gather what is (plan, store, Job, Deployment), decide (pure), act idempotently."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llmengine import PREFIX
from llmengine.api.artifacts import StoreLocation
from llmengine.api.bench import parse_bench_outcome
from llmengine.api.config import OperatorConfig
from llmengine.api.v1alpha1 import InvalidEngine, parse_engine
from llmengine.clients.kube import Kube, merge_patch
from llmengine.clients.store import EngineStore, S3Config, StoreError, make_s3_client, on_default_store
from llmengine.logging import register_secret
from llmengine.plan import plan_object
from llmengine.plan.benchgate import bench_request
from llmengine.reconcile import gate, metrics
from llmengine.reconcile.decide import Decision, DeploymentView, JobView, Observed, decide, pod_problem
from llmengine.reconcile.queue import BuildQueue
from llmengine.reconcile.traffic import TrafficWatcher, shape_floor
from llmengine.render import bench as render_bench
from llmengine.render import build as render_build
from llmengine.render import common, serving

RENDER_HASH = f"{PREFIX}/render-hash"

EventSink = Callable[[Mapping[str, Any], str, str, str], None]


@dataclass(frozen=True)
class StoreAccess:
    location: StoreLocation
    pod_secret: str | None  # Secret the build and serving pods read credentials from
    cache_key: tuple[Any, ...]


class Reconciler:
    def __init__(self, kube: Kube, cfg: OperatorConfig, events: EventSink | None = None) -> None:
        self.kube = kube
        self.cfg = cfg
        self.queue = BuildQueue(cfg.build_concurrency_per_pool)
        self.events = events or (lambda body, type_, reason, msg: None)
        self._committed: set[tuple[str, str, str, str]] = set()
        self._stores: dict[tuple[Any, ...], EngineStore] = {}
        self._seen_finished: set[str] = set()
        self.traffic = TrafficWatcher(kube, cfg)
        # The status each engine's last write stored, by resourceVersion: Kopf's body may not have caught up yet.
        self._written: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        # Each engine's last phase (llmengine_engines) and the identity a store hit was last counted for.
        self._phases: dict[tuple[str, str], str] = {}
        self._hits: dict[tuple[str, str], str] = {}

    # ---- store ----------------------------------------------------------------------------------------------
    def _store_access(self, body: Mapping[str, Any], location: StoreLocation) -> StoreAccess:
        spec = common.spec_of(body)
        store_spec = spec.get("store") or {}
        secret = (store_spec.get("credentialsSecretRef") or {}).get("name")
        if not store_spec:
            secret = self.cfg.default_store_secret
        return StoreAccess(location, secret, (body["metadata"]["namespace"], secret, location))

    async def _store(self, ns: str, access: StoreAccess, explicit_secret: bool) -> EngineStore:
        key = access.cache_key
        creds: dict[str, str] = {}
        if explicit_secret and access.pod_secret:
            data = await self.kube.get_secret_data(ns, access.pod_secret)
            if data is None:
                raise StoreError(
                    f"Secret {access.pod_secret!r} not found in namespace {ns!r}",
                    setting="spec.store.credentialsSecretRef",
                )
            creds = {
                "access_key_id": data.get("AWS_ACCESS_KEY_ID", ""),
                "secret_access_key": data.get("AWS_SECRET_ACCESS_KEY", ""),
            }
            for value in creds.values():
                register_secret(value)  # masked in every log line from now on
            key = (*key, hashlib.sha256(json.dumps(creds, sort_keys=True).encode()).hexdigest())
        if key not in self._stores:
            cfg = S3Config.for_location(access.location, **creds)
            self._stores[key] = EngineStore(make_s3_client(cfg), access.location)
        return self._stores[key]

    async def _committed_check(
        self, body: Mapping[str, Any], access: StoreAccess, digest: str
    ) -> tuple[bool | None, str | None]:
        loc = access.location
        ck = (loc.endpoint or "", loc.bucket, loc.prefix, digest)
        if ck in self._committed:
            return True, None
        store_spec = common.spec_of(body).get("store") or {}
        explicit = bool(store_spec.get("credentialsSecretRef"))
        try:
            store = await self._store(body["metadata"]["namespace"], access, explicit)
            ok = await asyncio.to_thread(store.is_committed, digest)
        except StoreError as e:
            metrics.STORE_ERRORS.inc()
            return None, str(e) if store_spec else on_default_store(str(e))
        except Exception as e:  # a store outage must never crash the operator
            metrics.STORE_ERRORS.inc()
            return None, f"{type(e).__name__}: {e}"[:300]
        if ok:
            self._committed.add(ck)
        return ok, None

    # ---- gather ---------------------------------------------------------------------------------------------
    async def _job_view(self, ns: str, name: str) -> tuple[JobView | None, dict[str, Any] | None]:
        job = await self.kube.get_job(ns, name)
        if job is None:
            return None, None
        st = job.get("status") or {}
        conds = {c["type"]: c for c in st.get("conditions") or [] if c.get("status") == "True"}
        failed = "Failed" in conds
        message = problem = None
        if failed:
            message = await self._termination_message(ns, name)
        elif "Complete" not in conds and not st.get("ready"):
            # Not running yet: say why (no node with free GPUs of the class, an image that does not pull, ...).
            problem = pod_problem(await self.kube.list_pods(ns, f"job-name={name}"))
        ann = job["metadata"].get("annotations") or {}
        try:
            attempt = int(ann.get(common.ATTEMPT_ANNOTATION, "1"))
        except ValueError:
            attempt = 1
        view = JobView(
            name=name,
            digest=ann.get(common.DIGEST_ANNOTATION, ""),
            attempt=attempt,
            active=bool(st.get("active")),
            succeeded="Complete" in conds,
            failed=failed,
            message=message,
            reason=conds["Failed"].get("reason") if failed else None,
            started_at=st.get("startTime"),
            completed_at=st.get("completionTime"),
            problem=problem,
        )
        return view, job

    async def _termination_message(self, ns: str, job_name: str) -> str | None:
        for pod in await self.kube.list_pods(ns, f"job-name={job_name}"):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated") or {}
                if term.get("message"):
                    return str(term["message"])
        return None

    async def _with_pod_problem(
        self, ns: str, dep: Mapping[str, Any] | None, view: DeploymentView | None, plan: Any, replicas: int
    ) -> DeploymentView | None:
        """While pods of the desired engine are not all available, what their status says is wrong (the status
        message carries it: a failed download, an unschedulable pod), at the cost of one pod list."""
        if dep is None or view is None or not plan.valid or view.digest != plan.engine_digest:
            return view
        if view.rolled_out and view.available >= replicas:  # the spec's replicas, as decide() judges them
            return view
        match = (dep["spec"].get("selector") or {}).get("matchLabels") or {}
        if not match:
            return view
        pods = await self.kube.list_pods(ns, common.label_selector(match))
        return dataclasses.replace(view, problem=pod_problem(pods, plan.engine_digest, common.DIGEST_ANNOTATION))

    @staticmethod
    def _deployment_view(dep: Mapping[str, Any] | None) -> DeploymentView | None:
        if dep is None:
            return None
        st = dep.get("status") or {}
        tmpl = dep["spec"]["template"]["metadata"].get("annotations") or {}
        return DeploymentView(
            digest=tmpl.get(common.DIGEST_ANNOTATION),
            generation=int(dep["metadata"].get("generation") or 0),
            observed_generation=int(st.get("observedGeneration") or 0),
            replicas=int(dep["spec"].get("replicas") or 0),
            updated=int(st.get("updatedReplicas") or 0),
            ready=int(st.get("readyReplicas") or 0),
            available=int(st.get("availableReplicas") or 0),
            total=int(st.get("replicas") or 0),
        )

    async def _pool_builds(self, pool: str) -> tuple[set[str], set[str]]:
        """The keys of the pool's build Jobs still running, and of all of them (ended ones included)."""
        sel = common.label_selector({"app.kubernetes.io/managed-by": common.MANAGED_BY, common.POOL_LABEL: pool})
        jobs = await self.kube.list_jobs(sel)
        keys = {f"{j['metadata']['namespace']}/{j['metadata']['name']}": j for j in jobs}
        return {k for k, j in keys.items() if not common.job_ended(j)}, set(keys)

    # ---- the pass -------------------------------------------------------------------------------------------
    async def reconcile(self, body: Mapping[str, Any]) -> float | None:
        """One level-based pass; returns seconds until the next pass is due (None: only on events)."""
        t0 = time.perf_counter()
        try:
            return await self._reconcile(body)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - t0)

    async def _reconcile(self, body: Mapping[str, Any]) -> float | None:
        md = body["metadata"]
        ns, name = md["namespace"], md["name"]
        spec = common.spec_of(body)
        # Kopf updates a daemon's body in place as watch events arrive: decide and diff against one snapshot, so
        # that a pass that started before our last status write can not write older values back over it.
        status = copy.deepcopy(self._freshest_status(body))
        seen = copy.deepcopy(status)
        obj = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": dict(md), "spec": dict(spec)}
        try:
            engine = parse_engine(obj)
        except InvalidEngine:
            engine = None
        floor = shape_floor(engine.spec, status) if engine is not None else None

        def plan_with(floor: dict[str, int] | None) -> Any:
            return plan_object(
                obj,
                compiler=self.cfg.compiler,
                default_store=self.cfg.default_store,
                test_engine_bytes=self.cfg.test_engine_bytes,
                shape_floor=floor,
                images=self.cfg.images,
            )

        plan = plan_with(floor)
        dep_name = common.serving_name(name)
        dep = await self.kube.get_deployment(ns, dep_name)
        replicas = int((spec.get("serving") or {}).get("replicas", 1) or 0)
        dview = await self._with_pod_problem(ns, dep, self._deployment_view(dep), plan, replicas)
        now = datetime.datetime.now(datetime.UTC)
        base: dict[str, Any] = {
            "generation": int(md.get("generation") or 0),
            "replicas": replicas,
            "status": status,
            "now": now,
            "max_attempts": self.cfg.build_max_attempts,
            "backoff_base": self.cfg.build_backoff_base_seconds,
            "backoff_max": self.cfg.build_backoff_max_seconds,
            "deployment": dview,
            "url": serving.service_url(body),
            "selector": common.label_selector(serving.instance_labels(name)),
        }
        req = plan.build_request
        if not plan.valid or req is None:
            errors = [(e.field, e.message) for e in plan.errors] or [("spec", "invalid")]
            obs = Observed(
                valid=False,
                errors=errors,
                desired_digest="",
                desired_uri=None,
                gpu=_gpu_text(plan),
                committed=None,
                store_error=None,
                job=None,
                queue_position=0,
                **base,
            )
            d = decide(obs)
            self._record_phase(ns, name, d.status["phase"])
            await self._act(body, d, plan, None, None, dep, seen)
            return d.requeue_after

        access = self._store_access(body, req.store)
        digest = plan.engine_digest
        committed, store_error = await self._committed_check(body, access, digest)
        pool = common.pool_name(plan.gpu.name, plan.mig_profile)
        job_name = common.build_job_name(plan.short_digest)
        key = f"{ns}/{job_name}"
        self.queue.join((ns, name), pool, key)
        # The builder commits before its Job is marked Complete: keep reading our build Job until its duration is
        # recorded (build metrics, status.build.lastDurationSeconds), not only while the engine is uncommitted.
        build_st = status.get("build") or {}
        ours = build_st.get("job") == job_name and "lastDurationSeconds" not in build_st
        job_view, job = await self._job_view(ns, job_name) if not committed or ours else (None, None)
        position = 0
        if not committed and committed is not None and job_view is None:
            position = self.queue.position(pool, key, *await self._pool_builds(pool))
            metrics.QUEUE_DEPTH.labels(pool).set(self.queue.depth(pool))
        elif committed:
            self.queue.forget(key)
            if not build_st.get("job") and self._hits.get((ns, name)) != digest:
                self._hits[(ns, name)] = digest  # committed and never built by us for this engine: a build avoided
                metrics.STORE_HITS.inc()
        metrics.QUEUE_DEPTH.labels(pool).set(self.queue.depth(pool))
        gate_step = None
        if committed and engine is not None:
            gate_step = await self._gate_step(ns, engine.spec, plan, status, dview.digest if dview else None)
        obs = Observed(
            valid=True,
            errors=[],
            gate=gate_step,
            desired_digest=digest,
            desired_uri=access.location.engine_uri(digest),
            gpu=_gpu_text(plan),
            committed=committed,
            store_error=store_error,
            job=job_view,
            queue_position=position,
            **base,
        )
        d = decide(obs)
        self._record_phase(ns, name, d.status["phase"])
        if engine is not None:

            def fits(candidate: dict[str, int]) -> str | None:
                p = plan_with(candidate)
                return None if p.valid else "; ".join(str(e) for e in p.errors)

            if await self.traffic.step(body, engine.spec, plan, d.status, now, fits, d.events):
                d.requeue_after = 0.05  # plan again with the raised shapes now
            if gate_step is not None and gate_step.create_job:
                await self._start_bench(body, engine.spec, plan, access, pool)
        if job is not None:
            owners = list(job["metadata"].get("ownerReferences") or [])
            owner = common.owner_reference(body, controller=False)
            await self.kube.add_owner("Job", ns, job_name, owners, owner)
            await self.kube.add_owner("ConfigMap", ns, job_name, owners, owner)
            self._record_finished(job_view)
        await self._act(body, d, plan, access, (pool, key), dep, seen)
        return d.requeue_after

    async def _gate_step(self, ns: str, spec: Any, plan: Any, status: Mapping[str, Any], serving: str | None) -> Any:
        """spec.benchmark: gather the benchmark Job of the desired engine (while it does not serve yet) and judge
        it; decide() applies the verdict (hold the serving engine until it passes)."""
        if spec.benchmark is None:
            return None
        view = None
        if serving != plan.engine_digest:
            bench_name = render_bench.bench_job_name(plan.short_digest)
            job = await self.kube.get_job(ns, bench_name)
            if job is not None:
                view = await self._bench_view(ns, bench_name, job)
        return gate.gate(spec.benchmark, plan.engine_digest, serving, status.get("benchmark") or {}, view)

    async def _ensure_configmap(self, cm: dict[str, Any], owner: dict[str, Any]) -> None:
        """Create the request ConfigMap, or join it as an owner when another engine of the same identity made it."""
        if not await self.kube.create(cm):
            await self.kube.add_owner("ConfigMap", cm["metadata"]["namespace"], cm["metadata"]["name"], [], owner)

    async def _bench_view(self, ns: str, name: str, job: Mapping[str, Any]) -> gate.BenchView:
        st = job.get("status") or {}
        done = {c["type"] for c in st.get("conditions") or [] if c.get("status") == "True"}
        message = await self._termination_message(ns, name) if done & {"Complete", "Failed"} else None
        return gate.BenchView(
            name=name,
            active=bool(st.get("active")),
            succeeded="Complete" in done,
            failed="Failed" in done,
            outcome=parse_bench_outcome(message) if message else None,
        )

    async def _start_bench(self, body: Mapping[str, Any], spec: Any, plan: Any, access: StoreAccess, pool: str) -> None:
        md = body["metadata"]
        ns = md["namespace"]
        raw = common.spec_of(body)
        owner = common.owner_reference(body, controller=False)
        request = bench_request(spec, plan)
        await self._ensure_configmap(
            render_bench.bench_request_configmap(request, plan.short_digest, pool, ns, [owner]), owner
        )
        job = render_bench.bench_job(
            request=request,
            short_digest=plan.short_digest,
            pool=pool,
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

    def _record_finished(self, job: JobView | None) -> None:
        if job is None or not (job.succeeded or job.failed):
            return
        marker = f"{job.name}/{job.attempt}/{job.started_at}"
        if marker in self._seen_finished:
            return
        self._seen_finished.add(marker)
        metrics.BUILDS.labels("succeeded" if job.succeeded else "failed").inc()
        if job.succeeded and job.started_at and job.completed_at:
            s = datetime.datetime.fromisoformat(job.started_at.replace("Z", "+00:00"))
            e = datetime.datetime.fromisoformat(job.completed_at.replace("Z", "+00:00"))
            metrics.BUILD_SECONDS.observe((e - s).total_seconds())

    # ---- act ------------------------------------------------------------------------------------------------
    async def _act(
        self,
        body: Mapping[str, Any],
        d: Decision,
        plan: Any,
        access: StoreAccess | None,
        build_key: tuple[str, str] | None,
        dep: dict[str, Any] | None,
        seen_status: Mapping[str, Any],
    ) -> None:
        md = body["metadata"]
        ns = md["namespace"]
        spec = common.spec_of(body)
        if d.delete_job:
            await self.kube.delete_job(ns, common.build_job_name(plan.short_digest))
        if d.create_job is not None and access is not None and build_key is not None:
            await self._start_build(body, plan, access, build_key, d.create_job)
        if d.deploy_digest and access is not None:
            desired = serving.deployment(
                body=body,
                digest=d.deploy_digest,
                short_digest=d.deploy_digest[:12],
                backend=str(spec.get("backend") or "tensorrt"),
                store=access.location,
                store_secret=access.pod_secret,
                product_labels=list(plan.gpu.product_labels),
                gpu_resource=plan.gpu_resource,
                gpu_count=plan.gpu_count,
                image=serving.image_for(d.deploy_digest, plan.engine_digest, plan.server_image, dep),
                cfg=self.cfg,
            )
            await self._apply_deployment(desired, dep)
            if await self.kube.get_service(ns, common.serving_name(md["name"])) is None:
                await self.kube.create(serving.service(body))
        patch = merge_patch(seen_status, d.status)
        if patch:
            stored = await self.kube.patch_status(ns, md["name"], patch)
            rv = (stored.get("metadata") or {}).get("resourceVersion")
            if rv and isinstance(stored.get("status"), dict):
                self._written[(ns, md["name"])] = (str(rv), stored["status"])
        for type_, reason, message in d.events:
            self.events(body, type_, reason, message)

    async def _apply_deployment(self, desired: dict[str, Any], current: dict[str, Any] | None) -> None:
        h = hashlib.sha256(json.dumps(desired, sort_keys=True).encode()).hexdigest()[:16]
        desired["metadata"]["annotations"][RENDER_HASH] = h
        if current is None:
            await self.kube.create(desired)
            return
        if (current["metadata"].get("annotations") or {}).get(RENDER_HASH) == h:
            return
        await self.kube.replace_deployment(desired, current["metadata"]["resourceVersion"])

    async def _start_build(
        self, body: Mapping[str, Any], plan: Any, access: StoreAccess, build_key: tuple[str, str], attempt: int
    ) -> None:
        md = body["metadata"]
        ns = md["namespace"]
        spec = common.spec_of(body)
        pool, key = build_key
        owner = common.owner_reference(body, controller=False)
        await self._ensure_configmap(
            render_build.request_configmap(plan.build_request, plan.short_digest, pool, ns, [owner]), owner
        )
        job = render_build.build_job(
            request=plan.build_request,
            short_digest=plan.short_digest,
            pool=pool,
            namespace=ns,
            owners=[owner],
            product_labels=list(plan.gpu.product_labels),
            gpu_resource=plan.gpu_resource,
            gpu_count=plan.gpu_count,
            target=dict(spec.get("target") or {}),
            store_secret=access.pod_secret,
            hf_token=_hf_token(spec),
            attempt=attempt,
            cfg=self.cfg,
        )
        self.queue.reserve(pool, key)
        created = await self.kube.create(job)
        self.queue.started(pool, key)
        if created:
            self.events(body, "Normal", "BuildStarted", f"build Job {job['metadata']['name']} (attempt {attempt})")

    def _freshest_status(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The body's status, or the one our last write stored when the body (a watch event behind) is older."""
        md = body["metadata"]
        status = dict(body.get("status") or {})
        written = self._written.get((md["namespace"], md["name"]))
        if written is None:
            return status
        try:
            newer = int(written[0]) > int(md.get("resourceVersion") or 0)
        except ValueError:  # resourceVersions are opaque; etcd's are integers, anything else: trust the body
            newer = False
        return dict(written[1]) if newer else status

    def forget(self, ns: str, name: str) -> None:
        self._written.pop((ns, name), None)
        self.traffic.forget(ns, name)
        self.queue.leave((ns, name))
        metrics.move_engine(self._phases.pop((ns, name), None), None)
        self._hits.pop((ns, name), None)

    def _record_phase(self, ns: str, name: str, phase: str) -> None:
        metrics.move_engine(self._phases.get((ns, name)), phase)
        self._phases[(ns, name)] = phase


def _hf_token(spec: Mapping[str, Any]) -> dict[str, str] | None:
    """The Secret key of the Hugging Face token the spec references, if any (never its value)."""
    hf = ((spec.get("model") or {}).get("source") or {}).get("huggingFace") or {}
    ref = hf.get("tokenSecretRef")
    return {"name": ref["name"], "key": ref.get("key", "token")} if ref else None


def _gpu_text(plan: Any) -> str:
    try:
        if plan.mig_profile:
            return f"{plan.gpu.name}/{plan.mig_profile}"
        return f"{plan.gpu.name} x{plan.gpu_count}"
    except AttributeError:
        return ""
