"""`llmengine bench-engine`: benchmark a committed engine with trtllm-bench before it is rolled out.

Stages: download (the engine, every file verified against its manifest) -> fetch (the checkpoint's config.json and
tokenizer, not its weights: trtllm-bench reads them from --model_path) -> dataset (synthetic JSONL in
trtllm-bench's own format) -> benchmark (`trtllm-bench ... throughput --streaming --report_json`) -> report (the
JSON report; the console report when the JSON is missing or unreadable). The outcome is a BenchOutcome written to
the termination message and stdout. Exit 0 when the run produced numbers, 1 when it did not. Whether the numbers
are good enough is the operator's decision (plan.benchgate), not this command's.

With compiler "test" the TEST BENCHMARKER stands in for trtllm-bench: it takes the same argv, writes a report
in trtllm-bench's JSON format with numbers derived from the request, and that report goes through the same parser.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llmengine.api.artifacts import RESULT_LIMIT, Manifest, first_problem
from llmengine.api.bench import BenchNumbers, BenchOutcome, BenchRequest
from llmengine.builder.benchmark.command import bench_argv, model_name
from llmengine.builder.benchmark.dataset import vocab_size, write_dataset
from llmengine.builder.benchmark.download import download_engine, fetch_model_files
from llmengine.builder.benchmark.failures import BenchFailure, classify_failure
from llmengine.builder.benchmark.report import read_report
from llmengine.builder.benchmark.seams import Seams
from llmengine.builder.compiler import BuildFailure
from llmengine.builder.main import write_result
from llmengine.clients.store import StoreError
from llmengine.logging import configure_logging, get_logger


def load_request(path: Path) -> BenchRequest:
    try:
        return BenchRequest.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise BenchFailure("validate", "InvalidRequest", f"bench request {path} does not exist", True) from exc
    except ValidationError as exc:
        raise BenchFailure("validate", "InvalidRequest", f"bench request {path}: {first_problem(exc)}", True) from exc


def _stage_done(log: Any, stage: str, start: float, **extra: Any) -> None:
    log.info("stage finished", stage=stage, seconds=round(time.monotonic() - start, 3), **extra)


def _check_version(request: BenchRequest, manifest: Manifest, seams: Seams) -> None:
    if request.compiler == "test":
        return
    installed, built = seams.trtllm_version(), manifest.provenance.trtllm_version
    if installed is not None and installed != built:
        raise BenchFailure(
            "validate",
            "VersionMismatch",
            f"this image has TensorRT-LLM {installed} but engine {request.engine_digest} was built with {built}: "
            "benchmark it with the image that built it",
            permanent=True,
        )


def _summary(n: BenchNumbers) -> str:
    parts = [
        f"{n.requests_per_second:.2f} req/s" if n.requests_per_second is not None else None,
        f"{n.output_tokens_per_second:.1f} output tok/s" if n.output_tokens_per_second is not None else None,
        f"ttft p99 {n.ttft_p99_ms:.1f} ms" if n.ttft_p99_ms is not None else None,
        f"itl p99 {n.itl_p99_ms:.1f} ms" if n.itl_p99_ms is not None else None,
    ]
    return ", ".join(p for p in parts if p)


def benchmark(request: BenchRequest, work_dir: Path, seams: Seams, log: Any) -> BenchOutcome:
    """Run the stages for a valid request; raises BenchFailure (or BuildFailure from the fetch) on a failed stage."""
    t0 = time.monotonic()
    runner = seams.runners().get(request.compiler)
    if runner is None:
        raise BenchFailure("validate", "InvalidRequest", f"compiler {request.compiler!r} is unknown", permanent=True)
    d = request.dataset
    if d.max_sequence_length > request.max_seq_len:
        raise BenchFailure(
            "validate",
            "DatasetExceedsEngine",
            f"dataset inputMax + outputMax = {d.max_sequence_length} exceeds the engine's maxSeqLen "
            f"{request.max_seq_len}: trtllm-bench would refuse it",
            permanent=True,
        )
    try:
        store = seams.store_factory(request.store)
    except StoreError as exc:
        raise BenchFailure("download", "StoreUnavailable", str(exc)) from exc

    t = time.monotonic()
    engine_dir = work_dir / "engine"
    manifest = download_engine(request, store, engine_dir)
    _check_version(request, manifest, seams)
    if d.max_sequence_length > manifest.shapes.max_seq_len:
        raise BenchFailure(
            "validate",
            "DatasetExceedsEngine",
            f"dataset inputMax + outputMax = {d.max_sequence_length} exceeds maxSeqLen "
            f"{manifest.shapes.max_seq_len} of the committed engine",
            permanent=True,
        )
    _stage_done(log, "download", t, bytes=manifest.total_bytes)

    t = time.monotonic()
    if request.backend == "tensorrt":
        model_dir = work_dir / "model"
        fetched = fetch_model_files(request, model_dir, seams)
        _stage_done(log, "fetch", t, bytes=fetched)
    else:
        model_dir = engine_dir  # the stored "engine" of the pytorch backend is the checkpoint itself

    t = time.monotonic()
    dataset_path = work_dir / "dataset.jsonl"
    stats = write_dataset(dataset_path, d, vocab_size(model_dir / "config.json", engine_dir / "config.json"))
    _stage_done(log, "dataset", t, requests=stats.num_requests, max_sequence_length=stats.max_sequence_length)

    t = time.monotonic()
    report = work_dir / "report.json"
    (work_dir / "workspace").mkdir(parents=True, exist_ok=True)
    argv = bench_argv(
        request,
        engine_dir=engine_dir,
        model_dir=model_dir,
        dataset=dataset_path,
        report=report,
        workspace=work_dir / "workspace",
    )
    ran = runner(argv, log.bind(stage="benchmark"))
    if ran.returncode != 0:
        raise classify_failure(ran.returncode, ran.output)
    numbers = read_report(report, ran.output, log)
    _stage_done(log, "benchmark", t, **numbers.model_dump(exclude_none=True))

    test = request.compiler == "test"
    return BenchOutcome(
        engine_digest=request.engine_digest,
        succeeded=True,
        message=("TEST BENCHMARKER, not trtllm-bench: " if test else "trtllm-bench: ") + _summary(numbers),
        numbers=numbers,
        test_benchmark=test,
        bench_seconds=round(time.monotonic() - t0, 3),
    )


def failure_outcome(
    digest: str, failure: BuildFailure, seconds: float | None = None, test_benchmark: bool = False
) -> BenchOutcome:
    return BenchOutcome(
        engine_digest=digest,
        succeeded=False,
        stage=failure.stage,
        reason=failure.reason,
        message=failure.message,
        permanent=failure.permanent,
        test_benchmark=test_benchmark,
        bench_seconds=round(seconds, 3) if seconds is not None else None,
    )


def fit_outcome(outcome: BenchOutcome, limit: int = RESULT_LIMIT) -> str:
    """The outcome as JSON under `limit` bytes, shortening the message if it must."""
    return outcome.fit_json(limit)


@contextlib.contextmanager
def _work_dir(path: Path | None) -> Iterator[Path]:
    """The given scratch directory (kept, for debugging), or a temporary one removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="llmengine-bench-") as tmp:
        yield Path(tmp)


