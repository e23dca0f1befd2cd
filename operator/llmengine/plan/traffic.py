"""Observed serving traffic, from the Prometheus text the serving pods expose at /llmengine/metrics.

Pure: parse one scrape per pod, keep snapshots, and turn the difference between the newest snapshot and the one at
the start of the window into a profile (token distributions, concurrency, refusals, queue time). Counters and
histograms are cumulative per pod; a pod that restarted (a counter went down) or appeared counts from zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# What the serving pods' metering proxy exports (server/meter.py), and what trtllm-serve itself exports
# (1.2.x with the trtllm_ prefix; 1.1 without it).
PROMPT_TOKENS = "llmengine_request_prompt_tokens"
OUTPUT_TOKENS = "llmengine_request_output_tokens"
CONCURRENCY = "llmengine_request_concurrency"
REQUESTS = "llmengine_requests"  # counter llmengine_requests_total{result=stop|length|too_long|error|other}
QUEUE_TIME = ("trtllm_request_queue_time_seconds", "request_queue_time_seconds")
TRTLLM_SUCCESS = ("trtllm_request_success", "request_success")  # counter *_total{finished_reason}

HISTOGRAMS = (PROMPT_TOKENS, OUTPUT_TOKENS, CONCURRENCY, *QUEUE_TIME)
COUNTERS = (REQUESTS, *TRTLLM_SUCCESS)


@dataclass(frozen=True)
class Hist:
    """A cumulative histogram: upper bounds (the last is +Inf) with cumulative counts."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    total: float = 0.0
    sum: float = 0.0

    def minus(self, older: Hist | None) -> Hist:
        if older is None or older.bounds != self.bounds or older.total > self.total:
            return self  # new or restarted pod: everything since its start
        return Hist(
            self.bounds,
            tuple(max(0.0, a - b) for a, b in zip(self.counts, older.counts, strict=True)),
            self.total - older.total,
            self.sum - older.sum,
        )

    def plus(self, other: Hist) -> Hist:
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets")
        return Hist(
            self.bounds,
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.total + other.total,
            self.sum + other.sum,
        )


@dataclass(frozen=True)
class PodMetrics:
    """One scrape of one pod."""

    hists: dict[str, Hist] = field(default_factory=dict)
    counters: dict[tuple[str, str], float] = field(default_factory=dict)  # (family, label value) -> value


@dataclass(frozen=True)
class Snapshot:
    at: float  # seconds (monotonic or epoch, as long as one clock is used)
    pods: dict[str, PodMetrics]


class MetricsParseError(ValueError):
    pass


def parse_metrics(text: str) -> PodMetrics:
    """The families the profile needs, summed over label sets (model_name, engine_type...) of one pod."""
    try:
        return _parse(text)
    except MetricsParseError:
        raise
    except Exception as exc:  # the parser raises ValueError, IndexError... on malformed text
        raise MetricsParseError(f"not Prometheus text: {type(exc).__name__}: {exc}") from None


def _parse(text: str) -> PodMetrics:
    samples: list[tuple[str, Mapping[str, str], float]] = []
    for fam in text_string_to_metric_families(text):
        wanted = fam.name in HISTOGRAMS if fam.type == "histogram" else fam.name in COUNTERS
        if wanted and fam.type in ("histogram", "counter"):
            samples.extend((s.name, s.labels, float(s.value)) for s in fam.samples)
    return assemble(samples)


def assemble(samples: Iterable[tuple[str, Mapping[str, str], float]]) -> PodMetrics:
    """One pod's metrics from its samples (series name, labels, value), summed over label sets other than `le`,
    `result` and `finished_reason`. Both sources build their snapshots here: the pods' text and Prometheus's
    answer (llmengine.plan.promql) give the judge the same numbers."""
    hists: dict[str, dict[str, Any]] = {}
    counters: dict[tuple[str, str], float] = {}
    for name, labels, value in samples:
        if math.isnan(value):
            continue
        family, _, suffix = name.rpartition("_")
        if family in HISTOGRAMS and suffix in ("bucket", "count", "sum"):
            acc = hists.setdefault(family, {"buckets": {}, "count": 0.0, "sum": 0.0})
            if suffix == "bucket":
                le = float(labels.get("le", "nan"))
                acc["buckets"][le] = acc["buckets"].get(le, 0.0) + value
            else:
                acc[suffix] += value
        elif family in COUNTERS and suffix == "total":
            key = (family, str(labels.get("result" if family == REQUESTS else "finished_reason", "")))
            counters[key] = counters.get(key, 0.0) + value
    out: dict[str, Hist] = {}
    for name, acc in hists.items():
        bounds = tuple(sorted(b for b in acc["buckets"] if not math.isnan(b)))
        if not bounds or not math.isinf(bounds[-1]):
            continue  # a histogram without +Inf is not one
        out[name] = Hist(bounds, tuple(acc["buckets"][b] for b in bounds), acc["count"], acc["sum"])
    return PodMetrics(out, counters)


