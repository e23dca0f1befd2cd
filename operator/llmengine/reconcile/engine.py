"""Reconcile one LLMEngine: gather (down to the API server, the store and the pods), decide (pure), act (down)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from llmengine.api.config import OperatorConfig
from llmengine.clients.kube import Kube
from llmengine.clients.prometheus import Prometheus
from llmengine.reconcile import metrics
from llmengine.reconcile.act import Actor, EventSink
from llmengine.reconcile.decide import decide
from llmengine.reconcile.gather import DeploymentLookup, Gatherer, Memory
from llmengine.reconcile.queue import BuildQueue
from llmengine.reconcile.stores import Stores
from llmengine.reconcile.traffic_source import PrometheusSource


def _no_events(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    return None


def prometheus_source(cfg: OperatorConfig) -> PrometheusSource | None:
    """traffic.source prometheus: the one reading every engine's pass shares."""
    if cfg.traffic_source != "prometheus" or not cfg.traffic_prometheus_url:
        return None
    client = Prometheus(
        cfg.traffic_prometheus_url,
        cfg.traffic_prometheus_timeout_seconds,
        cfg.traffic_prometheus_bearer_token_file,
        cfg.traffic_prometheus_ca_file,
    )
    return PrometheusSource(client, cfg.traffic_prometheus_selector, cfg.traffic_scrape_interval_seconds)


# Passes in progress at once. Kubernetes calls share a pool of 16 connections and store calls the event loop's default
# executor (a few threads), so more passes at once only wait there, each holding what it has read, parsed and
# rendered so far: after an apply of 1,000 engines that was most of the operator's peak memory, which the allocator
# then keeps. A pass waits for a slot instead, before it reads anything.
PASSES_AT_ONCE = 8


class Reconciler:
    def __init__(self, kube: Kube, cfg: OperatorConfig, events: EventSink | None = None) -> None:
        self.cfg = cfg
        self.slots = asyncio.Semaphore(PASSES_AT_ONCE)
        self.queue = BuildQueue(cfg.build_concurrency_per_pool)
        self.memory = Memory()
        metrics.ENGINE_STATES.states = self.memory.state  # the per-engine state series, read at scrape time
        stores = Stores(kube, cfg.ca_bundle)
        self.gatherer = Gatherer(kube, cfg, self.queue, self.memory, stores, prometheus=prometheus_source(cfg))
        self.actor = Actor(kube, cfg, self.queue, self.memory, stores, events or _no_events)

    async def reconcile(self, body: Mapping[str, Any], deployments: DeploymentLookup | None = None) -> float | None:
        """One level-based pass; returns seconds until the next pass is due (None: only on events)."""
        t0 = time.perf_counter()
        try:
            async with self.slots:
                snap, target = await self.gatherer.gather(body, deployments)
                decision = decide(snap)
                await self.actor.act(snap, target, decision)
            return decision.requeue_after
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - t0)

    def wrote(self, ns: str, name: str, resource_version: str | None) -> bool:
        """Whether this version of the engine is the one our last status write made."""
        written = self.memory.written.get((ns, name))
        return written is not None and resource_version is not None and written[0] == resource_version

    def forget(self, ns: str, name: str) -> None:
        """The engine is gone: drop every per-engine cache, its place in the build queue and its phase count."""
        metrics.move_engine(self.memory.forget((ns, name)), None)
        self.queue.leave((ns, name))
