"""Where the operator's memory and its apply -> build Job latency go, measured on a private dev cluster.

The operator runs under scripts/traced_operator.py (the same operator, plus tracemalloc and a timeline of watch
events, wake-ups, reconcile passes and Kubernetes calls). Two phases, each with an operator of its own:

1. latency (--samples, no tracemalloc): two engines are brought to Ready; then, one at a time, one engine's
   spec.build.maxSeqLen is patched to a new value (a new identity, so a build). Per sample: PATCH sent -> the
   operator's watch event -> wake-up -> pass start -> each call of the pass -> build Job created; the sum over the
   samples says where the time goes.
2. memory (--n, tracemalloc with --trace-frames frames): a seed engine is built, then --n store-hit engines are created
   and brought to Ready; snapshots at idle and after --settle seconds of steady state. Reports VmHWM/VmRSS (which
   include tracemalloc's own traces, so they are higher than an untraced operator's) and the traced bytes added per
   engine, by owner (the innermost frame in kopf, kubernetes, llmengine, pydantic, ... ) and by line.

    .venv/bin/python scripts/profile_operator.py --n 300 --samples 10
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import sys
import threading
import time
import tracemalloc
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client

import benchlib as bl

SCRIPT = Path(__file__).with_name("traced_operator.py")


class TracedOperator(bl.Operator):
    def __init__(self, bench: bl.Bench, namespaces: list[str], out: Path, frames: int, env: dict[str, str]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        super().__init__(bench, namespaces, {**env, "PROFILE_DIR": str(out), "PROFILE_TRACE_FRAMES": str(frames)})
        assert self.cmd[1:3] == ["-m", "llmengine.cli"], self.cmd
        self.cmd = [self.cmd[0], str(SCRIPT), *self.cmd[3:]]
        self.out = out
        self.snapshots = 0

    def __enter__(self) -> TracedOperator:
        super().__enter__()
        # Snapshots only once Kopf has started (its start-up activity done): the idle baseline is the running operator.
        bl.wait(lambda: "Activity 'startup' succeeded" in self.log_path.read_text(errors="replace"), 300, "startup")
        return self

    def snapshot(self) -> Path:
        path = self.out / f"snapshot-{self.snapshots}.bin"
        self.snapshots += 1
        os.kill(self.pid, signal.SIGUSR1)
        bl.wait(path.exists, 300, f"snapshot {path.name}")
        return path

    def timeline(self) -> list[list[Any]]:
        path = self.out / "timeline.jsonl"
        path.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR2)
        bl.wait(path.exists, 60, "timeline")
        return [json.loads(ln) for ln in path.read_text().splitlines()]


# ---- latency ------------------------------------------------------------------------------------------------
class JobWatch:
    def __init__(self, bench: bl.Bench, ns: str) -> None:
        self.first: dict[str, tuple[float, str]] = {}  # job name -> (arrival time.time(), creationTimestamp)
        self.lock = threading.Lock()
        self.api = client.BatchV1Api(bench.new_api())
        self.ns = ns
        threading.Thread(target=self._run, daemon=True).start()
        time.sleep(1.0)

    def _run(self) -> None:
        with bl.watch_stream(self.api.list_namespaced_job, self.ns) as events:
            for ev in events:
                t = time.time()
                md = ev["object"]["metadata"]
                with self.lock:
                    self.first.setdefault(md["name"], (t, md.get("creationTimestamp", "")))


def breakdown(timeline: list[list[Any]], name: str, t_patch: float, t_job: float, job: str) -> dict[str, Any]:
    """The steps between the PATCH and the build Job's watch event, from the operator's timeline."""
    evs = [e for e in timeline if t_patch <= e[0] <= t_job + 0.5]
    steps: dict[str, Any] = {}
    watch = next((e for e in evs if e[1] == "watch" and e[2] == "llmengines" and e[3] == name), None)
    wake = next((e for e in evs if e[1] == "wake" and e[2] == name), None)
    start = next((e for e in evs if e[1] == "pass-start" and e[2] == name and (wake is None or e[0] >= wake[0])), None)
    created = next(
        (
            e
            for e in evs
            if e[1] == "call-ended" and e[2] == "POST" and str(e[3]).endswith("/jobs") and start and e[0] >= start[0]
        ),
        None,
    )
    if watch:
        steps["patch_to_watch_event"] = watch[0] - t_patch
    if watch and wake:
        steps["watch_event_to_wake"] = wake[0] - watch[0]
    if wake and start:
        steps["wake_to_pass_start"] = start[0] - wake[0]
    calls: list[dict[str, Any]] = []
    if start and created:
        # Every call in the window (this pass's and other passes', on one connection pool): queued and ended.
        pending: dict[tuple[Any, ...], float] = {}
        for e in evs:
            if not (start[0] <= e[0] <= created[0]) or not e[1].startswith("call-"):
                continue
            key = tuple(e[2:])
            if e[1] == "call-queued":
                pending[key] = e[0]
            elif e[1] == "call-ended" and key in pending:
                q = pending.pop(key)
                calls.append({"call": key[0], "args": key[1:], "run": e[0] - q, "at": q - start[0]})
        steps["pass_start_to_job_created"] = created[0] - start[0]
        sv = [e for e in evs if e[1].startswith("store-view") and start[0] <= e[0] <= created[0]]
        if len(sv) >= 2:
            steps["store_view"] = sv[-1][0] - sv[0][0]
    steps["job_created_to_watch_event"] = t_job - created[0] if created else None
    steps["total"] = t_job - t_patch
    steps["calls"] = calls
    return steps


def run_latency(bench: bl.Bench, model: str, args: argparse.Namespace) -> dict[str, Any]:
    ns = bench.namespace("latency")
    co = client.CustomObjectsApi(bench.new_api())
    jobs = JobWatch(bench, ns)
    env = {"LLMENGINE_RESYNC_SECONDS": str(args.resync_seconds)}
    samples = []
    with TracedOperator(bench, [ns], bench.dir / "profile-latency", 0, env) as op:
        names = ["lat-0", "lat-1"]

        def ready(name: str) -> bool:
            return bl.is_ready(co.get_namespaced_custom_object(bl.GROUP, bl.VERSION, ns, bl.PLURAL, name))

        def new_job(before: set[str]) -> str | None:
            return next((j for j in jobs.first if j not in before), None)

        for name in names:
            co.create_namespaced_custom_object(
                bl.GROUP,
                bl.VERSION,
                ns,
                bl.PLURAL,
                bl.engine(name, bench.info, model, "engines", serving={"replicas": 1}),
            )
        for name in names:
            bl.wait(functools.partial(ready, name), 300, f"{name} Ready")
        bl.log("latency: engines Ready; sampling")
        for i in range(args.samples):
            name = names[i % 2]
            before = set(jobs.first)
            time.sleep(args.gap)  # the previous sample's build and rollout go on; the operator is not idle either
            t_patch = time.time()
            co.patch_namespaced_custom_object(
                bl.GROUP, bl.VERSION, ns, bl.PLURAL, name, {"spec": {"build": {"maxSeqLen": 1100 + i}}}
            )
            job = bl.wait(functools.partial(new_job, before), 120, "new Job")
            t_job = jobs.first[job][0]
            samples.append((name, t_patch, t_job, job))
            bl.wait(functools.partial(ready, name), 300, f"{name} Ready")
        timeline = op.timeline()
    rows = [breakdown(timeline, *s) for s in samples]
    keys = [k for k in rows[0] if k != "calls"] if rows else []
    summary: dict[str, Any] = {}
    for k in keys:
        xs = [r[k] for r in rows if r.get(k) is not None]
        if xs:
            summary[k] = {"p50": round(statistics.median(xs), 3), "max": round(max(xs), 3), "n": len(xs)}
    by_call: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        for c in r["calls"]:
            by_call[c["call"]].append(c["run"])
    summary["calls_in_window"] = {
        k: {"count_per_sample": round(len(v) / len(rows), 1), "run_p50": round(statistics.median(v), 3)}
        for k, v in sorted(by_call.items())
    }
    summary["samples"] = [
        {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "calls"} for r in rows
    ]
    summary["first_sample_calls"] = rows[0]["calls"] if rows else []
    return summary


# ---- memory -------------------------------------------------------------------------------------------------
PACKAGES = (
    "kopf",
    "kubernetes",
    "llmengine",
    "pydantic",
    "prometheus_client",
    "botocore",
    "boto3",
    "aiohttp",
    "structlog",
    "urllib3",
    "yaml",
)


def owner(tb: tracemalloc.Traceback) -> str:
    """The innermost frame in a package of interest (json.loads called by kopf is kopf's), else the innermost file."""
    for frame in reversed(tb):  # stored oldest first
        f = frame.filename
        for p in PACKAGES:
            if f"/{p}/" in f:
                rel = f.split(f"/{p}/", 1)[1]
                return f"{p}/{rel}:{frame.lineno}"
    return f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}"


