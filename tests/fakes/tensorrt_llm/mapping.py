"""FAKE tensorrt_llm.mapping. NOT TensorRT-LLM."""

from __future__ import annotations

from typing import Any

from tensorrt_llm import checked


class Mapping:
    def __init__(self, **kw: Any) -> None:
        checked("Mapping", kw)
        self.world_size, self.rank = kw.get("world_size", 1), kw.get("rank", 0)
        self.tp_size, self.pp_size = kw.get("tp_size", 1), kw.get("pp_size", 1)
        if self.tp_size * self.pp_size != self.world_size:
            raise ValueError("world_size must equal to tp_size * pp_size * cp_size")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"Rank should be an integer between 0 and {self.world_size - 1}")

    def to_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "rank": self.rank, "tp_size": self.tp_size, "pp_size": self.pp_size}
