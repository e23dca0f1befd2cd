"""Operator scale on a fresh dev cluster: many LLMEngines that are store hits, a plain-Deployment baseline, and many
distinct builds queued per GPU pool.

1. Seed: one engine builds with the test compiler and is committed to the store; its serving Deployment is the
   template of the baseline.
2. Baseline: --n plain Deployments with that pod template (another namespace, no operator running), created by a
   thread pool of the kubernetes client at --concurrency; time until every one is Available.
3. Store hits: --n LLMEngines with the seed's engine identity (only metadata.name differs, serving.replicas 1),
   created the same way; time until every one is Ready at its current generation. A fresh operator process: peak
   RSS (VmHWM), CPU seconds, and its API requests (its own FlowSchema, see benchlib) during the run and in the steady
   state afterwards. No build Job may exist.
4. Builds: --builds LLMEngines with distinct identities (build.maxSeqLen varies) spread over the H100-80GB and
   A100-80GB pools; a watch on Jobs checks that no pool ever has more than LLMENGINE_BUILD_CONCURRENCY_PER_POOL
   build Jobs active and that each identity gets exactly one build Job; time until every engine is Ready.

Prints one JSON summary; exits 1 when a correctness check fails.

    .venv/bin/python scripts/bench_scale.py --n 1000 --builds 200
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client

import benchlib as bl
from llmengine.render.common import DIGEST_ANNOTATION, POOL_LABEL, job_ended


# ---- creating many objects ----------------------------------------------------------------------------------
def create_all(bench: bl.Bench, bodies: list[dict[str, Any]], create: Any, concurrency: int) -> tuple[float, list[str]]:
    """Create every body with a pool of `concurrency` threads over one shared ApiClient; (seconds, errors)."""
    api = bench.new_api(pool=concurrency + 4)
    errors: list[str] = []
    t0 = time.monotonic()

    def one(body: dict[str, Any]) -> None:
        try:
            create(api, body)
        except Exception as e:
            errors.append(f"{body['metadata']['name']}: {e}"[:300])

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    return time.monotonic() - t0, errors


class ReadyTracker:
    """A watch on a namespace's objects that records, per name, the first time `done(obj)` holds."""

    def __init__(self, list_fn: Any, list_args: tuple[Any, ...], done: Any) -> None:
        self.done_at: dict[str, float] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.events = 0
        self._done = done
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(list_fn, list_args), daemon=True)

    def start(self) -> ReadyTracker:
        self._t.start()
        time.sleep(0.5)  # the watch is open before anything is created
        return self

    def _run(self, list_fn: Any, list_args: tuple[Any, ...]) -> None:
        with bl.watch_stream(list_fn, *list_args) as events:
            for ev in events:
                if self._stop.is_set():
                    return
                self.events += 1
                obj = ev["object"]
                name = obj["metadata"]["name"]
                self.last[name] = obj
                if name not in self.done_at and ev["type"] != "DELETED" and self._done(obj):
                    self.done_at[name] = time.monotonic()

    def wait(self, names: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if names <= self.done_at.keys():
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        self._stop.set()


def deployment_available(obj: dict[str, Any]) -> bool:
    st = obj.get("status") or {}
    want = int(obj["spec"].get("replicas") or 0)
    avail = any(c.get("type") == "Available" and c.get("status") == "True" for c in st.get("conditions") or [])
    return bool(
        avail
        and int(st.get("availableReplicas") or 0) >= want
        and int(st.get("observedGeneration") or 0) >= int(obj["metadata"].get("generation") or 0)
    )


def create_engine(api: Any, body: dict[str, Any]) -> None:
    ns = body["metadata"]["namespace"]
    client.CustomObjectsApi(api).create_namespaced_custom_object(bl.GROUP, bl.VERSION, ns, bl.PLURAL, body)


def create_deployment(api: Any, body: dict[str, Any]) -> None:
    client.AppsV1Api(api).create_namespaced_deployment(body["metadata"]["namespace"], body)


def list_engines(api: Any) -> Any:
    return client.CustomObjectsApi(api).list_namespaced_custom_object


def engines_args(ns: str) -> tuple[str, ...]:
    return (bl.GROUP, bl.VERSION, ns, bl.PLURAL)


# ---- phases -------------------------------------------------------------------------------------------------
def seed(bench: bl.Bench, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build the one engine every store-hit engine shares; return its serving Deployment as the baseline template."""
    ns = bench.namespace("seed")
    co = client.CustomObjectsApi(bench.api)
    with bl.Operator(bench, [ns], {"LLMENGINE_RESYNC_SECONDS": str(args.resync_seconds)}):
        body = bl.engine("seed", bench.info, model, "engines", serving={"replicas": 1})
        co.create_namespaced_custom_object(bl.GROUP, bl.VERSION, ns, bl.PLURAL, body)
        bl.wait(
            lambda: bl.is_ready(co.get_namespaced_custom_object(bl.GROUP, bl.VERSION, ns, bl.PLURAL, "seed")),
            300,
            "seed Ready",
        )
    dep = client.AppsV1Api(bench.api).read_namespaced_deployment("llme-seed", ns)
    return dict(bench.api.sanitize_for_serialization(dep))


def baseline_bodies(template: dict[str, Any], ns: str, n: int) -> list[dict[str, Any]]:
    """The operator's serving Deployment, renamed, without owner references, one instance label each."""
    out = []
    for i in range(n):
        name = f"plain-{i:04d}"
        spec = copy.deepcopy(template["spec"])
        spec["replicas"] = 1
        for labels in (spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]):
            labels["app.kubernetes.io/instance"] = name
            labels["llmengine.io/engine"] = name
        md = {"name": name, "namespace": ns, "labels": {"app": "plain-baseline"}}
        out.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": md, "spec": spec})
    return out


def run_baseline(bench: bl.Bench, template: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    ns = bench.namespace("baseline")
    bodies = baseline_bodies(template, ns, args.n)
    tracker = ReadyTracker(
        client.AppsV1Api(bench.new_api()).list_namespaced_deployment, (ns,), deployment_available
    ).start()
    bl.log(f"baseline: creating {args.n} Deployments at concurrency {args.concurrency}")
    t0 = time.monotonic()
    create_s, errors = create_all(bench, bodies, create_deployment, args.concurrency)
    ok = tracker.wait({b["metadata"]["name"] for b in bodies}, args.timeout)
    tracker.stop()
    done = sorted(tracker.done_at.values())
    total = (done[-1] - t0) if ok else None
    bl.log(f"baseline: {len(done)}/{args.n} Available, {total and round(total, 1)}s")
    return {
        "n": args.n,
        "create_seconds": round(create_s, 2),
        "all_available_seconds": round(total, 2) if total else None,
        "available": len(done),
        "create_errors": errors[:5],
        "rate_per_second": round(args.n / total, 2) if total else None,
    }


def run_store_hits(bench: bl.Bench, model: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    ns = bench.namespace("scale")
    failures: list[str] = []
    bodies = []
    for i in range(args.n):
        b = bl.engine(f"e-{i:04d}", bench.info, model, "engines", serving={"replicas": 1})
        b["metadata"]["namespace"] = ns
        bodies.append(b)
    api = bench.api
    env = {"LLMENGINE_RESYNC_SECONDS": str(args.resync_seconds)}
    with bl.Operator(bench, [ns], env) as op:
        time.sleep(3)
        idle_rss = op.rss_mib()
        tracker = ReadyTracker(list_engines(bench.new_api()), engines_args(ns), bl.is_ready).start()
        before, cpu0 = bench.request_counts(), op.cpu_seconds()
        bl.log(f"store hits: creating {args.n} LLMEngines at concurrency {args.concurrency}")
        t0 = time.monotonic()
        created_at: dict[str, float] = {}

        def create(api_: Any, body: dict[str, Any]) -> None:
            create_engine(api_, body)
            created_at[body["metadata"]["name"]] = time.monotonic()

        create_s, errors = create_all(bench, bodies, create, args.concurrency)
        ok = tracker.wait({b["metadata"]["name"] for b in bodies}, args.timeout)
        t_end = time.monotonic()
        during = bl.counts_delta(before, bench.request_counts())
        cpu_during = op.cpu_seconds() - cpu0
        reconciles_during = op.metric("llmengine_reconcile_duration_seconds_count")
        reconcile_seconds = op.metric("llmengine_reconcile_duration_seconds_sum")
        peak_during = op.peak_rss_mib()
        done = sorted(tracker.done_at.values())
        total = (done[-1] - t0) if ok else None
        bl.log(f"store hits: {len(done)}/{args.n} Ready, {total and round(total, 1)}s; steady state {args.settle}s")
        # The last status writes and events of the apply settle first; then a window of at least one resync period.
        time.sleep(args.settle_delay)
        s0, c0, r0 = bench.request_counts(), op.cpu_seconds(), op.metric("llmengine_reconcile_duration_seconds_count")
        time.sleep(args.settle)
        steady = bl.counts_delta(s0, bench.request_counts())
        steady_cpu = op.cpu_seconds() - c0
        steady_reconciles = op.metric("llmengine_reconcile_duration_seconds_count") - r0
        tracker.stop()
        store_hits = op.metric("llmengine_store_hits_total")
        peak = op.peak_rss_mib()
        alive = op.alive()
    latencies = [tracker.done_at[n] - created_at[n] for n in tracker.done_at if n in created_at]
    # Correctness: every engine Ready from the store, and not one build Job.
    objs = client.CustomObjectsApi(api).list_namespaced_custom_object(bl.GROUP, bl.VERSION, ns, bl.PLURAL)["items"]
    reasons: dict[str, int] = defaultdict(int)
    for o in objs:
        built: dict[str, Any] = next(
            (c for c in (o.get("status") or {}).get("conditions") or [] if c["type"] == "EngineBuilt"), {}
        )
        reasons[str(built.get("reason"))] += 1
    jobs = client.BatchV1Api(api).list_namespaced_job(ns).items
    if not ok:
        failures.append(f"store hits: only {len(done)}/{args.n} Ready within {args.timeout}s")
    if jobs:
        failures.append(f"store hits: {len(jobs)} build Job(s) ran for engines that were committed")
    if reasons.get("StoreHit", 0) != args.n:
        failures.append(f"store hits: EngineBuilt reasons {dict(reasons)}")
    if errors:
        failures.append(f"store hits: {len(errors)} create errors, e.g. {errors[0]}")
    if not alive:
        failures.append("store hits: the operator exited")
    wall = t_end - t0
    return {
        "n": args.n,
        "create_seconds": round(create_s, 2),
        "all_ready_seconds": round(total, 2) if total else None,
        "ready": len(done),
        "rate_per_second": round(args.n / total, 2) if total else None,
        "create_to_ready_seconds": bl.summary_stats(latencies),
        "engine_built_reasons": dict(reasons),
        "build_jobs": len(jobs),
        "operator": {
            "rss_idle_mib": idle_rss,
            "rss_peak_mib_during_apply": peak_during,
            "rss_peak_mib": peak,
            "cpu_seconds_during_apply": round(cpu_during, 1),
            "reconciles_during_apply": int(reconciles_during),
            # Wall time of one pass (the operator's own histogram): mostly waiting for a thread of the event loop's
            # default executor, which every Kubernetes call of every engine goes through.
            "reconcile_pass_mean_seconds_during_apply": round(reconcile_seconds / max(reconciles_during, 1), 2),
            "store_hits_metric": int(store_hits),
            "api_requests_during_apply": during["operator"],
            "api_requests_per_engine_during_apply": round(during["operator"] / args.n, 2),
            "steady_state_window_seconds": args.settle,
            "steady_state_window_starts_after_all_ready_seconds": args.settle_delay,
            "steady_api_requests": steady["operator"],
            "steady_api_requests_per_engine_per_minute": round(steady["operator"] / args.n * 60 / args.settle, 2),
            "steady_reconciles_per_second": round(steady_reconciles / args.settle, 1),
            "steady_cpu_fraction_of_one_core": round(steady_cpu / args.settle, 2),
        },
        "all_clients_api_requests_during_apply": during["all"],
        "all_clients_api_requests_by_verb_during_apply": during["all_by_verb"],
        "seconds_measured": round(wall, 1),
    }, failures


class JobWatch:
    """Every build Job of a namespace by UID, and after every event the number active per pool (no Complete or
    Failed condition, not deleted); the maximum seen is exact in the API server's order of events."""

    def __init__(self, bench: bl.Bench, ns: str) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.max_active: dict[str, int] = defaultdict(int)
        self.samples = 0
        self._stop = threading.Event()
        self._api = client.BatchV1Api(bench.new_api())
        self._ns = ns
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> JobWatch:
        self._t.start()
        time.sleep(0.5)
        return self

    def _run(self) -> None:
        with bl.watch_stream(self._api.list_namespaced_job, self._ns) as events:
            for ev in events:
                if self._stop.is_set():
                    return
                job = ev["object"]
                md = job["metadata"]
                finished = job_ended(job)
                now = time.monotonic()
                prev = self.jobs.get(md["uid"]) or {}
                self.jobs[md["uid"]] = {
                    "seen_at": prev.get("seen_at", now),
                    "finished_at": prev.get("finished_at") or (now if finished else None),
                    "name": md["name"],
                    "pool": (md.get("labels") or {}).get(POOL_LABEL, "?"),
                    "digest": (md.get("annotations") or {}).get(DIGEST_ANNOTATION, ""),
                    "active": ev["type"] != "DELETED" and not finished and not md.get("deletionTimestamp"),
                    "failed": any(
                        c.get("status") == "True" and c.get("type") == "Failed"
                        for c in (job.get("status") or {}).get("conditions") or []
                    ),
                }
                active: dict[str, int] = defaultdict(int)
                for j in self.jobs.values():
                    active[j["pool"]] += j["active"]
                for pool, k in active.items():
                    self.max_active[pool] = max(self.max_active[pool], k)
                self.samples += 1

    def stop(self) -> None:
        self._stop.set()

    def utilisation(self, limit: int, wall: float) -> dict[str, Any]:
        """Per pool: mean seconds a build Job was active (first seen to Complete/Failed, as this watch saw it) and
        the share of the pool's build slots (limit x wall time) that held an active Job."""
        out: dict[str, Any] = {}
        pools = {j["pool"] for j in self.jobs.values()}
        for pool in sorted(pools):
            spans = [
                j["finished_at"] - j["seen_at"]
                for j in self.jobs.values()
                if j["pool"] == pool and j["finished_at"] is not None
            ]
            out[pool] = {
                "job_active_seconds": bl.summary_stats(spans),
                "slot_utilisation": round(sum(spans) / (limit * wall), 2) if wall else None,
            }
        return out


def run_builds(bench: bl.Bench, model: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    ns = bench.namespace("builds")
    failures: list[str] = []
    limit = int(os.environ.get("LLMENGINE_BUILD_CONCURRENCY_PER_POOL", "2"))
    targets = ["H100-80GB", "A100-80GB"]
    bodies = []
    for i in range(args.builds):
        b = bl.engine(
            f"b-{i:04d}",
            bench.info,
            model,
            "engines",
            serving={"replicas": 1},
            build={"maxSeqLen": 1025 + i},
            target={"gpu": targets[i % len(targets)]},
        )
        b["metadata"]["namespace"] = ns
        bodies.append(b)
    env = {"LLMENGINE_RESYNC_SECONDS": str(args.resync_seconds), "LLMENGINE_BUILD_CONCURRENCY_PER_POOL": str(limit)}
    with bl.Operator(bench, [ns], env) as op:
        jw = JobWatch(bench, ns).start()
        tracker = ReadyTracker(list_engines(bench.new_api()), engines_args(ns), bl.is_ready).start()
        before = bench.request_counts()
        bl.log(f"builds: creating {args.builds} LLMEngines (distinct identities, 2 pools)")
        t0 = time.monotonic()
        create_s, errors = create_all(bench, bodies, create_engine, args.concurrency)
        ok = tracker.wait({b["metadata"]["name"] for b in bodies}, args.timeout)
        done = sorted(tracker.done_at.values())
        total = (done[-1] - t0) if ok else None
        wall = time.monotonic() - t0
        during = bl.counts_delta(before, bench.request_counts())
        time.sleep(2)  # the last Job events
        jw.stop()
        tracker.stop()
        peak = op.peak_rss_mib()
        builds_metric = op.metric("llmengine_builds_total")
    bl.log(f"builds: {len(done)}/{args.builds} Ready, {total and round(total, 1)}s")
    per_digest: dict[str, list[str]] = defaultdict(list)
    for uid, j in jw.jobs.items():
        per_digest[j["digest"]].append(uid)
    duplicated = {d[:12]: len(u) for d, u in per_digest.items() if len(u) != 1}
    by_pool: dict[str, int] = defaultdict(int)
    for j in jw.jobs.values():
        by_pool[j["pool"]] += 1
    over = {p: k for p, k in jw.max_active.items() if k > limit}
    if not ok:
        failures.append(f"builds: only {len(done)}/{args.builds} Ready within {args.timeout}s")
    if duplicated:
        failures.append(f"builds: identities with more than one build Job: {duplicated}")
    if len(per_digest) != args.builds:
        failures.append(f"builds: {len(per_digest)} identities got a build Job, expected {args.builds}")
    if over:
        failures.append(f"builds: more than {limit} build Jobs active in a pool: {over}")
    if errors:
        failures.append(f"builds: {len(errors)} create errors, e.g. {errors[0]}")
    return {
        "n": args.builds,
        "pools": dict(by_pool),
        "concurrency_limit_per_pool": limit,
        "max_active_build_jobs_per_pool": dict(jw.max_active),
        "build_slots": jw.utilisation(limit, wall),
        "seconds_measured": round(wall, 1),
        "job_events_seen": jw.samples,
        "build_jobs": len(jw.jobs),
        "failed_build_jobs": sum(j["failed"] for j in jw.jobs.values()),
        "identities_with_duplicate_jobs": duplicated,
        "create_seconds": round(create_s, 2),
        "all_ready_seconds": round(total, 2) if total else None,
        "ready": len(done),
        "builds_per_minute": round(args.builds / total * 60, 1) if total else round(len(done) / wall * 60, 1),
        "operator_rss_peak_mib": peak,
        "operator_builds_total_metric": int(builds_metric),
        "operator_api_requests": during["operator"],
        "operator_api_requests_per_engine": round(during["operator"] / args.builds, 1),
    }, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="LLMEngines (store hits) and baseline Deployments")
    ap.add_argument("--builds", type=int, default=200, help="LLMEngines that each need a build")
    ap.add_argument("--concurrency", type=int, default=16, help="client threads creating objects")
    ap.add_argument("--resync-seconds", type=float, default=60.0, help="LLMENGINE_RESYNC_SECONDS of the operator")
    ap.add_argument("--settle", type=float, default=120.0, help="steady-state window (s), after --settle-delay")
    ap.add_argument("--settle-delay", type=float, default=15.0, help="pause after all are Ready before the window")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per phase (s)")
    ap.add_argument("--max-procs", type=int, default=4, help="pod runner: container processes at once")
    ap.add_argument("--serving-exec", action="store_true", help="run serving pods' download init containers")
    ap.add_argument("--skip", action="append", default=[], choices=["baseline", "hits", "builds"])
    ap.add_argument("--name", default=f"bench-scale-{os.getpid()}")
    bl.add_operator_env_arg(ap)
    ap.add_argument("--keep", action="store_true", help="leave the dev cluster running")
    args = ap.parse_args()

    runner = ["--max-procs", str(args.max_procs)] + ([] if args.serving_exec else ["--no-serving-exec"])
    gpus = {"h100-80gb": 2 * args.n + args.builds + 16, "a100-80gb": args.builds + 16}
    summary: dict[str, Any] = {
        "benchmark": "scale",
        "args": {k: v for k, v in vars(args).items() if k not in ("keep",)},
    }
    failures: list[str] = []
    t_start = time.monotonic()
    src = bl.source()  # at the start: the code the operator subprocesses import
    with bl.Bench(args.name, gpus, keep=args.keep, runner_args=runner, operator_env=args.operator_env) as bench:
        model = bench.checkpoint()
        if not {"baseline", "hits"} <= set(args.skip):
            template = seed(bench, model, args)
        if "baseline" not in args.skip:
            summary["baseline_deployments"] = run_baseline(bench, template, args)
        if "hits" not in args.skip:
            summary["store_hit_engines"], f = run_store_hits(bench, model, args)
            failures += f
        base = (summary.get("baseline_deployments") or {}).get("all_available_seconds")
        ops = (summary.get("store_hit_engines") or {}).get("all_ready_seconds")
        if base and ops:
            summary["ratio_engines_ready_to_deployments_available"] = round(ops / base, 2)
        if "builds" not in args.skip:
            summary["builds"], f = run_builds(bench, model, args)
            failures += f
    return bl.finish(summary, src, t_start, failures)


if __name__ == "__main__":
    sys.exit(main())
