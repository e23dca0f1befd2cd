"""`python -m llmengine.builder.trtllm_driver`: build one TensorRT engine with TensorRT-LLM's own Python API.

Runs inside the builder image (TensorRT-LLM 1.2.x and a GPU). One route for every model family, the one the LLM
API's ModelLoader takes (tensorrt_llm/llmapi/llm_utils.py@7b437aaa):

1. the model class for the checkpoint's architecture (``tensorrt_llm.models.MODEL_MAP``);
2. a calibrating quantization: ``cls.quantize(...)`` (ModelOpt) into a TensorRT-LLM checkpoint, with the locally
   fetched calibration dataset, then ``cls.from_checkpoint(dir, rank=r)`` per rank; otherwise
   ``cls.from_hugging_face(dir, dtype, mapping, quant_config, load_model_on_cpu=True)`` per rank;
3. ``tensorrt_llm.builder.build(model, BuildConfig)`` per rank with every BuildConfig and PluginConfig setting of
   the EngineConfig given explicitly, and ``engine.save(dir)``.

The keyword arguments are pure functions of the EngineConfig (below), checked against the upstream tables by the
contract test; only ``main`` touches tensorrt_llm. The Hub is never reached: HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE are set before tensorrt_llm is imported, and the calibration dataset is a local directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from llmengine.api.engine import EngineConfig


def mapping_kwargs(engine: EngineConfig, rank: int) -> dict[str, Any]:
    m = engine.mapping
    return {"world_size": m.world_size, "rank": rank, "tp_size": m.tp_size, "pp_size": m.pp_size}


def quant_kwargs(engine: EngineConfig) -> dict[str, Any]:
    """QuantConfig keywords (QuantAlgo values are passed as their names; the enum is a StrEnum)."""
    return engine.quantization.model_dump(exclude_none=True)


def quantize_kwargs(engine: EngineConfig, calibration_dir: Path) -> dict[str, Any]:
    """Keywords of ``cls.quantize`` besides the directories, mapping and QuantConfig."""
    assert engine.calibration is not None
    return {"dtype": engine.dtype, "calib_dataset": str(calibration_dir), **engine.calibration.model_dump()}


def from_hugging_face_kwargs(engine: EngineConfig) -> dict[str, Any]:
    return {"dtype": engine.dtype, "load_model_on_cpu": True}


def build_config_dict(engine: EngineConfig) -> dict[str, Any]:
    """BuildConfig as a dict (plugin_config nested), in the form BuildConfig.from_dict / model_validate take."""
    assert engine.build_config is not None
    return engine.build_config.model_dump()


def offline_environment(env: dict[str, str]) -> dict[str, str]:
    """Nothing below may download: the model and the calibration data are local directories."""
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _build_config(cls: Any, data: dict[str, Any]) -> Any:
    # BuildConfig is a dataclass with from_dict in the 1.2 pre-releases and a pydantic model afterwards.
    if hasattr(cls, "from_dict"):
        return cls.from_dict(data)
    return cls.model_validate(data)


def build(engine: EngineConfig, model_dir: Path, calibration_dir: Path | None, work_dir: Path, out_dir: Path) -> None:
    os.environ.update(offline_environment({}))
    from tensorrt_llm.builder import BuildConfig
    from tensorrt_llm.builder import build as trt_build
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models import MODEL_MAP
    from tensorrt_llm.models.modeling_utils import QuantConfig

    cls = MODEL_MAP[engine.architecture]
    quant_config = QuantConfig(**quant_kwargs(engine))
    world = engine.mapping.world_size
    if engine.calibration is not None:
        if calibration_dir is None:
            raise SystemExit("this engine calibrates but no calibration directory was given")
        checkpoint = work_dir / "quantized-checkpoint"
        cls.quantize(
            str(model_dir),
            str(checkpoint),
            mapping=Mapping(**mapping_kwargs(engine, 0)),
            quant_config=quant_config,
            **quantize_kwargs(engine, calibration_dir),
        )

        def load(rank: int) -> Any:
            return cls.from_checkpoint(str(checkpoint), rank=rank)
    else:

        def load(rank: int) -> Any:
            return cls.from_hugging_face(
                str(model_dir),
                mapping=Mapping(**mapping_kwargs(engine, rank)),
                quant_config=quant_config,
                **from_hugging_face_kwargs(engine),
            )

    config = _build_config(BuildConfig, build_config_dict(engine))
    out_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        print(f"building rank {rank} of {world}", flush=True)
        trt_build(load(rank), config).save(str(out_dir))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmengine.builder.trtllm_driver")
    p.add_argument("--engine-config", type=Path, required=True, help="EngineConfig JSON (upstream names)")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--calibration-dir", type=Path)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--engine-dir", type=Path, required=True)
    a = p.parse_args(argv)
    engine = EngineConfig.model_validate(json.loads(a.engine_config.read_text()))
    build(engine, a.model_dir, a.calibration_dir, a.work_dir, a.engine_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
