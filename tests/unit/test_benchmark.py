"""The benchmark gate without GPUs: trtllm-bench reports (real and replayed), the gate, the dataset, bench-engine
end to end with the TEST BENCHMARKER and a fake store, failure classification, and the bench Job render."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from llmengine import cli
from llmengine.api.artifacts import RESULT_LIMIT, BuildRequest, BuildShapes, Manifest, ManifestFile, Provenance
from llmengine.api.bench import BenchDataset, BenchNumbers, BenchOutcome, BenchRequest, parse_bench_outcome
from llmengine.api.config import OperatorConfig
from llmengine.api.v1alpha1 import BenchmarkResult, BenchmarkThresholds, LLMEngineSpec, SecretKeySelector, parse_engine
from llmengine.builder import benchmark as bm
from llmengine.builder.shell import write_result
from llmengine.builder.testcompiler import TestCompiler
from llmengine.dev import seed
from llmengine.plan import plan_object
from llmengine.plan.benchgate import DatasetProfile, bench_request, dataset_profile, evaluate
from llmengine.render import bench as render_bench
from llmengine.render import common

FIXTURES = Path(__file__).parent / "fixtures" / "trtllm-bench"
GOLDEN = Path(__file__).parent / "golden"
LOG = structlog.get_logger()
DIGEST = "ab" * 32


# -- trtllm-bench reports ------------------------------------------------------------------------------------------


def test_report_json_sample_gives_the_gated_numbers() -> None:
    n = bm.parse_report_json((FIXTURES / "trtllm_bench_report_json_sample.json").read_bytes())
    assert n == BenchNumbers(
        requests_per_second=6.6003,
        output_tokens_per_second=1689.6838,
        ttft_p50_ms=612.0443,
        ttft_p99_ms=2101.7764,
        itl_p50_ms=35.3303,
        itl_p99_ms=41.8705,
    )


def test_console_sample_gives_the_same_numbers_as_its_json() -> None:
    console = bm.parse_report_console((FIXTURES / "trtllm_bench_throughput_console_sample.txt").read_text())
    assert console == bm.parse_report_json((FIXTURES / "trtllm_bench_report_json_sample.json").read_text())


@pytest.mark.parametrize(
    ("name", "rps", "tps"),
    [
        ("github_issue_6294_excerpt.txt", 248.4751, 6957.3030),  # no streaming: no TTFT/TPOT
        ("github_pr_7104_excerpt.txt", 7.3411, 7517.2584),  # PyTorch backend, cut after the throughput lines
    ],
)
def test_real_console_reports_from_github(name: str, rps: float, tps: float) -> None:
    n = bm.parse_report_console((FIXTURES / name).read_text())
    assert n == BenchNumbers(requests_per_second=rps, output_tokens_per_second=tps)


def test_report_json_without_streaming_has_no_latencies_and_nan_is_not_a_number() -> None:
    doc = json.loads((FIXTURES / "trtllm_bench_report_json_sample.json").read_text())
    del doc["streaming_metrics"]
    n = bm.parse_report_json(json.dumps(doc))
    assert n.requests_per_second == 6.6003 and n.ttft_p99_ms is None and n.itl_p50_ms is None
    doc = json.loads((FIXTURES / "trtllm_bench_report_json_sample.json").read_text())
    doc["streaming_metrics"]["ttft_percentiles"]["p99"] = float("nan")  # json.dumps writes NaN, as trtllm-bench does
    assert bm.parse_report_json(json.dumps(doc)).ttft_p99_ms is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"engine": {}}', "performance"),
        ('{"performance": {"request_throughput_req_s": 1.0}}', "system_output_throughput_tok_s"),
        ("not json", "Invalid JSON"),
        ("[" * 100_000, "recursion"),
        ("", "EOF"),
    ],
)
def test_unreadable_report_json(text: str, needle: str) -> None:
    with pytest.raises(bm.ReportUnreadable) as exc:
        bm.parse_report_json(text)
    assert needle in str(exc.value)


def test_console_without_numbers_is_unreadable() -> None:
    with pytest.raises(bm.ReportUnreadable):
        bm.parse_report_console("[TRT-LLM] [I] Preparing to run throughput benchmark...\n")


def test_missing_json_report_falls_back_to_the_console(tmp_path: Path) -> None:
    console = (FIXTURES / "trtllm_bench_throughput_console_sample.txt").read_text()
    assert bm.read_report(tmp_path / "report.json", console, LOG).itl_p99_ms == 41.8705
    (tmp_path / "report.json").write_text("{truncated")
    assert bm.read_report(tmp_path / "report.json", console, LOG).ttft_p50_ms == 612.0443
    with pytest.raises(bm.BenchFailure) as exc:
        bm.read_report(tmp_path / "report.json", "no report here", LOG)
    assert exc.value.reason == "ReportUnreadable" and exc.value.stage == "report" and not exc.value.permanent


# -- failures of trtllm-bench --------------------------------------------------------------------------------------

REBUILD_TRACEBACK = """[04/02/2026-10:15:40] [TRT-LLM] [I] Preparing to run throughput benchmark...
Traceback (most recent call last):
  File "/usr/local/bin/trtllm-bench", line 8, in <module>
    sys.exit(main())
  File "/usr/local/lib/python3.12/dist-packages/tensorrt_llm/bench/benchmark/throughput.py", line 330, in \
