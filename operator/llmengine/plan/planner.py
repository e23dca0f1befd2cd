"""make_plan: everything the operator decides about an LLMEngine before touching the cluster. Pure, no I/O."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from llmengine.api.artifacts import BuildRequest, BuildShapes, CalibrationSource, ModelSource, StoreLocation
from llmengine.api.config import ImageCatalog
from llmengine.api.engine import EngineConfig
from llmengine.api.pods import OperandPods
from llmengine.api.v1alpha1 import SHAPE_FIELDS, FieldError, InvalidEngine, LLMEngine, LLMEngineSpec, parse_engine
from llmengine.plan import pods, sizing, validate
from llmengine.plan.catalog import CATALOG, ModelFacts, lookup, resolve_facts
from llmengine.plan.engine_config import effective_shapes, engine_config
from llmengine.plan.gpus import GIB, GPU_CLASSES, UNKNOWN_GPU, GpuClass, MigProfile, gpu_class, gpu_resource, parse_sm
from llmengine.plan.identity import engine_digest, identity_inputs, short_digest, tool_job_name
from llmengine.plan.sizing import EMPTY_MEMORY, MemoryEstimate

COMPILERS = ("tensorrt-llm", "test")
# trtllm-build's defaults for shapes the spec leaves unset (max_seq_len defaults to the model's context).
DEFAULT_MAX_BATCH_SIZE = 2048
DEFAULT_MAX_INPUT_LEN = 1024
DEFAULT_MAX_NUM_TOKENS = 8192
# API quantization name -> the name the builder knows.
REQUEST_QUANTIZATION = {"smoothquant": "int8_smoothquant"}

EMPTY_SHAPES = BuildShapes(max_batch_size=0, max_input_len=0, max_seq_len=0, max_num_tokens=0)

Action = Literal["rebuild", "rollout", "nothing"]


@dataclass(frozen=True)
class Plan:
    """The planner's verdict on one LLMEngine.

    When `valid` is false, `errors` says why and `build_request` is None; the other fields hold what could be
    worked out (placeholders where nothing could: empty digest, zero shapes, the `unknown` GPU class).
    """

    valid: bool
    errors: list[FieldError]
    warnings: list[str]
    engine_digest: str
    short_digest: str
    shapes: BuildShapes
    memory: MemoryEstimate
    gpu: GpuClass
    mig_profile: str | None
    gpu_resource: str
    gpu_count: int
    build_request: BuildRequest | None
    runtime_args: list[str]
    engine_inputs: dict[str, Any] = field(default_factory=dict)
    shapes_from_traffic: bool = False
    store: StoreLocation | None = None
    trtllm_version: str | None = None
    # The images configured for trtllm_version: the builder's is part of the identity, the server's of the rollout.
    builder_image: str = ""
    server_image: str = ""
    # Every engine-shaping setting TensorRT-LLM is handed, upstream's rules applied (None when it could not be
    # worked out). The identity is a digest of it.
    engine: EngineConfig | None = None
    # The planner itself failed (a bug, not the spec's fault): what it raised. The plan is invalid, but no field is
    # to blame, so admission lets the object in and the status reports an internal error.
    internal_error: str | None = None
    # The identity's build Job into its store (identity.tool_job_name): "" when there is no identity or no store.
    build_job: str = ""
    bench_job: str = ""  # the benchmark Job of that engine, named alike

    @property
    def paged_context_fmha(self) -> bool:
        """Whether the engine is built with paged context attention (chunked prefill possible)."""
        b = self.engine.build_config if self.engine is not None else None
        return b.plugin_config.use_paged_context_fmha if b is not None else True


def invalid_plan(errors: list[FieldError]) -> Plan:
    return Plan(
        valid=False,
        errors=errors,
        warnings=[],
        engine_digest="",
        short_digest="",
        shapes=EMPTY_SHAPES,
        memory=EMPTY_MEMORY,
        gpu=UNKNOWN_GPU,
        mig_profile=None,
        gpu_resource="nvidia.com/gpu",
        gpu_count=0,
        build_request=None,
        runtime_args=[],
    )


def make_plan(
    engine: LLMEngine,
    *,
    compiler: str = "tensorrt-llm",
    default_store: StoreLocation | None = None,
    gpus_per_node: int | None = None,
    test_engine_bytes: int | None = None,
    shape_floor: Mapping[str, int] | None = None,
    images: ImageCatalog | None = None,
    isolated_builds: bool = False,
) -> Plan:
    """Validate an LLMEngine and work out its engine identity, shapes, memory fit and build request.

    shape_floor raises shapes (snake_case BuildShapes fields) to at least these values: the shapes a traffic-aware
    rebuild chose (rebuildPolicy Auto). They enter the identity like any other shape. Never raises on bad input:
    every problem becomes a FieldError. isolated_builds: default-store engines build in the operator's namespace.
    """
    try:
        plan = _plan(
            engine, compiler, default_store, gpus_per_node, test_engine_bytes, shape_floor, images or ImageCatalog()
        )
        errs = isolated_build_errors(engine) if isolated_builds else []
        return (
            dataclasses.replace(plan, errors=[*plan.errors, *errs], valid=False, build_request=None) if errs else plan
        )
    except Exception as exc:  # a planner bug must not crash the operator's reconcile loop
        why = f"{type(exc).__name__}: {exc}"[:500]
        plan = invalid_plan([FieldError("spec", f"the operator could not plan this engine ({why})")])
        return dataclasses.replace(plan, internal_error=why)


def plan_object(
    obj: Any,
    *,
    compiler: str = "tensorrt-llm",
    default_store: StoreLocation | None = None,
    gpus_per_node: int | None = None,
    test_engine_bytes: int | None = None,
    shape_floor: Mapping[str, int] | None = None,
    images: ImageCatalog | None = None,
    isolated_builds: bool = False,
) -> Plan:
    """make_plan for a raw Kubernetes object; schema errors become FieldErrors (spec.build.maxSeqLen, ...)."""
    try:
        engine = parse_engine(obj)
    except InvalidEngine as exc:
        return invalid_plan(exc.errors)
    return make_plan(
        engine,
        compiler=compiler,
        default_store=default_store,
        gpus_per_node=gpus_per_node,
        test_engine_bytes=test_engine_bytes,
        shape_floor=shape_floor,
        images=images,
        isolated_builds=isolated_builds,
    )


def isolated_build_errors(engine: LLMEngine) -> list[FieldError]:
    """Settings a build in the operator's namespace cannot take: a default-store engine's build-only pod settings
    name objects (ServiceAccount, volumes, Secrets) of the engine's namespace."""
    pods = engine.spec.pods
    if engine.spec.store is not None or pods is None or pods.build is None:
        return []
    return [
        FieldError(
            "spec.pods.build",
            "engines on the operator's default store are built in the operator's namespace with the chart's "
            "enginePods.build settings: remove spec.pods.build, or set spec.store to build in this namespace",
        )
    ]


