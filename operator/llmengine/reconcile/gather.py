"""Gather: read everything one pass decides on into an immutable Snapshot. Reads only (the store, the API server,
the serving pods' metrics); the only things kept are caches and the traffic series, which are observations."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import OperatorConfig
from llmengine.api.v1alpha1 import InvalidEngine, LLMEngine, LLMEngineSpec, LLMEngineStatus, parse_engine
from llmengine.clients import scrape
from llmengine.clients.kube import Kube
from llmengine.clock import utcnow
from llmengine.plan import envelope, identity, plan_object
from llmengine.plan import traffic as tr
from llmengine.plan.planner import Plan
from llmengine.reconcile import metrics
from llmengine.reconcile.queue import BuildQueue
from llmengine.reconcile.snapshot import BuildLimits, Snapshot, TrafficView
from llmengine.reconcile.stores import StoreAccess, Stores
from llmengine.reconcile.traffic_source import PrometheusSource
from llmengine.reconcile.views import (
    AttachmentView,
    DeploymentView,
    GrantView,
    attachment_view,
    bench_view,
    deployment_view,
    grant_view,
    job_view,
)
from llmengine.render import attachments, autoscale, common, grants, serving

Key = tuple[str, str]  # (namespace, name)
# How long a Deployment we wrote is preferred to the watch's older copy (its echo takes well under a second).
WRITE_ECHO_SECONDS = 30.0
# (namespace, Deployment name) -> the Deployment as the operator's watch last saw it, or None.
DeploymentLookup = Callable[[str, str], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Target:
    """What the act step needs besides the snapshot: the object to render from and where its engine lives."""

    engine: LLMEngine | None  # the LLMEngine as this pass read it (None: it does not parse)
    access: StoreAccess | None
    pool: str = ""
    build_key: str = ""  # namespace/name of the build Job (the queue's key)
    claim: str | None = None  # the build this pass claimed (digest|store), held only if the pass starts it


@dataclass
class _Series:
    digest: str
    snapshots: list[tr.Snapshot] = field(default_factory=list)
    last_scrape: float = float("-inf")


class Memory:
    """Everything the operator keeps per engine between passes. forget() drops all of it."""

    def __init__(self) -> None:
        # The status each engine's last write stored, by resourceVersion: Kopf's body may not have caught up yet.
        # Once it has, only the version is kept (to know the write's echo); the status itself is None.
        self.written: dict[Key, tuple[str, dict[str, Any] | None]] = {}
        self.series: dict[Key, _Series] = {}
        self.phases: dict[Key, str] = {}  # last phase (llmengine_engines)
        self.hits: dict[Key, str] = {}  # the identity a store hit was last counted for
        self.finished: dict[Key, str] = {}  # the last build Job end counted (llmengine_builds_total)
        self.state: dict[Key, dict[str, str]] = {}  # phase and condition statuses exported per engine
        # The serving Deployment each engine's last write stored: newer than the watch's copy until it catches up.
        self.deployments: dict[Key, tuple[float, dict[str, Any]]] = {}
        # Each engine's grant as last written or read (None: there is none).
        self.grants: dict[Key, GrantView | None] = {}

    def forget(self, key: Key) -> str | None:
        """Drop every cache of the engine; returns its last phase."""
        self.written.pop(key, None)
        self.series.pop(key, None)
        self.hits.pop(key, None)
        self.finished.pop(key, None)
        self.deployments.pop(key, None)
        self.grants.pop(key, None)
        self.state.pop(key, None)
        return self.phases.pop(key, None)


@dataclass
class _Early:
    """Reads started before the store's answer says whether they are needed; drop() cancels those not awaited and
    retrieves the outcome of the others."""

    job: asyncio.Future[dict[str, Any] | None] | None = None
    pool: asyncio.Future[tuple[set[str], set[str], str | None]] | None = None

    def drop(self) -> None:
        for fut in (self.job, self.pool):
            if fut is None:
                continue
            if fut.done():
                if not fut.cancelled():
                    fut.exception()  # retrieved: a failed read nobody needed is not an error
            else:
                fut.cancel()


class Gatherer:
    def __init__(
        self,
        kube: Kube,
        cfg: OperatorConfig,
        queue: BuildQueue,
        memory: Memory,
        stores: Stores,
        clock: Callable[[], float] = time.monotonic,
        prometheus: PrometheusSource | None = None,
    ) -> None:
        self.kube = kube
        self.prometheus = prometheus  # traffic.source prometheus: the fleet's shared reading
        self.cfg = cfg
        self.queue = queue
        self.memory = memory
        self.clock = clock
        self.stores = stores

    # ---- the snapshot ----
    async def gather(
        self, body: Mapping[str, Any], deployments: DeploymentLookup | None = None
    ) -> tuple[Snapshot, Target]:
        """`deployments` reads the serving Deployment from the operator's watch (no API call); without it, a GET."""
        md = body["metadata"]
        ns, name = md["namespace"], md["name"]
        # Kopf updates a daemon's body in place as watch events arrive: one copy, read once.
        raw = body.get("spec")
        spec_raw: dict[str, Any] = copy.deepcopy(dict(raw)) if isinstance(raw, Mapping) else {}
        obj: dict[str, Any] = {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "metadata": copy.deepcopy(dict(md)),
            "spec": spec_raw,
        }
        status = LLMEngineStatus.model_validate(self._freshest_status(body))
        try:
            engine: LLMEngine | None = parse_engine(obj)
        except InvalidEngine:
            engine = None
        spec = engine.spec if engine is not None else None
        floor = envelope.shape_floor(spec, status) if spec is not None else None
        plan = self._plan(obj, floor)
        now = utcnow()
        dep = await self._deployment(ns, name, deployments)
        current = deployment_view(dep)
        replicas = autoscale.replicas(spec, current.replicas if current else None) if spec is not None else 0
        base = Snapshot(
            namespace=ns,
            name=name,
            uid=str(md.get("uid", "")),
            generation=int(md.get("generation") or 0),
            spec=spec,
            status=status,
            plan=plan,
            now=now,
            replicas=replicas,
            url=serving.service_url(engine) if engine is not None else None,
            selector=common.label_selector(serving.instance_labels(name)),
            limits=BuildLimits(
                self.cfg.build_max_attempts, self.cfg.build_backoff_base_seconds, self.cfg.build_backoff_max_seconds
            ),
            deployment=current,
            traffic_on=self.cfg.traffic_source != "off",
            fits=lambda candidate: _fits(self._plan(obj, candidate)),
        )
        req = plan.build_request
        if engine is None or spec is None or not plan.valid or req is None or plan.internal_error:
            return base, Target(engine, None)

        access = self._access(spec, req.store)
        digest = plan.engine_digest
        pool = common.pool_name(plan.gpu.name, plan.mig_profile)
        job_name = plan.build_job
        bns = access.build_namespace or ns  # where the build Job runs
        key = f"{bns}/{job_name}"
        store_key = identity.store_key(req.store)
        early = _Early()
        moved = status.desired_engine is not None and status.desired_engine.digest != digest
        if moved and not self.stores.remembers(access, digest):
            # A spec change that moved the identity: most likely a rebuild, so its build Job and the pool's Jobs will
            # be read too. Ask for them while the store answers, not after it: this is the path from an edit to its
            # build Job. Not on a new engine (a fleet applied against a store that holds its engines would read them
            # all for nothing), never on an engine that stays put.
            early.job = asyncio.ensure_future(self.kube.get_job(bns, job_name))
            early.pool = asyncio.ensure_future(self._pool_builds(pool, bns, job_name, digest, store_key))
        try:
            store = await self.stores.view(ns, access, digest)
            self.queue.join((ns, name), pool, key)
            # The builder commits before its Job is marked Complete: keep reading our build Job until its duration is
            # recorded (build metrics, status.build.lastDurationSeconds), not only while the engine is uncommitted.
            build = status.build
            ours = build is not None and build.job == job_name and build.last_duration_seconds is None
            job = None
            if not store.committed or ours:
                raw_job = await (early.job or self.kube.get_job(bns, job_name))
                pods = await self.kube.list_pods(bns, f"job-name={job_name}") if raw_job is not None else []
                job = job_view(raw_job, pods)
            progress = None
            if job is not None and not job.ended and store.committed is False:
                progress = await self.stores.progress(ns, access, digest)
            position, elsewhere, claim = 0, None, None
            if store.committed is False and job is None:
                active, listed, elsewhere = await (
                    early.pool or self._pool_builds(pool, bns, job_name, digest, store_key)
                )
                if elsewhere is None:
                    claim = f"{digest}|{store_key}"
                    claimed = self.queue.claim(claim, key)
                    elsewhere = f"{claimed} (starting)" if claimed else None
                if elsewhere is None:
                    position = self.queue.position(pool, key, active, listed)
            elif store.committed:
                self.queue.forget(key)
            metrics.QUEUE_DEPTH.labels(pool).set(self.queue.depth(pool))
        finally:
            early.drop()
        dview = await self._deployment_with_pods(ns, dep, current, plan, replicas)
        bench = None
        if (
            store.committed
            and spec is not None
            and spec.benchmark is not None
            and (dview is None or dview.digest != digest)
        ):
            bench_name = plan.bench_job
            raw_bench = await self.kube.get_job(ns, bench_name)
            pods = await self.kube.list_pods(ns, f"job-name={bench_name}") if raw_bench is not None else []
            bench = bench_view(raw_bench, pods)
        traffic = None
        # Traffic is read (and the scrape interval spent) only when the desired engine serves every replica, as the
        # decision needs it for a Ready engine.
        serves = dview is not None and dview.digest == digest and dview.rolled_out and dview.available >= replicas
        if base.traffic_on and serves:
            traffic = await self._traffic(ns, name, plan, spec.serving.port, spec.rebuild_policy.window)
        kinds = sorted({*attachments.wanted(spec), *(current.attachments if current else ())})
        found: dict[str, AttachmentView | None] = {}
        for kind in kinds:
            k = common.ATTACHMENT_KINDS.get(kind)
            if k is not None:
                got = await self.kube.get_object(k.group, k.version, k.plural, ns, common.serving_name(name))
                found[kind] = attachment_view(kind, got)
        grant = await self._grant(ns, name) if access.isolated and store.committed else None
        snap = dataclasses.replace(
            base,
            build_owned=not access.isolated,
            grant_seconds=self.cfg.grant_seconds if access.isolated else None,
            grant=grant,
            attachments=found,
            store=store,
            job=job,
            building_elsewhere=elsewhere,
            progress=progress,
            queue_position=position,
            deployment=dview,
            bench=bench,
            traffic=traffic,
        )
        return snap, Target(engine, access, pool, key, claim)

    async def _deployment(self, ns: str, name: str, lookup: DeploymentLookup | None) -> Mapping[str, Any] | None:
        """The serving Deployment: from the watch when there is one, else read; our own last write when it is newer
        than what the watch has delivered (a write's echo arrives a moment later)."""
        dep_name = common.serving_name(name)
        seen = lookup(ns, dep_name) if lookup is not None else await self.kube.get_deployment(ns, dep_name)
        written = self.memory.deployments.get((ns, name))
        if written is None or self.clock() - written[0] > WRITE_ECHO_SECONDS:
            self.memory.deployments.pop((ns, name), None)  # long enough for any echo: the watch has the truth
            return seen
        ours = written[1]
        if seen is None and lookup is None:
            self.memory.deployments.pop((ns, name), None)  # read from the API server: it is gone
            return None
        if seen is not None and _rv(seen) >= _rv(ours):
            self.memory.deployments.pop((ns, name), None)  # the watch caught up
            return seen
        return ours

    def _plan(self, obj: Mapping[str, Any], floor: Mapping[str, int] | None) -> Plan:
        return plan_object(
            obj,
            compiler=self.cfg.compiler,
            default_store=self.cfg.default_store,
            test_engine_bytes=self.cfg.test_engine_bytes,
            shape_floor=floor,
            images=self.cfg.images,
            isolated_builds=self.cfg.isolated,
        )

    def _freshest_status(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The body's status, or the one our last write stored when the body (a watch event behind) is older."""
        md = body["metadata"]
        status = copy.deepcopy(dict(body.get("status") or {}))
        key = (md["namespace"], md["name"])
        written = self.memory.written.get(key)
        if written is None or written[1] is None:
            return status
        try:
            newer = int(written[0]) > int(md.get("resourceVersion") or 0)
        except ValueError:  # resourceVersions are opaque; etcd's are integers, anything else: trust the body
            newer = False
        if newer:
            return copy.deepcopy(written[1])
        self.memory.written[key] = (written[0], None)  # the body has caught up: its copy of the status is enough
        return status

    # ---- the store ----
    def _access(self, spec: LLMEngineSpec, location: StoreLocation) -> StoreAccess:
        if spec.store is None:
            bns = self.cfg.build_namespace if self.cfg.isolated else None
            return StoreAccess(location, self.cfg.default_store_secret, False, True, bns)
        ref = spec.store.credentials_secret_ref
        return StoreAccess(location, ref.name if ref else None, ref is not None, False)

    async def _grant(self, ns: str, name: str) -> GrantView | None:
        """The engine's grant as this operator last wrote it; read from its Secret once (after a restart)."""
        key = (ns, name)
        if key not in self.memory.grants:
            data = await self.kube.get_secret_data(ns, grants.secret_name(name))
            self.memory.grants[key] = grant_view(data)
        return self.memory.grants[key]

    # ---- Jobs, pods ----
    async def _pool_builds(
        self, pool: str, ns: str, job_name: str, digest: str, store: str
    ) -> tuple[set[str], set[str], str | None]:
        """The keys of the pool's build Jobs still running and of all of them (ended ones included), and another
        running Job of the same identity into the same store ("namespace/name"), if any, found by its annotations
        whatever its name (another namespace; the default store's Job for an engine naming the same place as its own;
        a Job an earlier operator named): one build per identity and store in the whole cluster."""
        sel = common.label_selector({"app.kubernetes.io/managed-by": common.MANAGED_BY, common.POOL_LABEL: pool})
        jobs = await self.kube.list_jobs(sel)
        keys = {f"{j['metadata']['namespace']}/{j['metadata']['name']}": j for j in jobs}
        active = {k for k, j in keys.items() if not common.job_ended(j)}
        elsewhere = next(
            (k for k in sorted(active) if k != f"{ns}/{job_name}" and _builds(keys[k], digest, store)),
            None,
        )
        return active, set(keys), elsewhere

    async def _deployment_with_pods(
        self, ns: str, dep: Mapping[str, Any] | None, view: DeploymentView | None, plan: Plan, replicas: int
    ) -> DeploymentView | None:
        """While pods of the desired engine are not all available, what their status says is wrong (the status
        message carries it: a failed download, an unschedulable pod), at the cost of one pod list."""
        if dep is None or view is None or view.digest != plan.engine_digest:
            return view
        if view.rolled_out and view.available >= replicas:  # the spec's replicas, as decide() judges them
            return view
        match = (dep["spec"].get("selector") or {}).get("matchLabels") or {}
        if not match:
            return view
        pods = await self.kube.list_pods(ns, common.label_selector(match))
        return deployment_view(dep, pods, plan.engine_digest)

    # ---- traffic ----
    async def _traffic(self, ns: str, name: str, plan: Plan, port: int, window_text: str) -> TrafficView | None:
        """Read the desired engine's traffic (at most once per scrape interval) into the engine's series."""
        key = (ns, name)
        series = self.memory.series.get(key)
        if series is None or series.digest != plan.engine_digest:
            series = self.memory.series[key] = _Series(plan.engine_digest)
        at = self.clock()
        if at - series.last_scrape < self.cfg.traffic_scrape_interval_seconds:
            return None  # nothing new: the status keeps what the last reading said
        series.last_scrape = at
        if self.prometheus is not None:
            at, read, error = await self._from_prometheus(ns, name, plan.engine_digest)
            asked: tuple[str, ...] = ()
        else:
            asked, read = await self._from_pods(ns, name, plan.engine_digest, port)
            error = None
        window = envelope.parse_duration(window_text)
        # A reading of Prometheus's that this engine already holds (the fleet's reading is shared) is not new.
        if read and not (self.prometheus is not None and series.snapshots and series.snapshots[-1].at >= at):
            series.snapshots.append(tr.snapshot(at, read))
            series.snapshots = tr.prune(series.snapshots, at, window)
        newest = series.snapshots[-1] if series.snapshots else None
        start = tr.window_start(series.snapshots[:-1], at, window) if newest else None
        return TrafficView(newest, start, asked, bool(read), error)

    async def _from_pods(
        self, ns: str, name: str, digest: str, port: int
    ) -> tuple[tuple[str, ...], dict[str, tr.PodMetrics]]:
        """Scrape the engine's ready serving pods: the URLs asked, and what answered."""
        labels = {**serving.instance_labels(name), common.DIGEST_LABEL: digest[:12]}
        pods = await self.kube.list_pods(ns, common.label_selector(labels))
        urls = {
            p["metadata"]["name"]: u
            for p in pods
            if scrape.ready(p) and (u := scrape.pod_url(self.cfg.traffic_url_template, p, port))
        }
        return tuple(sorted(urls.values())), await scrape.scrape(urls, self.cfg.traffic_scrape_timeout_seconds)

    async def _from_prometheus(
        self, ns: str, name: str, digest: str
    ) -> tuple[float, dict[str, tr.PodMetrics], str | None]:
        """The engine's serving pods in the fleet's shared reading: when it was taken, the pods, or why none."""
        assert self.prometheus is not None
        fetch = await self.prometheus.read()
        if fetch.reading is None:
            return fetch.at, {}, fetch.error
        pods = fetch.reading.pods(ns, name, digest)
        return fetch.at, pods, None if pods else self.prometheus.missing(ns, name, digest)


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:  # resourceVersions are opaque; etcd's are integers
        return 0


def _fits(plan: Plan) -> str | None:
    return None if plan.valid else "; ".join(str(e) for e in plan.errors)


def _builds(job: Mapping[str, Any], digest: str, store: str) -> bool:
    """Whether a build Job builds this identity into this store (its annotations, as render.build writes them)."""
    notes = job["metadata"].get("annotations") or {}
    return notes.get(common.DIGEST_ANNOTATION) == digest and notes.get(common.STORE_ANNOTATION) == store