throughput_command
    raise RuntimeError(
RuntimeError: Engine supports a max sequence of 4096. Provided dataset contains a maximum sequence of 4352. \
Please rebuild a new engine to support this dataset."""


@pytest.mark.parametrize(
    ("output", "reason", "permanent", "needle"),
    [
        (REBUILD_TRACEBACK, "DatasetExceedsEngine", True, "max sequence of 4096"),
        (
            "RuntimeError: Engine supports a max sequence of 128. Provided dataset contains a maximum sequence of 200. "
            "Please rebuild a new engine tosupport this dataset.",  # the latency command's typo
            "DatasetExceedsEngine",
            True,
            "engine tosupport",
        ),
        ("AssertionError: max_seq_len is not a runtime parameter for C++ backend", "InvalidArguments", True, "C++"),
        (
            "[TensorRT-LLM][ERROR] Assertion failed: Serialization assertion stdVersionRead == kSERIALIZATION_VERSION",
            "EngineIncompatible",
            True,
            "stdVersionRead",
        ),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "OutOfMemory", False, "2.00 GiB"),
        ("line one\nline two\nsomething odd happened", "BenchmarkFailed", False, "something odd happened"),
    ],
)
def test_trtllm_bench_failures_are_classified(output: str, reason: str, permanent: bool, needle: str) -> None:
    f = bm.classify_failure(1, output)
    assert (f.reason, f.permanent, f.stage) == (reason, permanent, "benchmark")
    assert needle in f.message and "exited with 1" in f.message


# -- the gate -------------------------------------------------------------------------------------------------------


def result(**kw: Any) -> BenchmarkResult:
    base: dict[str, Any] = {
        "requests_per_second": 10.0,
        "output_tokens_per_second": 1000.0,
        "ttft_p50_ms": 100.0,
        "ttft_p99_ms": 200.0,
        "itl_p50_ms": 10.0,
        "itl_p99_ms": 20.0,
    }
    base.update(kw)
    return BenchmarkResult(**base)


def test_no_thresholds_and_no_baseline_pass() -> None:
    assert evaluate(result(), None, None, None).passed
    assert evaluate(result(), BenchmarkThresholds(), None, 10).passed  # no baseline: the first engine


def test_thresholds_pass_and_fail_naming_metric_value_bound_and_field() -> None:
    ok = BenchmarkThresholds(
        min_requests_per_second=5, min_output_tokens_per_second=900, max_ttft_p99_ms=300, max_itl_p99_ms=25
    )
    assert evaluate(result(), ok, None, None) == evaluate(result(), ok, None, None)
    assert evaluate(result(), ok, None, None).passed
    v = evaluate(result(ttft_p99_ms=412.0, requests_per_second=4.25), ok, None, None)
    assert not v.passed
    assert v.reasons == [
        "requests/s 4.2 < spec.benchmark.thresholds.minRequestsPerSecond 5",
        "ttft p99 412.0 ms > spec.benchmark.thresholds.maxTtftP99Ms 300",
    ]
    edge = evaluate(result(itl_p99_ms=25.0, output_tokens_per_second=900.0), ok, None, None)
    assert edge.passed, "a value exactly at its bound passes"


def test_regression_is_lower_throughput_or_higher_latency() -> None:
    base = result()
    v = evaluate(result(output_tokens_per_second=812.3, ttft_p99_ms=240.0), None, base, 10)
    assert v.reasons == [
        "output tokens/s 812.3 is 18.8% below the serving engine's 1000.0 (spec.benchmark.maxRegressionPercent 10)",
        "ttft p99 240.0 ms is 20.0% above the serving engine's 200.0 ms (spec.benchmark.maxRegressionPercent 10)",
    ]
    better = result(requests_per_second=20.0, output_tokens_per_second=2000.0, ttft_p99_ms=50.0, itl_p99_ms=5.0)
    assert evaluate(better, None, base, 0).passed, "better in every direction is never a regression"
    within = result(requests_per_second=9.5, itl_p99_ms=21.0)
    assert evaluate(within, None, base, 10).passed
    assert not evaluate(within, None, base, 4).passed
    assert evaluate(result(output_tokens_per_second=1.0), None, base, None).passed, "no maxRegressionPercent"


def test_missing_metrics_fail_when_a_bound_needs_them() -> None:
    unstreamed = result(ttft_p50_ms=None, ttft_p99_ms=None, itl_p50_ms=None, itl_p99_ms=None)
    v = evaluate(unstreamed, BenchmarkThresholds(max_ttft_p99_ms=300), None, None)
    assert v.reasons == [
        "ttft p99 not measured, but spec.benchmark.thresholds.maxTtftP99Ms 300 needs it: run with streaming"
    ]
    assert evaluate(unstreamed, BenchmarkThresholds(min_requests_per_second=1), None, None).passed
    v = evaluate(unstreamed, None, result(), 10)
    assert not v.passed and all("not measured" in r for r in v.reasons) and len(v.reasons) == 2
    # The baseline lacking a metric means nothing to compare with.
    assert evaluate(result(), None, unstreamed, 10).passed


# -- the dataset profile -------------------------------------------------------------------------------------------


def spec(**kw: Any) -> LLMEngineSpec:
    body: dict[str, Any] = {
        "model": {"source": {"s3": {"uri": "s3://models/llama/"}}, "catalog": "llama-3.1-8b"},
        "target": {"gpu": "H100-80GB"},
    }
    body.update(kw)
    return LLMEngineSpec.model_validate(body)


def shapes(batch: int = 64, inp: int = 2048, seq: int = 4096, tokens: int = 8192) -> BuildShapes:
    return BuildShapes(max_batch_size=batch, max_input_len=inp, max_seq_len=seq, max_num_tokens=tokens)


def test_profile_from_the_shapes_and_from_traffic() -> None:
    assert dataset_profile(spec(), shapes()) == DatasetProfile(1024, 2048, 1024, 2048, 64)
    s = spec(serving={"runtime": {"maxBatchSize": 32, "maxSeqLen": 3072}})
    assert dataset_profile(s, shapes()) == DatasetProfile(1024, 2048, 512, 1024, 32)
    traffic = {"inputTokens": {"mean": 512, "max": 1024}, "outputTokens": {"mean": 256, "max": 512}, "concurrency": 16}
    assert dataset_profile(spec(traffic=traffic), shapes()) == DatasetProfile(512, 1024, 256, 512, 16)
    with_conc = spec(traffic=traffic, benchmark={"concurrency": 8})
    assert dataset_profile(with_conc, shapes()) == DatasetProfile(512, 1024, 256, 512, 8)


def test_profile_never_exceeds_the_engine() -> None:
    # maxInputLen == maxSeqLen: one token is left for the output.
    assert dataset_profile(spec(), shapes(inp=4096, seq=4096)) == DatasetProfile(2047, 4095, 1, 1, 64)
    # Traffic larger than the (raised or runtime-lowered) engine is capped.
    traffic = {"inputTokens": {"mean": 3000, "max": 4000}, "outputTokens": {"mean": 900, "max": 1000}}
    p = dataset_profile(spec(traffic=traffic, serving={"runtime": {"maxSeqLen": 2048}}), shapes(inp=4000, seq=5000))
    assert p.input_max + p.output_max <= 2048 and p.input_max == 2047 and p.input_mean <= p.input_max
    # Without paged context FMHA a prompt must fit maxNumTokens.
    p = dataset_profile(spec(build={"pagedContextFmha": False, "maxNumTokens": 512}), shapes(tokens=512), False)
    assert p.input_max == 512
    with pytest.raises(ValueError, match="no room"):
        dataset_profile(spec(), shapes(inp=1, seq=1))


@settings(max_examples=300, deadline=None)
@given(
    seq=st.integers(2, 131_072),
    inp=st.integers(1, 131_072),
    tokens=st.integers(1, 65_536),
    batch=st.integers(1, 4096),
    paged=st.booleans(),
    runtime_seq=st.one_of(st.none(), st.integers(1, 131_072)),
    traffic=st.one_of(st.none(), st.tuples(*[st.integers(1, 200_000)] * 4)),
)
def test_profile_property_fits_the_engine(
    seq: int,
    inp: int,
    tokens: int,
    batch: int,
    paged: bool,
    runtime_seq: int | None,
    traffic: tuple[int, int, int, int] | None,
) -> None:
    kw: dict[str, Any] = {"build": {"pagedContextFmha": paged}}
    if runtime_seq is not None:
        runtime_seq = min(runtime_seq, seq)
        kw["serving"] = {"runtime": {"maxSeqLen": max(2, runtime_seq)}}
    if traffic is not None:
        a, b, c, d = traffic
        kw["traffic"] = {"inputTokens": {"mean": min(a, b), "max": max(a, b)}}
        kw["traffic"]["outputTokens"] = {"mean": min(c, d), "max": max(c, d)}
    shp = shapes(batch=batch, inp=min(inp, seq), seq=seq, tokens=tokens)
    p = dataset_profile(spec(**kw), shp)
    effective = min(seq, runtime_seq if runtime_seq is not None else seq)
    assert p.input_max + p.output_max <= max(2, effective)
    assert 1 <= p.input_mean <= p.input_max <= shp.max_input_len
    assert 1 <= p.output_mean <= p.output_max
    assert p.concurrency >= 1
    BenchDataset(**p._asdict(), num_requests=8)  # always a valid request


# -- the dataset file ----------------------------------------------------------------------------------------------


def dataset(**kw: Any) -> BenchDataset:
    base: dict[str, Any] = {
        "input_mean": 64,
        "input_max": 128,
        "output_mean": 16,
        "output_max": 32,
        "num_requests": 50,
        "concurrency": 4,
        "seed": 7,
    }
    base.update(kw)
    return BenchDataset(**base)


def test_dataset_lines_are_trtllm_bench_format_and_deterministic(tmp_path: Path) -> None:
    stats = bm.write_dataset(tmp_path / "a.jsonl", dataset(), vocab_size=128_256)
    bm.write_dataset(tmp_path / "b.jsonl", dataset())
    bm.write_dataset(tmp_path / "c.jsonl", dataset(seed=8))
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    lines = a.decode().splitlines()
    assert len(lines) == 50 == stats.num_requests
    assert lines[0].startswith('{"task_id":0,"input_ids":[') and " " not in lines[0]
    docs = [json.loads(line) for line in lines]
    assert [list(d) for d in docs] == [["task_id", "input_ids", "output_tokens"]] * 50
    assert [d["task_id"] for d in docs] == list(range(50))
    low, high = bm.token_range(128_256)
    for d in docs:
        assert 1 <= len(d["input_ids"]) <= 128 and 1 <= d["output_tokens"] <= 32
        assert all(low <= t < high for t in d["input_ids"])
    assert stats.max_sequence_length == max(len(d["input_ids"]) + d["output_tokens"] for d in docs) <= 160
    assert 40 < stats.avg_isl < 90 and 10 < stats.avg_osl < 22
    assert len({len(d["input_ids"]) for d in docs}) > 5, "lengths vary around the mean"


def test_dataset_with_max_equal_to_mean_is_constant(tmp_path: Path) -> None:
    stats = bm.write_dataset(tmp_path / "d.jsonl", dataset(input_mean=128, output_mean=32, num_requests=3))
    assert (stats.max_isl, stats.max_osl, stats.avg_isl, stats.avg_osl) == (128, 32, 128.0, 32.0)


@pytest.mark.parametrize(
    ("vocab", "expected"),
    [(None, (1000, 32000)), (128_256, (1000, 32000)), (32_000, (1000, 32000)), (500, (250, 500)), (1, (0, 1))],
)
def test_token_range_stays_in_the_vocabulary(vocab: int | None, expected: tuple[int, int]) -> None:
    assert bm.token_range(vocab) == expected


# -- the trtllm-bench command line ---------------------------------------------------------------------------------


def bench_req(**kw: Any) -> BenchRequest:
    base: dict[str, Any] = {
        "engine_digest": DIGEST,
        "store": {"bucket": "engines"},
        "model": {"s3_uri": "s3://models/tiny/"},
        "backend": "tensorrt",
        "compiler": "test",
        "tp_size": 2,
        "max_seq_len": 256,
        "dataset": {
            "input_mean": 128,
            "input_max": 128,
            "output_mean": 32,
            "output_max": 32,
            "num_requests": 16,
            "concurrency": 4,
        },
    }
    base.update(kw)
    return BenchRequest.model_validate(base)


def test_argv_for_a_tensorrt_engine() -> None:
    req = bench_req(model_name="meta-llama/Llama-3.1-8B-Instruct", kv_cache_free_gpu_mem_fraction=0.85)
    argv = bm.bench_argv(
        req,
        engine_dir=Path("/work/engine"),
        model_dir=Path("/work/model"),
        dataset=Path("/work/dataset.jsonl"),
        report=Path("/work/report.json"),
        workspace=Path("/work/workspace"),
    )
    assert argv == [
        "trtllm-bench",
        "--model",
        "meta-llama/Llama-3.1-8B-Instruct",
        "--model_path",
        "/work/model",
        "--workspace",
        "/work/workspace",
        "throughput",
        "--backend",
        "tensorrt",
        "--engine_dir",
        "/work/engine",
        "--kv_cache_free_gpu_mem_fraction",
        "0.85",
        "--dataset",
        "/work/dataset.jsonl",
        "--num_requests",
        "16",
        "--concurrency",
        "4",
        "--warmup",
        "2",
        "--eos_id",
        "-1",
        "--disable_chunked_context",
        "--streaming",
        "--report_json",
        "/work/report.json",
    ]
    assert "--max_seq_len" not in argv, "trtllm-bench asserts max_seq_len is not a runtime parameter for engines"


def test_argv_for_the_pytorch_backend_and_a_model_without_a_hub_name() -> None:
    req = bench_req(backend="pytorch", max_batch_size=32, max_num_tokens=4096)
    p = Path("/w")
    argv = bm.bench_argv(req, engine_dir=p / "e", model_dir=p / "e", dataset=p / "d", report=p / "r", workspace=p)
    assert argv[:10] == [
        "trtllm-bench",
        "--model",
        f"llmengine/engine-{DIGEST[:12]}",
        "--model_path",
        "/w/e",
        "--workspace",
        "/w",
        "throughput",
        "--backend",
        "pytorch",
    ]
    assert "--engine_dir" not in argv
    flags = {argv[i]: argv[i + 1] for i in range(10, len(argv) - 1) if argv[i].startswith("--")}
    assert flags["--tp"] == "2" and flags["--pp"] == "1" and flags["--max_seq_len"] == "256"
    assert flags["--max_batch_size"] == "32" and flags["--max_num_tokens"] == "4096"
    assert bm.model_name(bench_req(model={"hugging_face_repo": "org/m", "revision": "abc"})) == "org/m"


# -- bench-engine end to end ---------------------------------------------------------------------------------------


def build_request(**kw: Any) -> BuildRequest:
    """The planner's request for a tp=2 engine (seed.build_request), request fields overridden as given."""
    data = seed.build_request(tp=kw.pop("tp_size", 2), backend=kw.pop("backend", "tensorrt")).model_dump()
    data.update({"engine_digest": DIGEST, "test_engine_bytes": 2048})
    data.update(kw)
    return BuildRequest.model_validate(data)


MODEL_FILES = {
    "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000}),
    "tokenizer.json": "{}",
    "tokenizer_config.json": "{}",
    "model.safetensors": "weights that the benchmark must not download",
}


class FakeStore:
    """The store as bench-engine uses it: manifest, verified engine download, listing and plain file download."""

    def __init__(self, engine_dir: Path | None, manifest: Manifest | None, model: dict[str, str] | None = None):
        self.engine_dir, self.manifest, self.model = engine_dir, manifest, MODEL_FILES if model is None else model
        self.client = self
        self.fetched: list[str] = []

    def uri(self, digest: str) -> str:
        return f"s3://engines/engines/{digest}/"

    def get_manifest(self, digest: str) -> Manifest | None:
        return self.manifest

    def download_engine(self, digest: str, dest: Path, parallelism: int | None = None) -> Manifest:
        assert self.engine_dir is not None and self.manifest is not None
        shutil.copytree(self.engine_dir, dest, dirs_exist_ok=True)
        return self.manifest

    def list_objects(self, prefix: str) -> dict[str, int]:
        return {prefix + name: len(data) for name, data in self.model.items()}

    def download_file(self, bucket: str, key: str, filename: str) -> None:
        self.fetched.append(key)
        Path(filename).write_text(self.model[key.rsplit("/", 1)[-1]])


def committed_engine(tmp_path: Path, test_build: bool = True, **kw: Any) -> tuple[Path, Manifest]:
    req = build_request(**kw)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name, text in MODEL_FILES.items():
        (ckpt / name).write_text(text)
    out = TestCompiler().compile(req, ckpt, tmp_path / "built", LOG)
    files = [
        ManifestFile(path=p.relative_to(out.engine_dir).as_posix(), sha256="0" * 64, size=p.stat().st_size)
        for p in sorted(out.engine_dir.rglob("*"))
        if p.is_file()
    ]
    provenance = Provenance(
        builder_image=req.image,
        trtllm_version="1.2.1",
        compiler="test" if test_build else "tensorrt-llm",
        gpu_class=req.gpu_class,
        sm=req.sm,
        build_time="2026-04-02T10:00:00Z",
        build_seconds=1.0,
        test_build=test_build,
    )
    manifest = Manifest(
        engine_digest=req.engine_digest,
        backend=req.backend,
        tp_size=req.tp_size,
        pp_size=req.pp_size,
        shapes=req.shapes,
        files=files,
        provenance=provenance,
    )
    return out.engine_dir, manifest


def write_request(tmp_path: Path, req: BenchRequest) -> Path:
    path = tmp_path / "request.json"
    path.write_text(req.to_json())
    return path


def test_bench_engine_end_to_end_with_the_test_benchmarker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine, manifest = committed_engine(tmp_path)
    store = FakeStore(engine, manifest)
    seams = bm.Seams(store_factory=lambda loc: store)  # type: ignore[arg-type,return-value]
    outcome = bm.run(write_request(tmp_path, bench_req()), tmp_path / "work", seams)
    assert outcome.succeeded and outcome.test_benchmark and outcome.reason is None
    # Numbers derived from the request, read back through parse_report_json from a real-format report.
    assert outcome.numbers == BenchNumbers(
        requests_per_second=8.0,
        output_tokens_per_second=256.0,
        ttft_p50_ms=5.0,
        ttft_p99_ms=7.5,
        itl_p50_ms=8.0,
        itl_p99_ms=10.0,
    )
    assert outcome.message is not None and outcome.message.startswith("TEST BENCHMARKER, not trtllm-bench")
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    keys = ["engine", "machine", "world_info", "request_info", "performance", "streaming_metrics", "dataset"]
    assert list(report) == keys
    assert report["engine"]["backend"] == "TRT" and report["request_info"]["num_requests"] == 16
    # Only the config and the tokenizer came from the checkpoint, never the weights.
    assert sorted(store.fetched) == ["tiny/config.json", "tiny/tokenizer.json", "tiny/tokenizer_config.json"]
    assert (tmp_path / "work" / "engine" / "rank1.engine").exists()

    write_result(bm.fit_outcome(outcome), tmp_path / "termination-log")
    assert capsys.readouterr().out.strip().splitlines()[-1] == (tmp_path / "termination-log").read_text()
    parsed = parse_bench_outcome((tmp_path / "termination-log").read_text())
    assert parsed == outcome
    assert parsed.benchmark_result() == BenchmarkResult(
        requests_per_second=8.0,
        output_tokens_per_second=256.0,
        ttft_p50_ms=5.0,
        ttft_p99_ms=7.5,
        itl_p50_ms=8.0,
        itl_p99_ms=10.0,
        test_benchmark=True,
    )


def test_bench_engine_fetches_config_and_tokenizer_from_the_hub(tmp_path: Path) -> None:
    engine, manifest = committed_engine(tmp_path)
    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(**kw: Any) -> str:
        calls.append(kw)
        for name in ("config.json", "tokenizer.json"):
            (Path(kw["local_dir"]) / name).write_text(MODEL_FILES[name])
        return str(kw["local_dir"])

    seams = bm.Seams(
        store_factory=lambda loc: FakeStore(engine, manifest),  # type: ignore[arg-type,return-value]
        hf_download=fake_snapshot_download,
    )
    req = bench_req(model={"hugging_face_repo": "org/tiny", "revision": "abc123"})
    assert bm.run(write_request(tmp_path, req), tmp_path / "work", seams).succeeded
    assert calls[0]["repo_id"] == "org/tiny" and calls[0]["revision"] == "abc123"
    assert "config.json" in calls[0]["allow_patterns"] and "*.safetensors" not in calls[0]["allow_patterns"]


def test_bench_engine_pytorch_backend_benchmarks_the_stored_checkpoint(tmp_path: Path) -> None:
    engine, manifest = committed_engine(tmp_path, backend="pytorch", tp_size=1)
    store = FakeStore(engine, manifest)
    ran: list[list[str]] = []

    def spy(argv: list[str], log: Any) -> bm.ToolRun:
        ran.append(argv)
        return bm.TestBenchmarker()(argv, log)

    seams = bm.Seams(store_factory=lambda loc: store, runners=lambda: {"test": spy})  # type: ignore[arg-type,return-value]
    outcome = bm.run(write_request(tmp_path, bench_req(backend="pytorch", tp_size=1)), tmp_path / "work", seams)
    assert outcome.succeeded and outcome.numbers is not None and outcome.numbers.itl_p99_ms == 10.0
    assert store.fetched == [], "the pytorch engine is the checkpoint: nothing else to fetch"
    argv = ran[0]
    assert argv[argv.index("--model_path") + 1] == str(tmp_path / "work" / "engine")
    assert argv[argv.index("--max_seq_len") + 1] == "256" and "--engine_dir" not in argv


def test_bench_engine_cli_exit_codes(tmp_path: Path) -> None:
    assert "bench-engine" in cli.usage() and cli.COMMANDS["bench-engine"][0] == "llmengine.builder.benchmark"
    engine, manifest = committed_engine(tmp_path)
    seams = bm.Seams(store_factory=lambda loc: FakeStore(engine, manifest))  # type: ignore[arg-type,return-value]
    req = write_request(tmp_path, bench_req())
    out = tmp_path / "result.json"
    argv = ["--request", str(req), "--work-dir", str(tmp_path / "w"), "--result", str(out), "--log-format", "console"]
    assert bm.main(argv, seams) == 0
    assert (parsed := parse_bench_outcome(out.read_text())) is not None and parsed.succeeded
    assert bm.main(["--request", str(tmp_path / "missing.json"), "--result", str(out)], seams) == 1
    failed = parse_bench_outcome(out.read_text())
    assert failed is not None and failed.reason == "InvalidRequest" and failed.permanent


def test_engine_missing_in_the_store(tmp_path: Path) -> None:
    seams = bm.Seams(store_factory=lambda loc: FakeStore(None, None))  # type: ignore[arg-type,return-value]
    outcome = bm.run(write_request(tmp_path, bench_req()), tmp_path / "work", seams)
    assert not outcome.succeeded and outcome.reason == "EngineNotCommitted" and outcome.stage == "download"
    assert outcome.numbers is None and DIGEST in (outcome.message or "")


def test_trtllm_bench_refusing_the_dataset_is_permanent(tmp_path: Path) -> None:
    engine, manifest = committed_engine(tmp_path, test_build=False)
    ran: list[list[str]] = []

    def fake_trtllm_bench(argv: list[str], log: Any) -> bm.ToolRun:
        ran.append(argv)
        return bm.ToolRun(1, REBUILD_TRACEBACK)

    seams = bm.Seams(
        store_factory=lambda loc: FakeStore(engine, manifest),  # type: ignore[arg-type,return-value]
        runners=lambda: {"tensorrt-llm": fake_trtllm_bench},
        trtllm_version=lambda: "1.2.1",
    )
    outcome = bm.run(write_request(tmp_path, bench_req(compiler="tensorrt-llm")), tmp_path / "work", seams)
    assert not outcome.succeeded and outcome.permanent and outcome.reason == "DatasetExceedsEngine"
    assert outcome.stage == "benchmark" and not outcome.test_benchmark
    work = tmp_path / "work"
    assert ran[0][:12] == [
        "trtllm-bench",
        "--model",
        f"llmengine/engine-{DIGEST[:12]}",
        "--model_path",
        str(work / "model"),
        "--workspace",
        str(work / "workspace"),
        "throughput",
        "--backend",
        "tensorrt",
        "--engine_dir",
        str(work / "engine"),
    ]
    assert (work / "dataset.jsonl").exists() and (work / "model" / "config.json").exists()


@pytest.mark.parametrize(
    ("kw", "test_build", "version", "model", "reason"),
    [
        ({"compiler": "tensorrt-llm"}, True, "1.2.1", None, "TestEngine"),
        ({"compiler": "tensorrt-llm"}, False, "1.1.0", None, "VersionMismatch"),
        ({"max_seq_len": 128}, True, None, None, "DatasetExceedsEngine"),
        ({"tp_size": 4}, True, None, None, "InvalidRequest"),
        ({}, True, None, {"tokenizer.json": "{}"}, "FetchFailed"),
    ],
)
def test_requests_that_cannot_be_benchmarked(
    tmp_path: Path,
    kw: dict[str, Any],
    test_build: bool,
    version: str | None,
    model: dict[str, str] | None,
    reason: str,
) -> None:
    engine, manifest = committed_engine(tmp_path, test_build=test_build)
    store = FakeStore(engine, manifest, model)
    seams = bm.Seams(
        store_factory=lambda loc: store,  # type: ignore[arg-type,return-value]
        runners=lambda: {"tensorrt-llm": _must_not_run, "test": _must_not_run},
        trtllm_version=lambda: version,
    )
    outcome = bm.run(write_request(tmp_path, bench_req(**kw)), tmp_path / "work", seams)
    assert not outcome.succeeded and outcome.reason == reason, outcome
    assert outcome.permanent is (reason != "FetchFailed")


def _must_not_run(argv: list[str], log: Any) -> bm.ToolRun:
    raise AssertionError("the benchmark must not start")


def test_test_benchmarker_refuses_a_dataset_longer_than_the_engine(tmp_path: Path) -> None:
    engine, _ = committed_engine(tmp_path)  # built max_seq_len 256
    bm.write_dataset(tmp_path / "d.jsonl", dataset(input_mean=200, input_max=200, output_mean=100, output_max=100))
    argv = ["trtllm-bench", "--model", "m", "throughput", "--backend", "tensorrt", "--engine_dir", str(engine)]
    argv += ["--dataset", str(tmp_path / "d.jsonl"), "--report_json", str(tmp_path / "r.json"), "--streaming"]
    ran = bm.TestBenchmarker()(argv, LOG)
    assert ran.returncode == 1 and not (tmp_path / "r.json").exists()
    failure = bm.classify_failure(ran.returncode, ran.output)
    assert failure.reason == "DatasetExceedsEngine" and failure.permanent
    assert "max sequence of 256" in failure.message and "maximum sequence of 300" in failure.message


def test_test_benchmarker_without_streaming_reports_no_latencies(tmp_path: Path) -> None:
    bm.write_dataset(tmp_path / "d.jsonl", dataset(num_requests=4))
    argv = ["trtllm-bench", "--model", "m", "throughput", "--backend", "pytorch", "--max_seq_len", "200"]
    argv += ["--dataset", str(tmp_path / "d.jsonl"), "--report_json", str(tmp_path / "r.json"), "--concurrency", "3"]
    assert bm.TestBenchmarker()(argv, LOG).returncode == 0
    n = bm.parse_report_json((tmp_path / "r.json").read_text())
    assert n.requests_per_second == 6.0 and n.ttft_p99_ms is None and n.itl_p99_ms is None
    v = evaluate(BenchmarkResult(**n.model_dump()), BenchmarkThresholds(max_itl_p99_ms=50), None, None)
    assert not v.passed and "run with streaming" in v.reasons[0]


# -- the outcome document ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        b"\xff\xfe\x00",
        "[" * 100_000,
        '{"a":' * 50_000,
        "null",
        "42",
        '{"apiVersion":"llmengine.io/v1alpha1","kind":"BuildResult","engineDigest":"d","succeeded":true}',
        '{"kind":"BenchResult","engineDigest":"d","succeeded":true,"numbers":{"ttftP99Ms":NaN}}',
        '{"kind":"BenchResult","engineDigest":"d","succeeded":true,"surprise":1}',
        '{"kind":"BenchResult","engineDigest":"d","succeeded":true,"numbers":{"requestsPerSecond":-1}}',
    ],
)
def test_parse_bench_outcome_never_raises_on_garbage(text: str | bytes) -> None:
    assert parse_bench_outcome(text) is None


