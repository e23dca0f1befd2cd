"""`llmengine serve-engine [download|preflight|run|all]`: fetch, verify and serve a committed engine.

- download: (init container) fetch the engine into --engine-dir and verify every file against the manifest; with
  --cache-dir, link a verified copy from the node's engine cache instead, fetching it into the cache first when the
  node has none (server/cache.py).
- preflight: check the GPUs (count, SM, free memory, MIG) against the downloaded manifest; print a JSON report.
- run: preflight, then serve: trtllm-serve on loopback behind the metering proxy (server/meter.py), which owns the
  public port and exits with trtllm-serve's exit code; with --no-meter (env LLMENGINE_METER=false), exec trtllm-serve.
- all (default): download, then run.

Every failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import Manifest, StoreLocation
from llmengine.clients.store import MANIFEST_NAME, EngineStore, StoreError, load_grant, store_for
from llmengine.logging import configure_logging, get_logger
from llmengine.server.cache import DEFAULT_LEASE_GRACE_S, CacheSettings, EngineCache, GiB, hold_lease
from llmengine.server.meter import LOOPBACK, Child, MeterError, run_meter, spawn_child, upstream_port_for
from llmengine.server.preflight import DEFAULT_MARGIN_BYTES, Expectation, run_preflight
from llmengine.server.serve import (
    RuntimeKnobs,
    ServeConfigError,
    default_tokenizer,
    extra_options,
    min_free_bytes,
    options_yaml,
    resolve_knobs,
    serve_argv,
)

STEPS = ("download", "preflight", "run", "all")


class ServeError(Exception):
    """A one-line reason not to serve."""


@dataclass
class Seams:
    store_factory: Callable[[StoreLocation], EngineStore] = store_for
    nvml: Any = None
    execvp: Callable[[str, list[str]], Any] = os.execvp
    spawn: Callable[[list[str]], Child] = spawn_child
    # (listen host, listen port, upstream port, child) -> exit code; returns when the child exits.
    run_meter: Callable[[str, int, int, Child], int] = run_meter


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmengine serve-engine", description=__doc__.splitlines()[0])
    p.add_argument("step", nargs="?", choices=STEPS, default="all")
    p.add_argument(
        "--digest", default=_env("LLMENGINE_ENGINE_DIGEST"), help="engine digest (env LLMENGINE_ENGINE_DIGEST)"
    )
    p.add_argument("--bucket", default=_env("LLMENGINE_STORE_BUCKET"), help="store bucket (env LLMENGINE_STORE_BUCKET)")
    p.add_argument("--prefix", default=_env("LLMENGINE_STORE_PREFIX", "engines"), help="store prefix")
    p.add_argument(
        "--endpoint",
        default=_env("LLMENGINE_STORE_ENDPOINT") or _env("AWS_ENDPOINT_URL_S3"),
        help="S3 endpoint URL (default AWS; env LLMENGINE_STORE_ENDPOINT or AWS_ENDPOINT_URL_S3)",
    )
    p.add_argument("--region", default=_env("AWS_REGION", "us-east-1"))
    p.add_argument(
        "--grant",
        type=Path,
        default=_env("LLMENGINE_ENGINE_GRANT"),
        help="download through this engine grant's presigned URLs instead of store credentials (its store location "
        "replaces --bucket/--prefix/--endpoint; env LLMENGINE_ENGINE_GRANT)",
    )
    p.add_argument("--engine-dir", type=Path, default=Path(_env("LLMENGINE_ENGINE_DIR", "/engine") or "/engine"))
    p.add_argument("--parallelism", type=int, default=8, help="parallel ranged GETs while downloading")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=_env("LLMENGINE_ENGINE_CACHE_DIR"),
        help="the node's engine cache (a hostPath); unset: no cache (env LLMENGINE_ENGINE_CACHE_DIR)",
    )
    p.add_argument(
        "--cache-budget-bytes", type=int, default=200 * GiB, help="bytes the cache may hold; least recently used go"
    )
    p.add_argument(
        "--cache-verify",
        choices=("stat", "sha256"),
        default="stat",
        help="check of a cached copy: sizes and mtimes against its verification record, or a full SHA-256 re-hash",
    )
    p.add_argument(
        "--cache-lease-grace-seconds",
        type=float,
        default=DEFAULT_LEASE_GRACE_S,
        help="how long a lease that no pod links and no server locks still keeps its copy from eviction",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or HF name (default: the engine dir)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000, help="public port (the metering proxy's, else trtllm-serve's)")
    p.add_argument(
        "--no-meter",
        dest="meter",
        action="store_false",
        default=_env_flag("LLMENGINE_METER", True),
        help="exec trtllm-serve on --port without the metering proxy (env LLMENGINE_METER=false)",
    )
    p.add_argument(
        "--meter-upstream-port",
        type=int,
        default=_env("LLMENGINE_METER_UPSTREAM_PORT"),
        help="loopback port of trtllm-serve behind the proxy (default --port + 1; env LLMENGINE_METER_UPSTREAM_PORT)",
    )
    p.add_argument("--backend", choices=("tensorrt", "pytorch"), default=None, help="must match the engine's")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-num-tokens", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--max-beam-width", type=int, default=None)
    p.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=0.9)
    p.add_argument("--min-free-bytes", type=int, default=None, help="override: free memory each GPU must have")
    p.add_argument("--memory-margin-bytes", type=int, default=DEFAULT_MARGIN_BYTES)
    p.add_argument(
        "--extra-options-file",
        type=Path,
        default=Path("/tmp/llmengine/extra_llm_api_options.yaml"),
    )
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def download(args: argparse.Namespace, seams: Seams) -> Manifest:
    if not args.digest:
        raise ServeError("no engine digest: pass --digest or set LLMENGINE_ENGINE_DIGEST")
    try:
        size, fetch = engine_source(args, seams)
        if args.cache_dir is not None:
            return from_cache(args, size, fetch)
        return fetch(args.engine_dir)
    except StoreError as exc:
        raise ServeError(str(exc)) from exc


def engine_source(args: argparse.Namespace, seams: Seams) -> tuple[Callable[[], int], Callable[[Path], Manifest]]:
    """The engine's size in bytes (asked only when the node's cache must make room for it) and how to fetch and
    verify it into a directory: through the grant's presigned URLs, or from the store with credentials."""
    if args.grant is not None:
        grant = load_grant(args.grant)
        granted = seams.store_factory(grant.location)
        entry = grant.engines.get(args.digest)
        return (
            lambda: entry.manifest.total_bytes if entry is not None else 0,  # the fetch then says what is missing
            lambda dest: granted.download_granted(grant, args.digest, dest, parallelism=args.parallelism),
        )
    if not args.bucket:
        raise ServeError("no store bucket: pass --bucket or set LLMENGINE_STORE_BUCKET")
    store = seams.store_factory(
        StoreLocation(bucket=args.bucket, prefix=args.prefix, endpoint=args.endpoint, region=args.region)
    )

    def size() -> int:
        manifest = store.get_manifest(args.digest)
        return manifest.total_bytes if manifest is not None else 0  # the fetch then says it is not committed

    return size, lambda dest: store.download_engine(args.digest, dest, parallelism=args.parallelism)


