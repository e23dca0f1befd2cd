"""Reading trtllm-bench's report: the JSON one, or the console one when the JSON is missing or unreadable."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from llmengine.api.artifacts import first_problem
from llmengine.api.bench import BenchNumbers
from llmengine.builder.benchmark.failures import BenchFailure


class ReportUnreadable(ValueError):
    """Neither a trtllm-bench JSON report nor a console report with the numbers."""


class _Percentiles(BaseModel):
    p50: float | None = None
    p99: float | None = None


class _Performance(BaseModel):
    request_throughput_req_s: float
    system_output_throughput_tok_s: float


class _Streaming(BaseModel):
    ttft_percentiles: _Percentiles | None = None
    tpot_percentiles: _Percentiles | None = None
    # Name of the TPOT breakdown before tpot_percentiles replaced it.
    itl_percentiles: _Percentiles | None = None


class _Report(BaseModel):
    """The part of trtllm-bench's --report_json the gate uses; every other key is ignored."""

    performance: _Performance
    streaming_metrics: _Streaming | None = None


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) and x >= 0 else None


def parse_report_json(text: str | bytes) -> BenchNumbers:
    """Numbers from trtllm-bench's --report_json: performance.request_throughput_req_s and
    system_output_throughput_tok_s; streaming_metrics.ttft_percentiles and tpot_percentiles p50/p99 (ms).
    Latencies are None when the run did not stream. Raises ReportUnreadable."""
    try:
        report = _Report.model_validate_json(text)
    except ValidationError as exc:
        raise ReportUnreadable(f"report JSON: {first_problem(exc)}") from exc
    s = report.streaming_metrics or _Streaming()
    ttft = s.ttft_percentiles or _Percentiles()
    tpot = s.tpot_percentiles or s.itl_percentiles or _Percentiles()
    return BenchNumbers(
        requests_per_second=_finite(report.performance.request_throughput_req_s),
        output_tokens_per_second=_finite(report.performance.system_output_throughput_tok_s),
        ttft_p50_ms=_finite(ttft.p50),
        ttft_p99_ms=_finite(ttft.p99),
        itl_p50_ms=_finite(tpot.p50),
        itl_p99_ms=_finite(tpot.p99),
    )


_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_CONSOLE = {
    "requests_per_second": re.compile(r"Request Throughput \(req/sec\):\s*" + _NUM),
    "output_tokens_per_second": re.compile(r"Total Output Throughput \(tokens/sec\):\s*" + _NUM),
    "ttft_p50_ms": re.compile(r"\[TTFT\]\s*P50\s*:\s*" + _NUM),
    "ttft_p99_ms": re.compile(r"\[TTFT\]\s*P99\s*:\s*" + _NUM),
    "itl_p50_ms": re.compile(r"\[(?:TPOT|ITL)\]\s*P50\s*:\s*" + _NUM),
    "itl_p99_ms": re.compile(r"\[(?:TPOT|ITL)\]\s*P99\s*:\s*" + _NUM),
}


def parse_report_console(text: str) -> BenchNumbers:
    """Numbers from the report trtllm-bench logs (PERFORMANCE OVERVIEW and the [TTFT]/[TPOT] breakdowns); the
    last report in the text counts. Raises ReportUnreadable without a request throughput line."""
    found: dict[str, float | None] = {}
    for key, pattern in _CONSOLE.items():
        matches = pattern.findall(text)
        found[key] = _finite(float(matches[-1])) if matches else None
    if found["requests_per_second"] is None:
        raise ReportUnreadable("no 'Request Throughput (req/sec)' line in trtllm-bench's output")
    return BenchNumbers(**found)


def read_report(report: Path, output: str, log: Any) -> BenchNumbers:
    try:
        return parse_report_json(report.read_bytes())
    except FileNotFoundError:
        why = f"trtllm-bench wrote no {report.name}"
    except ReportUnreadable as exc:
        why = str(exc)
    log.warning("JSON report unusable; reading the console report", reason=why)
    try:
        return parse_report_console(output)
    except ReportUnreadable as exc:
        raise BenchFailure("report", "ReportUnreadable", f"{why}; {exc}") from exc
