"""The rules TensorRT-LLM's engine build applies to the settings it is handed, as a pure function.

``tensorrt_llm.builder.build()`` (with ``_init_max_seq_len``, ``check_max_num_tokens`` and the plugin settings it
forces from the quantization) rewrites some settings depending on others and refuses some combinations. This
module restates those rules over our EngineConfig, one function per group, in upstream's order, each with the
identifier docs/trtllm-contract.md uses (B2, T1-T6, F1-F6, W1-W3, Q1-Q7, ...) and the source it was read from.

The planner runs them to fill in what the spec leaves to upstream and to refuse what upstream would override or
refuse; the contract test checks that every configuration the planner emits is a fixed point (no rule changes it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmengine.api.engine import BuildSettings, EngineConfig, PluginSettings, QuantSettings

FP8_FMHA_ALGOS = frozenset({"FP8", "W4A8_AWQ", "NVFP4"})
WEIGHT_ONLY_ALGOS = frozenset({"W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ"})
PER_GROUP_ALGOS = frozenset({"W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ"})
SMOOTHQUANT_PLUGIN_ALGOS = frozenset(
    {
        "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
        "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
        "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
        "W8A8_SQ_PER_TENSOR_PLUGIN",
    }
)
SMOOTHQUANT_ALGOS = SMOOTHQUANT_PLUGIN_ALGOS | {"W8A8_SQ_PER_CHANNEL"}
REDUCE_FUSION_ARCHS = frozenset({"LlamaForCausalLM", "Gemma2ForCausalLM", "MedusaForCausalLM"})
# max_num_tokens above this only draws a warning (T2c); kept for the planner's own advice.
TENSOR_VOLUME_WARNING_TOKENS = 16384


# QuantConfig._requires_modelopt_quantization (models/modeling_utils.py@b35ac1b6), for the algorithms we offer.
MODELOPT_ALGOS = frozenset({"FP8", "W4A16_AWQ", "W4A8_AWQ", "NVFP4", "W8A8_SQ_PER_CHANNEL"})


def requires_calibration(q: QuantSettings) -> bool:
    """QuantConfig._requires_calibration: every quantization but weight-only, and any KV cache quantization."""
    return (q.quant_algo is not None and q.quant_algo not in ("W8A16", "W4A16")) or q.kv_cache_quant_algo is not None


def requires_modelopt(q: QuantSettings) -> bool:
    """QuantConfig._requires_modelopt_quantization: what ModelOpt calibrates (the rest goes to per-family code)."""
    return q.quant_algo in MODELOPT_ALGOS or (q.quant_algo is None and q.kv_cache_quant_algo == "FP8")


@dataclass(frozen=True)
class Change:
    """A setting upstream would change: `key` is a dotted path in EngineConfig (build_config.plugin_config.x)."""

    rule: str
    key: str
    before: Any
    after: Any
    why: str


@dataclass(frozen=True)
class Refusal:
    """A combination upstream refuses (an assert or a raise during the build)."""

    rule: str
    message: str


@dataclass
class Outcome:
    config: EngineConfig
    changes: list[Change] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


class _State:
    """Mutable working copy of the build and plugin settings while the rules run."""

    def __init__(self, cfg: EngineConfig, build: BuildSettings, sm: tuple[int, int]) -> None:
        self.cfg, self.sm = cfg, sm[0] * 10 + sm[1]
        self.b: dict[str, Any] = build.model_dump(exclude={"plugin_config"})
        self.p: dict[str, Any] = build.plugin_config.model_dump()
        self.changes: list[Change] = []
        self.refusals: list[Refusal] = []
        q = cfg.quantization
        self.algo, self.kv = q.quant_algo, q.kv_cache_quant_algo

    def set_b(self, rule: str, key: str, value: Any, why: str) -> None:
        if self.b[key] != value:
            self.changes.append(Change(rule, f"build_config.{key}", self.b[key], value, why))
            self.b[key] = value

    def set_p(self, rule: str, key: str, value: Any, why: str) -> None:
        if self.p[key] != value:
            self.changes.append(Change(rule, f"build_config.plugin_config.{key}", self.p[key], value, why))
            self.p[key] = value

    def refuse(self, rule: str, message: str) -> None:
        self.refusals.append(Refusal(rule, message))


def _kv_cache_type(s: _State) -> None:
    """B2 (BuildConfig.update_kv_cache_type): kv_cache_type and paged_kv_cache must agree; paged_state is off for
    transformer models (B2e)."""
    if (s.b["kv_cache_type"] == "PAGED") != s.p["paged_kv_cache"]:
        s.refuse("B2a", f"kv_cache_type {s.b['kv_cache_type']} disagrees with paged_kv_cache {s.p['paged_kv_cache']}")
    s.set_p("B2e", "paged_state", False, "paged_state is forced off for transformer models")


def _seq_len(s: _State) -> None:
    """S5 (_init_max_seq_len): max_input_len is clipped to max_seq_len."""
    if s.b["max_input_len"] > s.b["max_seq_len"]:
        s.set_b("S5", "max_input_len", s.b["max_seq_len"], "max_input_len is clipped to max_seq_len")


def _num_tokens(s: _State) -> None:
    """T1-T6 (_common.check_max_num_tokens)."""
    bs, seq = s.b["max_batch_size"], s.b["max_seq_len"]
    if not s.p["remove_input_padding"]:
        s.set_b(
            "T1", "max_num_tokens", bs * seq, "without remove_input_padding max_num_tokens is maxBatchSize x maxSeqLen"
        )
        return
    if s.b["opt_num_tokens"] is None and not s.p["multiple_profiles"]:
        s.set_b(
            "T2b",
            "opt_num_tokens",
            min(bs * s.b["max_beam_width"], s.b["max_num_tokens"]),
            "opt_num_tokens defaults to min(maxBatchSize x maxBeamWidth, maxNumTokens)",
        )
    if s.b["max_num_tokens"] > bs * seq:
        s.set_b("T3", "max_num_tokens", bs * seq, "max_num_tokens is clipped to maxBatchSize x maxSeqLen")
    if s.b["max_num_tokens"] < s.b["max_input_len"] and not s.p["context_fmha"]:
        s.set_b(
            "T4", "max_num_tokens", s.b["max_input_len"], "without context FMHA max_num_tokens is raised to maxInputLen"
        )
    elif s.b["max_num_tokens"] < s.p["tokens_per_block"] and s.p["context_fmha"]:
        s.set_b("T5", "max_num_tokens", s.p["tokens_per_block"], "max_num_tokens is raised to tokens_per_block")
    if s.b["opt_num_tokens"] is not None and s.b["opt_num_tokens"] > s.b["max_num_tokens"]:
        s.set_b("T6", "opt_num_tokens", s.b["max_num_tokens"], "opt_num_tokens is clipped to max_num_tokens")


def _fusions(s: _State) -> None:
    """B4-B7 (build()): fusion flags only some models and parallelisms take; strongly typed networks for FP8."""
    arch, tp = s.cfg.architecture, s.cfg.mapping.tp_size
    if s.p["reduce_fusion"] and (tp == 1 or arch not in REDUCE_FUSION_ARCHS):
        s.set_p("B4", "reduce_fusion", False, "reduce_fusion needs tp > 1 and a Llama, Gemma2 or Medusa model")
    if s.p["user_buffer"] and not s.p["reduce_fusion"]:
        s.set_p("B5", "user_buffer", False, "user_buffer needs reduce_fusion")
    if s.p["norm_quant_fusion"] and (s.p["reduce_fusion"] or arch != "LlamaForCausalLM" or s.algo != "NVFP4"):
        s.set_p("B6", "norm_quant_fusion", False, "norm_quant_fusion needs Llama with NVFP4 and no reduce_fusion")
    if s.algo == "FP8" or s.kv == "FP8":
        s.set_b("B7", "strongly_typed", True, "FP8 networks are strongly typed")


def _context_fmha(s: _State) -> None:
    """F1-F6 (build()): FP8 and paged context attention, decided from context FMHA, the quantization, the build
    GPU's SM and the KV cache."""
    fp8_kv, int8_kv = s.kv == "FP8", s.kv == "INT8"
    dropped = "an FP8 KV cache without FP8 context FMHA drops paged context FMHA"
    if not s.p["context_fmha"]:
        s.set_p("F1", "use_fp8_context_fmha", False, "context FMHA is off")
        s.set_p("F1", "use_paged_context_fmha", False, "context FMHA is off")
    elif s.algo not in FP8_FMHA_ALGOS:
        s.set_p("F2", "use_fp8_context_fmha", False, "FP8 context FMHA needs quantization FP8, W4A8_AWQ or NVFP4")
        if fp8_kv:
            s.set_p("F2", "use_paged_context_fmha", False, dropped)
    elif s.sm < 89:
        s.set_p("F3", "use_fp8_context_fmha", False, "FP8 context FMHA needs SM 8.9 or later")
        if fp8_kv:
            s.set_p("F3", "use_paged_context_fmha", False, dropped)
    elif s.p["use_paged_context_fmha"]:
        if not fp8_kv:
            s.set_p("F4", "use_fp8_context_fmha", False, "FP8 paged context FMHA needs an FP8 KV cache")
        else:
            s.set_p(
                "F4", "use_fp8_context_fmha", True, "an FP8 KV cache with paged context FMHA forces FP8 context FMHA"
            )
    if s.p["use_paged_context_fmha"] and int8_kv:
        s.set_p("F6", "use_paged_context_fmha", False, "paged context FMHA does not work with an INT8 KV cache")


