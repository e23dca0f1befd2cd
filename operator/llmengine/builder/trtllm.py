"""The real compiler: TensorRT-LLM 1.2 inside NVIDIA's release image.

TensorRT backend: checkpoint conversion (``convert_checkpoint.py``, or ModelOpt ``quantize.py`` for FP8 / AWQ /
NVFP4) fixes tp/pp and quantization, then ``trtllm-build`` compiles one ``rank{N}.engine`` per rank. PyTorch
backend: the "engine" is the Hugging Face checkpoint itself, optionally quantized by ModelOpt into an HF-format
checkpoint; shapes are runtime flags there.

The command lines are pure functions of the request so they can be checked against the flag table without a GPU.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import BuildRequest
from llmengine.builder.compiler import (
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    TOKENS_PER_BLOCK,
    BuildFailure,
    CompileOutput,
    copy_tokenizer,
    feature,
    run_command,
)
from llmengine.builder.trtllm_flags import check_argv

EXAMPLES_ROOT = Path("/app/tensorrt_llm/examples")

# Hugging Face architecture -> directory under examples/models/core holding its convert_checkpoint.py.
FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen",
    "QWenLMHeadModel": "qwen",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma",
    "Phi3ForCausalLM": "phi",
    "PhiForCausalLM": "phi",
    "GPT2LMHeadModel": "gpt",
}
CALIB_SIZE = 512


def family_of(architecture: str) -> str:
    fam = FAMILIES.get(architecture)
    if fam is None:
        raise BuildFailure(
            "validate",
            "UnsupportedCombination",
            f"architecture {architecture} has no TensorRT-LLM checkpoint converter we drive "
            f"(supported: {', '.join(sorted(FAMILIES))})",
            permanent=True,
        )
    return fam


def convert_command(request: BuildRequest, model_dir: Path, out_dir: Path, examples: Path = EXAMPLES_ROOT) -> list[str]:
    """convert_checkpoint.py: HF checkpoint -> TensorRT-LLM checkpoint (unquantized, weight-only or SmoothQuant)."""
    q = QUANTIZATIONS[request.quantization]
    if q.tool == "modelopt":
        raise ValueError(f"quantization {request.quantization} goes through quantize.py, not convert_checkpoint.py")
    script = examples / "models" / "core" / family_of(request.architecture) / "convert_checkpoint.py"
    argv = [
        "python3",
        str(script),
        "--model_dir",
        str(model_dir),
        "--output_dir",
        str(out_dir),
        "--dtype",
        request.dtype,
        "--tp_size",
        str(request.tp_size),
        "--pp_size",
        str(request.pp_size),
    ]
    if q.weight_only_precision:
        argv += ["--use_weight_only", "--weight_only_precision", q.weight_only_precision]
    if q.smoothquant is not None:
        argv += ["--smoothquant", str(q.smoothquant), "--per_channel", "--per_token"]
    if request.kv_cache_dtype == "int8":
        argv.append("--int8_kv_cache")
    elif request.kv_cache_dtype == "fp8":
        argv.append("--fp8_kv_cache")
    return argv


def quantize_command(
    request: BuildRequest,
    model_dir: Path,
    out_dir: Path,
    export_format: str = "tensorrt_llm",
    examples: Path = EXAMPLES_ROOT,
    calib_size: int = CALIB_SIZE,
) -> list[str]:
    """ModelOpt quantize.py: calibrate and export (TensorRT-LLM checkpoint, or HF format for the PyTorch backend)."""
    q = QUANTIZATIONS[request.quantization]
    if q.qformat is None:
        raise ValueError(f"quantization {request.quantization} has no ModelOpt qformat")
    argv = [
        "python3",
        str(examples / "quantization" / "quantize.py"),
        "--model_dir",
        str(model_dir),
        "--output_dir",
        str(out_dir),
        "--dtype",
        request.dtype,
        "--qformat",
        q.qformat,
        "--calib_size",
        str(calib_size),
    ]
    if export_format == "tensorrt_llm":
        # The exported TensorRT-LLM checkpoint carries the mapping; the HF export leaves parallelism to runtime.
        argv += ["--tp_size", str(request.tp_size), "--pp_size", str(request.pp_size)]
    else:
        argv += ["--export_format", export_format]
    if KV_CACHE_DTYPES[request.kv_cache_dtype][0] is not None:
        argv += ["--kv_cache_dtype", request.kv_cache_dtype]
    return argv


def checkpoint_command(
    request: BuildRequest, model_dir: Path, out_dir: Path, examples: Path = EXAMPLES_ROOT
) -> list[str]:
    """The first step of a TensorRT build: conversion or ModelOpt quantization, whichever the request needs."""
    if QUANTIZATIONS[request.quantization].tool == "modelopt":
        return quantize_command(request, model_dir, out_dir, "tensorrt_llm", examples)
    return convert_command(request, model_dir, out_dir, examples)


def gemm_plugin(request: BuildRequest) -> str:
    return "nvfp4" if request.quantization == "nvfp4" else "auto"


def build_command(request: BuildRequest, checkpoint_dir: Path, engine_dir: Path, workers: int) -> list[str]:
    """trtllm-build. No --tp_size/--pp_size: the world size comes from the checkpoint's mapping."""
    s = request.shapes
    argv = [
        "trtllm-build",
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--output_dir",
        str(engine_dir),
        "--max_batch_size",
        str(s.max_batch_size),
        "--max_input_len",
        str(s.max_input_len),
        "--max_seq_len",
        str(s.max_seq_len),
        "--max_num_tokens",
        str(s.max_num_tokens),
        "--max_beam_width",
        str(s.max_beam_width),
    ]
    if s.opt_num_tokens is not None:
        argv += ["--opt_num_tokens", str(s.opt_num_tokens)]
    argv += [
        "--gemm_plugin",
        gemm_plugin(request),
        "--kv_cache_type",
        "paged" if feature(request, "paged_kv_cache") else "continuous",
        "--tokens_per_block",
        str(TOKENS_PER_BLOCK),
    ]
    if not feature(request, "context_fmha"):
        argv += ["--context_fmha", "disable"]
    if not feature(request, "remove_input_padding"):
        argv += ["--remove_input_padding", "disable"]
    if feature(request, "paged_context_fmha"):
        argv += ["--use_paged_context_fmha", "enable"]
    if feature(request, "fp8_context_fmha"):
        argv += ["--use_fp8_context_fmha", "enable"]
    if feature(request, "multiple_profiles"):
        argv += ["--multiple_profiles", "enable"]
    if feature(request, "strip_plan"):
        argv.append("--strip_plan")
    if feature(request, "weight_streaming"):
        argv.append("--weight_streaming")
    argv += ["--workers", str(max(1, workers))]
    return argv


