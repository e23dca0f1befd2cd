"""THE TEST COMPILER. IT IS NOT TENSORRT-LLM AND ITS OUTPUT CANNOT BE SERVED.

It exists so the whole build pipeline (fetch, verify, upload, commit, download, verify again) runs on machines
without a GPU: it writes an engine directory shaped like the one ``trtllm-build`` writes (``config.json`` with
``version``, ``pretrained_config`` and ``build_config``, one ``rank{N}.engine`` per rank, tokenizer files), filled
with pseudo-random bytes of the requested size. Everything it writes is marked ``"test_build": true``, and so are
the manifest and the build result.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import BuildRequest
from llmengine.builder.compiler import BuildFailure, CompileOutput, copy_tokenizer, write_tokenizer_dir
from llmengine.plan.upstream import table

MiB = 1024 * 1024
DEFAULT_ENGINE_BYTES = 4 * MiB
MARKER_NAME = "llmengine-test-build.json"
_BLOCK = 8 * MiB


def engine_config(request: BuildRequest) -> dict[str, Any]:
    """config.json as TensorRT-LLM's Engine.save lays it out (version, pretrained_config with architecture, dtype,
    mapping and the whole QuantConfig, build_config with plugin_config), holding the requested EngineConfig."""
    e = request.engine
    assert e.build_config is not None
    facts = request.model_facts
    quant = {o.name: o.default for o in table("QuantConfig").options}
    quant.update(e.quantization.model_dump(exclude_none=True))
    quant["kv_cache_quant_algo"] = e.quantization.kv_cache_quant_algo
    quant["quant_algo"] = e.quantization.quant_algo
    pretrained: dict[str, Any] = {
        "architecture": e.architecture,
        "dtype": e.dtype,
        "mapping": {**e.mapping.model_dump(), "rank": 0, "cp_size": 1, "gpus_per_node": 8},
        "quantization": quant,
    }
    for src, dest in (
        ("hiddenSize", "hidden_size"),
        ("numLayers", "num_hidden_layers"),
        ("numAttentionHeads", "num_attention_heads"),
        ("numKeyValueHeads", "num_key_value_heads"),
        ("vocabSize", "vocab_size"),
        ("maxPositionEmbeddings", "max_position_embeddings"),
    ):
        if src in facts:
            pretrained[dest] = facts[src]
    # Every key upstream's BuildConfig.to_dict and PluginConfig.model_dump write (their defaults from the upstream
    # tables), with the request's settings over them.
    plugins = {o.name: o.default for o in table("PluginConfig").options if not o.name.startswith("_")}
    plugins.update(e.build_config.plugin_config.model_dump())
    build = {o.name: o.default for o in table("BuildConfig").options if o.name not in NOT_IN_CONFIG_JSON}
    build.update(e.build_config.model_dump())
    build.update(plugin_config=plugins, lora_config={}, speculative_decoding_mode=1)  # NONE, as upstream writes it
    return {
        "version": request.trtllm_version,
        "test_build": True,
        "pretrained_config": pretrained,
        "build_config": build,
    }


# BuildConfig fields EngineConfig.to_dict leaves out of config.json (builder.py, EngineConfig.to_dict).
NOT_IN_CONFIG_JSON = frozenset({"dry_run", "visualize_network"})


def rank_sizes(total: int, ranks: int) -> list[int]:
    base, rest = divmod(total, ranks)
    return [base + (1 if r < rest else 0) for r in range(ranks)]


def write_pseudo_random(path: Path, size: int, seed: int) -> None:
    """Write `size` bytes quickly: one random block, rotated by a different offset for every block written.

    No compressor with a normal window can shrink it and no two blocks are equal, at disk speed (os.urandom for
    the whole size would be CPU-bound at a few hundred MB/s).
    """
    rnd = os.urandom(_BLOCK)
    view = memoryview(rnd)
    with open(path, "wb", buffering=0) as f:
        left, i = size, 0
        while left > 0:
            k = ((i + seed * 7919) * 104_729 * 64) % _BLOCK
            for piece in (view[k:], view[:k]):
                n = min(len(piece), left)
                if n:
                    f.write(piece[:n])
                    left -= n
            i += 1


def calibration_samples(request: BuildRequest, calibration_dir: Path | None) -> int | None:
    """How many calibration texts the build would use (what upstream reads: the "text" of the train split's
    records, at most calib_batches); a calibrating request without its data fails as the real build would."""
    settings = request.engine.calibration
    if request.calibration is None or settings is None:
        return None
    if calibration_dir is None or not calibration_dir.is_dir():
        raise BuildFailure(
            "compile", "CalibrationMissing", "the request calibrates but no calibration data was fetched"
        )
    texts = 0
    for path in sorted(calibration_dir.rglob("*.jsonl")):
        with path.open(encoding="utf-8", errors="replace") as f:
            texts += sum(1 for line in f if line.strip())
    if texts == 0:
        raise BuildFailure("compile", "CalibrationInvalid", "the calibration dataset holds no text records", True)
    return min(texts, settings.calib_batches)


class TestCompiler:
    """Writes a realistic engine directory without TensorRT-LLM. NOT A REAL ENGINE."""

    __test__ = False  # not a pytest test class despite the name
    name = "test"

    def compile(
        self,
        request: BuildRequest,
        checkpoint_dir: Path,
        out_dir: Path,
        log: Any,
        calibration_dir: Path | None = None,
    ) -> CompileOutput:
        log.warning("TEST COMPILER: this is NOT TensorRT-LLM; the engine written is fake and cannot be served")
        calibrated = calibration_samples(request, calibration_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        total = DEFAULT_ENGINE_BYTES if request.test_engine_bytes is None else request.test_engine_bytes
        if request.backend == "tensorrt":
            (out_dir / "config.json").write_text(json.dumps(engine_config(request), indent=2))
            for rank, size in enumerate(rank_sizes(total, request.world_size)):
                write_pseudo_random(out_dir / f"rank{rank}.engine", size, rank)
        else:
            # PyTorch backend: the artifact is the HF checkpoint itself.
            shutil.copytree(checkpoint_dir, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".cache"))
        copy_tokenizer(checkpoint_dir, out_dir)
        if request.backend == "tensorrt":
            write_tokenizer_dir(checkpoint_dir, out_dir)
        (out_dir / MARKER_NAME).write_text(
            json.dumps(
                {
                    "test_build": True,
                    "compiler": self.name,
                    "note": "NOT TensorRT-LLM output",
                    "calibration_samples": calibrated,
                }
            )
            + "\n"
        )
        log.warning("TEST COMPILER wrote a fake engine", engine_dir=str(out_dir), bytes=total)
        return CompileOutput(engine_dir=out_dir, trtllm_version=request.trtllm_version, test_build=True)
