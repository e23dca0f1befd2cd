"""The benchmark gate: the dataset a new engine is benchmarked with, and whether its numbers let it roll out.

Pure. A new engine passes when every absolute bound in spec.benchmark.thresholds holds and, when the serving
engine has numbers, no gated metric is worse than the serving engine's by more than maxRegressionPercent.
Throughput is worse when lower, latency when higher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from llmengine.api.artifacts import BuildShapes
from llmengine.api.bench import BenchDataset, BenchRequest
from llmengine.api.v1alpha1 import BenchmarkResult, BenchmarkSpec, BenchmarkThresholds, LLMEngineSpec
from llmengine.plan.planner import Plan

THRESHOLDS = "spec.benchmark.thresholds"
MAX_REGRESSION = "spec.benchmark.maxRegressionPercent"
Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class Metric:
    """One gated metric: its BenchmarkResult field, its threshold field, how to print it, which way is better."""

    field: str
    threshold: str
    threshold_camel: str
    label: str
    unit: str
    better: Better
    not_measured_hint: str


GATED: tuple[Metric, ...] = (
    Metric(
        "requests_per_second",
        "min_requests_per_second",
        "minRequestsPerSecond",
        "requests/s",
        "",
        "higher",
        "the report has no request throughput",
    ),
    Metric(
        "output_tokens_per_second",
        "min_output_tokens_per_second",
        "minOutputTokensPerSecond",
        "output tokens/s",
        "",
        "higher",
        "the report has no output token throughput",
    ),
    Metric("ttft_p99_ms", "max_ttft_p99_ms", "maxTtftP99Ms", "ttft p99", " ms", "lower", "run with streaming"),
    Metric("itl_p99_ms", "max_itl_p99_ms", "maxItlP99Ms", "itl p99", " ms", "lower", "run with streaming"),
)


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)


def _spec_number(x: float) -> str:
    """A bound as the user wrote it: 300.0 -> 300, 0.5 -> 0.5."""
    return format(x, ".15g")


def _threshold_reason(m: Metric, value: float | None, bound: float) -> str | None:
    where = f"{THRESHOLDS}.{m.threshold_camel} {_spec_number(bound)}"
    if value is None:
        return f"{m.label} not measured, but {where} needs it: {m.not_measured_hint}"
    if m.better == "higher" and value < bound:
        return f"{m.label} {value:.1f}{m.unit} < {where}"
    if m.better == "lower" and value > bound:
        return f"{m.label} {value:.1f}{m.unit} > {where}"
    return None


def _regression_reason(m: Metric, value: float | None, base: float | None, max_percent: float) -> str | None:
    if base is None or base <= 0:
        return None  # nothing to compare with (or no percentage of zero)
    serving = f"the serving engine's {base:.1f}{m.unit}"
    allowed = f"({MAX_REGRESSION} {_spec_number(max_percent)})"
    if value is None:
        return f"{m.label} not measured, but {serving} is the baseline {allowed}: {m.not_measured_hint}"
    if m.better == "higher":
        drop = (base - value) / base * 100.0
        if drop > max_percent:
            return f"{m.label} {value:.1f}{m.unit} is {drop:.1f}% below {serving} {allowed}"
    else:
        rise = (value - base) / base * 100.0
        if rise > max_percent:
            return f"{m.label} {value:.1f}{m.unit} is {rise:.1f}% above {serving} {allowed}"
    return None


def evaluate(
    result: BenchmarkResult,
    thresholds: BenchmarkThresholds | None,
    baseline: BenchmarkResult | None,
    max_regression_percent: float | None,
) -> GateVerdict:
    """Check a new engine's numbers against the absolute bounds and against the serving engine's numbers.

    Every failing reason names the metric, the measured value, the bound and the spec field it came from. A bound
    on a metric the run did not measure fails (a gate must not pass by not looking). Without a baseline (the first
    engine) or without maxRegressionPercent there is no comparison.
    """
    reasons: list[str] = []
    for m in GATED:
        value: float | None = getattr(result, m.field)
        bound: float | None = getattr(thresholds, m.threshold) if thresholds is not None else None
        if bound is not None and (r := _threshold_reason(m, value, bound)):
            reasons.append(r)
    if baseline is not None and max_regression_percent is not None:
        for m in GATED:
            r = _regression_reason(m, getattr(result, m.field), getattr(baseline, m.field), max_regression_percent)
            if r:
                reasons.append(r)
    return GateVerdict(passed=not reasons, reasons=reasons)


# ---------------------------------------------------------------------------------------------------------------
# the dataset


class DatasetProfile(NamedTuple):
    input_mean: int
    input_max: int
    output_mean: int
    output_max: int
    concurrency: int


def dataset_profile(spec: LLMEngineSpec, shapes: BuildShapes, paged_context_fmha: bool = True) -> DatasetProfile:
    """Prompt/output lengths and concurrency of the benchmark dataset for an engine built with `shapes`.

    From spec.traffic when set, else from the shapes (the longest prompt, the rest of the sequence for the output,
    means at half). Lengths are capped to what the engine serves: input_max + output_max never exceeds the
    sequence length (trtllm-bench refuses such a dataset: "Please rebuild a new engine to support this dataset"),
    nor input_max the input length. The serving runtime limits count, since the engine is measured as served.
    Concurrency: spec.benchmark.concurrency, else spec.traffic.concurrency, else the serving max batch size.

    Raises ValueError when the sequence length leaves no room for one prompt token and one output token.
    """
    rt = spec.serving.runtime
    seq = min(shapes.max_seq_len, rt.max_seq_len or shapes.max_seq_len)
    if seq < 2:
        raise ValueError(f"maxSeqLen {seq} leaves no room for a prompt and an output token: nothing to benchmark")
    input_cap = min(shapes.max_input_len, seq - 1)
    if not paged_context_fmha:
        # Without chunked prefill a prompt must fit one iteration; serving rejects longer ones.
        tokens = min(shapes.max_num_tokens, rt.max_num_tokens or shapes.max_num_tokens)
        input_cap = min(input_cap, tokens)
    input_cap = max(1, input_cap)
    t = spec.traffic
    if t is not None:
        input_max = min(t.input_tokens.max, input_cap)
        output_max = min(t.output_tokens.max, seq - input_max)
        input_mean = min(t.input_tokens.mean, input_max)
        output_mean = min(t.output_tokens.mean, output_max)
    else:
        input_max = input_cap
        output_max = seq - input_max
        input_mean = max(1, input_max // 2)
        output_mean = max(1, output_max // 2)
    bench = spec.benchmark or BenchmarkSpec()
    concurrency = bench.concurrency or (t.concurrency if t is not None else None)
    if concurrency is None:
        concurrency = min(shapes.max_batch_size, rt.max_batch_size or shapes.max_batch_size)
    return DatasetProfile(input_mean, input_max, output_mean, output_max, max(1, concurrency))


def bench_request(spec: LLMEngineSpec, plan: Plan, *, seed: int = 0) -> BenchRequest:
    """The BenchRequest for the engine a valid plan builds. Same seed, same profile: the same dataset.

    Raises ValueError for a plan without a build request (invalid) or shapes nothing can be benchmarked with.
    """
    br = plan.build_request
    if not plan.valid or br is None:
        raise ValueError("an invalid plan has no engine to benchmark")
    profile = dataset_profile(spec, plan.shapes, plan.paged_context_fmha)
    bench = spec.benchmark or BenchmarkSpec()
    rt = spec.serving.runtime
    return BenchRequest(
        engine_digest=plan.engine_digest,
        store=br.store,
        model=br.model,
        backend=br.backend,
        compiler=br.compiler,
        model_name=br.model.hugging_face_repo,
        tp_size=br.tp_size,
        pp_size=br.pp_size,
        max_seq_len=plan.shapes.max_seq_len,
        dataset=BenchDataset(
            input_mean=profile.input_mean,
            input_max=profile.input_max,
            output_mean=profile.output_mean,
            output_max=profile.output_max,
            num_requests=bench.num_requests,
            concurrency=profile.concurrency,
            seed=seed,
        ),
        max_batch_size=rt.max_batch_size,
        max_num_tokens=rt.max_num_tokens,
        kv_cache_free_gpu_mem_fraction=rt.kv_cache_free_gpu_memory_fraction,
    )
