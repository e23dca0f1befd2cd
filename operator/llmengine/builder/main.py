"""`llmengine build-engine`: build one engine from a BuildRequest and commit it to the store.

Stages: fetch -> compile -> verify -> upload. Each logs one structured line when it ends (stage, bytes, seconds,
rate). The outcome is a BuildResult written to the container's termination message (and stdout) and next to the
engine in the store. Exit 0 on success or when the engine is already committed, 1 on failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import (
    RESULT_LIMIT,
    BuildProgress,
    BuildRequest,
    BuildResult,
    Provenance,
    StoreLocation,
)
from llmengine.builder import shell
from llmengine.builder.compiler import BuildFailure, Compiler, check_request
from llmengine.builder.fetch import (
    HfDownload,
    StoreFactory,
    default_store_factory,
    fetch_calibration,
    fetch_model,
)
from llmengine.builder.verify import verify_engine
from llmengine.clients.store import EngineStore, IntegrityError, ManifestInvalid, StoreError, new_build_id
from llmengine.clients.store.errors import SETTING_PART_CHECKSUM
from llmengine.clock import iso, utcnow
from llmengine.logging import get_logger

MiB = 1024 * 1024


def default_compilers() -> dict[str, Compiler]:
    from llmengine.builder.testcompiler import TestCompiler
    from llmengine.builder.trtllm import TensorRTLLMCompiler

    return {"tensorrt-llm": TensorRTLLMCompiler(), "test": TestCompiler()}


@dataclass
class Seams:
    """What tests replace: the store, the compilers, the Hugging Face download and the GPU description."""

    store_factory: StoreFactory = default_store_factory
    compilers: Callable[[], dict[str, Compiler]] = default_compilers
    hf_download: HfDownload | None = None
    gpu_info: Callable[[], tuple[str | None, str | None]] | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def gpu_name_and_driver() -> tuple[str | None, str | None]:
    """The first GPU's name and the driver version, when NVML can tell (None, None on a machine without one)."""
    from llmengine.server.gpus import probe

    report = probe()
    if report.error or not report.devices:
        return None, report.driver_version
    return report.devices[0].name, report.driver_version


def load_request(path: Path) -> BuildRequest:
    return shell.load_request(path, BuildRequest, "build request")


def _stage_done(log: Any, stage: str, start: float, nbytes: int | None = None, **extra: Any) -> None:
    seconds = time.monotonic() - start
    fields: dict[str, Any] = {"stage": stage, "seconds": round(seconds, 3), **extra}
    if nbytes is not None:
        fields["bytes"] = nbytes
        fields["rate_mib_s"] = round(nbytes / MiB / seconds, 1) if seconds > 0 else None
    log.info("stage finished", **fields)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def build(request: BuildRequest, work_dir: Path, seams: Seams, log: Any) -> BuildResult:
    """Run the pipeline for a valid request; raises BuildFailure on a failed stage."""
    started_at = utcnow()
    t0 = time.monotonic()
    check_request(request)
    compilers = seams.compilers()
    compiler = compilers.get(request.compiler)
    if compiler is None:
        raise BuildFailure("validate", "InvalidRequest", f"compiler {request.compiler!r} is unknown", permanent=True)

    store = _store(seams, request.store)
    try:
        if store.get_manifest(request.engine_digest) is not None:
            log.info("engine already committed; nothing to do", uri=store.uri(request.engine_digest))
            return BuildResult(
                engine_digest=request.engine_digest,
                succeeded=True,
                message="already committed",
                engine_uri=store.uri(request.engine_digest),
            )
    except (ManifestInvalid, IntegrityError) as exc:
        log.warning("existing manifest is broken; rebuilding over it", error=str(exc))
    except StoreError as exc:
        raise BuildFailure("upload", "StoreUnavailable", str(exc)) from exc

    t = time.monotonic()
    _progress(store, request.engine_digest, "fetch", log)
    fetched = fetch_model(request, work_dir / "model", seams.store_factory, seams.hf_download)
    _stage_done(log.bind(stage="fetch"), "fetch", t, fetched.bytes)

    calibration = fetch_calibration(request, work_dir / "calibration", seams.store_factory, seams.hf_download)
    if calibration is not None:
        _stage_done(log.bind(stage="fetch"), "fetch-calibration", t, calibration.bytes)

    t = time.monotonic()
    _progress(store, request.engine_digest, "compile", log)
    engine_dir = work_dir / "engine"
    out = compiler.compile(
        request,
        fetched.path,
        engine_dir,
        log.bind(stage="compile", compiler=compiler.name),
        calibration_dir=calibration.path if calibration is not None else None,
    )
    _stage_done(log, "compile", t, _tree_bytes(out.engine_dir), compiler=compiler.name, test_build=out.test_build)

    t = time.monotonic()
    _progress(store, request.engine_digest, "verify", log)
    files = verify_engine(request, out.engine_dir)
    _stage_done(log, "verify", t, files=len(files))

    t = time.monotonic()
    _progress(store, request.engine_digest, "upload", log)
    gpu_name, driver = (seams.gpu_info or gpu_name_and_driver)()
    build_seconds = round(time.monotonic() - t0, 3)
    provenance = Provenance(
        builder_image=seams.env.get("LLMENGINE_BUILDER_IMAGE") or request.image,
        trtllm_version=out.trtllm_version,
        compiler=compiler.name,
        gpu_class=request.gpu_class,
        sm=request.sm,
        build_time=iso(started_at),
        build_seconds=build_seconds,
        test_build=out.test_build,
        gpu_name=gpu_name,
        driver_version=driver,
    )
    total = _tree_bytes(out.engine_dir)
    result = BuildResult(
        engine_digest=request.engine_digest,
        succeeded=True,
        message="built and committed" + (" (TEST BUILD, not TensorRT-LLM)" if out.test_build else ""),
        engine_uri=store.uri(request.engine_digest),
        total_bytes=total,
        build_seconds=build_seconds,
        test_build=out.test_build,
    )
    build_id = new_build_id()
    try:
        committed = store.upload_engine(
            request.engine_digest,
            out.engine_dir,
            backend=request.backend,
            tp_size=request.tp_size,
            pp_size=request.pp_size,
            shapes=request.shapes,
            provenance=provenance,
            result=result,
            build_id=build_id,
        )
    except StoreError as exc:
        raise BuildFailure("upload", "UploadFailed", str(exc)) from exc
    _stage_done(log, "upload", t, total)
    if committed.build_id != build_id:
        # Another build of this identity (another namespace or cluster on the bucket) committed between our first
        # look and our commit: its engine stands, ours was removed. Say so rather than "built and committed".
        winner = f"build {committed.build_id}" if committed.build_id else "an earlier build"
        return result.model_copy(update={"message": f"built, but {winner} committed this engine first; it stands"})
    return result


