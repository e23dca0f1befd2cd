"""Traffic-aware rebuilds: observe the serving pods, judge the engine's envelope, recommend or raise the shapes.

Runs after the lifecycle decision, only while the desired engine is the one serving (phase Ready): traffic seen by
an older engine says nothing about a newer one, so the snapshots start over when the serving engine changes. The
operator never writes spec: Auto keeps the raised shapes in status.envelope.autoShapes, which the planner applies
as a floor (they become part of the engine identity, so a rebuild and a rollout follow like any change).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmengine.api import conditions as cond
from llmengine.api.config import OperatorConfig
from llmengine.api.v1alpha1 import LLMEngineSpec
from llmengine.clients import scrape
from llmengine.clients.kube import Kube
from llmengine.plan import envelope, traffic
from llmengine.plan.planner import Plan
from llmengine.render import common, serving

EventSink = Callable[[str, str, str], None]


@dataclass
class _Series:
    digest: str
    snapshots: list[traffic.Snapshot] = field(default_factory=list)


def shape_floor(spec: LLMEngineSpec, status: Mapping[str, Any]) -> dict[str, int] | None:
    """The shapes Auto raised, when the policy is (still) Auto; Manual serves the spec's own shapes."""
    if spec.rebuild_policy.mode != "Auto":
        return None
    auto = (status.get("envelope") or {}).get("autoShapes") or {}
    return {str(k): int(v) for k, v in auto.items()} or None


class TrafficWatcher:
    def __init__(self, kube: Kube, cfg: OperatorConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.cfg = cfg
        self.clock = clock
        self.series: dict[tuple[str, str], _Series] = {}

    def forget(self, ns: str, name: str) -> None:
        self.series.pop((ns, name), None)

    async def step(
        self,
        body: Mapping[str, Any],
        spec: LLMEngineSpec,
        plan: Plan,
        status: dict[str, Any],
        now: datetime.datetime,
        fits: Callable[[dict[str, int]], str | None],
        events: list[tuple[str, str, str]],
    ) -> bool:
        """Update status.traffic / status.envelope and the EnvelopeExceeded condition in `status`; True when Auto
        raised the shapes (the caller plans again at once)."""
        if self.cfg.traffic_source == "off":
            return False
        md = body["metadata"]
        ns, name = md["namespace"], md["name"]
        serving_digest = (status.get("servingEngine") or {}).get("digest")
        if status.get("phase") != "Ready" or serving_digest != plan.engine_digest:
            return False
        key = (ns, name)
        series = self.series.get(key)
        env: dict[str, Any] = dict(status.get("envelope") or {})
        if series is None or series.digest != plan.engine_digest:
            series = self.series[key] = _Series(plan.engine_digest)
            if env.get("maxInputLen") != plan.shapes.max_input_len or env.get("maxSeqLen") != plan.shapes.max_seq_len:
                # Another engine serves now: what was exceeded was exceeded by the previous one.
                env.pop("exceeded", None)
                env.pop("recommendation", None)
        env.update(
            {
                "maxBatchSize": plan.shapes.max_batch_size,
                "maxInputLen": plan.shapes.max_input_len,
                "maxSeqLen": plan.shapes.max_seq_len,
                "maxNumTokens": plan.shapes.max_num_tokens,
            }
        )
        status["envelope"] = env

        window = envelope.parse_duration(spec.rebuild_policy.window)
        pods = await self.kube.list_pods(ns, _selector(name, plan.engine_digest[:12]))
        urls = {
            p["metadata"]["name"]: u
            for p in pods
            if scrape.ready(p) and (u := scrape.pod_url(self.cfg.traffic_url_template, p, spec.serving.port))
        }
        scraped = await scrape.scrape(urls, self.cfg.traffic_scrape_timeout_seconds)
        at = self.clock()
        if scraped:
            series.snapshots.append(traffic.snapshot(at, scraped))
            series.snapshots = traffic.prune(series.snapshots, at, window)
        newest = series.snapshots[-1] if series.snapshots else None
        start = traffic.window_start(series.snapshots[:-1], at, window) if newest else None
        gen = int(md.get("generation") or 0)
        conds: list[dict[str, Any]] = list(status.get("conditions") or [])
        stamp = now.replace(microsecond=0).isoformat().replace("+00:00", "Z")
        if newest is None or start is None:
            reason = "NoMetrics" if not scraped else "Observing"
            if scraped:
                msg = "first snapshot of this engine's traffic taken; the profile needs a second one"
            elif urls:
                shown = ", ".join(sorted(urls.values())[:3]) + (f" and {len(urls) - 3} more" if len(urls) > 3 else "")
                msg = f"no serving pod answered at {shown}"
            else:
                msg = "no ready serving pod of this engine to read traffic from"
            status["conditions"] = cond.set_condition(conds, cond.ENVELOPE_EXCEEDED, "Unknown", reason, msg, gen, stamp)
            return False

        profile = traffic.profile(traffic.window_delta(newest, start), newest.at - start.at, stamp)
        status["traffic"] = profile
        verdict = envelope.judge(profile, plan.shapes, spec.rebuild_policy)
        env["exceeded"] = [envelope.CAMEL[e.limit] for e in verdict.exceeded] or None
        message, raised = verdict.message, False
        if verdict.status == "True":
            patch = envelope.recommended_patch(spec, plan.shapes, verdict.target)
            env["recommendation"] = {
                "reason": verdict.message,
                "patch": envelope.patch_text(patch) if patch else None,
                "shapes": {envelope.CAMEL[k]: v for k, v in sorted(verdict.target.items())},
            }
            if spec.rebuild_policy.mode == "Auto":
                auto = envelope.auto_step(verdict, spec.rebuild_policy, env, now, fits)
                if auto.auto_shapes is not None:
                    env["autoShapes"] = auto.auto_shapes
                    env["lastAutoRebuild"] = auto.rebuilt_at
                    events.append(("Normal", "AutoRebuild", f"{verdict.message}: {auto.message}"))
                    raised = True
                if auto.message:
                    message = f"{message}; {auto.message}"
            else:
                message += "; rebuildPolicy Manual: apply status.envelope.recommendation.patch to rebuild"
        elif verdict.status == "False":
            env.pop("recommendation", None)
        env = {k: v for k, v in env.items() if v is not None}
        status["envelope"] = env
        old = cond.get_condition(conds, cond.ENVELOPE_EXCEEDED)
        if verdict.status == "True" and (old is None or old.get("status") != "True"):
            events.append(("Warning", "EnvelopeExceeded", message))
        status["conditions"] = cond.set_condition(
            conds, cond.ENVELOPE_EXCEEDED, verdict.status, verdict.reason, message[:2048], gen, stamp
        )
        return raised


def _selector(name: str, digest12: str) -> str:
    # The serving pods carry the first 12 hex of the engine digest they run (render.serving).
    labels = {**serving.instance_labels(name), common.DIGEST_LABEL: digest12}
    return common.label_selector(labels)
