"""Traffic from a Prometheus server (traffic.source prometheus): the one PromQL query and the reading of its answer.

Pure. The query asks for the latest value of every counter and histogram series the judge reads, for every
LLMEngine serving pod at once, summed per pod over the label sets the pods' text is summed over too (model_name,
engine_type, the scrape's job or instance...): one query per scrape interval for the whole fleet. The answer becomes
one `PodMetrics` per pod through `traffic.assemble`, as a scrape of the pod would, so the snapshots, the window and
the judge are the pods source's: per-pod counter resets, pods that appear or go, percentiles.

Series are selected by the labels the chart's serving PodMonitor (templates/servingpodmonitor.yaml) gives them:
`namespace` and `pod` (the prometheus-operator's own), `engine` (pod label llmengine.io/engine) and
`engine_digest` (pod label llmengine.io/engine-digest, the first 12 hex digits of the engine digest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmengine.api.config import LABEL_MATCHERS
from llmengine.plan import traffic as tr

NAMESPACE_LABEL = "namespace"
POD_LABEL = "pod"
ENGINE_LABEL = "engine"  # relabeled from the pod label llmengine.io/engine
DIGEST_LABEL = "engine_digest"  # relabeled from the pod label llmengine.io/engine-digest
# The labels `traffic.assemble` keeps apart within one pod; every other label is summed over.
KEPT = ("le", "result", "finished_reason")
SERIES = tuple(
    sorted(
        [f"{h}_{suffix}" for h in tr.HISTOGRAMS for suffix in ("bucket", "count", "sum")]
        + [f"{c}_total" for c in tr.COUNTERS]
    )
)

EngineKey = tuple[str, str, str]  # (namespace, LLMEngine name, engine digest's first 12 hex digits)


class PrometheusAnswerError(ValueError):
    """Prometheus answered, but not with a vector: an error status, or a body that is not its API's."""


def query(selector: str = "") -> str:
    """The instant query for every engine's serving pods. `selector`: extra label matchers (`cluster="a"`), for a
    Prometheus that sees more than this operator's cluster."""
    if not LABEL_MATCHERS.match(selector):
        raise ValueError(f'not PromQL label matchers: {selector!r} (write them as name="value", comma-separated)')
    matchers = [f'__name__=~"{"|".join(SERIES)}"', f'{ENGINE_LABEL}!=""', f'{DIGEST_LABEL}!=""']
    if selector.strip():
        matchers.append(selector.strip().rstrip(","))
    by = ", ".join((NAMESPACE_LABEL, ENGINE_LABEL, DIGEST_LABEL, POD_LABEL, "__name__", *KEPT))
    return f"sum by ({by}) ({{{', '.join(matchers)}}})"


@dataclass(frozen=True)
class Reading:
    """One answer of Prometheus: every engine's serving pods, by engine."""

    engines: dict[EngineKey, dict[str, tr.PodMetrics]] = field(default_factory=dict)
    series: int = 0  # series in the answer

    def pods(self, namespace: str, engine: str, digest: str) -> dict[str, tr.PodMetrics]:
        """The pods of one engine (`digest`: the full engine digest or its first 12 hex digits)."""
        return self.engines.get((namespace, engine, digest[:12]), {})


def parse(doc: Any) -> Reading:
    """The decoded JSON body of /api/v1/query. Raises PrometheusAnswerError for an error answer or a body that is
    not an instant vector; series without the engine labels are ignored."""
    if not isinstance(doc, Mapping):
        raise PrometheusAnswerError("the answer is not a JSON object")
    if doc.get("status") != "success":
        kind, error = doc.get("errorType") or "error", doc.get("error") or "no error message"
        raise PrometheusAnswerError(f"Prometheus answered {kind}: {error}")
    data = doc.get("data")
    if not isinstance(data, Mapping) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise PrometheusAnswerError("the answer is not an instant vector (data.resultType vector)")
    samples: dict[EngineKey, dict[str, list[tuple[str, Mapping[str, str], float]]]] = {}
    rows = data["result"]
    for row in rows:
        metric = row.get("metric") if isinstance(row, Mapping) else None
        value = row.get("value") if isinstance(row, Mapping) else None
        if not isinstance(metric, Mapping) or not isinstance(value, list) or len(value) != 2:
            raise PrometheusAnswerError(f"not a sample of an instant vector: {str(row)[:200]}")
        ns, engine = metric.get(NAMESPACE_LABEL), metric.get(ENGINE_LABEL)
        digest, pod, name = metric.get(DIGEST_LABEL), metric.get(POD_LABEL), metric.get("__name__")
        if not (ns and engine and digest and pod and name):
            continue
        try:
            v = float(value[1])
        except (TypeError, ValueError):
            raise PrometheusAnswerError(f"not a sample value: {value[1]!r}") from None
        if math.isnan(v):
            continue
        samples.setdefault((ns, engine, digest[:12]), {}).setdefault(pod, []).append((name, metric, v))
    engines = {k: {pod: tr.assemble(s) for pod, s in pods.items()} for k, pods in samples.items()}
    return Reading(engines, len(rows))
