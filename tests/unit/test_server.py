"""serve-engine without GPUs: NVML preflight against a fake NVML module, runtime knobs, the exec argv.

The fake stands in for pynvml; nothing here claims anything about a real GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llmengine.api.artifacts import Manifest
from llmengine.server import main as server_main
from llmengine.server.gpus import cuda_version_string, probe
from llmengine.server.preflight import Expectation, check
from llmengine.server.preflight import main as preflight_main
from llmengine.server.serve import RuntimeKnobs, ServeConfigError, min_free_bytes, resolve_knobs

GiB = 1024**3


class FakeNVMLError(Exception):
    pass


class FakeGPU:
    def __init__(
        self,
        name: str = "NVIDIA H100 80GB HBM3",
        cc: tuple[int, int] = (9, 0),
        total: int = 80 * GiB,
        free: int = 79 * GiB,
        mig: int | None = 0,
        slices: list[tuple[str, int]] | None = None,
        uuid: str = "GPU-1111",
    ) -> None:
        self.name, self.cc, self.total, self.free, self.mig, self.uuid = name, cc, total, free, mig, uuid
        self.slices = [
            SimpleNamespace(name=f"{name} MIG {p}", total=m, free=m - GiB, uuid=f"MIG-{uuid}-{i}")
            for i, (p, m) in enumerate(slices or [])
        ]


class FakeNVML:
    """Just enough of pynvml's surface for gpus.probe."""

    NVMLError = FakeNVMLError
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, gpus: list[FakeGPU], driver: str = "580.159.04", cuda: int = 13000, init_fails: bool = False):
        self.gpus, self.driver, self.cuda, self.init_fails = gpus, driver, cuda, init_fails
        self.shutdown = False

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Any:
        return self.gpus[i]

    def nvmlDeviceGetName(self, h: Any) -> Any:
        return h.name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        return str(h.uuid)

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        return SimpleNamespace(total=h.total, free=h.free, used=h.total - h.free)

    def nvmlDeviceGetCudaComputeCapability(self, h: Any) -> tuple[int, int]:
        return tuple(h.cc)

    def nvmlDeviceGetMigMode(self, h: Any) -> tuple[int, int]:
        if h.mig is None:
            raise FakeNVMLError("Not Supported")
        return h.mig, h.mig

    def nvmlDeviceGetMaxMigDeviceCount(self, h: Any) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: Any, j: int) -> Any:
        if j >= len(h.slices):
            raise FakeNVMLError("Not Found")
        return h.slices[j]


def test_probe_reports_full_gpus() -> None:
    nvml = FakeNVML([FakeGPU(), FakeGPU(uuid="GPU-2222", free=40 * GiB)])
    r = probe(nvml, use_env=False)
    assert r.error is None and r.driver_version == "580.159.04" and r.cuda_driver_version == "13.0"
    assert [(d.uuid, d.compute_capability, d.mig_mode, d.memory_free_bytes) for d in r.devices] == [
        ("GPU-1111", "9.0", "disabled", 79 * GiB),
        ("GPU-2222", "9.0", "disabled", 40 * GiB),
    ]
    assert r.devices[0].name == "NVIDIA H100 80GB HBM3" and nvml.shutdown


def test_probe_reports_mig_slices_with_profile_and_parent_sm() -> None:
    gpu = FakeGPU(mig=1, slices=[("1g.10gb", int(9.75 * GiB)), ("3g.40gb", int(39.5 * GiB))])
    r = probe(FakeNVML([gpu]), use_env=False)
    assert [(d.mig_profile, d.compute_capability, d.mig_device, d.parent_uuid) for d in r.devices] == [
        ("1g.10gb", "9.0", True, "GPU-1111"),
        ("3g.40gb", "9.0", True, "GPU-1111"),
    ]
    assert r.devices[1].uuid == "MIG-GPU-1111-1"


def test_probe_honours_cuda_visible_devices() -> None:
    nvml = FakeNVML([FakeGPU(uuid="GPU-a"), FakeGPU(uuid="GPU-b")])
    assert [d.uuid for d in probe(nvml, visible="1").devices] == ["GPU-b"]
    assert [d.uuid for d in probe(nvml, visible="GPU-b,GPU-a").devices] == ["GPU-b", "GPU-a"]
    assert probe(nvml, visible="").devices == []


def test_probe_never_raises_without_a_driver() -> None:
    r = probe(FakeNVML([], init_fails=True), use_env=False)
    assert r.error is not None and "Driver Not Loaded" in r.error
    assert check(r, Expectation(1)) == [
        "NVML unavailable: FakeNVMLError: Driver Not Loaded: no usable GPU in this container (request nvidia.com/gpu)"
    ]


def test_cuda_version_string() -> None:
    assert cuda_version_string(12080) == "12.8" and cuda_version_string(13000) == "13.0"


