"""FAKE tensorrt_llm.models: MODEL_MAP and a model class. NOT TensorRT-LLM."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tensorrt_llm import checked, record


class FakeModel:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    @staticmethod
    def _config(hf_dir: str, dtype: str, mapping: Any, quant_config: Any) -> dict[str, Any]:
        hf = json.loads((Path(hf_dir) / "config.json").read_text())
        return {
            "architecture": hf["architectures"][0],
            "dtype": dtype,
            "mapping": mapping.to_dict(),
            "quantization": quant_config.to_dict(),
        }

    @classmethod
    def quantize(cls, hf_model_dir: str, output_dir: str, *, mapping: Any, quant_config: Any, **kw: Any) -> None:
        checked("PretrainedModel.quantize", kw)
        if not Path(kw["calib_dataset"]).is_dir():
            raise NotImplementedError(f"Unsupported dataset name or local repo directory: {kw['calib_dataset']}")
        record("quantize", kwargs=kw, offline=os.environ.get("HF_DATASETS_OFFLINE"))
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = cls._config(hf_model_dir, kw["dtype"], mapping, quant_config)
        (out / "config.json").write_text(json.dumps(config))

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, **kw: Any) -> FakeModel:
        checked("PretrainedModel.from_checkpoint", kw)
        record("from_checkpoint", kwargs=kw)
        config = json.loads((Path(ckpt_dir) / "config.json").read_text())
        config["mapping"] = {**config["mapping"], "rank": kw["rank"]}
        return cls(config)

    @classmethod
    def from_hugging_face(cls, hf_model_dir: str, *, mapping: Any, quant_config: Any, **kw: Any) -> FakeModel:
        checked("PretrainedModel.from_hugging_face", kw)
        record("from_hugging_face", kwargs=kw, rank=mapping.rank, offline=os.environ.get("HF_HUB_OFFLINE"))
        return cls(cls._config(hf_model_dir, kw["dtype"], mapping, quant_config))


MODEL_MAP = {arch: FakeModel for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")}
