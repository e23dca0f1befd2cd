"""Whole reconcile decisions without a cluster: snapshots as gather() would make them, and the decision's effects
read back the way the act step carries them out (status document, Jobs created or deleted, engine served)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import BuildShapes
from llmengine.api.v1alpha1 import LLMEngineSpec, LLMEngineStatus
from llmengine.plan.gpus import GPU_CLASSES
from llmengine.plan.planner import Plan, invalid_plan
from llmengine.reconcile.act import status_document
from llmengine.reconcile.actions import AdoptBuildJob, DeleteBuildJob, StartBenchmark, StartBuild
from llmengine.reconcile.decide import Decision, decide
from llmengine.reconcile.snapshot import BuildLimits, Snapshot, StoreView
from llmengine.reconcile.views import BenchView, DeploymentView, JobView

NOW = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.UTC)
D = "a" * 64
SERVER_IMAGE = "registry.example/llmengine-server:1.2.1"
SPEC = LLMEngineSpec.model_validate(
    {
        "model": {"source": {"huggingFace": {"repo": "org/model", "revision": "0" * 40}}, "catalog": "llama-2-7b"},
        "target": {"gpu": "H100-80GB"},
        "build": {"maxBatchSize": 8, "maxInputLen": 512, "maxSeqLen": 1024},
    }
)


def plan(digest: str = D, **kw: Any) -> Plan:
    base = replace(
        invalid_plan([]),
        valid=True,
        engine_digest=digest,
        short_digest=f"e-{digest[:12]}",
        gpu=GPU_CLASSES["H100-80GB"],
        gpu_count=1,
        server_image=SERVER_IMAGE,
        shapes=BuildShapes(max_batch_size=8, max_input_len=512, max_seq_len=1024, max_num_tokens=2048),
    )
    return replace(base, **kw)


def snapshot(
    *,
    status: dict[str, Any] | LLMEngineStatus | None = None,
    committed: bool | None = False,
    store_error: str | None = None,
    digest: str = D,
    max_attempts: int = 3,
    **kw: Any,
) -> Snapshot:
    st = status if isinstance(status, LLMEngineStatus) else LLMEngineStatus.model_validate(status or {})
    base = Snapshot(
        namespace="ml",
        name="llama",
        uid="uid-llama",
        generation=3,
        spec=SPEC,
        status=st,
        plan=plan(digest),
        now=NOW,
        replicas=2,
        url="http://llme-llama.ml.svc:8000",
        selector="app.kubernetes.io/instance=llama",
        limits=BuildLimits(max_attempts, 30, 3600),
        store=StoreView(committed, store_error, f"s3://b/engines/{digest}/"),
    )
    return replace(base, **kw)


@dataclass(frozen=True)
class Effects:
    """A decision as the cluster sees it after the act step."""

    decision: Decision

    @property
    def status(self) -> dict[str, Any]:
        return status_document(self.decision.status)

    @property
    def create_job(self) -> int | None:
        return next((a.attempt for a in self.decision.actions if isinstance(a, StartBuild)), None)

    @property
    def delete_job(self) -> bool:
        return self.decision.has(DeleteBuildJob)

    @property
    def adopts(self) -> bool:
        return self.decision.has(AdoptBuildJob)

    @property
    def benchmarks(self) -> bool:
        return self.decision.has(StartBenchmark)

    @property
    def deploy_digest(self) -> str | None:
        return self.decision.serves()

    @property
    def events(self) -> list[tuple[str, str, str]]:
        return list(self.decision.events)

    @property
    def requeue_after(self) -> float | None:
        return self.decision.requeue_after

    def condition(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == type_)


def run(snap: Snapshot) -> Effects:
    return Effects(decide(snap))


def job(**kw: Any) -> JobView:
    """Our engine's build Job of D, running (attempt 1)."""
    base = JobView("llme-build-x", D, 1, True, False, False, None, None, "2026-11-26T11:00:00Z", None)
    return replace(base, **{"owners": ("uid-llama",), **kw})


def deployment(digest: str | None = D, **kw: Any) -> DeploymentView:
    """A Deployment of `digest` with 2 replicas, all rolled out and available, unless told otherwise."""
    base = DeploymentView(digest, 1, 1, replicas=2, updated=2, ready=2, available=2, total=2)
    return replace(base, **kw)


def bench(**kw: Any) -> BenchView:
    base = BenchView("llme-bench-x", True, False, False, None)
    return replace(base, **kw)


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """What the API server keeps of a status under the CRD's structural schema: unknown fields are dropped, except
    where x-kubernetes-preserve-unknown-fields keeps them (which does not carry into the properties it lists)."""
    if isinstance(value, dict):
        props = schema.get("properties")
        keep = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        if props is None:
            extra = schema.get("additionalProperties")
            return {k: prune(v, extra) for k, v in value.items()} if isinstance(extra, dict) else value
        return {k: prune(v, props[k]) if k in props else v for k, v in value.items() if k in props or keep}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(v, schema["items"]) for v in value]
    return value


def status_schema() -> dict[str, Any]:
    import yaml

    crd = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "llmengine.io_llmengines.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    return schema


# Every status any Passes run wrote in this process (tests/integration/test_status_schema.py stores them all).
WRITTEN: list[dict[str, Any]] = []


class Passes:
    """Consecutive passes over one engine: each starts from the status the last one stored, as the API server
    returned it (pruned by the CRD's schema). Every status written is kept, for checks across a whole run."""

    def __init__(self, **defaults: Any) -> None:
        self.defaults = defaults
        self.stored: dict[str, Any] = {}
        self.written: list[dict[str, Any]] = []
        self.schema = status_schema()

    def __call__(self, **observed: Any) -> Effects:
        effects = run(snapshot(**{**self.defaults, **observed, "status": self.stored}))
        doc = effects.status
        kept = prune(doc, self.schema)
        assert kept == doc, f"the API server would drop part of this status: {doc} -> {kept}"
        self.stored = kept
        self.written.append(doc)
        WRITTEN.append(doc)
        return effects
