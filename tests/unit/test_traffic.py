"""Observed traffic from metering scrapes, and the envelope policy (judge, recommendation, Auto with cool-down)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from llmengine.api.artifacts import BuildShapes
from llmengine.api.v1alpha1 import LLMEngineSpec, RebuildPolicy
from llmengine.plan import envelope, traffic

TOKEN_BUCKETS = [16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768]
CONC_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
TRTLLM_SAMPLE = Path(__file__).parent / "fixtures" / "trtllm-serve-1.2-prometheus.txt"


class Pod:
    """A serving pod's /llmengine/metrics, produced by prometheus_client exactly as the meter exports it."""

    def __init__(self) -> None:
        self.reg = CollectorRegistry()
        self.prompt = Histogram("llmengine_request_prompt_tokens", "p", buckets=TOKEN_BUCKETS, registry=self.reg)
        self.output = Histogram("llmengine_request_output_tokens", "o", buckets=TOKEN_BUCKETS, registry=self.reg)
        self.conc = Histogram("llmengine_request_concurrency", "c", buckets=CONC_BUCKETS, registry=self.reg)
        self.results = Counter("llmengine_requests", "r", ["result"], registry=self.reg)

    def serve(self, n: int, prompt: int, output: int, conc: int, result: str = "stop") -> Pod:
        for _ in range(n):
            self.prompt.observe(prompt)
            self.output.observe(output)
            self.conc.observe(conc)
            self.results.labels(result).inc()
        return self

    def text(self) -> str:
        return generate_latest(self.reg).decode()


def _snap(at: float, **pods: Pod) -> traffic.Snapshot:
    return traffic.snapshot(at, {name: traffic.parse_metrics(p.text()) for name, p in pods.items()})


SHAPES = BuildShapes(max_batch_size=8, max_input_len=512, max_seq_len=1024, max_num_tokens=2048)
NOW = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.UTC)


def _profile(newer: traffic.Snapshot, older: traffic.Snapshot | None) -> dict[str, Any]:
    return traffic.profile(traffic.window_delta(newer, older), newer.at - (older.at if older else 0), "t")


def test_profile_is_the_difference_over_the_window_summed_over_pods() -> None:
    a, b = Pod().serve(50, 100, 200, 2), Pod().serve(10, 100, 200, 2)
    old = _snap(0, a=a, b=b)
    a.serve(100, 300, 400, 4)
    b.serve(100, 300, 400, 4, result="length")
    p = _profile(_snap(60, a=a, b=b), old)
    assert p["requests"] == 200 and p["windowSeconds"] == 60
    assert 256 < p["inputTokens"]["p50"] <= 512 and p["inputTokens"]["max"] == 512
    assert p["outputTokens"]["max"] == 512 and p["concurrency"]["p99"] <= 4
    assert p["cutForLength"] == 100 and p["rejectedTooLong"] == 0


def test_restarted_or_new_pods_count_from_zero_and_gone_pods_drop_out() -> None:
    a, gone = Pod().serve(100, 100, 100, 1), Pod().serve(100, 100, 100, 1)
    old = _snap(0, a=a, gone=gone)
    restarted, new = Pod().serve(7, 100, 100, 1), Pod().serve(5, 100, 100, 1)
    p = _profile(_snap(30, a=restarted, new=new), old)
    assert p["requests"] == 12


def test_trtllm_serve_families_parse_next_to_ours() -> None:
    # The exposition of trtllm-serve 1.2 (multiprocess mode: no _created, _sum before buckets).
    text = TRTLLM_SAMPLE.read_text()
    m = traffic.parse_metrics(Pod().serve(3, 100, 10, 1).text() + text)
    assert "trtllm_request_queue_time_seconds" in m.hists
    assert m.counters[("trtllm_request_success", "length")] >= 1
    assert m.counters[("llmengine_requests", "stop")] == 3


def test_queue_time_comes_from_trtllm_and_requests_fall_back_to_its_counter() -> None:
    reg = CollectorRegistry()
    q = Histogram("trtllm_request_queue_time_seconds", "q", buckets=[0.3, 0.5, 1.0, 2.5, 5.0], registry=reg)
    c = Counter("trtllm_request_success", "s", ["finished_reason"], registry=reg)
    for _ in range(10):
        q.observe(3.0)
        c.labels("length").inc()
    p = _profile(traffic.snapshot(10, {"x": traffic.parse_metrics(generate_latest(reg).decode())}), None)
    assert p["requests"] == 10 and p["cutForLength"] == 10 and 2.5 < p["queueP90Seconds"] <= 5.0