def from_cache(args: argparse.Namespace, size: Callable[[], int], fetch: Callable[[Path], Manifest]) -> Manifest:
    settings = CacheSettings(args.cache_dir, args.cache_budget_bytes, args.cache_verify, args.cache_lease_grace_seconds)
    outcome = EngineCache(settings).provide(args.digest, args.engine_dir, size, fetch)
    # stdout carries the command's machine-readable result (as preflight's report): what the start cost.
    print(
        json.dumps(
            {"engineDigest": args.digest, "cacheHit": outcome.hit, "cached": outcome.cached}
            | {"fetchedBytes": outcome.fetched_bytes, "reason": outcome.reason}
        ),
        flush=True,
    )
    get_logger(engine_digest=args.digest).info(
        "engine cache hit" if outcome.hit else "engine cache miss",
        cache_hit=outcome.hit,
        cached=outcome.cached,
        fetched_bytes=outcome.fetched_bytes,
        reason=outcome.reason,
        copy=str(outcome.copy or ""),
    )
    return local_manifest(args)


def local_manifest(args: argparse.Namespace) -> Manifest:
    path = args.engine_dir / MANIFEST_NAME
    if not path.is_file():
        raise ServeError(f"no {MANIFEST_NAME} in {args.engine_dir}: run `serve-engine download` first")
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise ServeError(f"{path} is not a valid manifest") from exc
    if args.digest and manifest.engine_digest != args.digest:
        raise ServeError(f"{args.engine_dir} holds engine {manifest.engine_digest}, expected {args.digest}")
    return manifest