def analyse(idle: Path, busy: Path, n: int, top: int) -> dict[str, Any]:
    a = tracemalloc.Snapshot.load(str(idle))
    b = tracemalloc.Snapshot.load(str(busy))
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    a, b = a.filter_traces(filters), b.filter_traces(filters)
    diff = b.compare_to(a, "traceback")
    by_line: dict[str, int] = defaultdict(int)
    by_pkg: dict[str, int] = defaultdict(int)
    for st in diff:
        o = owner(st.traceback)
        by_line[o] += st.size_diff
        by_pkg[o.split("/", 1)[0] if "/" in o else "other"] += st.size_diff
    total = sum(by_pkg.values())

    def per_engine(x: int) -> float:
        return round(x / n / 1024, 1)

    return {
        "traced_mib_idle": round(sum(s.size for s in a.statistics("filename")) / 2**20, 1),
        "traced_mib_busy": round(sum(s.size for s in b.statistics("filename")) / 2**20, 1),
        "added_kib_per_engine": per_engine(total),
        "by_package_kib_per_engine": {k: per_engine(v) for k, v in sorted(by_pkg.items(), key=lambda kv: -kv[1])},
        "by_line_kib_per_engine": {k: per_engine(v) for k, v in sorted(by_line.items(), key=lambda kv: -kv[1])[:top]},
    }


