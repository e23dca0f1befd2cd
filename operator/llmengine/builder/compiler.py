"""What a compiler is, what the builder accepts, and the failures it reports.

A compiler turns a fetched Hugging Face checkpoint into an engine directory. Two exist: the real TensorRT-LLM
one (runs only inside NVIDIA's image) and a test compiler that writes a realistic-looking engine without any GPU.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmengine.api.artifacts import BuildRequest
from llmengine.api.engine import EngineConfig
from llmengine.builder.toolrun import relay
from llmengine.plan.trtllm_rules import apply_build_rules
from llmengine.plan.upstream import check_options


class BuildFailure(Exception):
    """A failed stage. `reason` is CamelCase; `permanent` means the same request can never succeed."""

    def __init__(self, stage: str, reason: str, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.stage, self.reason, self.message, self.permanent = stage, reason, message, permanent


# Files a serving process needs to tokenize; copied next to the engine so the engine dir is self-contained.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def sm_tuple(sm: str) -> tuple[int, int]:
    try:
        major, _, minor = sm.partition(".")
        return int(major), int(minor or 0)
    except ValueError as exc:
        raise BuildFailure("validate", "InvalidRequest", f"sm {sm!r} is not of the form MAJOR.MINOR", True) from exc


def upstream_options(engine: EngineConfig) -> dict[str, dict[str, Any]]:
    """The keyword options each upstream object receives, by upstream table name (what the contract checks)."""
    out: dict[str, dict[str, Any]] = {"QuantConfig": engine.quantization.model_dump(exclude_none=True)}
    if engine.calibration is not None:
        out["PretrainedModel.quantize"] = engine.calibration.model_dump()
    if engine.build_config is not None:
        out["BuildConfig"] = engine.build_config.model_dump(exclude={"plugin_config"})
        out["PluginConfig"] = engine.build_config.plugin_config.model_dump()
    return out


FP8_ALGOS = frozenset({"FP8", "W4A8_AWQ", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES"})


def hardware_problems(engine: EngineConfig, sm: str) -> list[str]:
    """Precisions the GPU has no kernels for (TensorRT: "Networks with FP8 precision require hardware with FP8
    support"; NVFP4 is Blackwell's)."""
    q, cc = engine.quantization, sm_tuple(sm)
    out = []
    if (q.quant_algo in FP8_ALGOS or q.kv_cache_quant_algo == "FP8") and cc < (8, 9):
        out.append(f"FP8 needs SM >= 8.9, this GPU class is SM {sm}")
    if (q.quant_algo == "NVFP4" or q.kv_cache_quant_algo == "NVFP4") and cc < (10, 0):
        out.append(f"NVFP4 needs SM >= 10.0, this GPU class is SM {sm}")
    return out


def contract_problems(engine: EngineConfig, sm: str) -> list[str]:
    """Everything upstream would not take as given: options it does not define or types it refuses, and settings
    its build rules would change or refuse on this SM. Empty for every request the planner writes."""
    problems = [p for name, opts in upstream_options(engine).items() for p in check_options(name, opts)]
    problems += hardware_problems(engine, sm)
    outcome = apply_build_rules(engine, sm_tuple(sm))
    problems += [
        f"TensorRT-LLM would change {c.key} from {c.before} to {c.after} ({c.rule}: {c.why})" for c in outcome.changes
    ]
    problems += [f"TensorRT-LLM refuses it ({r.rule}: {r.message})" for r in outcome.refusals]
    return problems


def check_request(request: BuildRequest) -> None:
    """Refuse (permanently) requests no compiler can ever satisfy, naming the field."""

    def invalid(msg: str) -> BuildFailure:
        return BuildFailure("validate", "InvalidRequest", msg, permanent=True)

    m = request.model
    if (m.hugging_face_repo is None) == (m.s3_uri is None):
        raise invalid("model: exactly one of huggingFaceRepo and s3Uri must be set")
    if m.s3_uri is not None and not m.s3_uri.startswith("s3://"):
        raise invalid(f"model.s3Uri {m.s3_uri!r} must start with s3://")
    if request.tp_size < 1 or request.pp_size < 1:
        raise invalid("tpSize and ppSize must be at least 1")
    s = request.shapes
    for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width"):
        if getattr(s, name) < 1:
            raise invalid(f"shapes.{name} must be positive")
    if s.max_input_len > s.max_seq_len:
        raise invalid(f"shapes.maxInputLen ({s.max_input_len}) exceeds shapes.maxSeqLen ({s.max_seq_len})")
    e = request.engine
    mapping = (e.mapping.tp_size, e.mapping.pp_size, e.mapping.world_size)
    if mapping != (request.tp_size, request.pp_size, request.world_size):
        raise invalid(f"engine.mapping {mapping} disagrees with tpSize/ppSize {request.tp_size}/{request.pp_size}")
    if e.dtype != request.dtype or e.architecture != request.architecture:
        raise invalid("engine.dtype/architecture disagree with the request's")
    if (request.backend == "tensorrt") != (e.build_config is not None):
        raise invalid(f"engine.buildConfig must be set exactly for the tensorrt backend (backend {request.backend})")
    b = e.build_config
    if b is not None:
        built = (b.max_batch_size, b.max_input_len, b.max_seq_len, b.max_num_tokens, b.max_beam_width)
        if built != (s.max_batch_size, s.max_input_len, s.max_seq_len, s.max_num_tokens, s.max_beam_width):
            raise invalid(f"engine.buildConfig shapes {built} disagree with the request's shapes")
    if (e.calibration is None) != (request.calibration is None):
        raise invalid("calibration data and engine.calibration must be set together")
    problems = contract_problems(e, request.sm)
    if problems:
        raise BuildFailure(
            "validate",
            "UnsupportedCombination",
            "not a build TensorRT-LLM takes as given: " + "; ".join(problems),
            True,
        )
    if request.compiler == "test" and request.test_engine_bytes is not None and request.test_engine_bytes < 0:
        raise invalid("testEngineBytes must not be negative")


@dataclass(frozen=True)
class CompileOutput:
    engine_dir: Path
    trtllm_version: str
    test_build: bool = False


class Compiler(Protocol):
    name: str

    def compile(
        self,
        request: BuildRequest,
        checkpoint_dir: Path,
        out_dir: Path,
        log: Any,
        calibration_dir: Path | None = None,
    ) -> CompileOutput: ...


def write_tokenizer_dir(checkpoint: Path, engine_dir: Path) -> Path:
    """engine_dir/tokenizer: the tokenizer files and the model's Hugging Face config.json, which trtllm-serve
    reads for the model type (the engine's own config.json is not one)."""
    dest = engine_dir / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(checkpoint, dest)
    if (checkpoint / "config.json").is_file():
        shutil.copyfile(checkpoint / "config.json", dest / "config.json")
    return dest


def copy_tokenizer(src: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files a checkpoint has into dest; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
            copied.append(name)
    return copied


def run_command(
    argv: list[str], log: Any, stage: str = "compile", env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> None:
    """Run a tool, relaying its output line by line into the structured log; a failure keeps the last lines."""
    tool = Path(argv[1] if argv[0].startswith("python") and len(argv) > 1 else argv[0]).name
    try:
        run = relay(argv, log, tail_lines=8, tool=tool, env=env, cwd=cwd)
    except FileNotFoundError as exc:
        raise BuildFailure(stage, "ToolMissing", f"{argv[0]} is not in this image: {exc}", permanent=True) from exc
    if run.returncode != 0:
        last = " | ".join(t[-200:] for t in run.output.splitlines()[-3:])
        raise BuildFailure(stage, "CompileFailed", f"{Path(argv[0]).name} exited with {run.returncode}: {last}")