def _blackwell(s: _State) -> None:
    """W1-W3 (build()): integer quantization is refused on SM 10.x-11.x GPUs (100 <= SM < 120)."""
    if not 100 <= s.sm < 120:
        return
    if s.algo in WEIGHT_ONLY_ALGOS:
        s.refuse("W1", "INT8/INT4 quantization is not supported on SM>=100")
    if s.kv == "INT8":
        s.refuse("W1", "INT8/INT4 quantization is not supported on SM>=100 (an INT8 KV cache counts)")
    if s.algo in SMOOTHQUANT_ALGOS:
        s.refuse("W2", "SmoothQuant is not supported on SM>=100")
    if s.algo == "FP8_PER_CHANNEL_PER_TOKEN":
        s.refuse("W3", "Per-channel or per-token scaling is not supported on SM>=100")


def _quant_plugins(s: _State) -> None:
    """Q1-Q7 (build()): plugins set from the quantization and the world size."""
    dtype = s.cfg.dtype
    if s.algo == "NVFP4":
        s.set_p("Q1", "gemm_plugin", "nvfp4", "NVFP4 uses the nvfp4 GEMM plugin")
    if s.algo in WEIGHT_ONLY_ALGOS:
        key = (
            "weight_only_groupwise_quant_matmul_plugin"
            if s.algo in PER_GROUP_ALGOS
            else "weight_only_quant_matmul_plugin"
        )
        s.set_p("Q3", key, dtype, "weight-only quantization uses its matmul plugin")
    if s.algo in SMOOTHQUANT_PLUGIN_ALGOS and s.p["smooth_quant_plugins"]:
        for key in ("smooth_quant_gemm_plugin", "rmsnorm_quantization_plugin", "layernorm_quantization_plugin"):
            s.set_p("Q4", key, dtype, "SmoothQuant uses its plugins")
        for key in ("quantize_per_token_plugin", "quantize_tensor_plugin"):
            s.set_p("Q4", key, True, "SmoothQuant uses its plugins")
    nccl = dtype if s.cfg.mapping.world_size > 1 else None
    s.set_p("Q7", "nccl_plugin", nccl, "the NCCL plugin follows the world size")


# trtllm-build's own command-line checks (C1-C15: e.g. C11, multiple profiles with opt_num_tokens) are not here:
# the driver calls build() directly.
RULES: tuple[Callable[[_State], None], ...] = (
    _kv_cache_type,
    _seq_len,
    _num_tokens,
    _fusions,
    _context_fmha,
    _blackwell,
    _quant_plugins,
)


def apply_build_rules(cfg: EngineConfig, sm: tuple[int, int]) -> Outcome:
    """What upstream's build makes of `cfg` on a GPU of compute capability `sm`: the settings it would write to
    the engine's config.json, each change it made on the way, and what it would refuse."""
    if cfg.build_config is None:
        return Outcome(cfg)
    s = _State(cfg, cfg.build_config, sm)
    for rule in RULES:
        rule(s)
    plugins = PluginSettings.model_validate(s.p)
    build = BuildSettings.model_validate({**s.b, "plugin_config": plugins})
    return Outcome(cfg.model_copy(update={"build_config": build}), s.changes, s.refusals)