def test_outcome_json_shape_and_size() -> None:
    ok = BenchOutcome(engine_digest="d", succeeded=True, numbers=BenchNumbers(requests_per_second=1.5))
    assert json.loads(ok.to_json()) == {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "BenchResult",
        "engineDigest": "d",
        "succeeded": True,
        "permanent": False,
        "numbers": {"requestsPerSecond": 1.5},
        "testBenchmark": False,
    }
    huge = bm.failure_outcome("d" * 64, bm.BenchFailure("benchmark", "BenchmarkFailed", "x" * 10_000), 3.0)
    text = bm.fit_outcome(huge)
    assert len(text.encode()) <= RESULT_LIMIT
    parsed = parse_bench_outcome(text)
    assert parsed is not None and parsed.message is not None and parsed.message.endswith("...[cut]")


# -- the bench request and Job -------------------------------------------------------------------------------------


def engine_body() -> dict[str, Any]:
    return {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "LLMEngine",
        "metadata": {"name": "llama", "namespace": "ml", "uid": "1111-2222", "generation": 1},
        "spec": {
            "model": {
                "source": {
                    "huggingFace": {
                        "repo": "meta-llama/Llama-3.1-8B",
                        "revision": "d04e592",
                        "tokenSecretRef": {"name": "hf"},
                    }
                },
                "catalog": "llama-3.1-8b",
            },
            "precision": {"dtype": "bfloat16"},
            "parallelism": {"tensor": 2},
            "build": {"maxBatchSize": 64, "maxInputLen": 2048, "maxSeqLen": 4096, "maxNumTokens": 8192},
            "target": {
                "gpu": "H100-80GB",
                "tolerations": [{"key": "team", "operator": "Equal", "value": "ml"}],
                "nodeSelector": {"pool": "gpu"},
            },
            "store": {"bucket": "engines", "endpoint": "http://s3:9000", "credentialsSecretRef": {"name": "s3"}},
            "serving": {"replicas": 2, "runtime": {"maxBatchSize": 32}},
            "benchmark": {"numRequests": 128, "thresholds": {"maxTtftP99Ms": 500}},
        },
    }


