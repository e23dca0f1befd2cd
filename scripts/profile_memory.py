"""What the operator's own code keeps per engine, without a cluster: --n store-hit engines through the real Reconciler.

Each engine is a Kopf-like body; an in-memory stand-in for the API server answers the pass's reads and writes (the
serving Deployment is created, then reported rolled out through the watch lookup, as the operator's index would), and
the store's client is a real boto3 client whose commit check answers "committed". The engines' passes run
concurrently, as after an apply of many engines: create, rolled out, Ready, one steady pass. tracemalloc compares
the heap after one warm-up engine with the heap after --n more, by owner (the innermost frame in the operator's
package or a library) and by line. Kopf's own per-object state and the watch are not here:
scripts/profile_operator.py measures the whole operator on a dev cluster.

    .venv/bin/python scripts/profile_memory.py --n 1000 --namespaces 10
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import itertools
import json
import resource
import sys
import tracemalloc
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from llmengine.api.config import OperatorConfig
from llmengine.clients.store.engine_store import EngineStore
from llmengine.dev.seed import engine
from llmengine.reconcile.engine import Reconciler
from llmengine.reconcile.views import deployment_essentials

PACKAGES = ("llmengine", "kopf", "kubernetes", "pydantic", "prometheus_client", "botocore", "boto3", "urllib3")
_rv = itertools.count(1000)


async def api() -> None:
    """A request's round trip: a turn of the event loop, as clients/kube.py's aiohttp requests take (no thread)."""
    await asyncio.sleep(0)


class FakeKube:
    """The API server as a store-hit pass sees it: no Jobs, no pods, writes stored and echoed back."""

    def __init__(self) -> None:
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}

    async def get_secret_data(self, ns: str, name: str) -> dict[str, str]:
        await api()
        return {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}

    async def get_job(self, ns: str, name: str) -> None:
        await api()
        return None

    async def get_object(self, *args: Any) -> None:
        await api()
        return None

    async def list_pods(self, ns: str, selector: str) -> list[dict[str, Any]]:
        await api()
        return []

    async def list_jobs(self, selector: str) -> list[dict[str, Any]]:
        await api()
        return []

    async def create(self, obj: Any) -> bool:
        await api()
        return True

    def _stored(self, obj: Any) -> dict[str, Any]:
        stored = copy.deepcopy(dict(obj))
        md = stored["metadata"]
        md.update(resourceVersion=str(next(_rv)), uid=f"uid-{md['name']}", generation=1)
        stored["status"] = {}
        self.deployments[(md["namespace"], md["name"])] = stored
        return stored

    async def create_deployment(self, obj: Any) -> dict[str, Any]:
        await api()
        return self._stored(obj)

    async def replace_deployment(self, obj: Any, resource_version: str) -> dict[str, Any]:
        await api()
        return self._stored(obj)

    async def patch_status(self, ns: str, name: str, patch: Any) -> dict[str, Any]:
        await api()
        return {"metadata": {"resourceVersion": str(next(_rv))}, "status": copy.deepcopy(dict(patch))}


class Watch:
    """The operator's index of serving Deployments, fed from what the stand-in stored, rolled out at once."""

    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube
        self.index: dict[tuple[str, str], dict[str, Any]] = {}

    def roll_out(self) -> None:
        for key, dep in self.kube.deployments.items():
            dep = copy.deepcopy(dep)
            n = dep["spec"].get("replicas") or 1
            dep["metadata"]["resourceVersion"] = str(next(_rv))
            dep["status"] = {
                "observedGeneration": 1,
                "replicas": n,
                "updatedReplicas": n,
                "readyReplicas": n,
                "availableReplicas": n,
            }
            self.index[key] = deployment_essentials(dep)
        self.kube.deployments.clear()

    def lookup(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.index.get((ns, name))


def body(i: int, namespaces: int, identities: int = 1) -> dict[str, Any]:
    info = SimpleNamespace(s3_bucket="llmengine", s3_endpoint="http://127.0.0.1:9")
    b = engine(
        f"e-{i:04d}",
        info,  # type: ignore[arg-type]
        "s3://llmengine/models/tiny/",
        "engines",
        serving={"replicas": 1},
        build={"maxSeqLen": 1024 + i % identities},
    )
    b["metadata"].update(
        namespace=f"team-{i % namespaces}", uid=f"uid-{i}", generation=1, resourceVersion=str(next(_rv))
    )
    return b


async def passes(rec: Reconciler, watch: Watch, bodies: list[dict[str, Any]]) -> list[str]:
    async def one(b: dict[str, Any]) -> None:
        await rec.reconcile(b, watch.lookup)
        written = rec.memory.written.get((b["metadata"]["namespace"], b["metadata"]["name"]))
        if written is not None and written[1] is not None:
            b["status"] = copy.deepcopy(written[1])  # Kopf's body catches up with the write's echo
            b["metadata"]["resourceVersion"] = written[0]

    await asyncio.gather(*(one(b) for b in bodies))  # created: the Deployment is made
    watch.roll_out()
    for _ in range(3):  # rolled out, Ready, steady
        await asyncio.gather(*(one(b) for b in bodies))
    return [str((b.get("status") or {}).get("phase")) for b in bodies]


def owner(tb: tracemalloc.Traceback) -> str:
    for frame in reversed(tb):  # most recent last
        for p in PACKAGES:
            if f"/{p}/" in frame.filename:
                return f"{p}/{frame.filename.split(f'/{p}/', 1)[1]}:{frame.lineno}"
    return f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}"


