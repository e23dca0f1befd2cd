"""FAKE tensorrt_llm.models.modeling_utils.QuantConfig. NOT TensorRT-LLM."""

from __future__ import annotations

from typing import Any

from tensorrt_llm import checked

DEFAULTS: dict[str, Any] = {
    "quant_algo": None,
    "kv_cache_quant_algo": None,
    "group_size": 128,
    "smoothquant_val": 0.5,
    "clamp_val": None,
    "use_meta_recipe": False,
    "has_zero_point": False,
    "pre_quant_scale": False,
    "exclude_modules": None,
}


class QuantConfig:
    def __init__(self, **kw: Any) -> None:
        checked("QuantConfig", kw)
        self.values = {**DEFAULTS, **kw}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)