def raise_shapes(shapes: BuildShapes, floor: Mapping[str, int] | None) -> BuildShapes:
    """Each shape at least its floor; maxNumTokens follows a raised maxInputLen (a prompt fits one iteration)."""
    if not floor:
        return shapes
    up = {f: max(getattr(shapes, f), int(floor[f])) for f in SHAPE_FIELDS if f in floor}
    if up.get("max_input_len", 0) > shapes.max_num_tokens:
        up["max_num_tokens"] = max(up.get("max_num_tokens", 0), up["max_input_len"])
    return shapes.model_copy(update=up) if up else shapes


def _resolve_facts(spec: LLMEngineSpec) -> tuple[ModelFacts | None, list[FieldError]]:
    m = spec.model
    if m.catalog is not None:
        entry = lookup(m.catalog)
        if entry is None:
            return None, [
                FieldError(
                    "spec.model.catalog",
                    f"{m.catalog!r} is not a built-in model: use one of {', '.join(CATALOG)} or give "
                    "spec.model.architecture",
                )
            ]
        return entry.facts, []
    assert m.architecture is not None
    a = m.architecture
    if a.head_dim is None and a.hidden_size % a.num_attention_heads:
        return None, [
            FieldError(
                "spec.model.architecture.headDim",
                f"hiddenSize {a.hidden_size} is not a multiple of numAttentionHeads {a.num_attention_heads}: set "
                "headDim from the model's config.json",
            )
        ]
    return resolve_facts(a), []


def _resolve_mig(spec: LLMEngineSpec, gpu: GpuClass) -> tuple[MigProfile | None, list[FieldError]]:
    name = spec.target.mig_profile
    if name is None:
        return None, []
    if not gpu.mig_capable:
        return None, [FieldError("spec.target.migProfile", f"{gpu.name} does not support MIG: remove migProfile")]
    profile = gpu.mig_profiles.get(name)
    if profile is None:
        return None, [
            FieldError(
                "spec.target.migProfile",
                f"{name!r} is not a MIG profile of {gpu.name}: use one of {', '.join(gpu.mig_profiles)}",
            )
        ]
    return profile, []


