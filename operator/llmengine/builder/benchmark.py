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
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore import exceptions as bx
from pydantic import BaseModel, ValidationError

from llmengine.api.artifacts import Manifest, StoreLocation, first_problem
from llmengine.api.bench import BenchDataset, BenchNumbers, BenchOutcome, BenchRequest
from llmengine.builder.compiler import TOKENIZER_FILES, BuildFailure, copy_tokenizer
from llmengine.builder.fetch import HfDownload, StoreFactory, default_store_factory, fetch_hf, split_s3_uri
from llmengine.builder.main import RESULT_LIMIT, write_result
from llmengine.builder.trtllm import installed_trtllm_version
from llmengine.clients.store import EngineStore, IntegrityError, ManifestInvalid, StoreError, translate_error
from llmengine.logging import configure_logging, get_logger
from llmengine.text import one_line

TRTLLM_BENCH = "trtllm-bench"
# trtllm-bench reads the model's config.json (model type) and initialises its tokenizer from --model_path even
# when the dataset carries token ids; the weights stay in the store.
MODEL_FILES = ("config.json", *TOKENIZER_FILES)
# Output lines kept for failure classification and the console-report fallback (the report is ~110 lines).
OUTPUT_TAIL = 400
# Token ids of synthetic prompts: above the low ids tokenizers reserve for special tokens, and below 32000, which
# the regular vocabulary of every common tokenizer covers (Llama 3 and Qwen put their special tokens far above).
LOW_TOKEN_ID = 1000
SAFE_VOCAB = 32000


class BenchFailure(BuildFailure):
    """A failed benchmark stage. `reason` is CamelCase; `permanent` means the same request can never succeed."""


@dataclass(frozen=True)
class ToolRun:
    returncode: int
    output: str  # the tail of stdout and stderr together


# argv, log -> what the benchmark tool did. The real one runs trtllm-bench; the test one is the TEST BENCHMARKER.
Runner = Callable[[list[str], Any], ToolRun]


def default_runners() -> dict[str, Runner]:
    return {"tensorrt-llm": run_tool, "test": TestBenchmarker()}


@dataclass
class Seams:
    """What tests replace: the store, the benchmark runners, the Hugging Face download, the installed version."""

    store_factory: StoreFactory = default_store_factory
    runners: Callable[[], dict[str, Runner]] = default_runners
    hf_download: HfDownload | None = None
    trtllm_version: Callable[[], str | None] = installed_trtllm_version


def load_request(path: Path) -> BenchRequest:
    try:
        return BenchRequest.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise BenchFailure("validate", "InvalidRequest", f"bench request {path} does not exist", True) from exc
    except ValidationError as exc:
        raise BenchFailure("validate", "InvalidRequest", f"bench request {path}: {first_problem(exc)}", True) from exc


def model_name(request: BenchRequest) -> str:
    """trtllm-bench --model: a Hugging Face name. It refuses a path, and only names the model in the report when
    --model_path is given, so a placeholder serves for weights that came from S3."""
    return request.model_name or request.model.hugging_face_repo or f"llmengine/engine-{request.engine_digest[:12]}"


# ---------------------------------------------------------------------------------------------------------------
# download and fetch


def download_engine(request: BenchRequest, store: EngineStore, dest: Path) -> Manifest:
    """The committed engine, verified file by file; refuses one this request cannot benchmark."""
    digest = request.engine_digest
    try:
        manifest = store.get_manifest(digest)
    except (ManifestInvalid, IntegrityError) as exc:
        raise BenchFailure("download", "EngineCorrupted", str(exc)) from exc
    except StoreError as exc:
        raise BenchFailure("download", "StoreUnavailable", str(exc)) from exc
    if manifest is None:
        raise BenchFailure(
            "download", "EngineNotCommitted", f"engine {digest} is not committed at {store.uri(digest)}: nothing to run"
        )
    want = (request.backend, request.tp_size, request.pp_size)
    have = (manifest.backend, manifest.tp_size, manifest.pp_size)
    if want != have:
        raise BenchFailure(
            "validate",
            "InvalidRequest",
            f"the request is for backend/tp/pp {want} but engine {digest} is {have}",
            permanent=True,
        )
    if manifest.provenance.test_build and request.compiler != "test":
        raise BenchFailure(
            "validate",
            "TestEngine",
            f"engine {digest} was written by the TEST COMPILER: trtllm-bench cannot load it",
            permanent=True,
        )
    try:
        return store.download_engine(digest, dest)
    except IntegrityError as exc:
        raise BenchFailure("download", "EngineCorrupted", str(exc)) from exc
    except StoreError as exc:
        raise BenchFailure("download", "StoreUnavailable", str(exc)) from exc