def run_memory(bench: bl.Bench, model: str, args: argparse.Namespace) -> dict[str, Any]:
    seed_ns = bench.namespace("seed")
    co = client.CustomObjectsApi(bench.new_api())
    env = {"LLMENGINE_RESYNC_SECONDS": str(args.resync_seconds)}
    with bl.Operator(bench, [seed_ns], env):
        co.create_namespaced_custom_object(
            bl.GROUP, bl.VERSION, seed_ns, bl.PLURAL, bl.engine("seed", bench.info, model, "engines")
        )
        bl.wait(
            lambda: bl.is_ready(co.get_namespaced_custom_object(bl.GROUP, bl.VERSION, seed_ns, bl.PLURAL, "seed")),
            300,
            "seed Ready",
        )
    ns = bench.namespace("scale")
    with TracedOperator(bench, [ns], bench.dir / "profile-memory", args.trace_frames, env) as op:
        time.sleep(3)
        idle = op.snapshot()
        rss_idle = op.rss_mib()
        bodies = []
        for i in range(args.n):
            b = bl.engine(f"e-{i:04d}", bench.info, model, "engines", serving={"replicas": 1})
            b["metadata"]["namespace"] = ns
            bodies.append(b)
        api = bench.new_api()
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda b: client.CustomObjectsApi(api).create_namespaced_custom_object(
                        bl.GROUP, bl.VERSION, ns, bl.PLURAL, b
                    ),
                    bodies,
                )
            )

        def all_ready() -> bool:
            items = co.list_namespaced_custom_object(bl.GROUP, bl.VERSION, ns, bl.PLURAL)["items"]
            return bool(sum(bl.is_ready(o) for o in items) == args.n)

        bl.wait(all_ready, 1800, "all Ready", interval=5)
        ready_s = time.monotonic() - t0
        peak_apply = op.peak_rss_mib()
        bl.log(f"memory: {args.n} Ready in {ready_s:.0f}s; settling {args.settle}s")
        time.sleep(args.settle)
        busy = op.snapshot()
        result = {
            "n": args.n,
            "trace_frames": args.trace_frames,
            "ready_seconds": round(ready_s, 1),
            "rss_idle_mib": rss_idle,
            "vmhwm_after_apply_mib": peak_apply,
            "vmhwm_mib": op.peak_rss_mib(),
            "rss_steady_mib": op.rss_mib(),
        }
    result.update(analyse(idle, busy, args.n, args.top))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="store-hit engines for the memory phase (0: skip)")
    ap.add_argument("--samples", type=int, default=10, help="apply -> build Job samples (0: skip)")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between a sample's Ready and the next PATCH")
    ap.add_argument("--trace-frames", type=int, default=12)
    ap.add_argument("--resync-seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--name", default=f"profile-op-{os.getpid()}")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    summary: dict[str, Any] = {"args": vars(args), "load_at_start": os.getloadavg()}
    src = bl.source()
    t_start = time.monotonic()
    runner = ["--max-procs", "4", "--no-serving-exec"]
    with bl.Bench(args.name, {"h100-80gb": args.n + 64, "a100-80gb": 16}, keep=args.keep, runner_args=runner) as bench:
        model = bench.checkpoint()
        if args.samples:
            summary["latency"] = run_latency(bench, model, args)
            bl.log(json.dumps({k: v for k, v in summary["latency"].items() if k != "first_sample_calls"}))
        if args.n:
            summary["memory"] = run_memory(bench, model, args)
    summary["load_at_end"] = os.getloadavg()
    return bl.finish(summary, src, t_start, [])


if __name__ == "__main__":
    sys.exit(main())