def _shapes(
    spec: LLMEngineSpec, facts: ModelFacts | None, available: int
) -> tuple[BuildShapes | None, list[FieldError], list[str]]:
    b, t = spec.build, spec.traffic
    if t is not None and b.explicit_shapes():
        names = ", ".join(validate._camel(n) for n in b.explicit_shapes())
        return (
            None,
            [FieldError("spec.traffic", f"spec.traffic and spec.build shapes ({names}) are exclusive: remove one")],
            [],
        )
    if facts is None:
        return None, [], []
    if t is None:
        seq = b.max_seq_len or facts.max_position_embeddings
        return (
            BuildShapes(
                max_batch_size=b.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
                max_input_len=b.max_input_len or min(DEFAULT_MAX_INPUT_LEN, seq),
                max_seq_len=seq,
                max_num_tokens=b.max_num_tokens or DEFAULT_MAX_NUM_TOKENS,
                max_beam_width=b.max_beam_width,
            ),
            [],
            [],
        )
    tp, pp = spec.parallelism.tensor, spec.parallelism.pipeline
    d = sizing.derive_shapes(
        facts,
        quantization=spec.precision.quantization,
        kv_cache_dtype=spec.precision.kv_cache_dtype,
        tp=tp,
        pp=pp,
        gpu_memory_bytes=available,
        input_mean=t.input_tokens.mean,
        input_max=t.input_tokens.max,
        output_mean=t.output_tokens.mean,
        output_max=t.output_tokens.max,
        max_beam_width=b.max_beam_width,
        concurrency=t.concurrency,
    )
    if d.shapes is None:
        weights = sizing.weight_bytes_total(facts, spec.precision.quantization) / GIB
        return (
            None,
            [
                FieldError(
                    "spec.traffic",
                    f"the weights ({weights:.1f} GiB) leave no KV cache for one request of mean length on "
                    f"{tp * pp} GPU(s) of {available / GIB:.1f} GiB: quantize, raise spec.parallelism.tensor or "
                    "target a larger GPU",
                )
            ],
            [],
        )
    return d.shapes, [], d.warnings


def _store(spec: LLMEngineSpec, default_store: StoreLocation | None) -> tuple[StoreLocation | None, list[FieldError]]:
    if spec.store is not None:
        s = spec.store
        return StoreLocation(bucket=s.bucket, prefix=s.prefix, endpoint=s.endpoint, region=s.region), []
    if default_store is not None:
        return default_store, []
    return None, [
        FieldError("spec.store", "no engine store: set spec.store, or configure the operator's default store")
    ]


def _memory(spec: LLMEngineSpec, facts: ModelFacts, shapes: BuildShapes, available: int) -> MemoryEstimate:
    rt = spec.serving.runtime
    return sizing.estimate_memory(
        facts,
        quantization=spec.precision.quantization,
        kv_cache_dtype=spec.precision.kv_cache_dtype,
        tp=spec.parallelism.tensor,
        pp=spec.parallelism.pipeline,
        built=shapes,
        runtime_batch=min(rt.max_batch_size or shapes.max_batch_size, shapes.max_batch_size),
        runtime_seq=min(rt.max_seq_len or shapes.max_seq_len, shapes.max_seq_len),
        kv_cache_type=spec.build.kv_cache_type,
        kv_fraction=rt.kv_cache_free_gpu_memory_fraction,
        available_bytes=available,
    )


# Lower-precision weights worth suggesting, per GPU generation (what the GPU has kernels for and build() takes).
_SMALLER_WEIGHTS: dict[str, tuple[str, ...]] = {
    "none": ("fp8", "int4_awq", "nvfp4"),
    "int8_weight_only": ("int4_awq", "nvfp4"),
    "smoothquant": ("int4_awq", "nvfp4"),
    "fp8": ("int4_awq", "nvfp4"),
}


def _quant_runs_on(q: str, sm: tuple[int, int]) -> bool:
    if q == "fp8":
        return sm >= validate.SM_FP8
    if q == "nvfp4":
        return sm >= validate.SM_BLACKWELL
    return sm < validate.SM_BLACKWELL  # integer weight-only (int4_awq) is refused on SM 10.x