def _only(hf_download: HfDownload | None, patterns: Iterable[str]) -> HfDownload:
    """fetch_hf's download, limited to the named files (allow_patterns) instead of the whole repository."""
    allow = list(patterns)

    def download(**kw: Any) -> Any:
        real = hf_download
        if real is None:
            from huggingface_hub import snapshot_download

            real = snapshot_download
        return real(**kw, allow_patterns=allow)

    return download


def fetch_s3_files(
    uri: str, location: StoreLocation, dest: Path, store_factory: StoreFactory, names: Iterable[str]
) -> int:
    """Download the named top-level files of an S3 prefix (those that exist); returns their bytes."""
    try:
        bucket, prefix = split_s3_uri(uri)
    except ValueError as exc:
        raise BenchFailure("validate", "InvalidRequest", f"model: {exc}", permanent=True) from exc
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    loc = StoreLocation(bucket=bucket, prefix="", endpoint=location.endpoint, region=location.region)
    wanted = set(names)
    total = 0
    try:
        store = store_factory(loc)
        for key, size in sorted(store.list_objects(prefix).items()):
            name = key[len(prefix) :]
            if name in wanted:
                store.client.download_file(bucket, key, str(dest / name))
                total += size
    except StoreError as exc:
        raise BenchFailure("fetch", "FetchFailed", f"model {uri}: {exc}") from exc
    except (bx.BotoCoreError, bx.ClientError) as exc:
        error = translate_error(exc, loc.endpoint or "S3", bucket)
        raise BenchFailure("fetch", "FetchFailed", f"model {uri}: {error}") from exc
    return total


def fetch_model_files(request: BenchRequest, dest: Path, seams: Seams) -> int:
    """config.json and the tokenizer of the checkpoint the engine was built from (the named tokenizer wins)."""
    dest.mkdir(parents=True, exist_ok=True)
    m = request.model
    if (m.hugging_face_repo is None) == (m.s3_uri is None):
        raise BenchFailure("validate", "InvalidRequest", "model: set exactly one of huggingFaceRepo and s3Uri", True)
    if m.s3_uri is not None:
        n = fetch_s3_files(m.s3_uri, request.store, dest, seams.store_factory, MODEL_FILES)
    else:
        assert m.hugging_face_repo is not None
        n = fetch_hf(m.hugging_face_repo, m.revision, dest, _only(seams.hf_download, MODEL_FILES))
    if m.tokenizer:
        tok = dest.parent / "tokenizer"
        tok.mkdir(parents=True, exist_ok=True)
        if m.tokenizer.startswith("s3://"):
            n += fetch_s3_files(m.tokenizer, request.store, tok, seams.store_factory, TOKENIZER_FILES)
        else:
            n += fetch_hf(m.tokenizer, None, tok, _only(seams.hf_download, TOKENIZER_FILES))
        copy_tokenizer(tok, dest)
    if not (dest / "config.json").is_file():
        source = m.s3_uri or m.hugging_face_repo
        raise BenchFailure("fetch", "FetchFailed", f"model {source} has no config.json, which trtllm-bench reads")
    return n


# ---------------------------------------------------------------------------------------------------------------
# dataset


@dataclass(frozen=True)
class DatasetStats:
    num_requests: int
    max_isl: int
    max_osl: int
    max_sequence_length: int
    avg_isl: float
    avg_osl: float


