"""build-engine without S3 or GPUs: request checks, the test compiler, verification, results, seams."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from llmengine.api.artifacts import BuildRequest, BuildResult
from llmengine.builder import main as builder_main
from llmengine.builder import shell
from llmengine.builder.compiler import BuildFailure, check_request
from llmengine.builder.fetch import HF_IGNORE_PATTERNS, fetch_hf, split_s3_uri
from llmengine.builder.main import RESULT_LIMIT, Seams, failure_result, fit_result, run
from llmengine.builder.testcompiler import MARKER_NAME, TestCompiler, rank_sizes
from llmengine.builder.trtllm import TensorRTLLMCompiler
from llmengine.builder.verify import verify_engine
from llmengine.dev import seed
from llmengine.logging import REDACTED, configure_logging, get_logger, register_secret

PLAN_KEYS = {"tp_size": "tp", "pp_size": "pp", "quantization": "quantization", "kv_cache_dtype": "kv_cache_dtype"}


def request(**kw: Any) -> BuildRequest:
    """A request as the planner writes it (seed.build_request), then request fields overridden as given."""
    plan_kw = {PLAN_KEYS[k]: kw.pop(k) for k in list(kw) if k in PLAN_KEYS}
    for k in ("backend", "gpu", "build"):
        if k in kw:
            plan_kw[k] = kw.pop(k)
    base = seed.build_request(**plan_kw)
    data = base.model_dump()
    data.update({"engine_digest": "e" * 16, "test_engine_bytes": 3 * 1024 + 1})
    data.update(kw)
    return BuildRequest.model_validate(data)


def checkpoint(tmp: Path) -> Path:
    d = tmp / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return d


LOG = structlog.get_logger()


# -- request checks ------------------------------------------------------------------------------------------------


def _tampered(**update: Any) -> BuildRequest:
    """A planner-written request with its EngineConfig changed afterwards (as a hand-edited ConfigMap would be)."""
    req = request(tp_size=1)
    engine = req.engine.model_dump()
    for path, value in update.items():
        node = engine
        *parents, leaf = path.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return req.model_copy(update={"engine": type(req.engine).model_validate(engine)})


@pytest.mark.parametrize(
    ("req", "reason", "needle"),
    [
        # Upstream's build() would turn these into another engine than the request names (rules F4, F6, T3, Q7).
        (lambda: _tampered(build_config__plugin_config__use_fp8_context_fmha=True), "UnsupportedCombination", "F2"),
        (lambda: _tampered(build_config__opt_num_tokens=10**6), "UnsupportedCombination", "T6"),
        (lambda: _tampered(build_config__plugin_config__nccl_plugin="float16"), "UnsupportedCombination", "Q7"),
        # Keys upstream does not define, values outside its choices.
        (
            lambda: _tampered(build_config__kv_cache_type="PAGED", quantization__quant_algo="INT3"),
            "UnsupportedCombination",
            "INT3",
        ),
        # Refused on Blackwell by build() (W1), after conversion would have spent GPU time.
        (
            lambda: request(quantization="int8_weight_only").model_copy(update={"sm": "10.0"}),
            "UnsupportedCombination",
            "W1",
        ),
        (lambda: request(model={"s3_uri": "s3://a/", "hugging_face_repo": "x/y"}), "InvalidRequest", "exactly one"),
        (
            lambda: request(
                shapes={"max_batch_size": 1, "max_input_len": 512, "max_seq_len": 256, "max_num_tokens": 8}
            ),
            "InvalidRequest",
            "maxInputLen",
        ),
        (lambda: request(tp_size=2).model_copy(update={"tp_size": 1}), "InvalidRequest", "mapping"),
    ],
)
def test_requests_that_can_never_build_fail_permanently(req: Any, reason: str, needle: str) -> None:
    with pytest.raises(BuildFailure) as exc:
        check_request(req())
    assert exc.value.permanent and exc.value.reason == reason and exc.value.stage == "validate"
    assert needle in exc.value.message


def test_invalid_request_file_gives_a_permanent_result(tmp_path: Path) -> None:
    path = tmp_path / "req.json"
    path.write_text(json.dumps({"engineDigest": "x", "backend": "tensorrt"}))
    result = run(path, tmp_path / "work", Seams(store_factory=_no_store))
    assert not result.succeeded and result.permanent and result.stage == "validate"
    assert result.reason == "InvalidRequest" and "field" in (result.message or "")


def _no_store(_loc: Any) -> Any:
    raise AssertionError("the store must not be touched")


# -- test compiler -------------------------------------------------------------------------------------------------


def test_test_compiler_writes_a_realistic_engine_dir(tmp_path: Path) -> None:
    req = request(tp_size=2, pp_size=2, quantization="fp8", kv_cache_dtype="fp8", test_engine_bytes=10_003)
    data = tmp_path / "calibration"
    data.mkdir()
    (data / "train.jsonl").write_bytes(seed.calibration_jsonl(4))
    out = TestCompiler().compile(req, checkpoint(tmp_path), tmp_path / "engine", LOG, calibration_dir=data)
    assert out.test_build and out.trtllm_version == "1.2.1"
    cfg = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert cfg["test_build"] is True and cfg["version"] == "1.2.1"
    pc = cfg["pretrained_config"]
    assert {k: pc["mapping"][k] for k in ("world_size", "tp_size", "pp_size")} == {
        "world_size": 4,
        "tp_size": 2,
        "pp_size": 2,
    }
    assert (pc["quantization"]["quant_algo"], pc["quantization"]["kv_cache_quant_algo"]) == ("FP8", "FP8")
    assert pc["architecture"] == "LlamaForCausalLM" and pc["hidden_size"] == 4096 and pc["num_hidden_layers"] == 32
    bc = cfg["build_config"]
    assert bc["max_seq_len"] == 256 and bc["kv_cache_type"] == "PAGED"
    # What upstream's rules make of an FP8 KV cache with paged context FMHA on 4 GPUs (F4, Q7), written out.
    pl = bc["plugin_config"]
    assert (pl["use_paged_context_fmha"], pl["use_fp8_context_fmha"], pl["nccl_plugin"]) == (True, True, "float16")
    sizes = [(tmp_path / "engine" / f"rank{r}.engine").stat().st_size for r in range(4)]
    assert sizes == rank_sizes(10_003, 4) and sum(sizes) == 10_003
    assert (tmp_path / "engine" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "engine" / MARKER_NAME).read_text())["test_build"] is True
    assert verify_engine(req, tmp_path / "engine")


def test_test_compiler_data_does_not_repeat(tmp_path: Path) -> None:
    req = request(tp_size=1, test_engine_bytes=24 * 1024 * 1024)
    TestCompiler().compile(req, checkpoint(tmp_path), tmp_path / "engine", LOG)
    data = (tmp_path / "engine" / "rank0.engine").read_bytes()
    blocks = {data[i : i + 4096] for i in range(0, len(data), 8 * 1024 * 1024)}
    assert len(blocks) == 3


def test_test_compiler_pytorch_backend_is_the_checkpoint(tmp_path: Path) -> None:
    req = request(backend="pytorch", tp_size=1)
    TestCompiler().compile(req, checkpoint(tmp_path), tmp_path / "engine", LOG)
    assert (tmp_path / "engine" / "model.safetensors").exists()
    assert verify_engine(req, tmp_path / "engine")


# -- verification --------------------------------------------------------------------------------------------------


def test_verify_reads_settings_as_upstream_writes_them(tmp_path: Path) -> None:
    """ "auto" plugins read back as the dtype and kv_cache_type is case-insensitive, as upstream reads them."""
    req = request(tp_size=2)
    engine = _engine(tmp_path, req)
    _edit_config(engine, lambda c: c["build_config"]["plugin_config"].update(gpt_attention_plugin="auto"))
    _edit_config(engine, lambda c: c["build_config"].update(kv_cache_type="paged"))
    assert verify_engine(req, engine)


def _engine(tmp_path: Path, req: BuildRequest) -> Path:
    TestCompiler().compile(req, checkpoint(tmp_path), tmp_path / "engine", LOG)
    return tmp_path / "engine"


def _edit_config(engine: Path, fn: Any) -> None:
    cfg = json.loads((engine / "config.json").read_text())
    fn(cfg)
    (engine / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda e: _edit_config(e, lambda c: c["pretrained_config"]["mapping"].update(tp_size=4)), "mapping.tp_size"),
        (lambda e: (e / "rank1.engine").unlink(), "rank1.engine is missing"),
        (lambda e: (e / "rank2.engine").write_bytes(b"x"), "unexpected rank files rank2.engine"),
        (
            lambda e: _edit_config(e, lambda c: c["build_config"].update(max_num_tokens=1)),
            "build_config.max_num_tokens",
        ),
        (lambda e: _edit_config(e, lambda c: c["pretrained_config"].update(dtype="bfloat16")), "dtype"),
        (
            lambda e: _edit_config(e, lambda c: c["pretrained_config"]["quantization"].update(quant_algo="FP8")),
            "pretrained_config.quantization.quant_algo: engine has 'FP8', request asks None",
        ),
        (
            lambda e: _edit_config(
                e, lambda c: c["build_config"]["plugin_config"].update(use_paged_context_fmha=False)
            ),
            "build_config.plugin_config.use_paged_context_fmha: engine has False, request asks True",
        ),
        (
            lambda e: _edit_config(e, lambda c: c["build_config"]["plugin_config"].pop("use_fp8_context_fmha")),
            "build_config.plugin_config.use_fp8_context_fmha: engine has no such setting",
        ),
        (lambda e: _edit_config(e, lambda c: c["build_config"].update(strongly_typed=False)), "strongly_typed"),
        (lambda e: (e / "config.json").unlink(), "config.json is missing"),
        (lambda e: (e / "config.json").write_text("{"), "does not parse"),
    ],
)
def test_verify_refuses_a_mismatching_engine(tmp_path: Path, mutate: Any, needle: str) -> None:
    req = request(tp_size=2)
    engine = _engine(tmp_path, req)
    mutate(engine)
    with pytest.raises(BuildFailure) as exc:
        verify_engine(req, engine)
    assert exc.value.stage == "verify" and needle in exc.value.message and not exc.value.permanent


def test_verify_failure_becomes_a_verify_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class BadCompiler(TestCompiler):
        def compile(self, request: BuildRequest, checkpoint_dir: Path, out_dir: Path, log: Any, **kw: Any) -> Any:
            out = super().compile(request, checkpoint_dir, out_dir, log, **kw)
            (out_dir / "rank0.engine").unlink()
            return out

    class Store:
        def check_upload_settings(self) -> None:
            pass

        def get_manifest(self, digest: str) -> None:
            return None

        def uri(self, digest: str) -> str:
            return f"s3://engines/engines/{digest}/"

        def put_result(self, digest: str, result: BuildResult) -> None:
            stored.append(result)

    stored: list[BuildResult] = []
    req_path = tmp_path / "req.json"
    req_path.write_text(request().to_json())
    seams = Seams(
        store_factory=lambda loc: Store(),  # type: ignore[arg-type,return-value]
        compilers=lambda: {"test": BadCompiler()},
    )

    def fake_fetch(request: BuildRequest, dest: Path, *a: Any, **k: Any) -> Any:
        from llmengine.builder.fetch import FetchResult

        checkpoint(dest.parent)
        return FetchResult(dest, 1, 0.1)

    monkeypatch.setattr(builder_main, "fetch_model", fake_fetch)
    result = run(req_path, tmp_path / "work", seams)
    assert not result.succeeded and result.stage == "verify" and not result.permanent
    assert "rank0.engine is missing" in (result.message or "")
    assert stored == [result]


@pytest.mark.parametrize("won", [True, False])
def test_a_build_that_loses_the_commit_race_names_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, won: bool
) -> None:
    """The store answers the upload with the manifest that stands: this build's, or another build's that committed
    between this build's first look and its commit."""
    from types import SimpleNamespace

    class Store:
        def check_upload_settings(self) -> None:
            pass

        def get_manifest(self, digest: str) -> None:
            return None

        def uri(self, digest: str) -> str:
            return f"s3://engines/engines/{digest}/"

        def put_progress(self, progress: Any) -> None:
            pass

        def upload_engine(self, digest: str, local_dir: Path, *, build_id: str, **kw: Any) -> Any:
            return SimpleNamespace(build_id=build_id if won else "f00d")

    req_path = tmp_path / "req.json"
    req_path.write_text(request().to_json())
    seams = Seams(store_factory=lambda loc: Store(), gpu_info=lambda: (None, None))  # type: ignore[arg-type,return-value]

    def fake_fetch(request: BuildRequest, dest: Path, *a: Any, **k: Any) -> Any:
        from llmengine.builder.fetch import FetchResult

        checkpoint(dest.parent)
        return FetchResult(dest, 1, 0.1)

    monkeypatch.setattr(builder_main, "fetch_model", fake_fetch)
    result = run(req_path, tmp_path / "work", seams)
    assert result.succeeded and result.engine_uri == "s3://engines/engines/" + "e" * 16 + "/"
    if won:
        assert result.message == "built and committed (TEST BUILD, not TensorRT-LLM)"
    else:
        assert result.message == "built, but build f00d committed this engine first; it stands"


