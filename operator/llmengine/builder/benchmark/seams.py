"""What tests replace in a benchmark run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmengine.builder.benchmark.command import Runner, run_tool
from llmengine.builder.benchmark.testbenchmarker import TestBenchmarker
from llmengine.builder.fetch import HfDownload, StoreFactory, default_store_factory
from llmengine.builder.trtllm import installed_trtllm_version


def default_runners() -> dict[str, Runner]:
    return {"tensorrt-llm": run_tool, "test": TestBenchmarker()}


@dataclass
class Seams:
    """What tests replace: the store, the benchmark runners, the Hugging Face download, the installed version."""

    store_factory: StoreFactory = default_store_factory
    runners: Callable[[], dict[str, Runner]] = default_runners
    hf_download: HfDownload | None = None
    trtllm_version: Callable[[], str | None] = installed_trtllm_version