@pytest.mark.parametrize(
    ("gpus", "exp", "problems"),
    [
        ([FakeGPU()], Expectation(1, "9.0", 10 * GiB), []),
        (
            [FakeGPU()],
            Expectation(2, "9.0", 0),
            ["the engine needs 2 GPUs (tp x pp) but 1 are visible: give the pod 2 GPUs"],
        ),
        (
            [FakeGPU(name="NVIDIA A100-SXM4-80GB", cc=(8, 0))],
            Expectation(1, "9.0", 0),
            [
                "GPU 0 (NVIDIA A100-SXM4-80GB) is SM 8.0 but the engine was built for SM 9.0: "
                "schedule on the engine's GPU class or rebuild"
            ],
        ),
        (
            [FakeGPU(free=5 * GiB)],
            Expectation(1, "9.0", 18 * GiB),
            ["GPU 0 (NVIDIA H100 80GB HBM3) has 5.0 GiB free, needs at least 18.0 GiB (engine rank + margin)"],
        ),
        (
            [FakeGPU(mig=1, slices=[("3g.40gb", 40 * GiB), ("3g.40gb", 40 * GiB)])],
            Expectation(2, "9.0", 0),
            ["tensor/pipeline parallelism across MIG slices is not supported: serve on full GPUs"],
        ),
        (
            [FakeGPU(mig=1, slices=[("1g.10gb", 10 * GiB)])],
            Expectation(1, "9.0", 12 * GiB),
            [
                "GPU 0 (NVIDIA H100 80GB HBM3 MIG 1g.10gb) has 9.0 GiB free, needs at least 12.0 GiB "
                "(engine rank + margin)"
            ],
        ),
    ],
)
def test_preflight_checks(gpus: list[FakeGPU], exp: Expectation, problems: list[str]) -> None:
    assert check(probe(FakeNVML(gpus), use_env=False), exp) == problems


