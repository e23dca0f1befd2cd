"""One pass's immutable view of the world: everything the decision reads, gathered once, with one clock reading."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from llmengine.api.artifacts import BuildProgress
from llmengine.api.v1alpha1 import LLMEngineSpec, LLMEngineStatus
from llmengine.plan import traffic
from llmengine.plan.planner import Plan
from llmengine.reconcile.views import AttachmentView, BenchView, DeploymentView, GrantView, JobView

# Would an engine with these shapes (snake_case floor) be valid? None when yes, else why not. Pure (the planner).
Fits = Callable[[dict[str, int]], str | None]


@dataclass(frozen=True)
class BuildLimits:
    max_attempts: int = 3
    backoff_base: float = 30.0
    backoff_max: float = 3600.0


@dataclass(frozen=True)
class StoreView:
    """What the store says about the desired engine."""

    committed: bool | None  # None: the store could not be asked
    error: str | None = None  # why not, naming the setting in use
    uri: str | None = None  # where the desired engine is (or will be) committed


@dataclass(frozen=True)
class TrafficView:
    """The serving pods' traffic, read this pass while the desired engine's Deployment is rolled out."""

    newest: traffic.Snapshot | None  # the newest snapshot of this engine's traffic (None: none yet)
    start: traffic.Snapshot | None  # where the window starts (None: one snapshot only so far)
    asked: tuple[str, ...] = ()  # metrics URLs of the ready pods asked this pass
    answered: bool = False  # some pod answered this pass (traffic.source prometheus: Prometheus had its series)
    error: str | None = None  # why nothing was read this pass, when the source says more than `asked` does


def _never(_: dict[str, int]) -> str | None:
    return "not planned"


@dataclass(frozen=True)
class Snapshot:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: LLMEngineSpec | None  # None: the object does not parse (the plan says why)
    status: LLMEngineStatus  # as stored (or as our last write left it, when the watch is behind)
    plan: Plan
    now: datetime.datetime
    replicas: int  # serving pods wanted: spec.serving.replicas, or under an autoscaler the count it set
    url: str | None  # the Service's in-cluster base URL
    selector: str  # label selector of the serving pods (scale subresource)
    limits: BuildLimits = field(default_factory=BuildLimits)
    store: StoreView | None = None  # None when the plan is invalid (nothing to look up)
    job: JobView | None = None  # the desired engine's build Job
    progress: BuildProgress | None = None  # where that build is, as its builder last wrote (while it runs)
    queue_position: int = 0  # 0: a build may start now
    # A running build Job of the same identity into the same store in another namespace ("namespace/name"): this
    # engine waits for its commit instead of building the same engine again.
    building_elsewhere: str | None = None
    deployment: DeploymentView | None = None
    bench: BenchView | None = None  # the desired engine's benchmark Job
    traffic: TrafficView | None = None  # None: not read this pass (source off, or no engine of the spec serves)
    traffic_on: bool = True  # the operator reads traffic at all
    # What is rendered next to the Deployment, by kind, for the kinds the spec asks for or the Deployment lists
    # (None: absent).
    attachments: Mapping[str, AttachmentView | None] = field(default_factory=dict)
    fits: Fits = _never
    # The build Job runs in the engine's namespace and the engines that want it own it (False: in the operator's
    # namespace, owned by none, for every namespace).
    build_owned: bool = True
    # Benchmark and serving pods read their engines through a grant lasting this long (None: with store keys).
    grant_seconds: int | None = None
    grant: GrantView | None = None  # the grant as last written (None: none yet)
