"""Why a benchmark failed: a failed stage, and trtllm-bench's known errors read from its output."""

from __future__ import annotations

import re

from llmengine.builder.compiler import BuildFailure
from llmengine.text import one_line


class BenchFailure(BuildFailure):
    """A failed benchmark stage. `reason` is CamelCase; `permanent` means the same request can never succeed."""


# (pattern, reason, permanent), first match wins.
_FAILURES: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    (re.compile(r"Engine supports a max sequence of \d+\..*?support this dataset\.?"), "DatasetExceedsEngine", True),
    (re.compile(r"Please rebuild a new engine\s*to\s*support this dataset"), "DatasetExceedsEngine", True),
    (re.compile(r"max_seq_len is not a runtime parameter[^\n]*"), "InvalidArguments", True),
    (re.compile(r"Model is a file or directory[^\n]*"), "InvalidArguments", True),
    (
        re.compile(
            r"[^\n]*(?:stdVersionRead == kSERIALIZATION_VERSION|Failed to deserialize cuda engine|"
            r"generated on an incompatible device)[^\n]*"
        ),
        "EngineIncompatible",
        True,
    ),
    (
        re.compile(r"[^\n]*(?:CUDA out of memory|OutOfMemoryError|out of memory)[^\n]*", re.IGNORECASE),
        "OutOfMemory",
        False,
    ),
)


def classify_failure(returncode: int, output: str) -> BenchFailure:
    """Why trtllm-bench failed, from its output: a known error becomes its reason, anything else BenchmarkFailed."""
    for pattern, reason, permanent in _FAILURES:
        m = pattern.search(output)
        if m:
            return BenchFailure(
                "benchmark", reason, f"trtllm-bench exited with {returncode}: {one_line(m[0], 600)}", permanent
            )
    last = " | ".join(line[-200:] for line in output.strip().splitlines()[-3:])
    return BenchFailure("benchmark", "BenchmarkFailed", f"trtllm-bench exited with {returncode}: {one_line(last, 600)}")
