"""FAKE tensorrt_llm (test stand-in, see tests/fakes/README.md). NOT TensorRT-LLM."""

from __future__ import annotations

import json
import os
from typing import Any

from llmengine.plan.upstream import check_options

__version__ = "1.2.1"


def record(call: str, **fields: Any) -> None:
    path = os.environ.get("FAKE_TRTLLM_CALLS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"call": call, **fields}, default=str) + "\n")


def checked(entry_point: str, values: dict[str, Any]) -> dict[str, Any]:
    problems = check_options(entry_point, values)
    if problems:
        raise TypeError("FAKE tensorrt_llm: " + "; ".join(problems))
    return values