def token_range(vocab_size: int | None) -> tuple[int, int]:
    """[low, high) of the token ids synthetic prompts use, for a vocabulary of this size (None: unknown)."""
    high = min(vocab_size or SAFE_VOCAB, SAFE_VOCAB)
    low = min(LOW_TOKEN_ID, high // 2)
    return low, max(high, low + 1)


def sample_length(rng: random.Random, mean: int, maximum: int) -> int:
    """A normal draw around mean (3 standard deviations reach maximum), rounded and clipped to [1, maximum]."""
    stdev = (maximum - mean) / 3.0
    if stdev <= 0:
        return mean
    return max(1, min(maximum, round(rng.gauss(mean, stdev))))


def dataset_lines(dataset: BenchDataset, vocab_size: int | None = None) -> Iterator[tuple[str, int, int]]:
    """(JSONL line, prompt length, output length) per request; the same seed gives the same lines."""
    rng = random.Random(dataset.seed)
    ids = range(*token_range(vocab_size))
    for i in range(dataset.num_requests):
        isl = sample_length(rng, dataset.input_mean, dataset.input_max)
        osl = sample_length(rng, dataset.output_mean, dataset.output_max)
        # Exactly what trtllm-bench's prepare_dataset writes; EOS is disabled (--eos_id -1), so every request
        # generates output_tokens tokens.
        line = json.dumps(
            {"task_id": i, "input_ids": rng.choices(ids, k=isl), "output_tokens": osl}, separators=(",", ":")
        )
        yield line, isl, osl


def write_dataset(path: Path, dataset: BenchDataset, vocab_size: int | None = None) -> DatasetStats:
    n = max_isl = max_osl = max_seq = total_isl = total_osl = 0
    with open(path, "w") as f:
        for line, isl, osl in dataset_lines(dataset, vocab_size):
            f.write(line + "\n")
            n += 1
            max_isl, max_osl, max_seq = max(max_isl, isl), max(max_osl, osl), max(max_seq, isl + osl)
            total_isl += isl
            total_osl += osl
    return DatasetStats(n, max_isl, max_osl, max_seq, total_isl / max(n, 1), total_osl / max(n, 1))


def vocab_size(*config_files: Path) -> int | None:
    """vocab_size from the first config.json that has one (HF: top level or text_config; engine: pretrained)."""
    for path in config_files:
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(cfg, dict):
            continue
        for holder in (cfg, cfg.get("text_config"), cfg.get("pretrained_config")):
            if isinstance(holder, dict) and isinstance(holder.get("vocab_size"), int) and holder["vocab_size"] > 0:
                return int(holder["vocab_size"])
    return None


# ---------------------------------------------------------------------------------------------------------------
# the command line


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
    log.info("running", argv=argv)
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL)
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except FileNotFoundError as exc:
        raise BenchFailure("benchmark", "ToolMissing", f"{argv[0]} is not in this image: {exc}", True) from exc
    with proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                log.info(line, tool=argv[0])
        rc = proc.wait()
    return ToolRun(rc, "\n".join(tail))


# ---------------------------------------------------------------------------------------------------------------
# THE TEST BENCHMARKER


