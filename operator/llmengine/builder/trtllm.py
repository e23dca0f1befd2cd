"""The real compiler: TensorRT-LLM 1.2 inside NVIDIA's release image.

TensorRT backend: one route for every model family, TensorRT-LLM's own Python API as its LLM API drives it (see
``trtllm_driver``), run as a child process so its output is relayed into the structured log and a crash in it is
a build failure, not a builder crash. The request's EngineConfig goes to the driver unchanged: every BuildConfig,
PluginConfig and QuantConfig setting explicit, already checked against the upstream tables and build rules by
``check_request``. PyTorch backend: the artifact is the Hugging Face checkpoint itself (TensorRT-LLM 1.2 has no
in-image export of a quantized Hugging Face checkpoint, so the planner only admits unquantized builds there).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import BuildRequest
from llmengine.builder.compiler import BuildFailure, CompileOutput, copy_tokenizer, run_command, write_tokenizer_dir
from llmengine.builder.trtllm_driver import offline_environment

DRIVER_MODULE = "llmengine.builder.trtllm_driver"


def driver_argv(
    engine_config: Path, model_dir: Path, calibration_dir: Path | None, work_dir: Path, engine_dir: Path
) -> list[str]:
    """The driver's command line (the builder's own interpreter: it sees the image's tensorrt_llm)."""
    argv = [sys.executable, "-m", DRIVER_MODULE, "--engine-config", str(engine_config), "--model-dir", str(model_dir)]
    if calibration_dir is not None:
        argv += ["--calibration-dir", str(calibration_dir)]
    return [*argv, "--work-dir", str(work_dir), "--engine-dir", str(engine_dir)]


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
    """Drives TensorRT-LLM's own API; only works inside the TensorRT-LLM release image with a GPU."""

    name = "tensorrt-llm"

    def __init__(
        self,
        runner: Callable[..., None] = run_command,
        version: Callable[[], str | None] = installed_trtllm_version,
        gpu_count: Callable[[], int] = visible_gpu_count,
        env: dict[str, str] | None = None,
    ) -> None:
        self.runner, self.version, self.gpu_count = runner, version, gpu_count
        self.env = env

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
        out_dir.mkdir(parents=True, exist_ok=True)
        if request.backend == "pytorch":
            log.info("pytorch backend: the checkpoint is the artifact")
            shutil.copytree(checkpoint_dir, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".cache"))
            return CompileOutput(engine_dir=out_dir, trtllm_version=version)
        if self.gpu_count() < 1:
            raise BuildFailure("compile", "NoGPU", "no GPU is visible to the builder")
        if request.engine.calibration is not None and calibration_dir is None:
            raise BuildFailure("compile", "CalibrationMissing", "the request calibrates but no data was fetched")
        work = out_dir.parent
        options = work / "engine-config.json"
        options.write_text(request.engine.model_dump_json(indent=2))
        env = offline_environment(dict(self.env) if self.env is not None else dict(os.environ))
        self.runner(driver_argv(options, checkpoint_dir, calibration_dir, work, out_dir), log, env=env)
        copy_tokenizer(checkpoint_dir, out_dir)
        if request.backend == "tensorrt":
            write_tokenizer_dir(checkpoint_dir, out_dir)
        return CompileOutput(engine_dir=out_dir, trtllm_version=version)
