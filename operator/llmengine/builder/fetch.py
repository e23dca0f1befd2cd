"""Fetch the model checkpoint a build starts from: a Hugging Face repo, or every object under an S3 prefix."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import BuildRequest, StoreLocation
from llmengine.builder.compiler import BuildFailure, copy_tokenizer
from llmengine.clients.store import EngineStore, StoreError, store_for

# Weights in formats no converter reads; Llama repos ship a second full copy under original/.
HF_IGNORE_PATTERNS = ["original/*", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]

HfDownload = Callable[..., Any]
StoreFactory = Callable[[StoreLocation], EngineStore]


@dataclass(frozen=True)
class FetchResult:
    path: Path
    bytes: int
    seconds: float


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket")
    return bucket, prefix


def default_store_factory(location: StoreLocation) -> EngineStore:
    return store_for(location)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def fetch_s3(uri: str, store_location: StoreLocation, dest: Path, store_factory: StoreFactory) -> int:
    """Download an S3 prefix with the store's endpoint and region (same credentials from the environment)."""
    bucket, prefix = split_s3_uri(uri)
    loc = StoreLocation(bucket=bucket, prefix="", endpoint=store_location.endpoint, region=store_location.region)
    store = store_factory(loc)
    try:
        return store.download_prefix(prefix, dest)
    except StoreError as exc:
        raise BuildFailure("fetch", "FetchFailed", f"model {uri}: {exc}") from exc


def fetch_hf(
    repo_id: str,
    revision: str | None,
    dest: Path,
    hf_download: HfDownload | None = None,
    token: str | None = None,
    repo_type: str = "model",
) -> int:
    """snapshot_download into dest. The token comes from HF_TOKEN and is passed, never logged."""
    if hf_download is None:
        from huggingface_hub import snapshot_download

        hf_download = snapshot_download
    token = token if token is not None else (os.environ.get("HF_TOKEN") or None)
    kwargs: dict[str, Any] = {"repo_type": repo_type} if repo_type != "model" else {}
    try:
        hf_download(
            repo_id=repo_id,
            revision=revision,
            token=token,
            local_dir=str(dest),
            ignore_patterns=HF_IGNORE_PATTERNS,
            **kwargs,
        )
    except Exception as exc:
        raise _hf_failure(repo_id, revision, exc, repo_type) from exc
    return _tree_bytes(dest)


def _hf_failure(repo_id: str, revision: str | None, exc: Exception, repo_type: str = "model") -> BuildFailure:
    name = type(exc).__name__
    field = (
        "spec.model.source.huggingFace" if repo_type == "model" else "spec.precision.calibration.dataset.huggingFace"
    )
    if name == "GatedRepoError":
        return BuildFailure(
            "fetch", "FetchFailed", f"{repo_id} is gated: put a token with access into the HF_TOKEN secret"
        )
    if name == "RepositoryNotFoundError":
        return BuildFailure(
            "fetch",
            "ModelNotFound",
            f"Hugging Face {repo_type} repo {repo_id} does not exist or is private (set HF_TOKEN): fix {field}.repo",
            permanent=True,
        )
    if name == "RevisionNotFoundError":
        return BuildFailure(
            "fetch",
            "ModelNotFound",
            f"revision {revision} of {repo_id} does not exist: fix {field}.revision",
            permanent=True,
        )
    msg = " ".join(str(exc).split())[:300]
    return BuildFailure("fetch", "FetchFailed", f"downloading {repo_id}: {name}: {msg}")