def render() -> tuple[dict[str, Any], dict[str, Any], BenchRequest]:
    body = engine_body()
    plan = plan_object(body)
    assert plan.valid, plan.errors
    engine = parse_engine(body)
    req = bench_request(engine.spec, plan)
    where = common.Placement(
        namespace="ml",
        owners=[common.owner_reference(engine, controller=False)],
        short_digest=plan.short_digest,
        build_job=plan.build_job,
        bench_job=plan.bench_job,
        pool=common.pool_name(plan.gpu.name, plan.mig_profile),
        product_labels=list(plan.gpu.product_labels),
        gpu_resource=plan.gpu_resource,
        gpu_count=plan.gpu_count,
        target=engine.spec.target,
        store_secret="s3",
        hf_token=SecretKeySelector(name="hf", key="token"),
    )
    job = render_bench.bench_job(
        request=req, where=where, image="reg/builder:1", cfg=OperatorConfig(), active_deadline_seconds=3600
    )
    cm = render_bench.bench_request_configmap(req, where)
    return job, cm, req


def test_bench_request_from_the_plan() -> None:
    _, _, req = render()
    plan = plan_object(engine_body())
    assert req.engine_digest == plan.engine_digest and req.compiler == "tensorrt-llm" and req.backend == "tensorrt"
    assert req.model_name == "meta-llama/Llama-3.1-8B" and req.model.revision == "d04e592"
    assert (req.tp_size, req.pp_size, req.max_seq_len) == (2, 1, 4096)
    assert req.dataset == BenchDataset(
        input_mean=1024, input_max=2048, output_mean=1024, output_max=2048, num_requests=128, concurrency=32, seed=0
    )
    assert req.max_batch_size == 32 and req.kv_cache_free_gpu_mem_fraction == 0.9
    test_plan = plan_object(engine_body(), compiler="test")
    assert bench_request(parse_engine(engine_body()).spec, test_plan).compiler == "test"