def _progress(store: EngineStore, digest: str, stage: str, log: Any) -> None:
    """Say where the build is (status.build.stage). Best effort: a store that refuses it fails no build."""
    since = iso(utcnow())
    try:
        store.put_progress(BuildProgress(engine_digest=digest, stage=stage, since=since))
    except Exception as exc:  # a note on where the build is: never a reason for the build to fail
        log.warning("could not record the build stage", stage=stage, error=f"{type(exc).__name__}: {exc}")


def _store(seams: Seams, location: StoreLocation) -> EngineStore:
    """The store, with its upload settings checked before any GPU time is spent on a build it could not upload."""
    try:
        store = seams.store_factory(location)
        store.check_upload_settings()
    except StoreError as exc:
        if exc.setting == SETTING_PART_CHECKSUM:
            raise BuildFailure("validate", "InvalidSettings", str(exc), permanent=True) from exc
        raise BuildFailure("upload", "StoreUnavailable", str(exc)) from exc
    return store


def failure_result(digest: str, failure: BuildFailure, seconds: float | None = None) -> BuildResult:
    return shell.failed(BuildResult, digest, failure, build_seconds=round(seconds, 3) if seconds is not None else None)


def fit_result(result: BuildResult, limit: int = RESULT_LIMIT) -> str:
    """The result as JSON under `limit` bytes, shortening the message if it must."""
    return result.fit_json(limit)


def run(request_path: Path, work_dir: Path | None, seams: Seams | None = None) -> BuildResult:
    """Load, build, and always come back with a BuildResult (never raises for a build failure)."""
    seams = seams or Seams()
    job = shell.Attempt(get_logger(component="builder"))
    request: BuildRequest | None = None

    def work() -> BuildResult:
        nonlocal request
        request = load_request(request_path)
        job.begin(
            request.engine_digest,
            "build started",
            compiler=request.compiler,
            backend=request.backend,
            model=request.model.hugging_face_repo or request.model.s3_uri,
            tp_size=request.tp_size,
            pp_size=request.pp_size,
            quantization=request.quantization,
            gpu_class=request.gpu_class,
        )
        with shell.work_dir(work_dir, "llmengine-build-") as wd:
            result = build(request, wd, seams, job.log)
        job.log.info("build succeeded", message=result.message, seconds=round(job.seconds(), 3))
        return result

    def failed(failure: BuildFailure) -> BuildResult:
        # The result of a crash carries no build time.
        seconds = None if isinstance(failure, shell.InternalError) else job.seconds()
        result = failure_result(job.digest, failure, seconds)
        if request is not None:
            _store_failure(request, result, seams, job.log)
        return result

    return job.run("build", work, failed)


def _store_failure(request: BuildRequest, result: BuildResult, seams: Seams, log: Any) -> None:
    """Best effort: leave the failed result next to where the engine would be (never a manifest)."""
    if result.stage in ("validate",) or result.reason in ("StoreUnavailable",):
        return
    try:
        seams.store_factory(request.store).put_result(request.engine_digest, result)
    except Exception as exc:
        log.warning("could not store the failed build result", error=str(exc))


def main(argv: list[str] | None = None) -> int:
    return shell.main(
        argv,
        run,
        prog="llmengine build-engine",
        description=__doc__.splitlines()[0],
        request="BuildRequest",
        result="BuildResult",
    )