def run(request_path: Path, work_dir: Path | None, seams: Seams | None = None) -> BenchOutcome:
    """Load, benchmark, and always come back with a BenchOutcome (never raises for a failed run)."""
    seams = seams or Seams()
    t0 = time.monotonic()
    digest = "unknown"
    test = False
    log = get_logger(component="benchmark")
    try:
        request = load_request(request_path)
        digest, test = request.engine_digest, request.compiler == "test"
        log = log.bind(engine_digest=digest)
        log.info(
            "benchmark started",
            compiler=request.compiler,
            backend=request.backend,
            model=model_name(request),
            tp_size=request.tp_size,
            pp_size=request.pp_size,
            **request.dataset.model_dump(),
        )
        with _work_dir(work_dir) as wd:
            outcome = benchmark(request, wd, seams, log)
        log.info("benchmark succeeded", message=outcome.message, seconds=outcome.bench_seconds)
        return outcome
    except BuildFailure as failure:
        log.error(
            "benchmark failed",
            stage=failure.stage,
            reason=failure.reason,
            permanent=failure.permanent,
            error=failure.message,
        )
        return failure_outcome(digest, failure, time.monotonic() - t0, test)
    except Exception as exc:  # a bug or an unexpected environment: report it as a (retryable) failure
        log.exception("benchmark crashed")
        crash = BenchFailure("internal", "InternalError", f"{type(exc).__name__}: {exc}")
        return failure_outcome(digest, crash, time.monotonic() - t0, test)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmengine bench-engine", description=__doc__.splitlines()[0])
    p.add_argument("--request", type=Path, required=True, help="BenchRequest JSON file")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument(
        "--result",
        type=Path,
        default=None,
        help="where to write the BenchResult (default: /dev/termination-log when writable; always stdout)",
    )
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, seams: Seams | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(json=args.log_format == "json", level=args.log_level)
    outcome = run(args.request, args.work_dir, seams)
    write_result(fit_outcome(outcome), args.result)
    return 0 if outcome.succeeded else 1
