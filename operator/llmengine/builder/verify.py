"""Check a compiled engine directory against the request before anything is uploaded.

The same checks hold for a real ``trtllm-build`` output and the test compiler's: the mapping in config.json is the
requested tp/pp, every rank file is there, and the built shapes are the requested ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import BuildRequest
from llmengine.builder.compiler import KV_CACHE_DTYPES, QUANTIZATIONS, BuildFailure

SHAPE_FIELDS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width")


def _fail(message: str) -> BuildFailure:
    return BuildFailure("verify", "VerifyFailed", message)


def _load_config(engine_dir: Path) -> dict[str, Any]:
    path = engine_dir / "config.json"
    if not path.is_file():
        raise _fail(f"{path.name} is missing from the engine directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _fail(f"config.json does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise _fail("config.json is not a JSON object")
    return data


def verify_engine(request: BuildRequest, engine_dir: Path) -> list[str]:
    """Raise BuildFailure(stage=verify) on the first mismatch; return the engine's files (relative) when good."""
    if request.backend == "tensorrt":
        _verify_tensorrt(request, engine_dir)
    else:
        _verify_pytorch(request, engine_dir)
    return sorted(p.relative_to(engine_dir).as_posix() for p in engine_dir.rglob("*") if p.is_file())


def _verify_tensorrt(request: BuildRequest, engine_dir: Path) -> None:
    cfg = _load_config(engine_dir)
    pretrained = cfg.get("pretrained_config") or {}
    mapping = pretrained.get("mapping") or {}
    want = {"tp_size": request.tp_size, "pp_size": request.pp_size, "world_size": request.world_size}
    for key, value in want.items():
        if mapping.get(key, 1 if key != "world_size" else None) != value:
            raise _fail(f"config.json mapping.{key} is {mapping.get(key)}, the request asks for {value}")
    for rank in range(request.world_size):
        f = engine_dir / f"rank{rank}.engine"
        if not f.is_file() or (f.stat().st_size == 0 and request.compiler != "test"):
            raise _fail(f"rank{rank}.engine is missing or empty (world size {request.world_size})")
    extra = sorted(p.name for p in engine_dir.glob("rank*.engine") if _rank_of(p.name) >= request.world_size)
    if extra:
        raise _fail(f"unexpected rank files {', '.join(extra)} for world size {request.world_size}")
    build = cfg.get("build_config") or {}
    for name in SHAPE_FIELDS:
        if build.get(name) != getattr(request.shapes, name):
            raise _fail(
                f"build_config.{name} is {build.get(name)}, the request asks for {getattr(request.shapes, name)}"
            )
    if request.shapes.opt_num_tokens is not None and build.get("opt_num_tokens") != request.shapes.opt_num_tokens:
        raise _fail(
            f"build_config.opt_num_tokens is {build.get('opt_num_tokens')}, expected {request.shapes.opt_num_tokens}"
        )
    if pretrained.get("dtype") not in (None, request.dtype):
        raise _fail(f"pretrained_config.dtype is {pretrained.get('dtype')}, the request asks for {request.dtype}")
    _verify_quant(request, pretrained.get("quantization") or {}, "pretrained_config.quantization")


def _verify_pytorch(request: BuildRequest, engine_dir: Path) -> None:
    cfg = _load_config(engine_dir)
    if not cfg.get("architectures"):
        raise _fail("config.json has no 'architectures': not a Hugging Face checkpoint")
    if not any(engine_dir.glob("*.safetensors")):
        raise _fail("no *.safetensors weights in the checkpoint")
    if QUANTIZATIONS[request.quantization].quant_algo is not None:
        qpath = engine_dir / "hf_quant_config.json"
        if not qpath.is_file():
            raise _fail("hf_quant_config.json is missing from a quantized checkpoint")
        quant = json.loads(qpath.read_text()).get("quantization") or {}
        _verify_quant(request, quant, "hf_quant_config.quantization")


def _verify_quant(request: BuildRequest, quant: dict[str, Any], where: str) -> None:
    algo = QUANTIZATIONS[request.quantization].quant_algo
    kv = KV_CACHE_DTYPES[request.kv_cache_dtype][0]
    if quant.get("quant_algo") != algo:
        raise _fail(
            f"{where}.quant_algo is {quant.get('quant_algo')}, quantization {request.quantization} means {algo}"
        )
    if quant.get("kv_cache_quant_algo") != kv:
        raise _fail(f"{where}.kv_cache_quant_algo is {quant.get('kv_cache_quant_algo')}, expected {kv}")


def _rank_of(name: str) -> int:
    try:
        return int(name[len("rank") : -len(".engine")])
    except ValueError:
        return -1