@pytest.mark.parametrize("broken", ["a wrong value", "no awscrt"])
def test_upload_settings_that_cannot_work_fail_the_build_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    """CRC32C part checksums that cannot be sent fail before the fetch and the compile: a setting costs no GPU time."""
    from llmengine.api.artifacts import StoreLocation
    from llmengine.clients.store import EngineStore, S3Config, TransferTuning, files, make_s3_client

    env = {"LLMENGINE_S3_PART_CHECKSUM": "sha256" if broken == "a wrong value" else "crc32c"}
    if broken == "no awscrt":
        monkeypatch.setitem(sys.modules, "awscrt.checksums", None)
        files.crc32c_function.cache_clear()

    def store(loc: StoreLocation) -> EngineStore:
        client = make_s3_client(S3Config(endpoint="http://s3.example:9000", access_key_id="a", secret_access_key="b"))
        return EngineStore(client, loc, TransferTuning.from_env(env))

    def no_fetch(*a: Any, **k: Any) -> Any:
        raise AssertionError("fetched although the upload could not work")

    monkeypatch.setattr(builder_main, "fetch_model", no_fetch)
    req_path = tmp_path / "req.json"
    req_path.write_text(request().to_json())
    try:
        result = run(req_path, tmp_path / "work", Seams(store_factory=store))
    finally:
        files.crc32c_function.cache_clear()
    assert not result.succeeded and result.permanent
    assert (result.stage, result.reason) == ("validate", "InvalidSettings")
    assert "LLMENGINE_S3_PART_CHECKSUM" in (result.message or "")