def vm_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    return 0.0


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    EngineStore.is_committed = lambda self, digest: True  # type: ignore[method-assign]
    kube = FakeKube()
    rec = Reconciler(kube, OperatorConfig.from_env({"LLMENGINE_COMPILER": "test"}))  # type: ignore[arg-type]
    watch = Watch(kube)
    # One engine first: what is made once (pydantic validators, the first store client, metric families) is not
    # counted per engine.
    await passes(rec, watch, [body(10**6, 1)])
    gc.collect()
    if args.frames:
        tracemalloc.start(args.frames)
    before = tracemalloc.take_snapshot() if args.frames else None
    rss0 = vm_rss_mib()
    bodies = [body(i, args.namespaces, args.identities) for i in range(args.n)]
    body_kib = None
    if args.frames:
        body_kib = tracemalloc.get_traced_memory()[0] / args.n / 1024
    phases = await passes(rec, watch, bodies)
    gc.collect()
    out: dict[str, Any] = {
        "n": args.n,
        "namespaces": args.namespaces,
        "identities": args.identities,
        "phases": {p: phases.count(p) for p in set(phases)},
        "store_clients": len(rec.gatherer.stores._clients),
        "rss_mib_before": round(rss0, 1),
        "rss_mib_after": round(vm_rss_mib(), 1),
        "rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_added_kib_per_engine": round((vm_rss_mib() - rss0) * 1024 / args.n, 1),
    }
    if before is not None:
        after = tracemalloc.take_snapshot()
        by_line: dict[str, int] = defaultdict(int)
        for st in after.compare_to(before, "traceback"):
            by_line[owner(st.traceback)] += st.size_diff
        by_pkg: dict[str, int] = defaultdict(int)
        for k, v in by_line.items():
            by_pkg[k.split("/", 1)[0] if "/" in k else "other"] += v
        out["bodies_kib_per_engine (the stand-in for Kopf's copy)"] = round(body_kib or 0, 1)
        out["traced_added_kib_per_engine"] = round(sum(by_line.values()) / args.n / 1024, 1)
        out["by_package_kib_per_engine"] = {
            k: round(v / args.n / 1024, 1) for k, v in sorted(by_pkg.items(), key=lambda kv: -kv[1])
        }
        out["by_line_kib_per_engine"] = {
            k: round(v / args.n / 1024, 2) for k, v in sorted(by_line.items(), key=lambda kv: -kv[1])[: args.top]
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--namespaces", type=int, default=1, help="engines spread over this many namespaces")
    ap.add_argument("--identities", type=int, default=1, help="distinct engine identities (store look-ups)")
    ap.add_argument("--frames", type=int, default=8, help="tracemalloc frames (0: RSS only)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
