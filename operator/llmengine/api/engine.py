"""The engine as TensorRT-LLM is asked to build it: every engine-shaping setting, explicit, under upstream's names.

The planner fills this from a spec (upstream's build rules applied, so nothing here is overridden by them), the
identity is a digest of it, the builder hands it to TensorRT-LLM unchanged, and after the build every setting is
compared with the engine's own config.json. Field names and spellings are TensorRT-LLM's (BuildConfig,
PluginConfig, QuantConfig, Mapping), so a document of this model is also the options upstream receives; the
tables in llmengine/data/trtllm record where each name was read.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

KvCacheTypeName = Literal["PAGED", "CONTINUOUS"]


class UpstreamModel(BaseModel):
    """Upstream's own key names on the wire (no camelCase), frozen, unknown keys refused. Every field that may be
    None defaults to None, so a document written without its nulls reads back the same."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PluginSettings(UpstreamModel):
    """PluginConfig fields that shape the engine. Dtype-valued plugins are a dtype or None (disabled)."""

    dtype: str
    gpt_attention_plugin: str | None = None
    gemm_plugin: str | None = None
    nccl_plugin: str | None = None
    moe_plugin: str | None = "auto"
    lora_plugin: str | None = None
    weight_only_quant_matmul_plugin: str | None = None
    weight_only_groupwise_quant_matmul_plugin: str | None = None
    smooth_quant_plugins: bool = True
    smooth_quant_gemm_plugin: str | None = None
    layernorm_quantization_plugin: str | None = None
    rmsnorm_quantization_plugin: str | None = None
    quantize_per_token_plugin: bool = False
    quantize_tensor_plugin: bool = False
    context_fmha: bool
    remove_input_padding: bool
    paged_kv_cache: bool
    tokens_per_block: int
    use_paged_context_fmha: bool
    use_fp8_context_fmha: bool
    multiple_profiles: bool
    use_fused_mlp: bool = True
    reduce_fusion: bool = False
    user_buffer: bool = False
    norm_quant_fusion: bool = False
    fuse_fp4_quant: bool = False
    paged_state: bool = False
    streamingllm: bool = False
    manage_weights: bool = False
    pp_reduce_scatter: bool = False


class BuildSettings(UpstreamModel):
    """BuildConfig fields that shape the engine (timing caches, debug and dry-run switches are not among them)."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    opt_num_tokens: int | None = None
    max_beam_width: int
    opt_batch_size: int = 8
    kv_cache_type: KvCacheTypeName
    max_prompt_embedding_table_size: int = 0
    gather_context_logits: bool = False
    gather_generation_logits: bool = False
    strongly_typed: bool = True
    max_draft_len: int = 0
    use_refit: bool = False
    weight_sparsity: bool = False
    weight_streaming: bool
    use_strip_plan: bool
    profiling_verbosity: Literal["layer_names_only", "detailed", "none"] = "layer_names_only"
    monitor_memory: bool = False
    use_mrope: bool = False
    plugin_config: PluginSettings


class MappingSettings(UpstreamModel):
    world_size: int
    tp_size: int
    pp_size: int


class QuantSettings(UpstreamModel):
    """QuantConfig: the algorithm names are QuantAlgo values (None: unquantized)."""

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int | None = None
    smoothquant_val: float | None = None
    has_zero_point: bool | None = None
    pre_quant_scale: bool | None = None


class CalibrationSettings(UpstreamModel):
    """Keyword arguments of the calibrating quantize step (calib_dataset is filled in by the builder: the local
    directory it fetched the spec's dataset into)."""

    calib_batches: int
    calib_batch_size: int = 1
    calib_max_seq_length: int
    random_seed: int = 1234
    tokenizer_max_seq_length: int = 2048
    device: Literal["cuda", "cpu"] = "cuda"


class EngineConfig(UpstreamModel):
    """The whole request to TensorRT-LLM for one engine. `build_config` is None for the pytorch backend (no
    engine build: shapes and features are runtime flags there)."""

    architecture: str
    dtype: Literal["float16", "bfloat16"]
    mapping: MappingSettings
    quantization: QuantSettings = Field(default_factory=QuantSettings)
    calibration: CalibrationSettings | None = None
    build_config: BuildSettings | None = None