def compile_commands(
    request: BuildRequest,
    model_dir: Path,
    work_dir: Path,
    engine_dir: Path,
    workers: int,
    examples: Path = EXAMPLES_ROOT,
) -> list[list[str]]:
    """Every command a real build of this request runs, in order (empty for an unquantized PyTorch build)."""
    if request.backend == "tensorrt":
        ckpt = work_dir / "trtllm-checkpoint"
        return [
            checkpoint_command(request, model_dir, ckpt, examples),
            build_command(request, ckpt, engine_dir, workers),
        ]
    if QUANTIZATIONS[request.quantization].tool == "none":
        return []
    return [quantize_command(request, model_dir, engine_dir, "hf", examples)]


def installed_trtllm_version() -> str | None:
    try:
        return importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return None


def visible_gpu_count() -> int:
    from llmengine.server.gpus import probe

    report = probe()
    return len(report.devices) if report.error is None else 0


class TensorRTLLMCompiler:
    """Drives TensorRT-LLM's own tools; only works inside the TensorRT-LLM release image with a GPU."""

    name = "tensorrt-llm"

    def __init__(
        self,
        examples: Path = EXAMPLES_ROOT,
        runner: Callable[[list[str], Any], None] = run_command,
        version: Callable[[], str | None] = installed_trtllm_version,
        gpu_count: Callable[[], int] = visible_gpu_count,
    ) -> None:
        self.examples, self.runner, self.version, self.gpu_count = examples, runner, version, gpu_count

    def compile(
        self,
        request: BuildRequest,
        checkpoint_dir: Path,
        out_dir: Path,
        log: Any,
        calibration_dir: Path | None = None,
    ) -> CompileOutput:
        version = self.version()
        if version is None:
            raise BuildFailure(
                "compile", "ToolMissing", "TensorRT-LLM is not installed: run the builder image", permanent=True
            )
        if version != request.trtllm_version:
            raise BuildFailure(
                "compile",
                "VersionMismatch",
                f"this image has TensorRT-LLM {version} but the request pins {request.trtllm_version}: "
                "engines only load with the version that built them",
                permanent=True,
            )
        gpus = self.gpu_count() if request.backend == "tensorrt" else 1
        if gpus < 1:
            raise BuildFailure("compile", "NoGPU", "no GPU is visible to the builder")
        out_dir.mkdir(parents=True, exist_ok=True)
        work = out_dir.parent
        commands = compile_commands(
            request, checkpoint_dir, work, out_dir, min(request.world_size, gpus), self.examples
        )
        for argv in commands:
            problems = check_argv(argv)
            if problems:
                raise BuildFailure("compile", "InvalidCommand", "; ".join(problems))
        if not commands:
            log.info("pytorch backend without quantization: the checkpoint is the artifact")
            shutil.copytree(checkpoint_dir, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".cache"))
        for argv in commands:
            self.runner(argv, log)
        copy_tokenizer(checkpoint_dir, out_dir)
        return CompileOutput(engine_dir=out_dir, trtllm_version=version)