def test_preflight_module_prints_a_json_report(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    rc = preflight_main(
        ["--expect-sm", "9.0", "--world-size", "1", "--min-free-bytes", str(GiB)], FakeNVML([FakeGPU()])
    )
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert rc == 0 and doc["ok"] and doc["problems"] == [] and doc["expect"]["sm"] == "9.0"
    dev = doc["devices"][0]
    assert dev["name"] == "NVIDIA H100 80GB HBM3" and dev["memory_total_bytes"] == 80 * GiB
    assert dev["compute_capability"] == "9.0" and dev["mig_mode"] == "disabled" and dev["uuid"] == "GPU-1111"
    assert doc["driver_version"] == "580.159.04" and doc["cuda_driver_version"] == "13.0"
    rc = preflight_main(["--expect-sm", "10.0"], FakeNVML([FakeGPU()]))
    assert rc == 1 and "preflight: GPU 0" in capsys.readouterr().err


# -- runtime knobs and exec ----------------------------------------------------------------------------------------


def manifest(backend: str = "tensorrt", test_build: bool = False, tp: int = 2) -> Manifest:
    return Manifest.model_validate(
        {
            "engineDigest": "abc",
            "backend": backend,
            "tpSize": tp,
            "ppSize": 1,
            "shapes": {"maxBatchSize": 64, "maxInputLen": 1024, "maxSeqLen": 4096, "maxNumTokens": 8192},
            "files": [
                {"path": "config.json", "sha256": "0" * 64, "size": 10},
                {"path": "rank0.engine", "sha256": "1" * 64, "size": 8 * GiB},
                {"path": "rank1.engine", "sha256": "2" * 64, "size": 8 * GiB + 5},
            ],
            "provenance": {
                "builderImage": "i",
                "trtllmVersion": "1.2.1",
                "compiler": "test" if test_build else "tensorrt-llm",
                "gpuClass": "H100-80GB",
                "sm": "9.0",
                "buildTime": "t",
                "buildSeconds": 1.0,
                "testBuild": test_build,
            },
        }
    )


def test_knobs_default_to_built_shapes_and_cannot_exceed_them() -> None:
    k = resolve_knobs(manifest(), RuntimeKnobs(max_batch_size=32))
    assert (k.max_batch_size, k.max_num_tokens, k.max_seq_len, k.max_beam_width) == (32, 8192, 4096, 1)
    with pytest.raises(ServeConfigError, match="--max-seq-len 8192 exceeds the engine's built max_seq_len 4096"):
        resolve_knobs(manifest(), RuntimeKnobs(max_seq_len=8192))
    assert resolve_knobs(manifest("pytorch"), RuntimeKnobs(max_seq_len=8192)).max_seq_len == 8192
    with pytest.raises(ServeConfigError, match="between 0 and 1"):
        resolve_knobs(manifest(), RuntimeKnobs(kv_cache_free_gpu_memory_fraction=1.5))


def test_min_free_bytes_is_largest_rank_plus_margin() -> None:
    assert min_free_bytes(manifest(), GiB) == 9 * GiB + 5


def _write_local(engine: Path, m: Manifest) -> None:
    engine.mkdir(parents=True, exist_ok=True)
    (engine / "manifest.json").write_text(m.to_json())


def test_run_preflights_then_starts_trtllm_serve_behind_the_meter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_local(tmp_path / "engine", manifest())
    execs: list[tuple[str, list[str]]] = []
    child = SimpleNamespace(pid=1)
    meters: list[tuple[str, int, int, Any]] = []
    seams = server_main.Seams(
        nvml=FakeNVML([FakeGPU(), FakeGPU(uuid="GPU-2")]),
        execvp=lambda f, a: execs.append((f, a)),
        spawn=lambda a: execs.append((a[0], a)) or child,
        run_meter=lambda h, p, u, c: meters.append((h, p, u, c)) or 7,
    )
    extra = tmp_path / "extra.yaml"
    rc = server_main.main(
        [
            "run",
            "--engine-dir",
            str(tmp_path / "engine"),
            "--digest",
            "abc",
            "--port",
            "9000",
            "--max-batch-size",
            "16",
            "--extra-options-file",
            str(extra),
            "--memory-margin-bytes",
            str(GiB),
        ],
        seams,
    )
    # The meter owns the public port; trtllm-serve binds loopback on the next one; its exit code is ours.
    assert rc == 7 and meters == [("0.0.0.0", 9000, 9001, child)]
    ((prog, argv),) = execs
    assert prog == "trtllm-serve" and argv[1] == str(tmp_path / "engine")
    assert argv[argv.index("--backend") + 1] == "tensorrt" and argv[argv.index("--tp_size") + 1] == "2"
    assert argv[argv.index("--max_batch_size") + 1] == "16" and argv[argv.index("--port") + 1] == "9001"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--tokenizer") + 1] == str(tmp_path / "engine")
    # A tensorrt engine gets no extra options: return_perf_metrics stops the 1.2 server (upstream issue #9678).
    assert "--extra_llm_api_options" not in argv and not extra.exists()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert report["ok"] and report["expect"]["min_free_bytes"] == 9 * GiB + 5


@pytest.mark.parametrize(
    ("m", "gpus", "extra_args", "needle"),
    [
        (manifest(), [FakeGPU()], [], "the engine needs 2 GPUs"),
        (manifest(test_build=True), [FakeGPU(), FakeGPU()], [], "TEST BUILD"),
        (manifest(), [FakeGPU(), FakeGPU()], ["--max-num-tokens", "99999"], "--max-num-tokens 99999 exceeds"),
        (manifest(), [FakeGPU(), FakeGPU()], ["--backend", "pytorch"], "--backend pytorch but engine abc"),
        (manifest(), [FakeGPU(), FakeGPU()], ["--digest", "other"], "holds engine abc, expected other"),
    ],
)
def test_run_refuses_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    m: Manifest,
    gpus: list[FakeGPU],
    extra_args: list[str],
    needle: str,
) -> None:
    _write_local(tmp_path / "engine", m)
    execs: list[Any] = []
    seams = server_main.Seams(nvml=FakeNVML(gpus), execvp=lambda f, a: execs.append(a))
    args = ["run", "--engine-dir", str(tmp_path / "engine"), "--extra-options-file", str(tmp_path / "x.yaml")]
    rc = server_main.main(args + extra_args, seams)
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("serve-engine:")]
    assert rc == 1 and execs == []
    assert len(err_lines) == 1 and needle in err_lines[0]


def test_run_without_download_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = server_main.main(["preflight", "--engine-dir", str(tmp_path)], server_main.Seams(nvml=FakeNVML([FakeGPU()])))
    assert rc == 1 and "run `serve-engine download` first" in capsys.readouterr().err


def test_download_needs_digest_and_bucket(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    for var in ("LLMENGINE_ENGINE_DIGEST", "LLMENGINE_STORE_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    rc = server_main.main(["download", "--engine-dir", str(tmp_path)])
    assert rc == 1 and "no engine digest" in capsys.readouterr().err


def test_extra_options_and_tokenizer_dir_follow_what_the_server_reads(tmp_path: Path) -> None:
    from llmengine.plan.upstream import table
    from llmengine.server.serve import default_tokenizer, extra_options, options_yaml

    assert extra_options("tensorrt") == {}
    opts = extra_options("pytorch")
    assert options_yaml(opts) == "return_perf_metrics: true\n"
    # Every key is one the server's LlmArgs define; none is refused with the backend it is written for.
    t = table("extra_llm_api_options")
    for key in opts:
        o = t.option(key)
        assert o is not None and "tensorrt-only" not in o.scope
    engine = tmp_path / "engine"
    engine.mkdir()
    assert default_tokenizer(engine) == engine
    (engine / "tokenizer").mkdir()
    (engine / "tokenizer" / "config.json").write_text("{}")
    assert default_tokenizer(engine) == engine / "tokenizer"
