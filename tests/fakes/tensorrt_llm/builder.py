"""FAKE tensorrt_llm.builder: BuildConfig.from_dict, build() and Engine.save. NOT TensorRT-LLM."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tensorrt_llm import checked, record


class BuildConfig:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BuildConfig:
        plugins = dict(config.get("plugin_config") or {})
        checked("BuildConfig", {k: v for k, v in config.items() if k != "plugin_config"})
        checked("PluginConfig", plugins)
        record("BuildConfig.from_dict", keys=sorted(config), plugin_keys=sorted(plugins))
        return cls(json.loads(json.dumps(config)))


class Engine:
    def __init__(self, model: Any, config: BuildConfig) -> None:
        self.model, self.config = model, config

    def save(self, engine_dir: str) -> None:
        out = Path(engine_dir)
        out.mkdir(parents=True, exist_ok=True)
        rank = self.model.config["mapping"]["rank"]
        (out / f"rank{rank}.engine").write_bytes(b"FAKE ENGINE " * 8)
        if rank == 0:
            doc = {"version": "1.2.1", "pretrained_config": self.model.config, "build_config": self.config.data}
            (out / "config.json").write_text(json.dumps(doc))
        record("Engine.save", rank=rank)


def build(model: Any, build_config: BuildConfig) -> Engine:
    """Hands back what it was given, unless FAKE_TRTLLM_DRIFT=key=json-value asks it to rewrite one plugin setting
    (standing in for an upstream rule the planner does not model)."""
    record("build", rank=model.config["mapping"]["rank"])
    drift = os.environ.get("FAKE_TRTLLM_DRIFT")
    if drift:
        key, _, value = drift.partition("=")
        data = json.loads(json.dumps(build_config.data))
        data["plugin_config"][key] = json.loads(value)
        build_config = BuildConfig(data)
    return Engine(model, build_config)