def preflight(args: argparse.Namespace, manifest: Manifest, seams: Seams) -> dict[str, Any]:
    need = (
        args.min_free_bytes if args.min_free_bytes is not None else min_free_bytes(manifest, args.memory_margin_bytes)
    )
    exp = Expectation(world_size=manifest.tp_size * manifest.pp_size, sm=manifest.provenance.sm, min_free_bytes=need)
    doc, problems = run_preflight(exp, seams.nvml)
    print(json.dumps(doc), flush=True)
    if problems:
        raise ServeError("; ".join(problems))
    return doc


def exec_server(args: argparse.Namespace, manifest: Manifest, seams: Seams) -> int:
    """Serve until trtllm-serve exits; return its exit code (never returns without the meter: exec)."""
    if manifest.provenance.test_build:
        raise ServeError(
            f"engine {manifest.engine_digest} is a TEST BUILD (not TensorRT-LLM output): trtllm-serve cannot load it"
        )
    if args.backend is not None and args.backend != manifest.backend:
        raise ServeError(
            f"--backend {args.backend} but engine {manifest.engine_digest} is a {manifest.backend} artifact"
        )
    knobs = RuntimeKnobs(
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        max_seq_len=args.max_seq_len,
        max_beam_width=args.max_beam_width,
        kv_cache_free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction,
    )
    try:
        resolved = resolve_knobs(manifest, knobs)
    except ServeConfigError as exc:
        raise ServeError(str(exc)) from exc
    options = extra_options(manifest.backend)
    options_file: Path | None = None
    if options:
        args.extra_options_file.parent.mkdir(parents=True, exist_ok=True)
        args.extra_options_file.write_text(options_yaml(options))
        options_file = args.extra_options_file
    log = get_logger(engine_digest=manifest.engine_digest)
    tokenizer = args.tokenizer or default_tokenizer(args.engine_dir)
    if not args.meter:
        argv = serve_argv(manifest, args.engine_dir, tokenizer, resolved, options_file, host=args.host, port=args.port)
        log.info("exec trtllm-serve", argv=argv)
        sys.stdout.flush()
        sys.stderr.flush()
        seams.execvp(argv[0], argv)
        return 0
    upstream = args.meter_upstream_port or upstream_port_for(args.port)
    if upstream == args.port:
        raise ServeError(f"--meter-upstream-port {upstream} is the public --port: pick another")
    argv = serve_argv(manifest, args.engine_dir, tokenizer, resolved, options_file, host=LOOPBACK, port=upstream)
    log.info("start trtllm-serve behind the metering proxy", argv=argv, port=args.port, upstream_port=upstream)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        child = seams.spawn(argv)
    except OSError as exc:
        raise ServeError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
    try:
        return seams.run_meter(args.host, args.port, upstream, child)
    except MeterError as exc:
        raise ServeError(str(exc)) from exc


def run_step(args: argparse.Namespace, seams: Seams) -> int:
    if args.step in ("download", "all"):
        download(args, seams)
        if args.step == "download":
            return 0
    manifest = local_manifest(args)
    preflight(args, manifest, seams)
    if args.step in ("run", "all"):
        hold_lease(args.engine_dir)  # a cached copy the server loads is not evicted while it runs
        return exec_server(args, manifest, seams)
    return 0


def main(argv: list[str] | None = None, seams: Seams | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(json=args.log_format == "json", level=args.log_level)
    log = get_logger(component="server", engine_digest=args.digest, step=args.step)
    try:
        return run_step(args, seams or Seams())
    except ServeError as exc:
        log.error("refusing to serve", error=str(exc))
        print(f"serve-engine: {exc}", file=sys.stderr)
        return 1
