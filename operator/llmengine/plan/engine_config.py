"""From a spec to the EngineConfig TensorRT-LLM is handed: every engine-shaping setting explicit, upstream's build
rules applied, and a FieldError wherever the spec sets something upstream would override or refuse.

Spec fields left unset take what upstream's rules make of them (so an unset pagedContextFmha with an INT8 KV cache
becomes false, as upstream would make it); a field the user set that upstream would change is refused, naming
the field, the rule and the fix. The result is a fixed point of the rules (checked here and by the contract test),
so the engine built is exactly the one the identity, which is a digest of this config, describes.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmengine.api.artifacts import BuildShapes
from llmengine.api.engine import (
    BuildSettings,
    CalibrationSettings,
    EngineConfig,
    MappingSettings,
    PluginSettings,
    QuantSettings,
)
from llmengine.api.v1alpha1 import FieldError, LLMEngineSpec
from llmengine.plan.gpus import GpuClass, parse_sm
from llmengine.plan.trtllm_rules import Change, Refusal, apply_build_rules, requires_calibration, requires_modelopt

TOKENS_PER_BLOCK = 32
AWQ_GROUP_SIZE = 128
SMOOTHQUANT_ALPHA = 0.5

# API quantization -> QuantConfig (QuantAlgo names as upstream spells them).
QUANT_SETTINGS: dict[str, QuantSettings] = {
    "none": QuantSettings(),
    "fp8": QuantSettings(quant_algo="FP8"),
    "int4_awq": QuantSettings(quant_algo="W4A16_AWQ", group_size=AWQ_GROUP_SIZE),
    "w4a8_awq": QuantSettings(quant_algo="W4A8_AWQ", group_size=AWQ_GROUP_SIZE),
    "nvfp4": QuantSettings(quant_algo="NVFP4"),
    "int8_weight_only": QuantSettings(quant_algo="W8A16"),
    # SmoothQuant through ModelOpt (qformat int8_sq), the calibration route every other quantization takes; the
    # *_PLUGIN variants only calibrate through per-family code that reads a cnn_dailymail- or lambada-named
    # dataset.
    "smoothquant": QuantSettings(quant_algo="W8A8_SQ_PER_CHANNEL"),
}
# quantize_and_export caps the calibration samples of AWQ formats at 32 (quantize_by_modelopt.py@585c7565).
AWQ_ALGOS = frozenset({"W4A16_AWQ", "W4A8_AWQ"})
AWQ_MAX_CALIB_SAMPLES = 32

# Hugging Face architecture -> the tensorrt_llm.models class that builds it (models/__init__.py MODEL_MAP at
# 02267d3d), for the families we drive.
MODEL_CLASSES: dict[str, str] = {
    "LlamaForCausalLM": "LLaMAForCausalLM",
    "MistralForCausalLM": "LLaMAForCausalLM",
    "MixtralForCausalLM": "LLaMAForCausalLM",
    "QWenLMHeadModel": "QWenForCausalLM",
    "Qwen2ForCausalLM": "QWenForCausalLM",
    "Qwen3ForCausalLM": "QWenForCausalLM",
    "GemmaForCausalLM": "GemmaForCausalLM",
    "Gemma2ForCausalLM": "GemmaForCausalLM",
    "Phi3ForCausalLM": "Phi3ForCausalLM",
    "PhiForCausalLM": "PhiForCausalLM",
    "GPT2LMHeadModel": "GPTForCausalLM",
}
# Per model class: quantizations its code refuses, and whether it has pipeline parallelism.
#   GemmaForCausalLM.assert_valid_quant_algo has no NVFP4 (gemma/model.py@5dedf53b); the Gemma, Phi and Phi3
#   converters refuse pp > 1 and the Phi/Phi3 models place embedding and head on every rank
#   (gemma/convert_checkpoint.py@fbbc05dd, phi/convert_checkpoint.py:131@567239fc, phi3/model.py@c4dc529f).
CLASS_REFUSES_ALGOS: dict[str, frozenset[str]] = {"GemmaForCausalLM": frozenset({"NVFP4"})}
CLASS_WITHOUT_PIPELINE = frozenset({"GemmaForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM"})
KV_CACHE_QUANT: dict[str, str | None] = {"auto": None, "fp8": "FP8", "int8": "INT8"}


@dataclass(frozen=True)
class EngineConfigResult:
    config: EngineConfig
    errors: list[FieldError]
    # Settings upstream chose for fields the spec left unset (informational; they are in the config).
    resolved: list[Change]


def quant_settings(spec: LLMEngineSpec) -> QuantSettings:
    base = QUANT_SETTINGS[spec.precision.quantization]
    return base.model_copy(update={"kv_cache_quant_algo": KV_CACHE_QUANT[spec.precision.kv_cache_dtype]})


def calibration_settings(spec: LLMEngineSpec, calibrates: bool) -> CalibrationSettings | None:
    """The calibration keywords as upstream applies them (AWQ uses at most 32 samples, whatever is asked)."""
    c = spec.precision.calibration
    if c is None or not calibrates:
        return None
    samples = c.samples
    if QUANT_SETTINGS[spec.precision.quantization].quant_algo in AWQ_ALGOS:
        samples = min(samples, AWQ_MAX_CALIB_SAMPLES)
    return CalibrationSettings(calib_batches=samples, calib_max_seq_length=c.max_seq_length)


def route_errors(spec: LLMEngineSpec, architecture: str, quant: QuantSettings) -> list[FieldError]:
    """What the one build route (tensorrt_llm.models class: ModelOpt quantize when calibrating, else
    from_hugging_face; then build() per rank) cannot build, before any GPU time."""
    p = spec.precision
    out: list[FieldError] = []
    cls = MODEL_CLASSES.get(architecture)
    if cls is None:
        out.append(
            FieldError(
                "spec.model.architecture",
                f"{architecture} has no TensorRT-LLM model class we build with: use one of "
                f"{', '.join(sorted(MODEL_CLASSES))}",
            )
        )
        return out
    if spec.backend == "pytorch":
        if p.quantization != "none" or p.kv_cache_dtype != "auto":
            field = "spec.precision.quantization" if p.quantization != "none" else "spec.precision.kvCacheDtype"
            out.append(
                FieldError(
                    field,
                    "the pytorch backend serves the checkpoint as it is (TensorRT-LLM 1.2 has no in-image export of "
                    "a quantized Hugging Face checkpoint): use a pre-quantized checkpoint (e.g. a ModelOpt FP8 one) "
                    "with quantization none and kvCacheDtype auto, or set spec.backend: tensorrt",
                )
            )
        return out
    algo, kv = quant.quant_algo, quant.kv_cache_quant_algo
    if requires_calibration(quant) and not requires_modelopt(quant):
        if algo == "W8A16" and kv == "FP8":
            msg = (
                "int8_weight_only with kvCacheDtype fp8 is refused by TensorRT-LLM's calibration (it asserts: "
                '"Call from_hugging_face when there is no quantization"): use kvCacheDtype auto or a ModelOpt '
                "quantization (fp8, int4_awq, w4a8_awq, smoothquant)"
            )
        else:
            msg = (
                f"kvCacheDtype int8 with quantization {p.quantization} calibrates through TensorRT-LLM's per-family "
                "code, which only reads a dataset named cnn_dailymail or lambada: pair it with fp8, int4_awq, "
                "w4a8_awq or smoothquant "
                "(ModelOpt calibrates those with your dataset), or use kvCacheDtype fp8 or auto"
            )
        out.append(FieldError("spec.precision.kvCacheDtype", msg))
    if cls == "GemmaForCausalLM" and algo is None and kv is not None:
        out.append(
            FieldError(
                "spec.precision.kvCacheDtype",
                "TensorRT-LLM's GemmaForCausalLM.quantize has no KV-cache-only path (it writes no checkpoint): pair "
                f"kvCacheDtype {p.kv_cache_dtype} with fp8, int4_awq, w4a8_awq or smoothquant, or use auto",
            )
        )
    if algo in CLASS_REFUSES_ALGOS.get(cls, frozenset()):
        out.append(
            FieldError(
                "spec.precision.quantization",
                f"{p.quantization} is refused by TensorRT-LLM's {cls} ({architecture}): use fp8 or int4_awq",
            )
        )
    if cls in CLASS_WITHOUT_PIPELINE and spec.parallelism.pipeline > 1:
        out.append(
            FieldError(
                "spec.parallelism.pipeline",
                f"TensorRT-LLM's {cls} ({architecture}) has no pipeline parallelism: set pipeline 1 and use tensor",
            )
        )
    return out


def draft_build(spec: LLMEngineSpec, shapes: BuildShapes) -> BuildSettings:
    """BuildConfig and PluginConfig before upstream's rules: the spec's values, upstream's defaults where the spec
    leaves a choice to upstream, and explicit values for everything else."""
    b, dtype = spec.build, spec.precision.dtype
    paged = b.kv_cache_type == "paged"
    plugins = PluginSettings(
        dtype=dtype,
        gpt_attention_plugin=dtype,
        gemm_plugin=dtype,
        nccl_plugin=None,
        moe_plugin=dtype,
        context_fmha=b.context_fmha,
        remove_input_padding=b.remove_input_padding,
        paged_kv_cache=paged,
        tokens_per_block=TOKENS_PER_BLOCK,
        # Upstream's defaults are on; a continuous KV cache has no pages to attend over, so we ask for off there.
        use_paged_context_fmha=b.paged_context_fmha if b.paged_context_fmha is not None else paged,
        use_fp8_context_fmha=b.fp8_context_fmha if b.fp8_context_fmha is not None else True,
        multiple_profiles=b.multiple_profiles,
    )
    return BuildSettings(
        **shapes.model_dump(),  # BuildShapes uses BuildConfig's names
        kv_cache_type="PAGED" if paged else "CONTINUOUS",
        weight_streaming=b.weight_streaming,
        use_strip_plan=b.strip_plan,
        plugin_config=plugins,
    )


def _spec_field(change: Change, spec: LLMEngineSpec, shapes_explicit: bool) -> str | None:
    """The spec field a change overrides, when the user set it (None: the spec left it to upstream)."""
    b = spec.build
    leaf = change.key.rsplit(".", 1)[-1]
    if leaf == "use_fp8_context_fmha" and b.fp8_context_fmha is not None:
        return "spec.build.fp8ContextFmha"
    if leaf == "use_paged_context_fmha" and b.paged_context_fmha is not None:
        return "spec.build.pagedContextFmha"
    if leaf == "max_num_tokens" and shapes_explicit and b.max_num_tokens is not None:
        return "spec.build.maxNumTokens"
    return None


def _fix(change: Change, spec: LLMEngineSpec, field: str, gpu: GpuClass) -> str:
    q, kv = spec.precision.quantization, spec.precision.kv_cache_dtype
    leaf = field.rsplit(".", 1)[-1]
    if leaf == "maxNumTokens":
        return f"set it to {change.after} or leave it unset"
    if change.rule == "F1":
        return f"remove {leaf} or set spec.build.contextFmha true"
    if leaf == "fp8ContextFmha" and change.rule == "F2":
        return f"use quantization fp8, w4a8_awq or nvfp4 (got {q}), or remove fp8ContextFmha"
    if leaf == "fp8ContextFmha" and change.rule == "F3":
        return "target an SM 8.9+ GPU (L40S, H100, H200, B200), or remove fp8ContextFmha"
    if leaf == "fp8ContextFmha" and change.rule == "F4":
        if change.after:
            follow = "remove fp8ContextFmha (it follows the FP8 KV cache)"
            return f"{follow}, or set kvCacheDtype auto or pagedContextFmha false"
        return "set kvCacheDtype fp8 or pagedContextFmha false, or remove fp8ContextFmha"
    if leaf == "pagedContextFmha" and change.rule in ("F2", "F3"):
        return (
            f"with kvCacheDtype {kv} use quantization fp8, w4a8_awq or nvfp4 on SM 8.9+, set kvCacheDtype auto, or "
            "set pagedContextFmha false"
        )
    if leaf == "pagedContextFmha" and change.rule == "F6":
        kv_fix = "auto or fp8" if parse_sm(gpu.sm) >= (8, 9) else "auto"
        return f"set kvCacheDtype {kv_fix}, or set pagedContextFmha false"
    return f"remove {leaf}"


def _refusal_error(r: Refusal, spec: LLMEngineSpec, gpu: GpuClass) -> FieldError:
    where = f"{gpu.name} (SM {gpu.sm})"
    if r.rule == "W1" and "KV cache" in r.message:
        return FieldError(
            "spec.precision.kvCacheDtype",
            f"an int8 KV cache is refused by TensorRT-LLM on {where} ({r.rule}: {r.message}): use kvCacheDtype fp8 "
            "or auto",
        )
    if r.rule in ("W1", "W2", "W3"):
        return FieldError(
            "spec.precision.quantization",
            f"{spec.precision.quantization} is refused by TensorRT-LLM on {where} ({r.rule}: {r.message}): use fp8 "
            "or nvfp4",
        )
    return FieldError("spec.build", f"TensorRT-LLM refuses this build ({r.rule}: {r.message})")


def engine_config(
    spec: LLMEngineSpec,
    *,
    architecture: str,
    shapes: BuildShapes,
    gpu: GpuClass,
    calibrates: bool,
    shapes_explicit: bool = True,
) -> EngineConfigResult:
    """The EngineConfig for a spec on its GPU class, and what upstream would override or refuse in it."""
    tp, pp = spec.parallelism.tensor, spec.parallelism.pipeline
    cfg = EngineConfig(
        architecture=architecture,
        dtype=spec.precision.dtype,
        mapping=MappingSettings(world_size=tp * pp, tp_size=tp, pp_size=pp),
        quantization=quant_settings(spec),
        calibration=calibration_settings(spec, calibrates),
        build_config=draft_build(spec, shapes) if spec.backend == "tensorrt" else None,
    )
    outcome = apply_build_rules(cfg, parse_sm(gpu.sm))
    errors: list[FieldError] = route_errors(spec, architecture, cfg.quantization)
    resolved: list[Change] = []
    seen: set[str] = {e.field for e in errors}
    for change in outcome.changes:
        field = _spec_field(change, spec, shapes_explicit)
        if field is None:
            resolved.append(change)
        elif field not in seen:
            seen.add(field)
            errors.append(
                FieldError(
                    field,
                    f"TensorRT-LLM would change it from {_spell(change.before)} to {_spell(change.after)} "
                    f"({change.rule}: {change.why}): {_fix(change, spec, field, gpu)}",
                )
            )
    for refusal in outcome.refusals:
        err = _refusal_error(refusal, spec, gpu)
        if err.field not in seen:
            seen.add(err.field)
            errors.append(err)
    if not errors:
        again = apply_build_rules(outcome.config, parse_sm(gpu.sm))
        if again.changes or again.refusals:  # a rule model that does not settle is our bug, not the user's
            raise AssertionError(f"engine config is not a fixed point of the build rules: {again.changes}")
    return EngineConfigResult(outcome.config, errors, resolved)


def _spell(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def effective_shapes(cfg: EngineConfig, shapes: BuildShapes) -> BuildShapes:
    """The shapes the engine is built with (upstream's rules applied): what serving and the manifest use."""
    b = cfg.build_config
    if b is None:
        return shapes
    return BuildShapes.model_validate(b.model_dump(include=set(BuildShapes.model_fields)))