# -- results -------------------------------------------------------------------------------------------------------


def test_result_json_stays_under_4_kib() -> None:
    failure = BuildFailure("compile", "CompileFailed", "trtllm-build exited with 1: " + "x" * 10_000)
    text = fit_result(failure_result("d" * 64, failure, 12.5))
    assert len(text.encode()) <= RESULT_LIMIT
    parsed = BuildResult.model_validate_json(text)
    assert parsed.stage == "compile" and parsed.message and parsed.message.endswith("...[cut]")
    ok = BuildResult(engine_digest="d" * 64, succeeded=True, engine_uri="s3://b/p/" + "d" * 64 + "/", total_bytes=1)
    assert fit_result(ok) == ok.to_json()


def test_result_is_written_to_the_given_path_and_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shell.write_result('{"a":1}', tmp_path / "termination-log")
    assert (tmp_path / "termination-log").read_text() == '{"a":1}'
    assert capsys.readouterr().out.strip() == '{"a":1}'


# -- fetch seam ----------------------------------------------------------------------------------------------------


def test_hugging_face_fetch_passes_revision_token_and_local_dir(tmp_path: Path, monkeypatch: Any) -> None:
    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(**kw: Any) -> str:
        calls.append(kw)
        (Path(kw["local_dir"]) / "config.json").write_text("{}")
        return str(kw["local_dir"])

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123456")
    n = fetch_hf("meta-llama/Llama-3.1-8B", "abc123", tmp_path, fake_snapshot_download)
    assert n == 2
    assert calls == [
        {
            "repo_id": "meta-llama/Llama-3.1-8B",
            "revision": "abc123",
            "token": "hf_secret_value_123456",
            "local_dir": str(tmp_path),
            "ignore_patterns": HF_IGNORE_PATTERNS,
        }
    ]