def _options(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def _percentiles(p50: float, p99: float) -> dict[str, float]:
    return {
        "p50": p50,
        "p90": p50 + (p99 - p50) * 0.8,
        "p95": p50 + (p99 - p50) * 0.9,
        "p99": p99,
        "minimum": p50 * 0.5,
        "maximum": p99 * 1.05,
        "average": p50 * 1.02,
    }


def _engine_max_seq_len(engine_dir: str | None) -> int | None:
    if engine_dir is None:
        return None
    try:
        value = json.loads((Path(engine_dir) / "config.json").read_text())["build_config"]["max_seq_len"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return value if isinstance(value, int) else None


class TestBenchmarker:
    """THE TEST BENCHMARKER. IT IS NOT trtllm-bench AND ITS NUMBERS MEASURE NOTHING.

    It exists so the benchmark pipeline (download, verify, fetch, dataset, report parsing, the gate) runs on
    machines without a GPU. Given trtllm-bench's argv it reads the dataset, refuses one longer than the engine with
    trtllm-bench's own error, and writes a report in trtllm-bench's JSON format with deterministic numbers:
    requests/s = 2 x concurrency, output tokens/s = requests/s x mean output length, TTFT p50 = 5 ms per 128
    prompt tokens (p99 1.5 x), TPOT p50 8 ms (p99 10 ms). Outcomes carry `testBenchmark: true`.
    """

    __test__ = False  # not a pytest test class despite the name
    name = "test"

    def __call__(self, argv: list[str], log: Any) -> ToolRun:
        log.warning("TEST BENCHMARKER: not trtllm-bench; the numbers are made up from the request")
        opts = _options(argv)
        dataset, report = opts.get("--dataset"), opts.get("--report_json")
        if dataset is None or report is None:
            return ToolRun(2, "TEST BENCHMARKER: not trtllm-bench\nError: --dataset and --report_json are required")
        lengths = []
        with open(dataset) as f:
            for line in f:
                doc = json.loads(line)
                lengths.append((len(doc["input_ids"]), int(doc["output_tokens"])))
        cap = int(opts.get("--num_requests") or 0)
        lengths = lengths[:cap] if cap > 0 else lengths
        if not lengths:
            return ToolRun(1, "TEST BENCHMARKER: not trtllm-bench\nError: the dataset has no requests")
        longest = max(i + o for i, o in lengths)
        engine_max = (
            _engine_max_seq_len(opts.get("--engine_dir"))
            if opts.get("--backend") == "tensorrt"
            else int(opts.get("--max_seq_len") or longest)
        )
        if engine_max is not None and longest > engine_max:
            return ToolRun(
                1,
                "TEST BENCHMARKER: not trtllm-bench\nTraceback (most recent call last):\n"
                f"RuntimeError: Engine supports a max sequence of {engine_max}. Provided dataset contains a maximum "
                f"sequence of {longest}. Please rebuild a new engine to support this dataset.",
            )
        stats = self._report(opts, lengths, streaming="--streaming" in opts)
        Path(report).write_text(json.dumps(stats, indent=4))
        perf = stats["performance"]
        return ToolRun(
            0,
            "TEST BENCHMARKER: not trtllm-bench\n"
            f"Request Throughput (req/sec):                     {perf['request_throughput_req_s']:.4f}\n"
            f"Total Output Throughput (tokens/sec):             {perf['system_output_throughput_tok_s']:.4f}",
        )

    @staticmethod
    def _report(opts: dict[str, str | None], lengths: list[tuple[int, int]], streaming: bool) -> dict[str, Any]:
        """A report shaped exactly like trtllm-bench 1.2's get_statistics_dict (the keys the parser reads, and
        the rest)."""
        n = len(lengths)
        isl = [i for i, _ in lengths]
        osl = [o for _, o in lengths]
        avg_isl, avg_osl = sum(isl) / n, sum(osl) / n
        concurrency = int(opts.get("--concurrency") or 0)
        concurrency = concurrency if concurrency > 0 else n
        rps = concurrency * 2.0
        ttft, tpot = 5.0 * avg_isl / 128.0, 8.0
        latency = ttft + tpot * max(avg_osl - 1, 0)
        backend = "TRT" if opts.get("--backend") == "tensorrt" else "Pytorch"
        streaming_metrics = {
            "token_output_speed_tok_s": 1000.0 / tpot,
            "avg_ttft_ms": ttft,
            "avg_tpot_ms": tpot,
            "tpot_percentiles": _percentiles(tpot, 10.0),
            "ttft_percentiles": _percentiles(ttft, ttft * 1.5),
            "gen_tps_percentiles": _percentiles(1000.0 / tpot, 1000.0 / 10.0),
        }
        seq = [i + o for i, o in lengths]
        return {
            "engine": {
                "model": opts.get("--model"),
                "model_path": opts.get("--model_path"),
                "engine_dir": opts.get("--engine_dir"),
                "version": "TEST BENCHMARKER",
                "backend": backend,
                "dtype": None,
                "kv_cache_dtype": None,
                "quantization": None,
            },
            "machine": None,
            "world_info": {
                "tp_size": int(opts.get("--tp") or 1),
                "pp_size": int(opts.get("--pp") or 1),
                "ep_size": 1,
                "world_size": int(opts.get("--tp") or 1) * int(opts.get("--pp") or 1),
                "max_batch_size": int(opts.get("--max_batch_size") or concurrency),
                "max_num_tokens": int(opts.get("--max_num_tokens") or 8192),
                "scheduling_policy": "GUARANTEED_NO_EVICT",
                "kv_cache_percentage": float(opts.get("--kv_cache_free_gpu_mem_fraction") or 0.9),
                "issue_rate": 0.0,
            },
            "request_info": {
                "num_requests": n,
                "avg_num_concurrent_requests": float(min(concurrency, n)),
                "avg_input_length": avg_isl,
                "avg_output_length": avg_osl,
            },
            "performance": {
                "total_latency_ms": n / rps * 1000.0,
                "avg_request_latency_ms": latency,
                "request_throughput_req_s": rps,
                "system_output_throughput_tok_s": rps * avg_osl,
                "system_total_throughput_tok_s": rps * (avg_isl + avg_osl),
                "output_throughput_per_user_tok_s": avg_osl / latency * 1000.0 if latency else 0.0,
                "output_throughput_per_gpu_tok_s": rps * avg_osl,
                "request_latency_percentiles_ms": _percentiles(latency, latency * 1.3),
            },
            **({"streaming_metrics": streaming_metrics} if streaming else {}),
            "dataset": {
                "num_requests": n,
                "dataset_path": opts.get("--dataset"),
                "max_isl": max(isl),
                "max_osl": max(osl),
                "max_sequence_length": max(seq),
                "avg_isl": int(avg_isl),
                "avg_osl": int(avg_osl),
                "avg_sequence_length": int(sum(seq) / n),
            },
        }


# ---------------------------------------------------------------------------------------------------------------
# reading the report


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


# ---------------------------------------------------------------------------------------------------------------
# failures


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


# ---------------------------------------------------------------------------------------------------------------
# the pipeline


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
    text = outcome.to_json()
    if len(text.encode()) <= limit or not outcome.message:
        return text
    over = len(text.encode()) - limit
    msg = outcome.message.encode()[: max(0, len(outcome.message.encode()) - over - 16)].decode(errors="ignore")
    return outcome.model_copy(update={"message": msg + "...[cut]"}).to_json()


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