@pytest.mark.parametrize(
    "text",
    [
        'x{a="b" 1\n',
        '# TYPE llmengine_request_prompt_tokens histogram\nllmengine_request_prompt_tokens_bucket{le="zz"} 1\n',
    ],
)
def test_malformed_metrics_raise_one_error_type(text: str) -> None:
    with pytest.raises(traffic.MetricsParseError):
        traffic.parse_metrics(text)


def test_quantile_matches_prometheus_histogram_quantile() -> None:
    h = traffic.Hist((10.0, 20.0, float("inf")), (50.0, 100.0, 100.0), 100.0, 0.0)
    assert traffic.quantile(h, 0.5) == 10.0
    assert traffic.quantile(h, 0.75) == 15.0
    assert traffic.max_bound(h) == 20.0
    inf = traffic.Hist((10.0, float("inf")), (1.0, 10.0), 10.0, 0.0)
    assert traffic.quantile(inf, 0.99) == 10.0 and traffic.max_bound(inf) == 10.0
    assert traffic.quantile(traffic.Hist((float("inf"),), (0.0,), 0.0, 0.0), 0.5) is None


def test_window_start_and_prune() -> None:
    snaps = [traffic.Snapshot(t, {}) for t in (0, 100, 200, 300)]
    assert traffic.window_start(snaps, 320, 150).at == 100
    assert traffic.window_start(snaps[2:], 320, 500).at == 200  # a partial window
    assert [s.at for s in traffic.prune(snaps, 320, 150)] == [100, 200, 300]


# ---- the envelope ---------------------------------------------------------------------------------------------


def _traffic(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "requests": 500,
        "inputTokens": {"p50": 200, "p99": 400, "max": 512},
        "outputTokens": {"p50": 100, "p99": 300, "max": 512},
        "concurrency": {"p50": 2, "p99": 6, "max": 8},
        "rejectedTooLong": 0,
    }
    base.update(kw)
    return base


POLICY = RebuildPolicy(mode="Auto", cooldown="1h", headroom=1.2, min_requests=100)


def test_within_the_envelope_is_false_with_the_numbers() -> None:
    v = envelope.judge(_traffic(), SHAPES, POLICY)
    assert (v.status, v.reason) == ("False", "WithinEnvelope") and not v.target
    assert "400/512" in v.message and "6/8" in v.message


def test_too_little_traffic_gives_no_verdict() -> None:
    v = envelope.judge(_traffic(requests=99), SHAPES, POLICY)
    assert v.status == "Unknown" and v.reason == "NotEnoughTraffic" and "minRequests" in v.message


def test_long_prompts_raise_input_and_sequence_with_headroom() -> None:
    v = envelope.judge(_traffic(inputTokens={"p50": 600, "p99": 900, "max": 1024}), SHAPES, POLICY)
    assert v.status == "True" and v.reason == "TrafficExceedsEngine"
    assert "maxInputLen 512 < 900" in v.message
    assert v.target["max_input_len"] == 1280  # 900 x 1.2 = 1080, rounded up to 256
    assert v.target["max_seq_len"] >= v.target["max_input_len"] + 300
    assert v.target["max_seq_len"] % 256 == 0


def test_sustained_refusals_size_from_the_largest_seen() -> None:
    v = envelope.judge(_traffic(rejectedTooLong=12, inputTokens={"p50": 200, "p99": 500, "max": 3072}), SHAPES, POLICY)
    assert v.status == "True" and "12 of 500 prompts refused" in v.message
    assert v.target["max_input_len"] == 3840  # 3072 x 1.2 = 3686.4 -> 3840
    assert v.target["max_num_tokens"] == 3840


def test_a_handful_of_refusals_is_reported_not_acted_on() -> None:
    # 500 requests: sustained from max(minRefused 10, 2 % of 500 = 10) refusals.
    assert envelope.refusals_to_act(POLICY, 500) == 10 and envelope.refusals_to_act(POLICY, 2000) == 40
    v = envelope.judge(_traffic(rejectedTooLong=3, inputTokens={"p50": 200, "p99": 500, "max": 3072}), SHAPES, POLICY)
    assert v.status == "False" and not v.target
    assert "3 prompts refused as too long, 10 count as sustained" in v.message
    stricter = POLICY.model_copy(update={"min_refused": 2, "min_refused_percent": 0.5})
    assert envelope.judge(_traffic(rejectedTooLong=3), SHAPES, stricter).status == "True"