def test_hugging_face_errors_map_to_failures(tmp_path: Path) -> None:
    class RepositoryNotFoundError(Exception):
        pass

    class GatedRepoError(Exception):
        pass

    def raiser(exc: Exception) -> Any:
        def f(**kw: Any) -> None:
            raise exc

        return f

    with pytest.raises(BuildFailure) as missing:
        fetch_hf("x/y", None, tmp_path, raiser(RepositoryNotFoundError("404")))
    assert missing.value.permanent and "spec.model.source.huggingFace.repo" in missing.value.message
    with pytest.raises(BuildFailure) as gated:
        fetch_hf("x/y", None, tmp_path, raiser(GatedRepoError("403")))
    assert not gated.value.permanent and "HF_TOKEN" in gated.value.message


def test_split_s3_uri() -> None:
    assert split_s3_uri("s3://models/llama/8b/") == ("models", "llama/8b/")
    with pytest.raises(ValueError):
        split_s3_uri("https://x")


# -- real compiler, driven through a fake runner -------------------------------------------------------------------


def test_real_compiler_refuses_a_different_trtllm_version(tmp_path: Path) -> None:
    c = TensorRTLLMCompiler(version=lambda: "1.1.0", gpu_count=lambda: 1, runner=lambda argv, log, **kw: None)
    with pytest.raises(BuildFailure) as exc:
        c.compile(request(compiler="tensorrt-llm"), tmp_path, tmp_path / "engine", LOG)
    assert exc.value.permanent and exc.value.reason == "VersionMismatch"
    missing = TensorRTLLMCompiler(version=lambda: None)
    with pytest.raises(BuildFailure) as exc:
        missing.compile(request(compiler="tensorrt-llm"), tmp_path, tmp_path / "engine", LOG)
    assert exc.value.reason == "ToolMissing"


