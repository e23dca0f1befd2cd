"""The TensorRT-LLM contract over the whole matrix the planner accepts.

Every quantization x KV cache dtype x model family x tensor/pipeline parallelism x build feature x GPU class x
backend is planned. For each accepted spec, everything we hand upstream is checked against the upstream tables
(llmengine/data/trtllm, read off the 1.2-line sources): the EngineConfig's BuildConfig, PluginConfig, QuantConfig
and calibration keywords, the driver's keyword arguments, the trtllm-serve and trtllm-bench command lines and the
extra LLM API options; the EngineConfig must be a fixed point of upstream's build rules, and the config.json an
engine built from it carries must verify. For each refused spec, every error must name what it mirrors, and an
error citing a build rule must be one that rule really produces on that spec. docs/trtllm-contract.md records the
counts this test prints.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import Manifest, Provenance
from llmengine.api.v1alpha1 import SHAPE_FIELDS, parse_engine
from llmengine.builder.benchmark import bench_argv
from llmengine.builder.compiler import contract_problems
from llmengine.builder.testcompiler import engine_config as written_config
from llmengine.builder.trtllm_driver import (
    build_config_dict,
    from_hugging_face_kwargs,
    mapping_kwargs,
    quant_kwargs,
    quantize_kwargs,
)
from llmengine.dev import seed
from llmengine.plan import plan_object
from llmengine.plan.benchgate import bench_request
from llmengine.plan.engine_config import draft_build, quant_settings
from llmengine.plan.gpus import gpu_class, parse_sm
from llmengine.plan.trtllm_rules import apply_build_rules
from llmengine.plan.upstream import check_argv, check_options, table
from llmengine.server.serve import ResolvedKnobs, extra_options, serve_argv

QUANTS = ["none", "fp8", "int4_awq", "w4a8_awq", "nvfp4", "int8_weight_only", "smoothquant"]
KV = ["auto", "fp8", "int8"]
GPUS = ["A100-80GB", "L40S", "H100-80GB", "B200"]
FEATURES: list[dict[str, Any]] = [
    {},
    {"pagedContextFmha": False},
    {"pagedContextFmha": True},
    {"fp8ContextFmha": True},
    {"fp8ContextFmha": False},
    {"contextFmha": False},
    {"removeInputPadding": False},
    {"multipleProfiles": True},
    {"kvCacheType": "continuous"},
    {"stripPlan": True, "weightStreaming": True},
    {"maxNumTokens": 4096},
]
# Catalog models, and families named by their architecture facts (small made-up sizes).
MODELS: list[dict[str, Any]] = [
    {"catalog": "llama-3.1-8b"},
    {"catalog": "mistral-7b"},
    {"catalog": "mixtral-8x7b"},
    {"catalog": "qwen2.5-7b"},
    *(
        {
            "architecture": {
                "architecture": arch,
                "numLayers": 8,
                "hiddenSize": 1024,
                "numAttentionHeads": 16,
                "numKeyValueHeads": 8,
                "vocabSize": 32000,
                "parameterCount": 1_000_000_000,
                "maxPositionEmbeddings": 8192,
            }
        }
        for arch in ("Gemma2ForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM", "GPT2LMHeadModel", "Qwen3ForCausalLM")
    ),
]
RULE = re.compile(r"\(([A-Z]\d+[a-z]?):")
# config.json's keys as upstream writes them (build.json: BuildConfig.to_dict / PluginConfig.model_dump).
BUILD_KEYS = {o.name for o in table("BuildConfig").options} - {"dry_run", "visualize_network"}
PLUGIN_KEYS = {o.name for o in table("PluginConfig").options if not o.name.startswith("_")}
# What a refusal may rest on besides a cited build rule: the route's own facts and the planner's other checks.
GROUNDS = (
    "has no TensorRT-LLM model class",
    "refused by TensorRT-LLM's calibration",
    "TensorRT-LLM's per-family code",
    "is refused by TensorRT-LLM's",
    "has no pipeline parallelism",
    "has no KV-cache-only path",
    "the pytorch backend serves the checkpoint as it is",
    "needs FP8 hardware",
    "an fp8 KV cache needs SM 8.9+",
    "nvfp4 needs Blackwell",
    "calibrates on sample text",
    "needs kvCacheType paged",
    "pipeline",
    "GiB per GPU",  # the memory fit
    "heads",
    "exceeds the model's context",
    "is a TensorRT engine build flag",
)


def _spec(
    model: dict[str, Any], q: str, kv: str, tp: int, pp: int, gpu: str, backend: str, feat: dict[str, Any]
) -> Any:
    obj = seed.engine_manifest(quantization=q, kv_cache_dtype=kv, tp=tp, pp=pp, gpu=gpu, backend=backend, build=feat)
    obj["spec"]["model"] = {"source": obj["spec"]["model"]["source"], **model}
    return obj


def _matrix() -> list[tuple[Any, ...]]:
    rows = []
    for model, q, kv, gpu in itertools.product(MODELS, QUANTS, KV, GPUS):
        for tp, pp in ((1, 1), (2, 2)):
            rows += [(model, q, kv, tp, pp, gpu, "tensorrt", f) for f in FEATURES]
        rows += [(model, q, kv, tp, pp, gpu, "tensorrt", {}) for tp, pp in ((2, 1), (1, 2), (8, 1))]
        rows.append((model, q, kv, 1, 1, gpu, "pytorch", {}))
    return rows


def _accepted_problems(plan: Any, obj: Any) -> list[str]:
    req, e = plan.build_request, plan.engine
    problems = contract_problems(e, req.sm)
    problems += check_options("QuantConfig", quant_kwargs(e))
    for rank in range(e.mapping.world_size):
        problems += check_options("Mapping", mapping_kwargs(e, rank))
    if e.build_config is not None:
        cfg = build_config_dict(e)
        problems += check_options("BuildConfig", {k: v for k, v in cfg.items() if k != "plugin_config"})
        problems += check_options("PluginConfig", cfg["plugin_config"])
        if e.calibration is not None:
            problems += check_options("PretrainedModel.quantize", quantize_kwargs(e, Path("/work/calibration")))
        else:
            problems += check_options("PretrainedModel.from_hugging_face", from_hugging_face_kwargs(e))
        # The test compiler writes every key upstream's config.json has (CI's builds are verified on that layout).
        written = written_config(req)["build_config"]
        problems += [f"test compiler config.json lacks build_config.{k}" for k in BUILD_KEYS - set(written)]
        problems += [
            f"test compiler config.json lacks plugin_config.{k}" for k in PLUGIN_KEYS - set(written["plugin_config"])
        ]
    manifest = Manifest(
        engine_digest=plan.engine_digest,
        backend=req.backend,
        tp_size=req.tp_size,
        pp_size=req.pp_size,
        shapes=req.shapes,
        files=[],
        provenance=Provenance(
            builder_image="b",
            trtllm_version="1.2.1",
            compiler="test",
            gpu_class="g",
            sm=req.sm,
            build_time="t",
            build_seconds=0,
        ),
    )
    s = req.shapes
    knobs = ResolvedKnobs(s.max_batch_size, s.max_num_tokens, s.max_seq_len, s.max_beam_width, 0.9)
    options = extra_options(req.backend)
    argv = serve_argv(manifest, Path("/engine"), "/engine/tokenizer", knobs, Path("/x.yaml") if options else None)
    problems += check_argv("trtllm-serve", argv[1:])
    problems += check_options("extra_llm_api_options", options)
    spec = parse_engine(obj).spec
    bench = bench_request(spec, plan)
    argv = bench_argv(
        bench, engine_dir=Path("/e"), model_dir=Path("/m"), dataset=Path("/d"), report=Path("/r"), workspace=Path("/w")
    )
    cut = argv.index("throughput")
    problems += check_argv("trtllm-bench", argv[1:cut]) + check_argv("trtllm-bench throughput", argv[cut + 1 :])
    return problems


def _refusal_problems(plan: Any, obj: Any, gpu: str) -> list[str]:
    problems = []
    spec = parse_engine(obj).spec
    for err in plan.errors:
        cited = RULE.findall(err.message)
        if not cited and not any(g in err.message for g in GROUNDS):
            problems.append(f"{err.field}: refusal without a ground: {err.message}")
        if cited and plan.engine is not None and spec.backend == "tensorrt":
            # The rule cited must be one upstream's rules produce on this spec's draft.
            g = gpu_class(gpu)
            assert g is not None
            # The spec's own shapes (plan.shapes are upstream's result), under the same draft the planner starts from.
            explicit = {f: v for f in SHAPE_FIELDS if (v := getattr(spec.build, f)) is not None}
            shapes = plan.shapes.model_copy(update=explicit)
            draft = plan.engine.model_copy(
                update={"quantization": quant_settings(spec), "build_config": draft_build(spec, shapes)}
            )
            out = apply_build_rules(draft, parse_sm(g.sm))
            fired = {c.rule for c in out.changes} | {r.rule for r in out.refusals}
            problems += [f"{err.field} cites {r}, which does not fire here" for r in cited if r not in fired]
    return problems


def test_every_accepted_spec_hands_upstream_only_what_it_defines_and_every_refusal_names_its_ground(
    capsys: Any,
) -> None:
    rows = _matrix()
    accepted = refused = 0
    by_rule: Counter[str] = Counter()
    mismatches: list[str] = []
    for model, q, kv, tp, pp, gpu, backend, feat in rows:
        obj = _spec(model, q, kv, tp, pp, gpu, backend, feat)
        plan = plan_object(obj, compiler="tensorrt-llm")
        where = f"{model} {q}/{kv} tp{tp}pp{pp} {gpu} {backend} {feat}"
        if plan.valid:
            accepted += 1
            mismatches += [f"{where}: {p}" for p in _accepted_problems(plan, obj)]
        else:
            refused += 1
            for err in plan.errors:
                by_rule.update(RULE.findall(err.message) or [err.field])
            mismatches += [f"{where}: {p}" for p in _refusal_problems(plan, obj, gpu)]
    with capsys.disabled():
        print(f"\ncontract matrix: {len(rows)} specs, {accepted} accepted and checked, {refused} refused")
        print("refusals by rule or field:", dict(sorted(by_rule.items())))
    assert accepted > 1000 and refused > 1000
    assert not mismatches, f"{len(mismatches)} mismatches, first: " + "\n".join(mismatches[:10])
