"""Node-local engine cache: time from a serving pod's scheduling to its engine on disk, cold node vs warm node.

For each size, one engine (rank0.engine of that size plus config.json) is committed to a real S3 server (versitygw)
on loopback, then `llmengine serve-engine download` runs as a process, as fetch-engine does once the pod is scheduled:

- baseline: no cache (today's emptyDir download: ranged GETs, SHA-256 verification);
- cold node: --cache-dir on an empty cache (the same download into the cache, sealed, renamed, linked);
- warm node: --cache-dir on the cache the cold run filled (a second pod on that node).

It also times the two ways to check a cached copy on a hit: the stat rule (size and mtime of every file against the
record written after full verification) and a full SHA-256 re-hash, with the file in the page cache and evicted
from it (posix_fadvise DONTNEED). Sizes that do not fit the free disk (3x the size plus 2 GiB at the peak, during the
upload: the source, the parts versitygw's posix backend writes, and the object it assembles from them on completion)
are reported as skipped. Each size runs --repeat times and the tables show
medians (the machine may be shared); before each fetch the store's files are evicted from the page cache, so
that the baseline and the cold node read the store from disk alike. Prints markdown tables.

    .venv/bin/python scripts/bench_cache.py --sizes-gib 1 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llmengine.api.artifacts import StoreLocation
from llmengine.builder.testcompiler import write_pseudo_random
from llmengine.clients.store import EngineStore, S3Config, TransferTuning, make_s3_client
from llmengine.dev import proc
from llmengine.dev.s3 import S3Endpoint, start_s3
from llmengine.dev.seed import BENCH_SHAPES, bench_provenance
from llmengine.logging import configure_logging
from llmengine.server.cache import check

GiB = 1024**3
MARGIN = 2 * GiB
LLMENGINE = str(Path(sys.executable).parent / "llmengine")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def commit_engine(store: EngineStore, digest: str, size: int, scratch: Path) -> None:
    src = scratch / "src"
    src.mkdir()
    write_pseudo_random(src / "rank0.engine", size, 0)
    (src / "config.json").write_text('{"bench": true}')
    store.upload_engine(
        digest, src, backend="tensorrt", tp_size=1, pp_size=1, shapes=BENCH_SHAPES, provenance=bench_provenance()
    )
    shutil.rmtree(src)  # only the store's copy stays: the disk holds the store and one local copy at a time


def fetch_engine(ep: S3Endpoint, digest: str, dest: Path, cache: Path | None) -> tuple[float, dict[str, object]]:
    """`serve-engine download` as fetch-engine runs it: seconds from process start to exit, and its report."""
    argv = [LLMENGINE, "serve-engine", "download", "--digest", digest, "--bucket", "bench"]
    argv += ["--endpoint", ep.endpoint, "--engine-dir", str(dest), "--log-level", "WARNING"]
    if cache is not None:
        argv += ["--cache-dir", str(cache), "--cache-budget-bytes", str(1024 * GiB)]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ep.access_key, "AWS_SECRET_ACCESS_KEY": ep.secret_key}
    t = time.monotonic()
    res = subprocess.run(argv, env=env, capture_output=True, text=True)
    secs = time.monotonic() - t
    if res.returncode != 0:
        raise SystemExit(f"serve-engine download failed: {res.stderr.strip()}")
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    return secs, (json.loads(lines[-1]) if lines else {})


def evict_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def evict_store(scratch: Path) -> None:
    """Every fetch reads the store's objects from disk: none gains from the page cache an earlier fetch filled."""
    for p in (scratch / "s3").rglob("*"):
        if p.is_file() and not p.is_symlink():
            evict_from_page_cache(p)