def test_a_failing_tool_reports_its_last_lines(tmp_path: Path) -> None:
    from llmengine.builder.compiler import run_command

    with pytest.raises(BuildFailure) as exc:
        run_command(["sh", "-c", "echo converting; echo 'CUDA out of memory' >&2; exit 3"], LOG)
    assert exc.value.reason == "CompileFailed" and "exited with 3" in exc.value.message
    assert "CUDA out of memory" in exc.value.message
    with pytest.raises(BuildFailure) as missing:
        run_command(["/nonexistent/trtllm-build"], LOG)
    assert missing.value.reason == "ToolMissing" and missing.value.permanent


# -- logging never prints secrets ----------------------------------------------------------------------------------


def test_logs_never_print_secret_values(monkeypatch: Any, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    configure_logging(json=True)
    register_secret("hf_abcdefghijklmnop")
    log = get_logger(engine_digest="d")
    log.info(
        "x",
        secret_key="plain-secret-value",
        hf_token="hf_abcdefghijklmnop",
        tokenizer="/engine",
        max_num_tokens=8192,
        argv=["--token", "hf_abcdefghijklmnop"],
        line="boto said wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    )
    err = capsys.readouterr().err
    assert "plain-secret-value" not in err and "hf_abcdefghijklmnop" not in err and "EXAMPLEKEY" not in err
    doc = json.loads(err.strip().splitlines()[-1])
    assert doc["secret_key"] == REDACTED and doc["hf_token"] == REDACTED
    assert doc["tokenizer"] == "/engine" and doc["max_num_tokens"] == 8192 and doc["engine_digest"] == "d"
    assert doc["argv"] == ["--token", REDACTED] and doc["line"] == f"boto said {REDACTED}"


def test_console_logging_is_key_value() -> None:
    configure_logging(json=False)
    buf = io.StringIO()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buf))
    get_logger(stage="upload").info("done", bytes=3)
    assert "stage=upload" in buf.getvalue() and "bytes=3" in buf.getvalue()
    configure_logging(json=True)