def test_concurrency_above_batch_size_raises_it_in_trtllm_bench_steps() -> None:
    v = envelope.judge(_traffic(concurrency={"p50": 10, "p99": 40, "max": 64}), SHAPES, POLICY)
    assert v.status == "True" and "maxBatchSize 8 < 40" in v.message
    assert v.target == {"max_batch_size": 64}


def test_queueing_below_the_batch_limit_advises_replicas_not_a_rebuild() -> None:
    v = envelope.judge(_traffic(queueP90Seconds=5.0), SHAPES, POLICY)
    assert v.status == "False" and v.reason == "Saturated" and "add replicas" in v.message and not v.target
    full = envelope.judge(_traffic(queueP90Seconds=5.0, concurrency={"p50": 8, "p99": 8, "max": 8}), SHAPES, POLICY)
    assert full.status == "True" and full.target["max_batch_size"] > 8


def test_recommended_patch_for_explicit_shapes_and_for_a_traffic_profile() -> None:
    v = envelope.judge(_traffic(inputTokens={"p50": 600, "p99": 900, "max": 1024}), SHAPES, POLICY)
    spec = LLMEngineSpec.model_validate(
        {"model": {"catalog": "llama-3.1-8b", "source": {"s3": {"uri": "s3://b/m/"}}}, "target": {"gpu": "H100-80GB"}}
    )
    patch = envelope.recommended_patch(spec, SHAPES, v.target)
    assert patch == {"spec": {"build": {"maxInputLen": 1280, "maxSeqLen": v.target["max_seq_len"]}}}
    with_traffic = spec.model_copy(
        update={
            "traffic": LLMEngineSpec.model_validate(
                {
                    **spec.model_dump(by_alias=True, exclude_none=True),
                    "traffic": {"inputTokens": {"mean": 200, "max": 512}, "outputTokens": {"mean": 100, "max": 512}},
                }
            ).traffic
        }
    )
    tp = envelope.recommended_patch(with_traffic, SHAPES, v.target)
    assert tp["spec"]["traffic"]["inputTokens"] == {"max": 1280}
    assert json.loads(envelope.patch_text(tp)) == tp


def _auto(env: dict[str, Any], now: datetime.datetime, fits: Any = lambda c: None) -> envelope.AutoStep:
    v = envelope.judge(_traffic(inputTokens={"p50": 600, "p99": 900, "max": 1024}), SHAPES, POLICY)
    return envelope.auto_step(v, POLICY, env.get("raised", {}), env.get("last"), now, fits)


def test_auto_raises_once_then_waits_for_the_cooldown() -> None:
    first = _auto({}, NOW)
    assert (
        first.auto_shapes and first.auto_shapes["max_input_len"] == 1280 and first.rebuilt_at == "2026-11-26T12:00:00Z"
    )
    env = {"raised": first.auto_shapes, "last": first.rebuilt_at}
    # The same traffic again: nothing new to raise.
    assert _auto(env, NOW + datetime.timedelta(minutes=5)).auto_shapes is None
    # Traffic grew again inside the cool-down: recorded, not rebuilt.
    v = envelope.judge(_traffic(inputTokens={"p50": 600, "p99": 2000, "max": 2048}), SHAPES, POLICY)
    held = envelope.auto_step(
        v, POLICY, first.auto_shapes, first.rebuilt_at, NOW + datetime.timedelta(minutes=5), lambda c: None
    )
    assert held.auto_shapes is None and "13:00:00Z" in held.message
    later = envelope.auto_step(
        v, POLICY, first.auto_shapes, first.rebuilt_at, NOW + datetime.timedelta(hours=1, seconds=1), lambda c: None
    )
    assert later.auto_shapes and later.auto_shapes["max_input_len"] == 2560


def test_auto_does_not_rebuild_what_would_not_fit() -> None:
    step = _auto({}, NOW, fits=lambda c: "spec.target.gpu: needs 90 GiB")
    assert step.auto_shapes is None and "would not be valid" in step.message and "90 GiB" in step.message


def test_auto_shapes_never_go_down() -> None:
    step = _auto({"raised": {"max_input_len": 4096}}, NOW)
    assert step.auto_shapes is not None and step.auto_shapes["max_input_len"] == 4096


@pytest.mark.parametrize(("text", "seconds"), [("1h", 3600), ("15m", 900), ("1h30m", 5400), ("250ms", 0.25)])
def test_durations(text: str, seconds: float) -> None:
    assert envelope.parse_duration(text) == seconds
