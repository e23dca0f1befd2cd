"""The command-line flags TensorRT-LLM 1.2 defines for the tools we drive, and a checker for our argv.

Read off the TensorRT-LLM 1.x sources: ``tensorrt_llm/commands/build.py`` with ``plugin.add_plugin_argument``
(trtllm-build), ``examples/models/core/llama/convert_checkpoint.py``, ``examples/quantization/quantize.py`` and
``tensorrt_llm/commands/serve.py`` (trtllm-serve). Only the flags we may emit are listed, with their value type;
a flag missing here is one we must not pass. Verify against the pinned image when bumping it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["int", "float", "str", "path", "choice", "switch"]


@dataclass(frozen=True)
class Flag:
    kind: Kind
    choices: tuple[str, ...] = ()


def _i() -> Flag:
    return Flag("int")


def _p() -> Flag:
    return Flag("path")


def _c(*choices: str) -> Flag:
    return Flag("choice", choices)


_SWITCH = Flag("switch")
_ENABLE = _c("enable", "disable")
# plugin.py: dtype-valued plugins accept these (None is spelled "disable").
_PLUGIN_DTYPES = ("auto", "float16", "float32", "bfloat16", "int32", "fp8", "nvfp4", "disable")

TRTLLM_BUILD: dict[str, Flag] = {
    "--checkpoint_dir": _p(),
    "--output_dir": _p(),
    "--max_batch_size": _i(),
    "--max_input_len": _i(),
    "--max_seq_len": _i(),
    "--max_num_tokens": _i(),
    "--opt_num_tokens": _i(),
    "--max_beam_width": _i(),
    "--kv_cache_type": _c("continuous", "paged", "disabled"),
    "--workers": _i(),
    "--log_level": _c("verbose", "info", "warning", "error", "internal_error"),
    "--strip_plan": _SWITCH,
    "--weight_streaming": _SWITCH,
    "--input_timing_cache": _p(),
    "--output_timing_cache": _p(),
    "--max_draft_len": _i(),
    "--speculative_decoding_mode": _c(
        "draft_tokens_external", "lookahead_decoding", "medusa", "explicit_draft_tokens", "eagle"
    ),
    # Plugin and feature arguments (plugin.cli_plugin_args).
    "--gemm_plugin": _c(*_PLUGIN_DTYPES),
    "--gpt_attention_plugin": _c(*_PLUGIN_DTYPES),
    "--lora_plugin": _c(*_PLUGIN_DTYPES),
    "--context_fmha": _ENABLE,
    "--remove_input_padding": _ENABLE,
    "--tokens_per_block": _i(),
    "--use_paged_context_fmha": _ENABLE,
    "--use_fp8_context_fmha": _ENABLE,
    "--multiple_profiles": _ENABLE,
    "--reduce_fusion": _ENABLE,
    "--use_fused_mlp": _ENABLE,
}

CONVERT_CHECKPOINT: dict[str, Flag] = {
    "--model_dir": _p(),
    "--output_dir": _p(),
    "--dtype": _c("auto", "float16", "bfloat16", "float32"),
    "--tp_size": _i(),
    "--pp_size": _i(),
    "--workers": _i(),
    "--use_weight_only": _SWITCH,
    "--weight_only_precision": _c("int8", "int4", "int8_gptq", "int4_gptq", "int4_awq"),
    "--smoothquant": Flag("float"),
    "--per_channel": _SWITCH,
    "--per_token": _SWITCH,
    "--int8_kv_cache": _SWITCH,
    "--fp8_kv_cache": _SWITCH,
    "--use_fp8": _SWITCH,
    "--calib_dataset": Flag("str"),
    "--load_by_shard": _SWITCH,
    "--log_level": Flag("str"),
}

QUANTIZE: dict[str, Flag] = {
    "--model_dir": _p(),
    "--output_dir": _p(),
    "--dtype": _c("auto", "float16", "bfloat16", "float32"),
    "--qformat": _c("nvfp4", "fp8", "fp8_pc_pt", "int8_sq", "int4_awq", "w4a8_awq", "int8_wo", "int4_wo", "full_prec"),
    "--kv_cache_dtype": _c("int8", "fp8"),
    "--tp_size": _i(),
    "--pp_size": _i(),
    "--calib_size": _i(),
    "--calib_dataset": Flag("str"),
    "--batch_size": _i(),
    "--awq_block_size": _i(),
    "--device": _c("cuda", "cpu"),
    # Present in the later 1.x quantize.py; "hf" writes a Hugging Face-format checkpoint for the PyTorch backend.
    "--export_format": _c("tensorrt_llm", "hf"),
}

TRTLLM_SERVE: dict[str, Flag] = {
    "--tokenizer": _p(),
    "--host": Flag("str"),
    "--port": _i(),
    "--backend": _c("pytorch", "tensorrt", "trt", "_autodeploy"),
    "--log_level": _c("verbose", "info", "warning", "error", "internal_error"),
    "--max_beam_width": _i(),
    "--max_batch_size": _i(),
    "--max_num_tokens": _i(),
    "--max_seq_len": _i(),
    "--tp_size": _i(),
    "--pp_size": _i(),
    "--kv_cache_free_gpu_memory_fraction": Flag("float"),
    "--extra_llm_api_options": _p(),
    "--trust_remote_code": _SWITCH,
}

# tool -> (flags, number of positional arguments after the program)
TOOLS: dict[str, tuple[dict[str, Flag], int]] = {
    "trtllm-build": (TRTLLM_BUILD, 0),
    "convert_checkpoint": (CONVERT_CHECKPOINT, 0),
    "quantize": (QUANTIZE, 0),
    "trtllm-serve": (TRTLLM_SERVE, 1),
}


def tool_of(argv: list[str]) -> tuple[str, list[str]]:
    """Which tool an argv runs and its arguments (after `python3 script.py` or the console script)."""
    if argv and argv[0] in ("python", "python3"):
        script, args = argv[1], argv[2:]
        if script.endswith("convert_checkpoint.py"):
            return "convert_checkpoint", args
        if script.endswith("quantize.py"):
            return "quantize", args
        raise ValueError(f"unknown script {script}")
    return argv[0], argv[1:]


def _value_ok(flag: Flag, value: str) -> bool:
    if value.startswith("--"):
        return False
    if flag.kind == "int":
        try:
            int(value)
        except ValueError:
            return False
        return True
    if flag.kind == "float":
        try:
            float(value)
        except ValueError:
            return False
        return True
    if flag.kind == "choice":
        return value in flag.choices
    return bool(value)


def check_argv(argv: list[str]) -> list[str]:
    """Problems with an argv we built: unknown flags, missing or mistyped values, stray positionals."""
    tool, args = tool_of(argv)
    if tool not in TOOLS:
        return [f"unknown tool {tool}"]
    flags, positionals = TOOLS[tool]
    problems: list[str] = []
    seen: set[str] = set()
    i, npos = 0, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            npos += 1
            if npos > positionals:
                problems.append(f"{tool}: unexpected positional argument {a!r}")
            i += 1
            continue
        spec = flags.get(a)
        if spec is None:
            problems.append(f"{tool}: {a} is not a {tool} flag in TensorRT-LLM 1.2")
            i += 1
            continue
        if a in seen:
            problems.append(f"{tool}: {a} given twice")
        seen.add(a)
        if spec.kind == "switch":
            i += 1
            continue
        if i + 1 >= len(args) or not _value_ok(spec, args[i + 1]):
            got = args[i + 1] if i + 1 < len(args) else "nothing"
            problems.append(f"{tool}: {a} expects a {spec.kind} {list(spec.choices) or ''}, got {got!r}".rstrip())
            i += 1
            continue
        i += 2
    if npos < positionals:
        problems.append(f"{tool}: missing positional argument")
    return problems
