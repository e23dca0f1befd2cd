"""Operator reaction latency on a fresh dev cluster: apply -> build Job exists, and build Job Complete -> serving
Deployment updated (its pod template annotation llmengine.io/engine-digest equals the new engine's digest).

--parallel engines (half on the H100-80GB pool, half on A100-80GB, so no build ever waits for a slot) are created and
brought to Ready first (not sampled). Then each engine, in its own thread, repeats: patch spec.build.maxSeqLen to a
value never used before (a new engine identity, so a build), wait for Ready at the new generation. Three watches,
opened before anything is created, timestamp every event on arrival (time.monotonic in this process):
Jobs (first seen, Complete condition), Deployments (each new template digest), LLMEngines (Ready at a generation).
The apply time is taken just before the PATCH request is sent.

Prints one JSON summary with p50/p99; exits 1 when a sample times out or an identity gets more than one build Job.

    .venv/bin/python scripts/bench_latency.py --samples 100
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client

import benchlib as bl
from llmengine.render.common import DIGEST_ANNOTATION


class Events:
    """Arrival times of the events the samples wait on, keyed so a waiter can poll for them."""

    def __init__(self, bench: bl.Bench, ns: str) -> None:
        self.ns = ns
        self.lock = threading.Lock()
        self.job_added: dict[str, tuple[float, set[str]]] = {}  # digest -> (t, owner engine names)
        self.job_uids: dict[str, set[str]] = defaultdict(set)  # digest -> Job UIDs
        self.job_complete: dict[str, float] = {}
        self.dep_digest: dict[tuple[str, str], float] = {}  # (engine, digest) -> first time the template has it
        self.ready: dict[tuple[str, int], float] = {}  # (engine, generation) -> first time Ready at it
        self.stop = threading.Event()
        apis = [bench.new_api() for _ in range(3)]
        self.threads = [
            threading.Thread(target=self._jobs, args=(client.BatchV1Api(apis[0]),), daemon=True),
            threading.Thread(target=self._deps, args=(client.AppsV1Api(apis[1]),), daemon=True),
            threading.Thread(target=self._engines, args=(client.CustomObjectsApi(apis[2]),), daemon=True),
        ]

    def start(self) -> Events:
        for t in self.threads:
            t.start()
        time.sleep(1.0)
        return self

    def _jobs(self, batch: Any) -> None:
        with bl.watch_stream(batch.list_namespaced_job, self.ns) as events:
            for ev in events:
                t = time.monotonic()
                if self.stop.is_set():
                    return
                job = ev["object"]
                md = job["metadata"]
                digest = (md.get("annotations") or {}).get(DIGEST_ANNOTATION, "")
                owners = {o["name"] for o in md.get("ownerReferences") or []}
                complete = any(
                    c.get("type") == "Complete" and c.get("status") == "True"
                    for c in (job.get("status") or {}).get("conditions") or []
                )
                with self.lock:
                    if ev["type"] != "DELETED":
                        self.job_uids[digest].add(md["uid"])
                    self.job_added.setdefault(digest, (t, owners))
                    if complete:
                        self.job_complete.setdefault(digest, t)

    def _deps(self, apps: Any) -> None:
        with bl.watch_stream(apps.list_namespaced_deployment, self.ns) as events:
            for ev in events:
                t = time.monotonic()
                if self.stop.is_set():
                    return
                dep = ev["object"]
                engine = next((o["name"] for o in dep["metadata"].get("ownerReferences") or []), "")
                digest = ((dep["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get(
                    DIGEST_ANNOTATION
                )
                if digest:
                    with self.lock:
                        self.dep_digest.setdefault((engine, digest), t)

    def _engines(self, co: Any) -> None:
        with bl.watch_stream(co.list_namespaced_custom_object, bl.GROUP, bl.VERSION, self.ns, bl.PLURAL) as events:
            for ev in events:
                t = time.monotonic()
                if self.stop.is_set():
                    return
                obj = ev["object"]
                if bl.is_ready(obj):
                    key = (obj["metadata"]["name"], int(obj["metadata"]["generation"]))
                    with self.lock:
                        self.ready.setdefault(key, t)


def poll(fn: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got is not None:
            return got
        time.sleep(0.02)
    raise TimeoutError(what)


def sample(ev: Events, co: Any, ns: str, name: str, seq_len: int, timeout: float) -> dict[str, Any]:
    """One change of one engine that needs a build; every interval measured on event arrival times."""
    with ev.lock:
        known = set(ev.job_added)
    t_apply = time.monotonic()
    obj = co.patch_namespaced_custom_object(
        bl.GROUP, bl.VERSION, ns, bl.PLURAL, name, {"spec": {"build": {"maxSeqLen": seq_len}}}
    )
    gen = int(obj["metadata"]["generation"])

    def new_job() -> tuple[str, float] | None:
        with ev.lock:
            for d, (t, owners) in ev.job_added.items():
                if d not in known and name in owners:
                    return d, t
        return None

    digest, t_job = poll(new_job, timeout, f"{name}: build Job for maxSeqLen {seq_len}")
    t_done = poll(lambda: ev.job_complete.get(digest), timeout, f"{name}: Job {digest[:12]} Complete")
    t_dep = poll(lambda: ev.dep_digest.get((name, digest)), timeout, f"{name}: Deployment on {digest[:12]}")
    t_ready = poll(lambda: ev.ready.get((name, gen)), timeout, f"{name}: Ready at generation {gen}")
    return {
        "engine": name,
        "maxSeqLen": seq_len,
        "digest": digest[:12],
        "apply_to_job": t_job - t_apply,
        "job_run": t_done - t_job,
        "job_complete_to_deployment": t_dep - t_done,
        "apply_to_ready": t_ready - t_apply,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=4, help="engines changing at once (split over 2 pools)")
    ap.add_argument("--resync-seconds", type=float, default=5.0, help="LLMENGINE_RESYNC_SECONDS (harness: 5)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per wait (s)")
    ap.add_argument("--serving-exec", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--name", default=f"bench-latency-{os.getpid()}")
    bl.add_operator_env_arg(ap)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    limit = int(os.environ.get("LLMENGINE_BUILD_CONCURRENCY_PER_POOL", "2"))
    targets = ["H100-80GB", "A100-80GB"]
    if args.parallel > limit * len(targets):
        print(f"--parallel above {limit * len(targets)} would queue builds and measure the queue", file=sys.stderr)
        return 2
    # The stock pod runner unless serving pods should skip their download (then the benchmark's runner).
    runner = None if args.serving_exec else ["--max-procs", "8", "--no-serving-exec"]
    failures: list[str] = []
    samples: list[dict[str, Any]] = []
    t_start = time.monotonic()
    src = bl.source()  # at the start: the code the operator subprocesses import
    with bl.Bench(
        args.name,
        {"h100-80gb": 64, "a100-80gb": 64},
        keep=args.keep,
        runner_args=runner,
        operator_env=args.operator_env,
    ) as bench:
        ns = bench.namespace("latency")
        model = bench.checkpoint()
        co = client.CustomObjectsApi(bench.new_api())
        ev = Events(bench, ns).start()
        env = {"LLMENGINE_RESYNC_SECONDS": str(args.resync_seconds)}
        with bl.Operator(bench, [ns], env) as op:
            names = [f"lat-{i}" for i in range(args.parallel)]
            for i, name in enumerate(names):
                body = bl.engine(
                    name, bench.info, model, "engines", serving={"replicas": 1}, target={"gpu": targets[i % 2]}
                )
                co.create_namespaced_custom_object(bl.GROUP, bl.VERSION, ns, bl.PLURAL, body)
            for name in names:
                poll(lambda n=name: ev.ready.get((n, 1)), args.timeout, f"{name} Ready")
            bl.log(f"{len(names)} engines Ready; taking {args.samples} samples")
            seq = itertools.count(1100)
            seq_lock = threading.Lock()
            per_engine = [
                args.samples // args.parallel + (i < args.samples % args.parallel) for i in range(args.parallel)
            ]

            def worker(i: int) -> None:
                for _ in range(per_engine[i]):
                    with seq_lock:
                        seq_len = next(seq)
                    try:
                        samples.append(sample(ev, co, ns, names[i], seq_len, args.timeout))
                    except TimeoutError as e:
                        failures.append(f"timed out waiting for {e}")
                        return
                    if len(samples) % 10 == 0:
                        bl.log(f"{len(samples)} samples")

            with ThreadPoolExecutor(args.parallel) as pool:
                list(pool.map(worker, range(args.parallel)))
            peak = op.peak_rss_mib()
        ev.stop.set()
        duplicated = {d[:12]: len(u) for d, u in ev.job_uids.items() if len(u) > 1}
        if duplicated:
            failures.append(f"identities with more than one build Job: {duplicated}")

    def stats(key: str) -> dict[str, Any]:
        return bl.summary_stats([s[key] for s in samples])

    summary = {
        "benchmark": "latency",
        "args": {k: v for k, v in vars(args).items() if k != "keep"},
        "samples": len(samples),
        "seconds": {
            "apply_to_build_job_exists": stats("apply_to_job"),
            "build_job_complete_to_deployment_updated": stats("job_complete_to_deployment"),
            "build_job_exists_to_complete": stats("job_run"),
            "apply_to_ready": stats("apply_to_ready"),
        },
        "negative_job_complete_to_deployment": sum(s["job_complete_to_deployment"] < 0 for s in samples),
        "identities_with_duplicate_jobs": duplicated,
        "operator_rss_peak_mib": peak,
    }
    return bl.finish(summary, src, t_start, failures)


if __name__ == "__main__":
    sys.exit(main())
