"""Memory arithmetic: weight and KV cache sizes, the per-GPU fit estimate, and traffic -> shape derivation.

The formulas are documented in docs/planning.md; keep the two in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from llmengine.api.artifacts import BuildShapes
from llmengine.plan.catalog import ModelFacts

GIB = 1 << 30

# Bytes per weight for each quantization; "none" stores weights in the compute dtype (2 bytes).
WEIGHT_BYTES: dict[str, Fraction] = {
    "none": Fraction(2),
    "fp8": Fraction(1),
    "int8_weight_only": Fraction(1),
    "int4_awq": Fraction(1, 2),
    "w4a8_awq": Fraction(1, 2),
    "smoothquant": Fraction(1),
    "nvfp4": Fraction(1, 2),
}
# Bytes per KV cache element; auto keeps the compute dtype.
KV_BYTES: dict[str, int] = {"auto": 2, "fp8": 1, "int8": 1}

# Activation memory per token of max_num_tokens, in units of hidden_size x 2 bytes. TensorRT sizes its
# activation buffers for max_num_tokens at build time; 16 hidden-widths per token covers the QKV, attention
# output, MLP gate/up/down and residual buffers of Llama-style layers with margin.
ACTIVATION_FACTOR = 16
ACTIVATION_BYTES = 2
# Per-sequence runtime buffers: fp32 logits over the vocabulary and 8 bytes per token position (ids, lengths).
LOGIT_BYTES = 4
TOKEN_BUFFER_BYTES = 8
# CUDA context, cuBLAS/NCCL workspaces and the allocator's slack.
RUNTIME_OVERHEAD_BYTES = 1 * GIB

# trtllm-bench build heuristic constants.
BENCH_KV_FRACTION = Fraction(95, 100)
BENCH_MAX_BATCH = 4096
BENCH_MAX_TOKENS = 32768
BENCH_MIN_KV_PER_GPU = 10 * GIB
BENCH_MIN_REQUESTS = 32


def weight_bytes_total(facts: ModelFacts, quantization: str) -> int:
    return math.ceil(facts.parameter_count * WEIGHT_BYTES[quantization])


def kv_bytes_per_token(facts: ModelFacts, kv_cache_dtype: str) -> int:
    """Whole model: 2 (K and V) x layers x kv heads x head size x bytes per element."""
    return 2 * facts.num_layers * facts.num_key_value_heads * facts.head_dim * KV_BYTES[kv_cache_dtype]


def kv_bytes_per_token_per_gpu(facts: ModelFacts, kv_cache_dtype: str, tp: int, pp: int) -> int:
    """One rank's share: its layers (pp) and its kv heads (tp), at least one kv head per rank."""
    layers = math.ceil(facts.num_layers / pp)
    heads = max(1, math.ceil(facts.num_key_value_heads / tp))
    return 2 * layers * heads * facts.head_dim * KV_BYTES[kv_cache_dtype]


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory one GPU (or MIG slice) needs to load the engine and hold at least the minimum KV cache."""

    required_bytes_per_gpu: int
    available_bytes_per_gpu: int
    fits: bool
    weights_bytes: int
    activation_bytes: int
    kv_bytes_per_token: int
    min_kv_bytes: int
    runtime_bytes: int = 0
    kv_bytes_per_token_per_gpu: int = 0
    kv_cache_fraction: float = 0.9


EMPTY_MEMORY = MemoryEstimate(0, 0, False, 0, 0, 0, 0)


def estimate_memory(
    facts: ModelFacts,
    *,
    quantization: str,
    kv_cache_dtype: str,
    tp: int,
    pp: int,
    built: BuildShapes,
    runtime_batch: int,
    runtime_seq: int,
    kv_cache_type: str,
    kv_fraction: float,
    available_bytes: int,
) -> MemoryEstimate:
    """Per-GPU estimate; runtime_batch/runtime_seq are the serving limits (at most the built shapes)."""
    weights = math.ceil(weight_bytes_total(facts, quantization) / (tp * pp))
    activations = built.max_num_tokens * facts.hidden_size * ACTIVATION_FACTOR * ACTIVATION_BYTES
    beams = built.max_beam_width
    runtime = (
        runtime_batch * beams * (facts.vocab_size * LOGIT_BYTES + runtime_seq * TOKEN_BUFFER_BYTES)
        + RUNTIME_OVERHEAD_BYTES
    )
    per_token = kv_bytes_per_token_per_gpu(facts, kv_cache_dtype, tp, pp)
    if kv_cache_type == "disabled":
        min_kv = 0
    elif kv_cache_type == "continuous":
        # A continuous cache reserves every slot up front.
        min_kv = per_token * runtime_seq * beams * runtime_batch
    else:
        # Paged: room for at least one full-length sequence (all its beams).
        min_kv = per_token * runtime_seq * beams
    # The KV pool only gets kv_fraction of what is left after weights, activations and buffers.
    # Exact: a fraction near zero (even a denormal float) gives a huge requirement, not an infinity.
    required = weights + activations + runtime + math.ceil(Fraction(min_kv) / Fraction(kv_fraction))
    return MemoryEstimate(
        required_bytes_per_gpu=required,
        available_bytes_per_gpu=available_bytes,
        fits=required <= available_bytes,
        weights_bytes=weights,
        activation_bytes=activations,
        kv_bytes_per_token=kv_bytes_per_token(facts, kv_cache_dtype),
        min_kv_bytes=min_kv,
        runtime_bytes=runtime,
        kv_bytes_per_token_per_gpu=per_token,
        kv_cache_fraction=kv_fraction,
    )


# ---------------------------------------------------------------------------------------------------------------
# trtllm-bench build heuristic


def _ceil_to(value: Fraction, step: int) -> int:
    return math.ceil(value / step) * step


def round_batch_size(raw: Fraction) -> int:
    """Below 256: multiple of 32, at least 64; below 1024: multiple of 128; else multiple of 256."""
    if raw < 256:
        return max(64, _ceil_to(raw, 32))
    if raw < 1024:
        return _ceil_to(raw, 128)
    return _ceil_to(raw, 256)


def round_num_tokens(raw: Fraction) -> int:
    """Below 4096: multiple of 256, at least 2048; below 8192: multiple of 512; else multiple of 1024."""
    if raw < 4096:
        return max(2048, _ceil_to(raw, 256))
    if raw < 8192:
        return _ceil_to(raw, 512)
    return _ceil_to(raw, 1024)


@dataclass(frozen=True)
class Derivation:
    """The outcome of sizing an engine for a traffic profile."""

    shapes: BuildShapes | None
    kv_max_requests: Fraction
    free_kv_bytes: Fraction
    warnings: list[str] = field(default_factory=list)


def derive_shapes(
    facts: ModelFacts,
    *,
    quantization: str,
    kv_cache_dtype: str,
    tp: int,
    pp: int,
    gpu_memory_bytes: int,
    input_mean: int,
    input_max: int,
    output_mean: int,
    output_max: int,
    max_beam_width: int = 1,
    concurrency: int | None = None,
) -> Derivation:
    """Shapes for a traffic profile with trtllm-bench's build heuristic; shapes is None when nothing fits."""
    engine = facts.parameter_count * WEIGHT_BYTES[quantization]
    free = (Fraction(gpu_memory_bytes) * tp * pp - engine) * BENCH_KV_FRACTION
    per_token = 2 * facts.num_layers * max(tp, facts.num_key_value_heads) * facts.head_dim * KV_BYTES[kv_cache_dtype]
    requests = free / (per_token * (input_mean + output_mean)) if free > 0 else Fraction(0)
    if requests < 1:
        return Derivation(None, requests, free)
    raw_bs = min(requests, Fraction(BENCH_MAX_BATCH)) / pp
    raw_tokens = min(raw_bs * (1 + Fraction(input_mean, output_mean)), Fraction(BENCH_MAX_TOKENS))
    shapes = BuildShapes(
        max_batch_size=round_batch_size(raw_bs),
        max_input_len=input_max,
        max_seq_len=input_max + output_max,
        max_num_tokens=round_num_tokens(raw_tokens),
        max_beam_width=max_beam_width,
    )
    warnings = []
    if free / (tp * pp) < BENCH_MIN_KV_PER_GPU:
        warnings.append(
            f"only {float(free / (tp * pp)) / GIB:.1f} GiB of KV cache per GPU (under 10 GiB): expect low "
            "throughput; use more GPUs or a smaller quantization"
        )
    if requests < BENCH_MIN_REQUESTS:
        warnings.append(f"the KV cache holds only {int(requests)} requests of mean length (under 32): expect queueing")
    if concurrency is not None and requests < concurrency:
        warnings.append(
            f"the KV cache holds {int(requests)} requests of mean length, fewer than spec.traffic.concurrency "
            f"({concurrency}): add replicas, GPUs, or use kvCacheDtype fp8"
        )
    return Derivation(shapes, requests, free, warnings)