def check_checkpoint(request: BuildRequest, model_dir: Path) -> None:
    """The tensorrt route quantizes from unquantized weights: a checkpoint that is already quantized (ModelOpt's
    hf_quant_config.json, or a quantization_config in config.json, which TensorRT-LLM's own loader would pick up)
    would be built with the request's QuantConfig instead, an engine the identity does not describe."""
    if request.backend != "tensorrt":
        return
    marker = None
    if (model_dir / "hf_quant_config.json").is_file():
        marker = "hf_quant_config.json"
    else:
        try:
            cfg = json.loads((model_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            cfg = {}
        if isinstance(cfg, dict) and cfg.get("quantization_config"):
            marker = "config.json quantization_config"
    if marker:
        raise BuildFailure(
            "fetch",
            "CheckpointPreQuantized",
            f"the checkpoint is already quantized ({marker}); engines are built from unquantized weights with "
            "spec.precision.quantization: point spec.model.source at the unquantized checkpoint, or serve this "
            "one with spec.backend: pytorch",
            permanent=True,
        )


def fetch_model(
    request: BuildRequest,
    dest: Path,
    store_factory: StoreFactory = default_store_factory,
    hf_download: HfDownload | None = None,
) -> FetchResult:
    dest.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    m = request.model
    if m.s3_uri is not None:
        n = fetch_s3(m.s3_uri, request.store, dest, store_factory)
    elif m.hugging_face_repo is not None:
        n = fetch_hf(m.hugging_face_repo, m.revision, dest, hf_download)
    else:  # check_request refuses this earlier
        raise BuildFailure("fetch", "InvalidRequest", "no model source", permanent=True)
    if m.tokenizer:
        tok = dest.parent / "tokenizer"
        tok.mkdir(parents=True, exist_ok=True)
        if m.tokenizer.startswith("s3://"):
            fetch_s3(m.tokenizer, request.store, tok, store_factory)
        else:
            fetch_hf(m.tokenizer, None, tok, hf_download)
        # The compilers take the tokenizer from the checkpoint directory; the named one wins.
        copy_tokenizer(tok, dest)
    check_checkpoint(request, dest)
    return FetchResult(path=dest, bytes=n, seconds=time.monotonic() - start)


# Files the datasets library loads from a local dataset directory; upstream's calibration reads the train split's
# "text" column from such a directory (quantize_by_modelopt.get_calib_dataloader, a local path not naming
# cnn_dailymail or scienceqa).
CALIBRATION_FORMATS = (".jsonl", ".json", ".parquet", ".csv", ".txt")
# Metadata files a dataset snapshot carries that are not data.
DATASET_METADATA = frozenset({"dataset_infos.json", "dataset_info.json", "state.json", "dataset_dict.json"})
SPLIT_WORDS = ("train", "validation", "valid", "dev", "test", "eval")


def _invalid(message: str) -> BuildFailure:
    return BuildFailure("fetch", "CalibrationInvalid", f"{message}: fix spec.precision.calibration.dataset", True)


def _columns(path: Path) -> set[str] | None:
    """The column names of a data file, where they can be read without a data library (None: unknown)."""
    if path.suffix == ".txt":
        return {"text"}  # the text loader yields one "text" row per line
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", errors="replace") as f:
            return set(next(csv.reader(f), []))
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 20).lstrip()
        if head.startswith("["):
            try:
                rows = json.loads(path.read_text(encoding="utf-8", errors="replace"))
            except json.JSONDecodeError as exc:
                raise _invalid(f"calibration file {path.name} is not JSON ({exc.msg})") from exc
            first = rows[0] if isinstance(rows, list) and rows else None
        else:
            try:
                first = json.loads(head.splitlines()[0]) if head else None
            except json.JSONDecodeError as exc:
                raise _invalid(f"calibration file {path.name}: line 1 is not JSON ({exc.msg})") from exc
        return set(first) if isinstance(first, dict) else set()
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # type: ignore[import-not-found]  # in the builder image, with datasets
        except ImportError:
            return None
        return set(pq.read_schema(path).names)
    return None


def _declares_configs(root: Path) -> bool:
    """A dataset card with several `configs:` (per-config folders): loading the directory asks for a name."""
    card = root / "README.md"
    if not card.is_file():
        return False
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    return header.count("config_name:") > 1


def check_calibration_dir(root: Path) -> None:
    """The fetched dataset is one TensorRT-LLM can calibrate on offline: `datasets.load_dataset(dir,
    split="train")` finds a train split, and its rows have a "text" string."""
    data = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in CALIBRATION_FORMATS
        and ".cache" not in p.parts
        and p.name not in DATASET_METADATA
    )
    if not data:
        raise _invalid(f"the calibration dataset has no data files ({', '.join(CALIBRATION_FORMATS)})")
    if _declares_configs(root):
        raise _invalid(
            "the calibration dataset declares several configurations (README.md configs:), and TensorRT-LLM loads the "
            'directory without a configuration name ("Config name is missing"): use a dataset of one configuration'
        )

    def where(p: Path) -> str:
        return p.relative_to(root).as_posix().lower()

    named = [p for p in data if any(w in where(p) for w in SPLIT_WORDS)]
    train = [p for p in named if "train" in where(p)] if named else data
    if not train:
        raise _invalid(
            f"the calibration dataset has no train split ({', '.join(p.name for p in data[:4])}): TensorRT-LLM "
            "calibrates on the train split"
        )
    for p in train:
        cols = _columns(p)
        if cols is not None and "text" not in cols:
            raise _invalid(
                f'calibration file {p.name} has no "text" column ({", ".join(sorted(cols)[:6]) or "no columns"}): '
                "TensorRT-LLM calibrates on the text column"
            )


def fetch_calibration(
    request: BuildRequest,
    dest: Path,
    store_factory: StoreFactory = default_store_factory,
    hf_download: HfDownload | None = None,
) -> FetchResult | None:
    """The calibration dataset into dest, checked; None when the request's quantization does not calibrate."""
    c = request.calibration
    if c is None:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if c.s3_uri is not None:
        n = fetch_s3(c.s3_uri, request.store, dest, store_factory)
    elif c.hugging_face_repo is not None:
        n = fetch_hf(c.hugging_face_repo, c.revision, dest, hf_download, repo_type="dataset")
    else:
        raise BuildFailure("fetch", "InvalidRequest", "calibration has no dataset source", permanent=True)
    check_calibration_dir(dest)
    return FetchResult(path=dest, bytes=n, seconds=time.monotonic() - start)
