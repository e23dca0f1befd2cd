"""The engine's static envelope against observed traffic, and what traffic-aware rebuilds do about it. Pure.

Rules (docs/traffic.md states them for users):
- No verdict below rebuildPolicy.minRequests requests in the window (condition Unknown, NotEnoughTraffic).
- Input: exceeded when prompts were refused as too long, or the p99 prompt is above maxInputLen. The observed
  length is the largest prompt seen when some were refused (their lengths are metered too), else the p99.
- Sequence: exceeded when observed input + p99 output is above maxSeqLen.
- Batch: exceeded when the p99 of requests in flight per pod is above maxBatchSize.
- Queueing: p90 queue time above rebuildPolicy.maxQueueSeconds while in-flight requests reach maxBatchSize is a
  batch limit (raise maxBatchSize); below it the GPU is saturated and more replicas, not a rebuild, is the fix.
- New shapes = observed x headroom, lengths rounded up to 256 tokens, batch sizes to trtllm-bench's steps; never
  below the built shapes, so a new engine has room above what triggered it (hysteresis).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from llmengine.api.artifacts import BuildShapes
from llmengine.api.v1alpha1 import LLMEngineSpec, LLMEngineStatus, RebuildPolicy
from llmengine.clock import iso, parse_iso
from llmengine.plan.sizing import round_batch_size

LENGTH_STEP = 256
CAMEL = {
    "max_batch_size": "maxBatchSize",
    "max_input_len": "maxInputLen",
    "max_seq_len": "maxSeqLen",
    "max_num_tokens": "maxNumTokens",
}
SNAKE = {v: k for k, v in CAMEL.items()}


@dataclass(frozen=True)
class Excess:
    limit: str  # snake_case shape name
    observed: int
    built: int
    why: str


@dataclass(frozen=True)
class Verdict:
    status: str  # "True" (exceeded), "False" (within), "Unknown" (no verdict)
    reason: str
    message: str
    exceeded: list[Excess] = field(default_factory=list)
    target: dict[str, int] = field(default_factory=dict)  # raised shapes only, snake_case
    advice: str = ""  # what a rebuild can not fix (more replicas)


def parse_duration(text: str) -> float:
    """Seconds in 1h30m, 15m, 90s, 250ms (the CRD pattern guarantees the shape)."""
    total, num = 0.0, ""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            num += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        total += float(num or 0) * units[unit]
        num = ""
        i += len(unit)
    return total


def _round_len(n: float) -> int:
    return max(LENGTH_STEP, math.ceil(n / LENGTH_STEP) * LENGTH_STEP)


def refusals_to_act(policy: RebuildPolicy, requests: int) -> int:
    """How many too-long refusals in a window of `requests` make a sustained excess (a handful never does)."""
    return max(policy.min_refused, math.ceil(policy.min_refused_percent / 100 * requests))


def judge(traffic: Mapping[str, Any], shapes: BuildShapes, policy: RebuildPolicy) -> Verdict:
    """Compare status.traffic with the built shapes."""
    n = int(traffic.get("requests") or 0)
    if n < policy.min_requests:
        return Verdict(
            "Unknown",
            "NotEnoughTraffic",
            f"{n} requests in the window; judged from {policy.min_requests} (rebuildPolicy.minRequests)",
        )
    inp, out, conc = (traffic.get(k) or {} for k in ("inputTokens", "outputTokens", "concurrency"))
    rejected = int(traffic.get("rejectedTooLong") or 0)
    h = policy.headroom
    excess: list[Excess] = []
    target: dict[str, int] = {}
    advice = ""

    needed = refusals_to_act(policy, n)
    sustained = rejected >= needed
    obs_in = int((inp.get("max") if sustained else inp.get("p99")) or 0)
    if sustained or obs_in > shapes.max_input_len:
        why = f"{rejected} of {n} prompts refused as too long" if sustained else f"p99 prompt {obs_in} tokens"
        excess.append(Excess("max_input_len", obs_in, shapes.max_input_len, why))
        target["max_input_len"] = max(shapes.max_input_len, _round_len(max(obs_in, shapes.max_input_len + 1) * h))
    obs_seq = obs_in + int(out.get("p99") or 0)
    if obs_seq > shapes.max_seq_len:
        excess.append(Excess("max_seq_len", obs_seq, shapes.max_seq_len, f"prompt + p99 output {obs_seq} tokens"))
        target["max_seq_len"] = max(shapes.max_seq_len, _round_len(obs_seq * h))
    if "max_input_len" in target:
        # Room for outputs above the raised input length, as the built engine had.
        room = max(shapes.max_seq_len - shapes.max_input_len, int(out.get("p99") or 0))
        target["max_seq_len"] = max(target.get("max_seq_len", 0), target["max_input_len"] + room)
    obs_bs = int(conc.get("p99") or 0)
    raw_queue = traffic.get("queueP90Seconds")
    queue = float(raw_queue) if raw_queue is not None else 0.0
    queueing = raw_queue is not None and queue > policy.max_queue_seconds
    if obs_bs > shapes.max_batch_size or (queueing and obs_bs >= shapes.max_batch_size):
        why = f"p99 {obs_bs} requests in flight per pod"
        if queueing:
            why += f", p90 queue {queue:.2f}s"
        excess.append(Excess("max_batch_size", obs_bs, shapes.max_batch_size, why))
        target["max_batch_size"] = max(shapes.max_batch_size, round_batch_size(Fraction(max(obs_bs, 1)) * Fraction(h)))
    elif queueing:
        advice = (
            f"p90 queue {queue:.2f}s above {policy.max_queue_seconds:g}s with {obs_bs} of "
            f"{shapes.max_batch_size} batch slots used: the GPUs are saturated, add replicas (a rebuild would not help)"
        )
    if target.get("max_input_len", 0) > shapes.max_num_tokens:
        target["max_num_tokens"] = target["max_input_len"]

    if not excess:
        msg = (
            f"within the engine: p99 prompt {inp.get('p99', '-')}/{shapes.max_input_len}, prompt+output "
            f"{obs_seq}/{shapes.max_seq_len}, p99 in flight {obs_bs}/{shapes.max_batch_size} per pod"
        )
        if rejected:
            msg += f"; {rejected} prompts refused as too long, {needed} count as sustained (rebuildPolicy.minRefused)"
        if advice:
            return Verdict("False", "Saturated", f"{msg}; {advice}", advice=advice)
        return Verdict("False", "WithinEnvelope", msg)
    parts = [f"{CAMEL[e.limit]} {e.built} < {e.observed} ({e.why})" for e in excess]
    return Verdict("True", "TrafficExceedsEngine", "; ".join(parts), excess, target, advice)


def recommended_patch(spec: LLMEngineSpec, shapes: BuildShapes, target: Mapping[str, int]) -> dict[str, Any]:
    """The spec change (JSON merge patch) a GitOps user commits to build for the observed traffic."""
    if spec.traffic is not None:
        t = spec.traffic
        new_in = max(t.input_tokens.max, target.get("max_input_len", t.input_tokens.max))
        seq = target.get("max_seq_len", shapes.max_seq_len)
        traffic: dict[str, Any] = {}
        if new_in != t.input_tokens.max:
            traffic["inputTokens"] = {"max": new_in}
        new_out = max(t.output_tokens.max, seq - new_in)
        if new_out != t.output_tokens.max:
            traffic["outputTokens"] = {"max": new_out}
        if "max_batch_size" in target:
            traffic["concurrency"] = max(t.concurrency or 0, target["max_batch_size"])
        return {"spec": {"traffic": traffic}} if traffic else {}
    build = {CAMEL[k]: v for k, v in sorted(target.items()) if v != getattr(shapes, k)}
    return {"spec": {"build": build}} if build else {}


@dataclass(frozen=True)
class AutoStep:
    auto_shapes: dict[str, int] | None  # what status.envelope.autoShapes becomes (None: unchanged)
    rebuilt_at: str | None  # set when this step raised the shapes
    message: str


def auto_step(
    verdict: Verdict,
    policy: RebuildPolicy,
    raised: Mapping[str, int],
    last_rebuild: str | None,
    now: datetime.datetime,
    fits: Callable[[dict[str, int]], str | None],
) -> AutoStep:
    """rebuildPolicy Auto: raise the shapes (at most once per cool-down) when they fit; else say why not.

    `raised` holds the shapes Auto raised so far (snake_case), `last_rebuild` when it last did."""
    if verdict.status != "True" or not verdict.target:
        return AutoStep(None, None, "")
    current = {k: int(v) for k, v in raised.items()}
    candidate = dict(current)
    for k, v in verdict.target.items():
        candidate[k] = max(candidate.get(k, 0), v)
    if candidate == current:
        return AutoStep(None, None, "")
    at = parse_iso(last_rebuild)
    if at is not None:
        nxt = at + datetime.timedelta(seconds=parse_duration(policy.cooldown))
        if now < nxt:
            when = iso(nxt)
            return AutoStep(None, None, f"next automatic rebuild allowed at {when} (rebuildPolicy.cooldown)")
    problem = fits(candidate)
    if problem:
        return AutoStep(None, None, f"an engine for this traffic would not be valid ({problem}): not rebuilding")
    stamp = iso(now)
    shapes = ", ".join(f"{CAMEL[k]} {v}" for k, v in sorted(candidate.items()))
    return AutoStep(candidate, stamp, f"rebuilding for the observed traffic: {shapes}")


def patch_text(patch: Mapping[str, Any]) -> str:
    return json.dumps(patch, separators=(",", ":"), sort_keys=True)


def shape_floor(spec: LLMEngineSpec, status: LLMEngineStatus | None) -> dict[str, int] | None:
    """The shapes Auto raised (status.envelope.autoShapes, snake_case as the planner takes them), when the policy is
    (still) Auto: part of the engine's identity. Manual serves the spec's own shapes."""
    if spec.rebuild_policy.mode != "Auto" or status is None or status.envelope is None:
        return None
    auto = status.envelope.auto_shapes or {}
    return {SNAKE[k]: int(v) for k, v in auto.items() if k in SNAKE} or None