def one_run(ep: S3Endpoint, digest: str, scratch: Path) -> dict[str, float]:
    """Baseline, cold node, warm node, then the checks of the copy the cold run left: seconds each."""
    evict_store(scratch)
    base, _ = fetch_engine(ep, digest, scratch / "pod-plain", None)
    shutil.rmtree(scratch / "pod-plain")
    cache = scratch / "node-cache"
    evict_store(scratch)
    cold, cold_report = fetch_engine(ep, digest, scratch / "pod-1", cache)
    warm, warm_report = fetch_engine(ep, digest, scratch / "pod-2", cache)
    assert cold_report.get("cacheHit") is False, cold_report
    assert warm_report.get("cacheHit") is True and warm_report.get("fetchedBytes") == 0, warm_report
    copy = cache / "engines" / digest
    stat_s = timed(lambda: check(copy, digest, "stat"))
    hot_sha = timed(lambda: check(copy, digest, "sha256"))
    evict_from_page_cache(copy / "rank0.engine")
    cold_sha = timed(lambda: check(copy, digest, "sha256"))
    for p in (cache, scratch / "pod-1", scratch / "pod-2"):
        shutil.rmtree(p)
    return {"baseline": base, "cold": cold, "warm": warm, "stat": stat_s, "sha_hot": hot_sha, "sha_cold": cold_sha}


def bench_size(ep: S3Endpoint, store: EngineStore, size_gib: float, scratch: Path, repeat: int) -> dict[str, str]:
    """Medians over `repeat` runs of one engine of `size_gib`."""
    digest = f"bench-{size_gib:g}gib"
    commit_engine(store, digest, int(size_gib * GiB), scratch)
    runs = [one_run(ep, digest, scratch) for _ in range(repeat)]
    store.delete_engine(digest)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {
        "size": f"{size_gib:g} GiB",
        "baseline": f"{med['baseline']:.1f}",
        "cold": f"{med['cold']:.1f}",
        "warm": f"{med['warm']:.2f}",
        "warm_bytes": "0",
        "stat": f"{med['stat'] * 1000:.2f} ms",
        "sha_hot": f"{med['sha_hot']:.1f} s",
        "sha_cold": f"{med['sha_cold']:.1f} s",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-gib", type=float, nargs="+", default=[1.0, 8.0, 32.0])
    p.add_argument("--repeat", type=int, default=3, help="runs per size; the tables show medians")
    p.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args()
    configure_logging(json=False, level="WARNING")
    scratch = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.dir))
    free = shutil.disk_usage(scratch).free
    print(f"load before: {uptime()}\nfree disk at {scratch}: {free / GiB:.1f} GiB, {os.cpu_count()} CPUs\n")
    ep, server = start_s3(scratch / "s3")
    rows: list[dict[str, str]] = []
    skipped: list[str] = []
    try:
        client = make_s3_client(
            S3Config(endpoint=ep.endpoint, access_key_id=ep.access_key, secret_access_key=ep.secret_key)
        )
        client.create_bucket(Bucket="bench")
        store = EngineStore(client, StoreLocation(bucket="bench", endpoint=ep.endpoint), TransferTuning.from_env())
        for size_gib in args.sizes_gib:
            need = int(3 * size_gib * GiB) + MARGIN  # source + uploaded parts + the assembled object
            free = shutil.disk_usage(scratch).free
            if need > free:
                skipped.append(f"{size_gib:g} GiB: needs {need / GiB:.0f} GiB free, {free / GiB:.1f} GiB available")
                continue
            rows.append(bench_size(ep, store, size_gib, scratch, args.repeat))
    finally:
        proc.stop_pid(server.pid)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"Scheduled -> engine on disk (seconds, `serve-engine download` start to exit; medians of {args.repeat}):\n")
    print("| engine | baseline: no cache | cold node (miss) | warm node (hit) | bytes fetched on the hit |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['baseline']} | {r['cold']} | {r['warm']} | {r['warm_bytes']} |")
    print("\nChecking a cached copy on a hit:\n")
    print(
        "| engine | stat rule (size + mtime vs record) | SHA-256 re-hash, in page cache | SHA-256 re-hash, from disk |"
    )
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['stat']} | {r['sha_hot']} | {r['sha_cold']} |")
    for s in skipped:
        print(f"\nskipped {s}")
    print(f"\nload after: {uptime()}")


if __name__ == "__main__":
    main()