def window_delta(newer: Snapshot, older: Snapshot | None) -> PodMetrics:
    """Traffic between two snapshots, summed over pods (pods gone since `older` are ignored)."""
    hists: dict[str, Hist] = {}
    counters: dict[tuple[str, str], float] = {}
    for pod, now in newer.pods.items():
        before = older.pods.get(pod) if older else None
        restarted = before is not None and any(now.counters.get(k, 0.0) < v for k, v in before.counters.items())
        for name, h in now.hists.items():
            d = h.minus(None if restarted or before is None else before.hists.get(name))
            hists[name] = hists[name].plus(d) if name in hists and hists[name].bounds == d.bounds else d
        for k, v in now.counters.items():
            prev = 0.0 if restarted or before is None else before.counters.get(k, 0.0)
            counters[k] = counters.get(k, 0.0) + max(0.0, v - prev)
    return PodMetrics(hists, counters)


def quantile(h: Hist | None, q: float) -> float | None:
    """Prometheus histogram_quantile: linear within the bucket; in the +Inf bucket, the largest finite bound."""
    if h is None or h.total <= 0 or not h.counts or h.counts[-1] <= 0:
        return None
    rank = q * h.counts[-1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(h.bounds, h.counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return h.bounds[-2] if len(h.bounds) > 1 else None
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return None


def max_bound(h: Hist | None) -> float | None:
    """Upper bound of the highest non-empty bucket (the largest finite bound when it is the +Inf bucket)."""
    if h is None or h.total <= 0 or h.counts[-1] <= 0:
        return None
    for bound, count in zip(h.bounds, h.counts, strict=True):
        if count >= h.counts[-1]:
            if math.isinf(bound):
                return h.bounds[-2] if len(h.bounds) > 1 else None
            return bound
    return None


def _stats(h: Hist | None) -> dict[str, int] | None:
    p50, p99, top = quantile(h, 0.5), quantile(h, 0.99), max_bound(h)
    if p50 is None or p99 is None or top is None:
        return None
    return {"p50": math.ceil(p50), "p99": math.ceil(p99), "max": math.ceil(top)}


def profile(delta: PodMetrics, window_seconds: float, observed_at: str) -> dict[str, Any]:
    """status.traffic (camelCase) for one window."""
    c = delta.counters
    ours = {r: v for (fam, r), v in c.items() if fam == REQUESTS}
    theirs = {r: v for (fam, r), v in c.items() if fam in TRTLLM_SUCCESS}
    requests = sum(ours.values()) if ours else sum(theirs.values())
    cut = ours.get("length", 0.0) if ours else theirs.get("length", 0.0)
    queue = next((delta.hists[n] for n in QUEUE_TIME if n in delta.hists), None)
    q90 = quantile(queue, 0.9)
    out: dict[str, Any] = {
        "observedAt": observed_at,
        "windowSeconds": round(window_seconds, 1),
        "requests": int(requests),
        "inputTokens": _stats(delta.hists.get(PROMPT_TOKENS)),
        "outputTokens": _stats(delta.hists.get(OUTPUT_TOKENS)),
        "concurrency": _stats(delta.hists.get(CONCURRENCY)),
        "rejectedTooLong": int(ours.get("too_long", 0.0)),
        "cutForLength": int(cut),
        "queueP90Seconds": round(q90, 3) if q90 is not None else None,
    }
    return {k: v for k, v in out.items() if v is not None}


def window_start(snapshots: Iterable[Snapshot], now: float, window_seconds: float) -> Snapshot | None:
    """Where the window starts: the newest snapshot at least a window old, else the oldest one (a partial window)."""
    snaps = list(snapshots)
    old = [s for s in snaps if now - s.at >= window_seconds]
    if old:
        return max(old, key=lambda s: s.at)
    return min(snaps, key=lambda s: s.at) if snaps else None


def prune(snapshots: list[Snapshot], now: float, window_seconds: float) -> list[Snapshot]:
    """Keep what the window needs: the snapshots inside it plus the newest one at least a window old."""
    inside = [s for s in snapshots if now - s.at < window_seconds]
    before = [s for s in snapshots if now - s.at >= window_seconds]
    return ([max(before, key=lambda s: s.at)] if before else []) + inside


def snapshot(at: float, scrapes: Mapping[str, PodMetrics]) -> Snapshot:
    return Snapshot(at, dict(scrapes))
