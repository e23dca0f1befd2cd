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

import time
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import RESULT_LIMIT, Manifest, StoreLocation
from llmengine.api.bench import BenchNumbers, BenchOutcome, BenchRequest
from llmengine.builder import shell
from llmengine.builder.benchmark.command import bench_argv, model_name
from llmengine.builder.benchmark.dataset import vocab_size, write_dataset
from llmengine.builder.benchmark.download import download_engine, fetch_model_files
from llmengine.builder.benchmark.failures import BenchFailure, classify_failure
from llmengine.builder.benchmark.report import read_report
from llmengine.builder.benchmark.seams import Seams
from llmengine.builder.compiler import BuildFailure
from llmengine.clients.store import StoreError, load_grant
from llmengine.logging import get_logger


def load_request(path: Path) -> BenchRequest:
    return shell.load_request(path, BenchRequest, "bench request", BenchFailure)


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
        store = seams.store_factory(request.store if request.grant_file is None else _grant_location(request))
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
    carried = engine_dir / "tokenizer"  # what the compiler copies into every engine (builder/compiler.py)
    if request.backend == "tensorrt" and request.grant_file is not None and (carried / "config.json").is_file():
        model_dir = carried  # no store credentials to read the checkpoint with: the engine carries what is needed
    elif request.backend == "tensorrt":
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
    return shell.failed(
        BenchOutcome,
        digest,
        failure,
        test_benchmark=test_benchmark,
        bench_seconds=round(seconds, 3) if seconds is not None else None,
    )


def fit_outcome(outcome: BenchOutcome, limit: int = RESULT_LIMIT) -> str:
    """The outcome as JSON under `limit` bytes, shortening the message if it must."""
    return outcome.fit_json(limit)


def run(request_path: Path, work_dir: Path | None, seams: Seams | None = None) -> BenchOutcome:
    """Load, benchmark, and always come back with a BenchOutcome (never raises for a failed run)."""
    seams = seams or Seams()
    job = shell.Attempt(get_logger(component="benchmark"))
    test = False

    def work() -> BenchOutcome:
        nonlocal test
        request = load_request(request_path)
        test = request.compiler == "test"
        job.begin(
            request.engine_digest,
            "benchmark started",
            compiler=request.compiler,
            backend=request.backend,
            model=model_name(request),
            tp_size=request.tp_size,
            pp_size=request.pp_size,
            **request.dataset.model_dump(),
        )
        with shell.work_dir(work_dir, "llmengine-bench-") as wd:
            outcome = benchmark(request, wd, seams, job.log)
        job.log.info("benchmark succeeded", message=outcome.message, seconds=outcome.bench_seconds)
        return outcome

    return job.run("benchmark", work, lambda failure: failure_outcome(job.digest, failure, job.seconds(), test))


def main(argv: list[str] | None = None, seams: Seams | None = None) -> int:
    return shell.main(
        argv,
        lambda request, work_dir: run(request, work_dir, seams),
        prog="llmengine bench-engine",
        description=__doc__.splitlines()[0],
        request="BenchRequest",
        result="BenchResult",
    )


def _grant_location(request: BenchRequest) -> StoreLocation:
    """Where the grant's engines are (its URLs carry it; the client is built for naming only)."""
    assert request.grant_file is not None
    return load_grant(Path(request.grant_file)).location