def test_stdlib_log_records_are_masked_too() -> None:
    """Kopf, botocore and huggingface_hub log through the stdlib: their lines are masked like structlog's."""
    import io
    import logging as stdlog

    from llmengine.logging import MaskSecrets

    secret = "s3cr3t-" + "x" * 20
    register_secret(secret)
    out = io.StringIO()
    handler = stdlog.StreamHandler(out)
    handler.addFilter(MaskSecrets())
    log = stdlog.getLogger("test.kopf.objects")
    log.addHandler(handler)
    try:
        log.warning("reconcile failed: key %s rejected", secret)
    finally:
        log.removeHandler(handler)
    assert out.getvalue() == "reconcile failed: key [redacted] rejected\n"


def test_calibration_dataset_is_fetched_as_a_pinned_dataset_repo_and_checked(tmp_path: Path) -> None:
    from llmengine.builder.fetch import fetch_calibration
    from llmengine.dev.seed import calibration_jsonl

    calls: list[dict[str, Any]] = []

    def download(**kw: Any) -> None:
        calls.append(kw)
        Path(kw["local_dir"], "train.jsonl").write_bytes(calibration_jsonl(4))

    cal = {"hugging_face_repo": "org/text", "revision": "abc"}
    got = fetch_calibration(request(calibration=cal), tmp_path / "cal", hf_download=download)
    assert got is not None and got.path == tmp_path / "cal" and got.bytes > 0
    assert calls[0]["repo_id"] == "org/text" and calls[0]["revision"] == "abc"
    assert calls[0]["repo_type"] == "dataset"
    assert fetch_calibration(request(), tmp_path / "none", hf_download=download) is None


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ({"README.md": b"no data"}, "no data files"),
        ({"dataset_infos.json": b"{}"}, "no data files"),
        ({"train.jsonl": b'{"article": "x"}\n'}, 'no "text" column'),
        ({"train.jsonl": b"not json\n"}, "not JSON"),
        ({"data/train.csv": b"article,highlights\nx,y\n"}, 'no "text" column'),
        ({"validation.jsonl": b'{"text": "x"}\n'}, "no train split"),
        # A multi-configuration dataset (as abisee/cnn_dailymail): upstream loads it without a configuration name.
        (
            {
                "README.md": b"---\nconfigs:\n- config_name: 1.0.0\n- config_name: 3.0.0\n---\n",
                "3.0.0/train.jsonl": b'{"text": "x"}\n',
            },
            "several configurations",
        ),
    ],
)
def test_a_calibration_dataset_upstream_cannot_read_is_refused(
    tmp_path: Path, files: dict[str, bytes], why: str
) -> None:
    from llmengine.builder.fetch import check_calibration_dir

    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with pytest.raises(BuildFailure) as exc:
        check_calibration_dir(tmp_path)
    assert exc.value.permanent and exc.value.stage == "fetch" and why in exc.value.message


@pytest.mark.parametrize(
    "files",
    [
        {"train.jsonl": b'{"text": "a"}\n'},
        {"data.jsonl": b'{"text": "a"}\n'},  # no split in the name: all of it is the train split
        {"train.txt": b"one line per sample\n"},
        {"train.csv": b"text,source\na,b\n"},
        {"train.json": b'[{"text": "a"}]', "dataset_infos.json": b"{}"},
    ],
)
def test_calibration_datasets_upstream_reads_are_accepted(tmp_path: Path, files: dict[str, bytes]) -> None:
    from llmengine.builder.fetch import check_calibration_dir

    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    check_calibration_dir(tmp_path)


def test_a_pre_quantized_checkpoint_is_refused_for_an_engine_build(tmp_path: Path) -> None:
    from llmengine.builder.fetch import check_checkpoint

    model = checkpoint(tmp_path)
    check_checkpoint(request(), model)
    (model / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "FP8"}}')
    with pytest.raises(BuildFailure) as exc:
        check_checkpoint(request(), model)
    assert (
        exc.value.permanent and exc.value.reason == "CheckpointPreQuantized" and "backend: pytorch" in exc.value.message
    )
    check_checkpoint(request(backend="pytorch"), model)  # served as it is
