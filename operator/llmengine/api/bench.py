"""Documents exchanged between the operator and a benchmark Job.

The bench request is what the operator mounts into the Job that runs trtllm-bench on a committed engine before
rolling it out; the bench result is what `llmengine bench-engine` writes into its termination message. Both are
versioned JSON documents with camelCase keys, like the build documents in artifacts.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from llmengine.api.artifacts import Doc, JobResult, ModelSource, StoreLocation
from llmengine.api.v1alpha1 import BenchmarkResult


class BenchDataset(Doc):
    """The synthetic dataset: prompt and output lengths (in tokens) drawn from clipped normal distributions."""

    input_mean: int = Field(ge=1)
    input_max: int = Field(ge=1)
    output_mean: int = Field(ge=1)
    output_max: int = Field(ge=1)
    num_requests: int = Field(ge=1)
    # Requests in flight during the run (trtllm-bench --concurrency).
    concurrency: int = Field(ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _means_within_max(self) -> BenchDataset:
        if self.input_mean > self.input_max:
            raise ValueError(f"inputMean ({self.input_mean}) exceeds inputMax ({self.input_max})")
        if self.output_mean > self.output_max:
            raise ValueError(f"outputMean ({self.output_mean}) exceeds outputMax ({self.output_max})")
        return self

    @property
    def max_sequence_length(self) -> int:
        """Longest prompt plus output the dataset can hold; trtllm-bench refuses an engine shorter than this."""
        return self.input_max + self.output_max


class BenchRequest(Doc):
    """Everything a benchmark Job needs to measure one committed engine."""

    api_version: Literal["llmengine.io/v1alpha1"] = "llmengine.io/v1alpha1"
    kind: Literal["BenchRequest"] = "BenchRequest"
    engine_digest: str = Field(min_length=1)
    store: StoreLocation
    # The build's model source: trtllm-bench reads the tokenizer and config.json of the checkpoint.
    model: ModelSource
    backend: Literal["tensorrt", "pytorch"]
    # "test" swaps trtllm-bench for the test benchmarker (no GPU, made-up numbers), like the test compiler.
    compiler: Literal["tensorrt-llm", "test"] = "tensorrt-llm"
    # Hugging Face model name for trtllm-bench --model (it refuses a path); a placeholder is used when unknown.
    model_name: str | None = None
    tp_size: int = Field(default=1, ge=1)
    pp_size: int = Field(default=1, ge=1)
    # Built max_seq_len of the engine (the pytorch backend takes it as a runtime flag).
    max_seq_len: int = Field(ge=2)
    dataset: BenchDataset
    warmup: int = Field(default=2, ge=0)
    # The serving runtime limits, so the benchmark measures the engine as it will be served. None: the engine's.
    max_batch_size: int | None = Field(default=None, ge=1)
    max_num_tokens: int | None = Field(default=None, ge=1)
    kv_cache_free_gpu_mem_fraction: float | None = Field(default=None, gt=0, lt=1)
    # An engine grant (EngineGrant JSON) to download the engine through, when the pod holds no store credentials;
    # config.json and the tokenizer then come from the engine's tokenizer directory.
    grant_file: str | None = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


class BenchNumbers(Doc):
    """What one run measured. Latencies in milliseconds; None when the run did not measure it (no streaming)."""

    # NaN is what trtllm-bench's json.dumps writes for an empty statistic: never a number here.
    model_config = ConfigDict(allow_inf_nan=False)

    requests_per_second: float | None = Field(default=None, ge=0)
    output_tokens_per_second: float | None = Field(default=None, ge=0)
    ttft_p50_ms: float | None = Field(default=None, ge=0)
    ttft_p99_ms: float | None = Field(default=None, ge=0)
    itl_p50_ms: float | None = Field(default=None, ge=0)
    itl_p99_ms: float | None = Field(default=None, ge=0)


class BenchOutcome(JobResult):
    """The benchmark Job's structured outcome: its termination message. A failed stage is one of validate,
    download, fetch, dataset, benchmark, report; permanent for, e.g., a dataset longer than the engine or an
    incompatible engine."""

    kind: Literal["BenchResult"] = "BenchResult"
    numbers: BenchNumbers | None = None
    test_benchmark: bool = False
    bench_seconds: float | None = Field(default=None, ge=0)

    def benchmark_result(self) -> BenchmarkResult:
        """The numbers as the LLMEngine status carries them (status.benchmark.result)."""
        n = self.numbers or BenchNumbers()
        return BenchmarkResult(**n.model_dump(), test_benchmark=self.test_benchmark)


def parse_bench_outcome(text: str | bytes) -> BenchOutcome | None:
    """A termination message as a BenchOutcome, or None when it is not one. Never raises."""
    return BenchOutcome.parse(text)
