"""Check a compiled engine directory against the request before anything is uploaded.

The engine's own config.json (what TensorRT-LLM's Engine.save writes: pretrained_config with the mapping and the
quantization, build_config with the plugin_config) must hold every setting of the request's EngineConfig, and
every rank file must be there. A real trtllm build and the test compiler's output go through the same checks; a
difference names the setting and both values, so an upstream rule we did not model fails the build instead of
committing an engine its identity does not describe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import BuildRequest
from llmengine.builder.compiler import BuildFailure
from llmengine.plan.upstream import table

# PluginConfig fields that take "auto", which upstream stores as is and reads back as the dtype (the table's choices).
DTYPE_PLUGINS = frozenset(o.name for o in table("PluginConfig").options if "auto" in (o.choices or []))
_ABSENT = object()


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
    """Raise BuildFailure(stage=verify) naming every mismatch; return the engine's files (relative) when good."""
    if request.backend == "tensorrt":
        _verify_tensorrt(request, engine_dir)
    else:
        _verify_pytorch(engine_dir)
    return sorted(p.relative_to(engine_dir).as_posix() for p in engine_dir.rglob("*") if p.is_file())


def _normalize(key: str, value: Any, dtype: str) -> Any:
    if key in DTYPE_PLUGINS and value == "auto":
        return dtype
    if key == "kv_cache_type" and isinstance(value, str):
        return value.upper()
    return value


def _section(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def setting_mismatches(request: BuildRequest, cfg: dict[str, Any]) -> list[str]:
    """Every setting of the request's EngineConfig that the engine's config.json does not hold, as
    `where: engine has X, request asks Y`."""
    e = request.engine
    pretrained, build = _section(cfg, "pretrained_config"), _section(cfg, "build_config")
    plugins = _section(build, "plugin_config")
    mapping, quant = _section(pretrained, "mapping"), _section(pretrained, "quantization")
    expected: list[tuple[str, dict[str, Any], str, Any]] = [
        ("pretrained_config", pretrained, "architecture", e.architecture),
        ("pretrained_config", pretrained, "dtype", e.dtype),
    ]
    expected += [("pretrained_config.mapping", mapping, k, v) for k, v in e.mapping.model_dump().items()]
    expected += [
        ("pretrained_config.quantization", quant, k, v)
        for k, v in e.quantization.model_dump().items()
        if v is not None or k in ("quant_algo", "kv_cache_quant_algo")
    ]
    assert e.build_config is not None
    expected += [("build_config", build, k, v) for k, v in e.build_config.model_dump(exclude={"plugin_config"}).items()]
    expected += [
        ("build_config.plugin_config", plugins, k, v) for k, v in e.build_config.plugin_config.model_dump().items()
    ]
    out: list[str] = []
    for where, section, key, want in expected:
        have = section.get(key, _ABSENT)
        if have is _ABSENT:
            out.append(f"{where}.{key}: engine has no such setting, request asks {want!r}")
        elif _normalize(key, have, e.dtype) != _normalize(key, want, e.dtype):
            out.append(f"{where}.{key}: engine has {have!r}, request asks {want!r}")
    return out


def _verify_tensorrt(request: BuildRequest, engine_dir: Path) -> None:
    cfg = _load_config(engine_dir)
    for rank in range(request.world_size):
        f = engine_dir / f"rank{rank}.engine"
        if not f.is_file() or (f.stat().st_size == 0 and request.compiler != "test"):
            raise _fail(f"rank{rank}.engine is missing or empty (world size {request.world_size})")
    extra = sorted(p.name for p in engine_dir.glob("rank*.engine") if _rank_of(p.name) >= request.world_size)
    if extra:
        raise _fail(f"unexpected rank files {', '.join(extra)} for world size {request.world_size}")
    mismatches = setting_mismatches(request, cfg)
    if mismatches:
        raise _fail(
            f"the engine was not built as requested ({len(mismatches)} setting(s)): " + "; ".join(mismatches[:8])
        )


def _verify_pytorch(engine_dir: Path) -> None:
    cfg = _load_config(engine_dir)
    if not cfg.get("architectures"):
        raise _fail("config.json has no 'architectures': not a Hugging Face checkpoint")
    if not any(engine_dir.glob("*.safetensors")):
        raise _fail("no *.safetensors weights in the checkpoint")


def _rank_of(name: str) -> int:
    try:
        return int(name[len("rank") : -len(".engine")])
    except ValueError:
        return -1