def test_bench_job_golden() -> None:
    job, cm, req = render()
    path = GOLDEN / "bench-job.yaml"
    text = yaml.safe_dump(job, sort_keys=True)
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; rerun with UPDATE_GOLDEN=1 if the change is intended"
    assert BenchRequest.model_validate_json(cm["data"]["request.json"]) == req
    assert cm["metadata"]["name"] == job["metadata"]["name"]


def test_bench_job_runs_like_the_serving_pods() -> None:
    job, _, req = render()
    plan = plan_object(engine_body())
    md, pod = job["metadata"], job["spec"]["template"]["spec"]
    assert md["name"] == plan.bench_job and md["name"].startswith(f"llme-bench-{plan.engine_digest[:12]}-")
    assert len(md["name"]) <= 63
    assert md["labels"]["app.kubernetes.io/managed-by"] == "llmengine-operator"
    assert md["labels"][common.COMPONENT_LABEL] == "benchmark"
    assert md["annotations"][common.DIGEST_ANNOTATION] == req.engine_digest
    assert md["ownerReferences"][0]["uid"] == "1111-2222"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    c = pod["containers"][0]
    assert c["command"] + c["args"][:2] == [
        "llmengine",
        "bench-engine",
        "--request",
        "/etc/llmengine/bench/request.json",
    ]
    assert c["image"] == "reg/builder:1"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert common.GPU_TOLERATION in pod["tolerations"] and pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "Never"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    for e in c["env"]:
        if e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
            assert "value" not in e and "secretKeyRef" in e["valueFrom"]
