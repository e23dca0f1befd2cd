"""The real compiler's route through TensorRT-LLM's Python API, run against a FAKE tensorrt_llm (tests/fakes).

The builder's TensorRTLLMCompiler starts `python -m llmengine.builder.trtllm_driver` as it does in the image; the
fake package stands in for tensorrt_llm and refuses any keyword or key the upstream tables do not list, so these
tests check the driver's calls against upstream's signatures. The engine it saves then goes through the same
verification as a real one. Nothing here is TensorRT-LLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from llmengine.api.artifacts import BuildRequest
from llmengine.builder.compiler import BuildFailure
from llmengine.builder.trtllm import TensorRTLLMCompiler
from llmengine.builder.verify import verify_engine
from llmengine.dev import seed

FAKES = Path(__file__).resolve().parents[1] / "fakes"


class Lines:
    """A log that keeps what the tool printed (independent of structlog's global configuration)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(event)

    warning = info


LOG = Lines()


def _checkpoint(tmp: Path) -> Path:
    d = tmp / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (d / "tokenizer.json").write_text("{}")
    return d


def _compile(
    tmp: Path, req: BuildRequest, calibration: Path | None = None, **extra_env: str
) -> tuple[Path, list[dict[str, Any]]]:
    calls = tmp / "calls.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(FAKES), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env["FAKE_TRTLLM_CALLS"] = str(calls)
    env.update(extra_env)
    compiler = TensorRTLLMCompiler(version=lambda: "1.2.1", gpu_count=lambda: 1, env=env)
    out = tmp / "work" / "engine"
    compiler.compile(req, _checkpoint(tmp), out, LOG, calibration_dir=calibration)
    return out, [json.loads(line) for line in calls.read_text().splitlines()]


def test_an_unquantized_engine_loads_each_rank_from_the_checkpoint_and_builds_it_as_requested(tmp_path: Path) -> None:
    req = seed.build_request(compiler="tensorrt-llm", tp=2)
    engine, calls = _compile(tmp_path, req)
    names = [c["call"] for c in calls]
    assert names == ["BuildConfig.from_dict"] + ["from_hugging_face", "build", "Engine.save"] * 2
    loads = [c for c in calls if c["call"] == "from_hugging_face"]
    assert [c["rank"] for c in loads] == [0, 1] and all(c["offline"] == "1" for c in loads)
    assert loads[0]["kwargs"] == {"dtype": "float16", "load_model_on_cpu": True}
    # Every BuildConfig and PluginConfig setting is handed over explicitly, none left to a default.
    given = calls[0]
    assert set(given["plugin_keys"]) == set(req.engine.build_config.plugin_config.model_dump())  # type: ignore[union-attr]
    assert verify_engine(req, engine)
    assert (engine / "tokenizer.json").exists()


def test_a_calibrating_engine_quantizes_once_with_the_local_dataset_then_builds_each_rank(tmp_path: Path) -> None:
    req = seed.build_request(compiler="tensorrt-llm", quantization="fp8", kv_cache_dtype="fp8", tp=2)
    data = tmp_path / "calibration"
    data.mkdir()
    (data / "train.jsonl").write_bytes(seed.calibration_jsonl(4))
    engine, calls = _compile(tmp_path, req, data)
    (quantize,) = [c for c in calls if c["call"] == "quantize"]
    assert quantize["kwargs"]["calib_dataset"] == str(data) and quantize["offline"] == "1"
    assert quantize["kwargs"]["calib_batches"] == 16 and quantize["kwargs"]["calib_max_seq_length"] == 64
    assert [c["kwargs"]["rank"] for c in calls if c["call"] == "from_checkpoint"] == [0, 1]
    assert verify_engine(req, engine)


def test_a_calibrating_request_without_its_data_fails_before_the_driver_runs(tmp_path: Path) -> None:
    req = seed.build_request(compiler="tensorrt-llm", quantization="fp8")
    with pytest.raises(BuildFailure) as exc:
        _compile(tmp_path, req, None)
    assert exc.value.reason == "CalibrationMissing"


def test_an_option_upstream_does_not_define_fails_the_build_with_upstreams_complaint(tmp_path: Path) -> None:
    """The fake refuses keys outside the upstream tables, as the real BuildConfig/PluginConfig would ignore them
    (an engine built with defaults) or refuse them: a drifted EngineConfig cannot pass silently."""
    req = seed.build_request(compiler="tensorrt-llm")
    bad = req.engine.model_copy(
        update={"quantization": req.engine.quantization.model_copy(update={"quant_algo": "INT3"})}
    )
    with pytest.raises(BuildFailure) as exc:
        _compile(tmp_path, req.model_copy(update={"engine": bad}))
    assert exc.value.reason == "CompileFailed" and "INT3" in exc.value.message


def test_an_engine_upstream_built_differently_fails_verification_naming_the_setting(tmp_path: Path) -> None:
    """Should upstream's build() change a setting we did not expect (a rule we do not model), the engine it saves
    does not pass: the build fails before upload, naming both values."""
    req = seed.build_request(compiler="tensorrt-llm")
    engine, _ = _compile(tmp_path, req, FAKE_TRTLLM_DRIFT="use_paged_context_fmha=false")
    with pytest.raises(BuildFailure) as exc:
        verify_engine(req, engine)
    assert "build_config.plugin_config.use_paged_context_fmha: engine has False, request asks True" in exc.value.message
