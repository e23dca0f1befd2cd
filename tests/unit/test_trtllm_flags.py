"""Every flag our command builders emit exists in TensorRT-LLM 1.2 and carries a value of the right type."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from llmengine.api.artifacts import BuildRequest, Manifest, ManifestFile, Provenance
from llmengine.builder.compiler import FEATURES, QUANTIZATIONS, BuildFailure, check_request
from llmengine.builder.trtllm import build_command, compile_commands, convert_command, quantize_command
from llmengine.builder.trtllm_flags import TOOLS, check_argv, tool_of
from llmengine.server.serve import ResolvedKnobs, serve_argv

MODEL, WORK, ENGINE = Path("/work/model"), Path("/work"), Path("/work/engine")


def request(**kw: Any) -> BuildRequest:
    base: dict[str, Any] = {
        "engine_digest": "d" * 16,
        "backend": "tensorrt",
        "model": {"hugging_face_repo": "meta-llama/Llama-3.1-8B-Instruct"},
        "architecture": "LlamaForCausalLM",
        "model_facts": {"hidden_size": 4096},
        "dtype": "bfloat16",
        "shapes": {"max_batch_size": 64, "max_input_len": 2048, "max_seq_len": 4096, "max_num_tokens": 8192},
        "gpu_class": "H100-80GB",
        "sm": "9.0",
        "image": "reg/llmengine-builder:1",
        "trtllm_version": "1.2.1",
        "store": {"bucket": "engines"},
    }
    base.update(kw)
    return BuildRequest.model_validate(base)


SM_FOR = {"fp8": "9.0", "w4a8_awq": "9.0", "nvfp4": "10.0"}


def matrix() -> list[BuildRequest]:
    """Each quantization x backend x KV dtype x parallelism, plus each feature on its own, where valid."""
    out: list[BuildRequest] = []
    for quant, backend, kv, (tp, pp), arch in itertools.product(
        QUANTIZATIONS,
        ("tensorrt", "pytorch"),
        ("auto", "fp8", "int8"),
        ((1, 1), (2, 1), (4, 2)),
        ("LlamaForCausalLM", "Qwen2ForCausalLM"),
    ):
        r = request(
            quantization=quant,
            backend=backend,
            kv_cache_dtype=kv,
            tp_size=tp,
            pp_size=pp,
            architecture=arch,
            sm=SM_FOR.get(quant, "9.0" if kv == "fp8" else "8.0"),
        )
        try:
            check_request(r)
        except BuildFailure:
            continue
        out.append(r)
    for name in FEATURES:
        feats = {name: not FEATURES[name]}
        if name == "fp8_context_fmha":
            feats["paged_context_fmha"] = True
        r = request(features=feats, quantization="fp8" if name == "fp8_context_fmha" else "none")
        try:
            check_request(r)
        except BuildFailure:
            continue
        out.append(r)
    out.append(request(shapes={**request().shapes.model_dump(), "opt_num_tokens": 1024, "max_beam_width": 4}))
    return out


MATRIX = matrix()


def _id(r: BuildRequest) -> str:
    feats = ",".join(k for k, v in r.features.items() if v != FEATURES[k])
    return f"{r.backend}-{r.quantization}-kv{r.kv_cache_dtype}-tp{r.tp_size}pp{r.pp_size}-{r.architecture[:5]}-{feats}"


def test_matrix_covers_every_quantization_and_backend() -> None:
    seen = {(r.quantization, r.backend) for r in MATRIX}
    for q, spec in QUANTIZATIONS.items():
        assert (q, "tensorrt") in seen
        assert ((q, "pytorch") in seen) == spec.pytorch
    assert len(MATRIX) > 60


@pytest.mark.parametrize("req", MATRIX, ids=_id)
def test_every_emitted_flag_is_a_trtllm_flag_with_a_typed_value(req: BuildRequest) -> None:
    commands = compile_commands(req, MODEL, WORK, ENGINE, workers=req.world_size)
    for argv in commands:
        assert check_argv(argv) == [], argv
    if req.backend == "tensorrt":
        ckpt, build = commands
        assert tool_of(ckpt)[0] == (
            "quantize" if QUANTIZATIONS[req.quantization].tool == "modelopt" else "convert_checkpoint"
        )
        assert "--tp_size" not in build and "--pp_size" not in build
        assert build[build.index("--workers") + 1] == str(req.world_size)
        assert build[build.index("--max_seq_len") + 1] == str(req.shapes.max_seq_len)
    elif req.quantization != "none":
        (q,) = commands
        assert q[q.index("--export_format") + 1] == "hf"
    manifest = Manifest(
        engine_digest=req.engine_digest,
        backend=req.backend,
        tp_size=req.tp_size,
        pp_size=req.pp_size,
        shapes=req.shapes,
        files=[ManifestFile(path="rank0.engine", sha256="0" * 64, size=1)],
        provenance=Provenance(
            builder_image="i",
            trtllm_version="1.2.1",
            compiler="tensorrt-llm",
            gpu_class=req.gpu_class,
            sm=req.sm,
            build_time="t",
            build_seconds=1,
        ),
    )
    knobs = ResolvedKnobs(8, 1024, 2048, 1, 0.85)
    argv = serve_argv(manifest, ENGINE, ENGINE, knobs, Path("/tmp/x.yaml"), port=8000)
    assert check_argv(argv) == []
    assert argv[:2] == ["trtllm-serve", str(ENGINE)]
    assert argv[argv.index("--backend") + 1] == req.backend
    assert argv[argv.index("--tp_size") + 1] == str(req.tp_size)


def test_quantization_flags() -> None:
    wo = convert_command(request(quantization="int4_weight_only", sm="8.0"), MODEL, WORK)
    assert wo[wo.index("--weight_only_precision") + 1] == "int4" and "--use_weight_only" in wo
    sq = convert_command(request(quantization="int8_smoothquant", sm="8.0", kv_cache_dtype="int8"), MODEL, WORK)
    assert sq[sq.index("--smoothquant") + 1] == "0.5" and "--int8_kv_cache" in sq
    assert sq[1].endswith("examples/models/core/llama/convert_checkpoint.py")
    fp8 = quantize_command(request(quantization="fp8", kv_cache_dtype="fp8"), MODEL, WORK)
    assert fp8[fp8.index("--qformat") + 1] == "fp8" and fp8[fp8.index("--kv_cache_dtype") + 1] == "fp8"
    nvfp4 = build_command(request(quantization="nvfp4", sm="10.0"), WORK, ENGINE, 1)
    assert nvfp4[nvfp4.index("--gemm_plugin") + 1] == "nvfp4"
    feats = build_command(
        request(quantization="fp8", features={"paged_context_fmha": True, "fp8_context_fmha": True}), WORK, ENGINE, 1
    )
    assert feats[feats.index("--use_fp8_context_fmha") + 1] == "enable"
    assert feats[feats.index("--use_paged_context_fmha") + 1] == "enable"


def test_checker_catches_wrong_flags_and_values() -> None:
    assert check_argv(["trtllm-build", "--tp_size", "2"])[0] == (
        "trtllm-build: --tp_size is not a trtllm-build flag in TensorRT-LLM 1.2"
    )
    assert "expects a int" in check_argv(["trtllm-build", "--max_batch_size", "many"])[0]
    assert "expects a choice" in check_argv(["trtllm-build", "--kv_cache_type", "ring"])[0]
    assert "given twice" in check_argv(["trtllm-build", "--workers", "1", "--workers", "2"])[0]
    assert check_argv(["trtllm-serve"]) == ["trtllm-serve: missing positional argument"]
    assert "expects a float" in check_argv(["python3", "x/convert_checkpoint.py", "--smoothquant", "--per_token"])[0]


def test_flag_table_is_well_formed() -> None:
    for tool, (flags, _) in TOOLS.items():
        for name, flag in flags.items():
            assert name.startswith("--") and name == name.lower(), (tool, name)
            assert (flag.kind == "choice") == bool(flag.choices), (tool, name)
