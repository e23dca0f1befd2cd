"""What a compiler is, what the builder accepts, and the failures it reports.

A compiler turns a fetched Hugging Face checkpoint into an engine directory. Two exist: the real TensorRT-LLM
one (runs only inside NVIDIA's image) and a test compiler that writes a realistic-looking engine without any GPU.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from llmengine.api.artifacts import BuildRequest

Tool = Literal["none", "convert", "modelopt"]


class BuildFailure(Exception):
    """A failed stage. `reason` is CamelCase; `permanent` means the same request can never succeed."""

    def __init__(self, stage: str, reason: str, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.stage, self.reason, self.message, self.permanent = stage, reason, message, permanent


@dataclass(frozen=True)
class QuantSpec:
    """How one `quantization` value of a request is produced and what it requires."""

    quant_algo: str | None  # QuantAlgo name recorded in the engine's config.json
    tool: Tool
    qformat: str | None = None  # quantize.py --qformat
    weight_only_precision: str | None = None  # convert_checkpoint.py --weight_only_precision
    smoothquant: float | None = None
    min_sm: float = 0.0
    below_sm: float = 99.0  # supported only below this SM
    pytorch: bool = True  # the PyTorch backend can serve a ModelOpt HF export of it


QUANTIZATIONS: dict[str, QuantSpec] = {
    "none": QuantSpec(None, "none"),
    "fp8": QuantSpec("FP8", "modelopt", qformat="fp8", min_sm=8.9),
    "int4_awq": QuantSpec("W4A16_AWQ", "modelopt", qformat="int4_awq", below_sm=10.0),
    "w4a8_awq": QuantSpec("W4A8_AWQ", "modelopt", qformat="w4a8_awq", min_sm=8.9, below_sm=10.0),
    "nvfp4": QuantSpec("NVFP4", "modelopt", qformat="nvfp4", min_sm=10.0),
    "int8_weight_only": QuantSpec("W8A16", "convert", weight_only_precision="int8", below_sm=10.0, pytorch=False),
    "int4_weight_only": QuantSpec("W4A16", "convert", weight_only_precision="int4", below_sm=10.0, pytorch=False),
    "int8_smoothquant": QuantSpec(
        "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "convert", smoothquant=0.5, below_sm=10.0, pytorch=False
    ),
}

# kv_cache_dtype -> (KV QuantAlgo, minimum SM)
KV_CACHE_DTYPES: dict[str, tuple[str | None, float]] = {"auto": (None, 0.0), "fp8": ("FP8", 8.9), "int8": ("INT8", 0.0)}

# Build features a request may set, with their default. Anything else is refused: it would change the engine
# identity without changing the engine.
FEATURES: dict[str, bool] = {
    "paged_kv_cache": True,
    "context_fmha": True,
    "remove_input_padding": True,
    "paged_context_fmha": False,
    "fp8_context_fmha": False,
    "multiple_profiles": False,
    "strip_plan": False,
    "weight_streaming": False,
}
FP8_CONTEXT_FMHA_QUANTS = frozenset({"fp8", "w4a8_awq", "nvfp4"})
TOKENS_PER_BLOCK = 32

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


def feature(request: BuildRequest, name: str) -> bool:
    return request.features.get(name, FEATURES[name])


def sm_value(sm: str) -> float:
    try:
        major, _, minor = sm.partition(".")
        return int(major) + int(minor or 0) / 10
    except ValueError as exc:
        raise BuildFailure("validate", "InvalidRequest", f"sm {sm!r} is not of the form MAJOR.MINOR", True) from exc


def check_request(request: BuildRequest) -> None:
    """Refuse (permanently) requests no compiler can ever satisfy, naming the field."""

    def invalid(msg: str) -> BuildFailure:
        return BuildFailure("validate", "InvalidRequest", msg, permanent=True)

    def unsupported(msg: str) -> BuildFailure:
        return BuildFailure("validate", "UnsupportedCombination", msg, permanent=True)

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
    q = QUANTIZATIONS.get(request.quantization)
    if q is None:
        raise invalid(f"quantization {request.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    kv = KV_CACHE_DTYPES.get(request.kv_cache_dtype)
    if kv is None:
        raise invalid(f"kvCacheDtype {request.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    unknown = sorted(set(request.features) - set(FEATURES))
    if unknown:
        raise invalid(f"features {', '.join(unknown)} unknown; known: {', '.join(FEATURES)}")
    sm = sm_value(request.sm)
    if sm < q.min_sm:
        raise unsupported(
            f"quantization {request.quantization} needs SM >= {q.min_sm}; "
            f"gpuClass {request.gpu_class} is SM {request.sm}"
        )
    if sm >= q.below_sm:
        raise unsupported(f"quantization {request.quantization} is not supported on SM {request.sm} (>= {q.below_sm})")
    if sm < kv[1]:
        raise unsupported(f"kvCacheDtype {request.kv_cache_dtype} needs SM >= {kv[1]}, SM {request.sm} has no FP8")
    if request.backend == "pytorch" and not q.pytorch:
        raise unsupported(f"quantization {request.quantization} is only available with backend tensorrt")
    if feature(request, "fp8_context_fmha") and (request.quantization not in FP8_CONTEXT_FMHA_QUANTS or sm < 8.9):
        raise unsupported(
            "features.fp8_context_fmha needs quantization fp8, w4a8_awq or nvfp4 on SM >= 8.9 "
            "(TensorRT-LLM would silently disable it)"
        )
    if feature(request, "paged_context_fmha") and not feature(request, "paged_kv_cache"):
        raise unsupported("features.paged_context_fmha needs features.paged_kv_cache")
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
    log.info("running", argv=argv)
    tail: deque[str] = deque(maxlen=8)
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise BuildFailure(stage, "ToolMissing", f"{argv[0]} is not in this image: {exc}", permanent=True) from exc
    with proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                log.info(line, tool=Path(argv[1] if argv[0].startswith("python") else argv[0]).name)
        rc = proc.wait()
    if rc != 0:
        last = " | ".join(t[-200:] for t in list(tail)[-3:])
        raise BuildFailure(stage, "CompileFailed", f"{Path(argv[0]).name} exited with {rc}: {last}")