def _memory_fixes(
    spec: LLMEngineSpec, facts: ModelFacts, shapes: BuildShapes, gpu: GpuClass, available: int, gpus_per_node: int
) -> list[str]:
    """The fixes that are valid for this GPU and precision, each with what it would need per GPU."""
    fixes: list[str] = []
    sm = parse_sm(gpu.sm)
    for q in _SMALLER_WEIGHTS.get(spec.precision.quantization, ()):
        if _quant_runs_on(q, sm):
            trial = spec.model_copy(update={"precision": spec.precision.model_copy(update={"quantization": q})})
            m = _memory(trial, facts, shapes, available)
            fixes.append(f"quantization {q} ({m.required_bytes_per_gpu / GIB:.1f} GiB)")
    if spec.target.mig_profile is None:
        for tp in range(spec.parallelism.tensor + 1, gpus_per_node // spec.parallelism.pipeline + 1):
            if validate.tensor_fits(facts, tp):
                trial = spec.model_copy(update={"parallelism": spec.parallelism.model_copy(update={"tensor": tp})})
                m = _memory(trial, facts, shapes, available)
                fixes.append(f"spec.parallelism.tensor {tp} ({m.required_bytes_per_gpu / GIB:.1f} GiB per GPU)")
                break
    fixes.append("lower maxNumTokens/maxSeqLen/maxBatchSize")
    if spec.target.mig_profile is not None:
        fixes.append("a larger spec.target.migProfile")
        return fixes
    bigger = sorted(
        (
            g
            for g in GPU_CLASSES.values()
            if g.memory_bytes > available and _memory(spec, facts, shapes, g.memory_bytes).fits
        ),
        key=lambda g: g.memory_bytes,
    )
    if bigger:
        fixes.append(f"target {bigger[0].name}")
    return fixes


def _memory_error(spec: LLMEngineSpec, m: MemoryEstimate, gpu: GpuClass, fixes: list[str]) -> FieldError:
    where = f"a {spec.target.mig_profile} slice of {gpu.name}" if spec.target.mig_profile else gpu.name
    field_ = "spec.target.migProfile" if spec.target.mig_profile else "spec.target.gpu"
    return FieldError(
        field_,
        f"needs {m.required_bytes_per_gpu / GIB:.1f} GiB per GPU (weights {m.weights_bytes / GIB:.1f}, "
        f"activations {m.activation_bytes / GIB:.1f}, runtime {m.runtime_bytes / GIB:.1f}, minimum KV cache "
        f"{m.min_kv_bytes / GIB:.1f} at fraction {m.kv_cache_fraction}) but {where} has "
        f"{m.available_bytes_per_gpu / GIB:.1f} GiB: " + ", or ".join(fixes),
    )


def runtime_args(spec: LLMEngineSpec, shapes: BuildShapes) -> list[str]:
    """trtllm-serve flags for the runtime limits; unset limits serve at the built shapes."""
    rt = spec.serving.runtime
    return [
        "--max_batch_size",
        str(rt.max_batch_size or shapes.max_batch_size),
        "--max_num_tokens",
        str(rt.max_num_tokens or shapes.max_num_tokens),
        "--max_seq_len",
        str(rt.max_seq_len or shapes.max_seq_len),
        "--kv_cache_free_gpu_memory_fraction",
        str(rt.kv_cache_free_gpu_memory_fraction),
        "--tp_size",
        str(spec.parallelism.tensor),
        "--pp_size",
        str(spec.parallelism.pipeline),
    ]


def calibration_request(spec: LLMEngineSpec) -> CalibrationSource | None:
    """Where the calibration samples are, normalized (trimmed, no trailing /), only when the build calibrates.
    How many samples of what length are used is in the EngineConfig, as upstream applies them."""
    c = spec.precision.calibration
    if c is None or not validate.calibrates(spec):
        return None
    hf, s3 = c.dataset.hugging_face, c.dataset.s3
    return CalibrationSource(
        hugging_face_repo=hf.repo.strip() if hf else None,
        revision=hf.revision.strip() if hf else None,
        s3_uri=s3.uri.strip().rstrip("/") + "/" if s3 else None,
    )


def calibration_identity(source: CalibrationSource | None) -> dict[str, Any] | None:
    """The calibration dataset as an identity input (otherwise it changes nothing)."""
    return {"dataset": source.model_dump(exclude_none=True)} if source is not None else None


def _build_request(
    spec: LLMEngineSpec,
    *,
    engine: EngineConfig,
    digest: str,
    compiler: Literal["tensorrt-llm", "test"],
    test_engine_bytes: int | None,
    facts: ModelFacts,
    shapes: BuildShapes,
    gpu: GpuClass,
    version: str,
    builder_image: str,
    store: StoreLocation,
) -> BuildRequest:
    src = spec.model.source
    hf = src.hugging_face
    return BuildRequest(
        engine_digest=digest,
        backend=spec.backend,
        compiler=compiler,
        test_engine_bytes=test_engine_bytes if compiler == "test" else None,
        model=ModelSource(
            hugging_face_repo=hf.repo if hf else None,
            revision=hf.revision if hf else None,
            s3_uri=src.s3.uri if src.s3 else None,
            tokenizer=spec.model.tokenizer,
        ),
        architecture=facts.architecture,
        model_facts=facts.as_dict(),
        dtype=spec.precision.dtype,
        quantization=REQUEST_QUANTIZATION.get(spec.precision.quantization, spec.precision.quantization),
        kv_cache_dtype=spec.precision.kv_cache_dtype,
        tp_size=spec.parallelism.tensor,
        pp_size=spec.parallelism.pipeline,
        shapes=shapes,
        engine=engine,
        calibration=calibration_request(spec),
        gpu_class=gpu.name,
        sm=gpu.sm,
        image=builder_image,
        trtllm_version=version,
        store=store,
    )


def _plan(
    engine: LLMEngine,
    compiler: str,
    default_store: StoreLocation | None,
    gpus_per_node: int | None,
    test_engine_bytes: int | None,
    shape_floor: Mapping[str, int] | None,
    images: ImageCatalog,
) -> Plan:
    spec = engine.spec
    errors = validate.check_integer_range(spec)
    if errors:
        return invalid_plan(errors)
    warnings: list[str] = []
    if compiler not in COMPILERS:
        errors.append(FieldError("compiler", f"unknown compiler {compiler!r}: use one of {', '.join(COMPILERS)}"))

    facts, errs = _resolve_facts(spec)
    errors += errs
    gpu = gpu_class(spec.target.gpu) or UNKNOWN_GPU
    mig, errs = _resolve_mig(spec, gpu)
    errors += errs
    available = mig.memory_bytes if mig else gpu.memory_bytes
    version, errs = validate.resolve_version(spec, images.default_version)
    errors += errs
    shapes, errs, warns = _shapes(spec, facts, available)
    errors += errs
    warnings += warns
    if shapes is not None:
        shapes = raise_shapes(shapes, shape_floor)

    resolved = validate.Resolved(
        spec=spec,
        facts=facts,
        gpu=gpu,
        mig=mig,
        shapes=shapes,
        shapes_from_traffic=spec.traffic is not None,
        version=version,
        gpus_per_node=gpus_per_node or gpu.gpus_per_node,
        images=images,
    )
    for rule in (
        validate.check_version,
        validate.check_images,
        validate.check_precision,
        validate.check_calibration,
        validate.check_backend,
        validate.check_parallelism,
        validate.check_shapes,
        validate.check_runtime,
    ):
        errors += rule(resolved)
    warnings += validate.calibration_warnings(resolved)
    warnings += validate.revision_warnings(spec)

    econf: EngineConfig | None = None
    if facts is not None and shapes is not None:
        result = engine_config(
            spec,
            architecture=facts.architecture,
            shapes=shapes,
            gpu=gpu,
            calibrates=validate.calibrates(spec),
            shapes_explicit=spec.traffic is None,
        )
        errors += result.errors
        warnings += [
            f"paged context FMHA is off for this engine ({c.rule}: {c.why}): no chunked prefill or KV cache reuse; "
            "set spec.build.pagedContextFmha false to say so, or change the KV cache dtype"
            for c in result.resolved
            if c.key.endswith(".use_paged_context_fmha") and c.after is False
        ]
        econf = result.config
        shapes = effective_shapes(econf, shapes)
        paged_ctx = econf.build_config.plugin_config.use_paged_context_fmha if econf.build_config else True
        warnings += validate.shape_warnings(replace(resolved, shapes=shapes), paged_ctx)

    memory = EMPTY_MEMORY
    shape_fields = {f"spec.build.{n}" for n in ("maxBatchSize", "maxInputLen", "maxSeqLen", "maxNumTokens")}
    if facts is not None and shapes is not None and not any(e.field in shape_fields for e in errors):
        memory = _memory(spec, facts, shapes, available)
        if not memory.fits:
            per_node = gpus_per_node or gpu.gpus_per_node
            fixes = _memory_fixes(spec, facts, shapes, gpu, available, per_node)
            errors.append(_memory_error(spec, memory, gpu, fixes))

    store, errs = _store(spec, default_store)
    errors += errs

    pair = images.resolve(version) if version is not None else None
    inputs: dict[str, Any] = {}
    digest = ""
    if econf is not None and facts is not None and pair is not None and version is not None and compiler in COMPILERS:
        inputs = identity_inputs(
            spec,
            facts=facts,
            engine=econf,
            gpu=gpu,
            trtllm_version=version,
            builder_image=pair.builder,
            compiler=compiler,
            calibration=calibration_identity(calibration_request(spec)),
        )
        digest = engine_digest(inputs)

    valid = not errors
    request = None
    if valid:
        assert facts is not None and shapes is not None and version is not None and store is not None
        assert pair is not None and econf is not None
        request = _build_request(
            spec,
            engine=econf,
            digest=digest,
            compiler="test" if compiler == "test" else "tensorrt-llm",
            test_engine_bytes=test_engine_bytes,
            facts=facts,
            shapes=shapes,
            gpu=gpu,
            version=version,
            builder_image=pair.builder,
            store=store,
        )
    tp, pp = spec.parallelism.tensor, spec.parallelism.pipeline
    short = short_digest(digest)
    return Plan(
        valid=valid,
        errors=errors,
        warnings=warnings,
        engine_digest=digest,
        short_digest=short,
        build_job=tool_job_name("build", short, store) if short and store is not None else "",
        bench_job=tool_job_name("bench", short, store) if short and store is not None else "",
        shapes=shapes or EMPTY_SHAPES,
        memory=memory,
        gpu=gpu,
        mig_profile=spec.target.mig_profile,
        gpu_resource=gpu_resource(spec.target.mig_profile),
        gpu_count=1 if spec.target.mig_profile else tp * pp,
        build_request=request,
        runtime_args=runtime_args(spec, shapes) if shapes is not None else [],
        engine_inputs=inputs,
        shapes_from_traffic=spec.traffic is not None,
        store=store,
        trtllm_version=version,
        builder_image=pair.builder if pair else "",
        server_image=pair.server if pair else "",
        engine=econf,
    )


# ---------------------------------------------------------------------------------------------------------------
# compare


def serving_inputs(plan: Plan, engine: LLMEngine) -> dict[str, Any]:
    """What the serving pods are made from, besides the engine itself: a change here is a rollout."""
    spec = engine.spec
    return {
        "serving": spec.serving.model_dump(mode="json", by_alias=True),
        "tokenizer": spec.model.tokenizer,
        "serverImage": plan.server_image,
        "backend": spec.backend,
        "target": spec.target.model_dump(
            mode="json", by_alias=True, include={"mig_profile", "node_selector", "affinity", "tolerations"}
        ),
        "store": spec.store.model_dump(mode="json", by_alias=True) if spec.store else None,
        # The serving pods' settings; spec.pods.build only shapes the next build and benchmark.
        "pods": pods.resolve(OperandPods(), spec.pods, "serving").model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
        or None,
        "runtimeArgs": plan.runtime_args,
        "gpuResource": plan.gpu_resource,
        "gpuCount": plan.gpu_count,
    }


def compare(old: Plan, new: Plan, old_engine: LLMEngine, new_engine: LLMEngine) -> Action:
    """What applying new_engine over old_engine does: rebuild the engine, roll out the pods, or nothing."""
    if old.engine_digest != new.engine_digest:
        return "rebuild"
    if serving_inputs(old, old_engine) != serving_inputs(new, new_engine):
        return "rollout"
    return "nothing"


_ABSENT = object()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: value}


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(unset)"
    return json.dumps(value) if isinstance(value, str | bool) or value is None else str(value)


def differences(old: Plan, new: Plan, old_engine: LLMEngine, new_engine: LLMEngine) -> list[str]:
    """What applying new_engine over old_engine changes, as `path: old → new`: the engine identity's inputs when
    the engine is rebuilt (the EngineConfig's effective settings, so a field upstream's rules settle the same way
    is not listed), the serving pods' inputs when only they roll out."""
    if old.engine_digest != new.engine_digest:
        a, b = _flatten(old.engine_inputs), _flatten(new.engine_inputs)
    else:
        a, b = _flatten(serving_inputs(old, old_engine)), _flatten(serving_inputs(new, new_engine))
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {_show(a.get(k, _ABSENT))} → {_show(b.get(k, _ABSENT))}"
        for k in keys
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    ]
