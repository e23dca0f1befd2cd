"""The command line: trtllm-bench's argv for a request, and running it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmengine.api.bench import BenchRequest
from llmengine.builder.benchmark.failures import BenchFailure
from llmengine.builder.toolrun import ToolRun, relay

TRTLLM_BENCH = "trtllm-bench"
# Output lines kept for failure classification and the console-report fallback (the report is ~110 lines).
OUTPUT_TAIL = 400


# argv, log -> what the benchmark tool did. The real one runs trtllm-bench; the test one is the TEST BENCHMARKER.
Runner = Callable[[list[str], Any], ToolRun]


def model_name(request: BenchRequest) -> str:
    """trtllm-bench --model: a Hugging Face name. It refuses a path, and only names the model in the report when
    --model_path is given, so a placeholder serves for weights that came from S3."""
    return request.model_name or request.model.hugging_face_repo or f"llmengine/engine-{request.engine_digest[:12]}"


def bench_argv(
    request: BenchRequest, *, engine_dir: Path, model_dir: Path, dataset: Path, report: Path, workspace: Path
) -> list[str]:
    """trtllm-bench (1.2.x) throughput on the engine, streaming (TTFT and TPOT need it), with a JSON report.

    --backend defaults to pytorch, so a TensorRT engine needs --backend tensorrt and --engine_dir; its max_seq_len,
    tp and pp come from the engine (passing --max_seq_len there is an error). The pytorch backend loads the stored
    checkpoint from --model_path and takes tp, pp and max_seq_len as flags.
    """
    argv = [
        TRTLLM_BENCH,
        "--model",
        model_name(request),
        "--model_path",
        str(model_dir),
        "--workspace",
        str(workspace),
        "throughput",
        "--backend",
        request.backend,
    ]
    if request.backend == "tensorrt":
        argv += ["--engine_dir", str(engine_dir)]
    else:
        argv += ["--tp", str(request.tp_size), "--pp", str(request.pp_size), "--max_seq_len", str(request.max_seq_len)]
    for flag, value in (
        ("--max_batch_size", request.max_batch_size),
        ("--max_num_tokens", request.max_num_tokens),
        ("--kv_cache_free_gpu_mem_fraction", request.kv_cache_free_gpu_mem_fraction),
    ):
        if value is not None:
            argv += [flag, str(value)]
    d = request.dataset
    argv += [
        "--dataset",
        str(dataset),
        "--num_requests",
        str(d.num_requests),
        "--concurrency",
        str(d.concurrency),
        "--warmup",
        str(request.warmup),
        # Explicit, not upstream's defaults: synthetic outputs run to their length (EOS off), and chunked prefill
        # stays off as trtllm-serve serves it (trtllm-bench turns it on by default from 1.1).
        "--eos_id",
        "-1",
        "--disable_chunked_context",
        "--streaming",
        "--report_json",
        str(report),
    ]
    return argv


def run_tool(argv: list[str], log: Any) -> ToolRun:
    """Run trtllm-bench, relaying its output line by line into the log and keeping the tail."""
    try:
        return relay(argv, log, tail_lines=OUTPUT_TAIL, tool=argv[0])
    except FileNotFoundError as exc:
        raise BenchFailure("benchmark", "ToolMissing", f"{argv[0]} is not in this image: {exc}", True) from exc
