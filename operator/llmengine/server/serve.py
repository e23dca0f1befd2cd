"""The trtllm-serve command line for a verified engine, built as a pure function of the manifest and knobs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmengine.api.artifacts import Manifest

TOKENIZER_SUBDIR = "tokenizer"


def extra_options(backend: str) -> dict[str, object]:
    """The extra LLM API options trtllm-serve gets (keys of the backend's LlmArgs; an unknown key stops it).

    return_perf_metrics exposes Prometheus metrics at /prometheus/metrics, but with the tensorrt backend it makes
    the 1.2 line's server fail at start-up (TrtLlmArgs has no perf_metrics_max_requests: NVIDIA/TensorRT-LLM
    issue #9678, fixed on main after 1.2), so tensorrt engines get no options file; the metering proxy still
    counts every request.
    """
    return {"return_perf_metrics": True} if backend == "pytorch" else {}


def options_yaml(options: dict[str, object]) -> str:
    return "".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in sorted(options.items()))


def default_tokenizer(engine_dir: Path) -> Path:
    """The engine's tokenizer directory (tokenizer files plus the model's Hugging Face config.json, which the
    server reads), or the engine dir itself for engines built before it existed."""
    sub = engine_dir / TOKENIZER_SUBDIR
    return sub if (sub / "config.json").is_file() else engine_dir


class ServeConfigError(Exception):
    """A runtime knob the engine cannot honour; the message is one line naming the flag."""


@dataclass(frozen=True)
class RuntimeKnobs:
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_seq_len: int | None = None
    max_beam_width: int | None = None
    kv_cache_free_gpu_memory_fraction: float = 0.9


@dataclass(frozen=True)
class ResolvedKnobs:
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    max_beam_width: int
    kv_cache_free_gpu_memory_fraction: float


def resolve_knobs(manifest: Manifest, knobs: RuntimeKnobs) -> ResolvedKnobs:
    """Unset knobs take the built shapes. A TensorRT engine cannot exceed what it was built for."""
    built = manifest.shapes
    out = ResolvedKnobs(
        max_batch_size=knobs.max_batch_size or built.max_batch_size,
        max_num_tokens=knobs.max_num_tokens or built.max_num_tokens,
        max_seq_len=knobs.max_seq_len or built.max_seq_len,
        max_beam_width=knobs.max_beam_width or built.max_beam_width,
        kv_cache_free_gpu_memory_fraction=knobs.kv_cache_free_gpu_memory_fraction,
    )
    if not 0.0 < out.kv_cache_free_gpu_memory_fraction < 1.0:
        raise ServeConfigError(
            f"--kv-cache-free-gpu-memory-fraction {out.kv_cache_free_gpu_memory_fraction} must be between 0 and 1"
        )
    if manifest.backend == "tensorrt":
        for name in ("max_batch_size", "max_num_tokens", "max_seq_len", "max_beam_width"):
            want, have = getattr(out, name), getattr(built, name)
            if want > have:
                flag = "--" + name.replace("_", "-")
                raise ServeConfigError(
                    f"{flag} {want} exceeds the engine's built {name} {have}: lower it or rebuild the engine"
                )
    return out


def serve_argv(
    manifest: Manifest,
    model_dir: Path,
    tokenizer: Path | str,
    knobs: ResolvedKnobs,
    extra_options: Path | None,
    host: str = "0.0.0.0",
    port: int = 8000,
) -> list[str]:
    """argv to exec or spawn behind the meter (host 127.0.0.1 then): the engine dir with --backend tensorrt, or
    the HF checkpoint dir with pytorch."""
    argv = [
        "trtllm-serve",
        str(model_dir),
        "--backend",
        manifest.backend,
        "--tokenizer",
        str(tokenizer),
        "--host",
        host,
        "--port",
        str(port),
        "--max_batch_size",
        str(knobs.max_batch_size),
        "--max_num_tokens",
        str(knobs.max_num_tokens),
        "--max_seq_len",
        str(knobs.max_seq_len),
        "--max_beam_width",
        str(knobs.max_beam_width),
        "--kv_cache_free_gpu_memory_fraction",
        str(knobs.kv_cache_free_gpu_memory_fraction),
        "--tp_size",
        str(manifest.tp_size),
        "--pp_size",
        str(manifest.pp_size),
    ]
    if extra_options is not None:
        argv += ["--extra_llm_api_options", str(extra_options)]
    return argv


def min_free_bytes(manifest: Manifest, margin: int) -> int:
    """Free memory each GPU needs before loading: its share of the weights (largest rank file) plus a margin."""
    ranks = [f.size for f in manifest.files if f.path.startswith("rank") and f.path.endswith(".engine")]
    if ranks:
        share = max(ranks)
    else:
        weights = sum(f.size for f in manifest.files if f.path.endswith(".safetensors"))
        share = -(-weights // (manifest.tp_size * manifest.pp_size))
    return share + margin
