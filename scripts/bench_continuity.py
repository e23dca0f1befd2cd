"""Serving continuity through a rebuild on a fresh dev cluster.

Each run: an LLMEngine with serving.replicas 3 (an identity of its own, so it builds) is brought to Ready; a watch
on its serving Deployment is opened; spec.build.maxSeqLen is patched (a new identity: a build, then a rolling update);
the run ends when the engine is Ready at the new generation and the Deployment has rolled out the new engine digest
with every replica available. Every Deployment event's status.availableReplicas is recorded. Serving pods run their
real `llmengine serve-engine download` init container through the dev cluster's stock pod runner, so a new pod is
Ready only after it has downloaded and verified the new engine.

Prints one JSON summary; exits 1 when available replicas ever dropped below spec.replicas, or a run timed out.

    .venv/bin/python scripts/bench_continuity.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

from kubernetes import client

import benchlib as bl
from llmengine.render.common import DIGEST_ANNOTATION


class DeploymentWatch:
    """Every event of one Deployment: (arrival time, type, availableReplicas, updatedReplicas, template digest)."""

    def __init__(self, bench: bl.Bench, ns: str, name: str) -> None:
        self.events: list[tuple[float, str, int, int, str | None]] = []
        self.stop = threading.Event()
        self._apps = client.AppsV1Api(bench.new_api())
        self._args = (ns, name)
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> DeploymentWatch:
        self._t.start()
        bl.wait(lambda: self.events, 30, "the Deployment's first watch event")
        return self

    def _run(self) -> None:
        ns, name = self._args
        fs = f"metadata.name={name}"
        with bl.watch_stream(self._apps.list_namespaced_deployment, ns, field_selector=fs) as events:
            for ev in events:
                if self.stop.is_set():
                    return
                dep = ev["object"]
                st = dep.get("status") or {}
                digest = ((dep["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get(
                    DIGEST_ANNOTATION
                )
                self.events.append(
                    (
                        time.monotonic(),
                        ev["type"],
                        int(st.get("availableReplicas") or 0),
                        int(st.get("updatedReplicas") or 0),
                        digest,
                    )
                )


def rolled_out(dep: Any, digest: str, replicas: int) -> bool:
    st = dep.status
    tmpl = (dep.spec.template.metadata.annotations or {}).get(DIGEST_ANNOTATION)
    return bool(
        tmpl == digest
        and (st.observed_generation or 0) >= (dep.metadata.generation or 0)
        and (st.updated_replicas or 0) == replicas
        and (st.available_replicas or 0) == replicas
        and (st.replicas or 0) == replicas
    )


def one_run(bench: bl.Bench, ns: str, model: str, i: int, replicas: int, timeout: float) -> dict[str, Any]:
    co = client.CustomObjectsApi(bench.api)
    apps = client.AppsV1Api(bench.api)
    name = f"cont-{i}"
    body = bl.engine(name, bench.info, model, "engines", serving={"replicas": replicas}, build={"maxSeqLen": 1500 + i})
    co.create_namespaced_custom_object(bl.GROUP, bl.VERSION, ns, bl.PLURAL, body)

    def get() -> dict[str, Any]:
        return dict(co.get_namespaced_custom_object(bl.GROUP, bl.VERSION, ns, bl.PLURAL, name))

    old = bl.wait(lambda: (o := get()) and bl.is_ready(o) and o, timeout, f"{name} Ready")
    old_digest = old["status"]["servingEngine"]["digest"]
    watch = DeploymentWatch(bench, ns, f"llme-{name}").start()
    t0 = time.monotonic()
    patched = co.patch_namespaced_custom_object(
        bl.GROUP, bl.VERSION, ns, bl.PLURAL, name, {"spec": {"build": {"maxSeqLen": 2500 + i}}}
    )
    gen = int(patched["metadata"]["generation"])
    new = bl.wait(
        lambda: (o := get()) and bl.is_ready(o) and o["metadata"]["generation"] == gen and o,
        timeout,
        f"{name} Ready at generation {gen}",
    )
    t_ready = time.monotonic()
    new_digest = new["status"]["servingEngine"]["digest"]
    bl.wait(
        lambda: rolled_out(apps.read_namespaced_deployment(f"llme-{name}", ns), new_digest, replicas),
        timeout,
        "rollout complete",
    )
    t_rolled = time.monotonic()
    time.sleep(1.0)  # events in flight
    watch.stop.set()
    evs = watch.events
    during = [e for e in evs if e[0] <= t_rolled + 1.0]
    first_new = next((e[0] for e in during if e[4] == new_digest), None)
    co.delete_namespaced_custom_object(bl.GROUP, bl.VERSION, ns, bl.PLURAL, name)
    return {
        "engine": name,
        "replicas": replicas,
        "old_digest": old_digest[:12],
        "new_digest": new_digest[:12],
        "deployment_events": len(during),
        "min_available": min(e[2] for e in during),
        "available_series": [e[2] for e in during],
        "patch_to_template_updated_seconds": round(first_new - t0, 2) if first_new else None,
        "patch_to_ready_seconds": round(t_ready - t0, 2),
        "patch_to_rollout_complete_seconds": round(t_rolled - t0, 2),
        "rollout_seconds": round(t_rolled - first_new, 2) if first_new else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--resync-seconds", type=float, default=5.0, help="LLMENGINE_RESYNC_SECONDS (harness: 5)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--name", default=f"bench-continuity-{os.getpid()}")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    failures: list[str] = []
    runs: list[dict[str, Any]] = []
    t_start = time.monotonic()
    src = bl.source()  # at the start: the code the operator subprocesses import
    with bl.Bench(args.name, {"h100-80gb": 64}, keep=args.keep) as bench:
        ns = bench.namespace("continuity")
        model = bench.checkpoint()
        with bl.Operator(bench, [ns], {"LLMENGINE_RESYNC_SECONDS": str(args.resync_seconds)}):
            for i in range(args.runs):
                try:
                    r = one_run(bench, ns, model, i, args.replicas, args.timeout)
                except TimeoutError as e:
                    failures.append(f"run {i}: {e}")
                    continue
                runs.append(r)
                bl.log(f"run {i}: min available {r['min_available']}, {r['patch_to_rollout_complete_seconds']}s")
                if r["min_available"] < args.replicas:
                    failures.append(f"run {i}: available replicas dropped to {r['min_available']} < {args.replicas}")
    summary = {
        "benchmark": "continuity",
        "args": {k: v for k, v in vars(args).items() if k != "keep"},
        "min_available_over_all_runs": min((r["min_available"] for r in runs), default=None),
        "patch_to_rollout_complete_seconds": bl.summary_stats([r["patch_to_rollout_complete_seconds"] for r in runs]),
        "rollout_seconds": bl.summary_stats([r["rollout_seconds"] for r in runs if r["rollout_seconds"] is not None]),
        "runs": runs,
    }
    return bl.finish(summary, src, t_start, failures)


if __name__ == "__main__":
    sys.exit(main())
