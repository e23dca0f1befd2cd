"""Prometheus metrics of the operator."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

BUILDS = Counter("llmengine_builds_total", "Build Jobs by result", ["result"])
BUILD_SECONDS = Histogram(
    "llmengine_build_duration_seconds",
    "Duration of successful builds",
    buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
STORE_HITS = Counter(
    "llmengine_store_hits_total", "Builds avoided: desired engines found committed in the store without a build of ours"
)
STORE_ERRORS = Counter("llmengine_store_errors_total", "Failed engine store look-ups")
QUEUE_DEPTH = Gauge("llmengine_build_queue_depth", "Builds waiting for a slot", ["pool"])
RECONCILE_SECONDS = Histogram(
    "llmengine_reconcile_duration_seconds",
    "Latency of one reconcile pass",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter("llmengine_reconcile_errors_total", "Reconcile passes that raised")
ENGINES = Gauge("llmengine_engines", "LLMEngines by phase", ["phase"])
# traffic.source prometheus: one query serves every engine (reconcile/traffic_source.py).
TRAFFIC_QUERIES = Counter(
    "llmengine_traffic_queries_total",
    "PromQL queries for the serving pods' traffic (traffic.source prometheus) by result: ok or error",
    ["result"],
)
TRAFFIC_QUERY_SECONDS = Histogram(
    "llmengine_traffic_query_duration_seconds",
    "Latency of one PromQL query for the serving pods' traffic, answer read and parsed",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TRAFFIC_SERIES = Gauge(
    "llmengine_traffic_series", "Series in the last answer to the query for the serving pods' traffic"
)
PHASES = ("Pending", "Queued", "Building", "Deploying", "Ready", "Degraded", "Failed")


for _phase in PHASES:
    ENGINES.labels(_phase).set(0)  # every phase is exported, 0 until an engine is in it


def move_engine(before: str | None, after: str | None) -> None:
    """One engine left phase `before` (None: it is new) for `after` (None: it is gone)."""
    if before == after:
        return
    if before is not None:
        ENGINES.labels(before).dec()
    if after is not None:
        ENGINES.labels(after).inc()


# Per engine: one series per condition type, labelled with its current status (1), and one for the phase, read at
# scrape time from each engine's state as its last pass left it (Memory.state), so that `== 1` selects exactly the
# engines in that state and a gone engine has no series. Nothing is kept per engine here: eight series objects per
# engine were about 6 KiB each engine.
class EngineStates(Collector):
    def __init__(self) -> None:
        self.states: Mapping[tuple[str, str], Mapping[str, str]] = {}

    def collect(self) -> Iterable[Metric]:
        condition = GaugeMetricFamily(
            "llmengine_engine_condition",
            "Each LLMEngine's conditions: 1 on the series of its current status",
            labels=["namespace", "name", "type", "status"],
        )
        phase = GaugeMetricFamily(
            "llmengine_engine_phase",
            "Each LLMEngine's phase: 1 on the series of its current phase",
            labels=["namespace", "name", "phase"],
        )
        for (namespace, name), state in list(self.states.items()):  # read from the metrics server's thread
            for key, value in state.items():
                if key == "phase":
                    phase.add_metric([namespace, name, value], 1)
                else:
                    condition.add_metric([namespace, name, key, value], 1)
        return [condition, phase]


ENGINE_STATES = EngineStates()
REGISTRY.register(ENGINE_STATES)
