"""`llmengine bench-engine`: benchmark a committed engine with trtllm-bench before it is rolled out.

The stages, a module each: ``download`` (the engine, verified, and the checkpoint files trtllm-bench reads),
``dataset`` (synthetic JSONL), ``command`` (trtllm-bench's argv, and running it), ``report`` (reading its report),
``failures`` (why it failed). ``testbenchmarker`` stands in for trtllm-bench without a GPU; ``seams`` is what tests
replace; ``pipeline`` runs the stages and is the command's entry point. Callers import from here.
"""

from llmengine.builder.benchmark.command import (
    OUTPUT_TAIL,
    TRTLLM_BENCH,
    Runner,
    bench_argv,
    model_name,
    run_tool,
)
from llmengine.builder.benchmark.dataset import (
    LOW_TOKEN_ID,
    SAFE_VOCAB,
    DatasetStats,
    dataset_lines,
    sample_length,
    token_range,
    vocab_size,
    write_dataset,
)
from llmengine.builder.benchmark.download import MODEL_FILES, download_engine, fetch_model_files, fetch_s3_files
from llmengine.builder.benchmark.failures import BenchFailure, classify_failure
from llmengine.builder.benchmark.pipeline import (
    benchmark,
    failure_outcome,
    fit_outcome,
    load_request,
    main,
    run,
)
from llmengine.builder.benchmark.report import ReportUnreadable, parse_report_console, parse_report_json, read_report
from llmengine.builder.benchmark.seams import Seams, default_runners
from llmengine.builder.benchmark.testbenchmarker import TestBenchmarker
from llmengine.builder.toolrun import ToolRun

__all__ = [
    "LOW_TOKEN_ID",
    "MODEL_FILES",
    "OUTPUT_TAIL",
    "SAFE_VOCAB",
    "TRTLLM_BENCH",
    "BenchFailure",
    "DatasetStats",
    "ReportUnreadable",
    "Runner",
    "Seams",
    "TestBenchmarker",
    "ToolRun",
    "bench_argv",
    "benchmark",
    "classify_failure",
    "dataset_lines",
    "default_runners",
    "download_engine",
    "failure_outcome",
    "fetch_model_files",
    "fetch_s3_files",
    "fit_outcome",
    "load_request",
    "main",
    "model_name",
    "parse_report_console",
    "parse_report_json",
    "read_report",
    "run",
    "run_tool",
    "sample_length",
    "token_range",
    "vocab_size",
    "write_dataset",
]
