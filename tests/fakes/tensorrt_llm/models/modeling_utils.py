"""FAKE tensorrt_llm.models.modeling_utils.QuantConfig. NOT TensorRT-LLM."""

from __future__ import annotations

from typing import Any

from llmengine.plan.upstream import table
from tensorrt_llm import checked

# QuantConfig's fields and defaults, as the upstream table records them.
DEFAULTS: dict[str, Any] = {o.name: o.default for o in table("QuantConfig").options}


class QuantConfig:
    def __init__(self, **kw: Any) -> None:
        checked("QuantConfig", kw)
        self.values = {**DEFAULTS, **kw}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)
