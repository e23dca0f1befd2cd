"""Engine store throughput against a real S3 server (versitygw) on loopback.

Uploads and downloads one engine file of --size-gib through EngineStore (tuned multipart, streaming SHA-256,
parallel ranged GETs, verification), next to a plain local copy of the same bytes and boto3's default
TransferConfig (no hashing, no verification). Prints a markdown table.

    .venv/bin/python scripts/bench_store.py --size-gib 4
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from boto3.s3.transfer import TransferConfig

from llmengine.api.artifacts import BuildShapes, Provenance, StoreLocation
from llmengine.builder.testcompiler import write_pseudo_random
from llmengine.clients.store import EngineStore, S3Config, TransferTuning, make_s3_client
from llmengine.dev import proc
from llmengine.dev.s3 import start_s3
from llmengine.logging import configure_logging

MiB = 1024 * 1024


def timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--part-size-mib", type=int, default=TransferTuning().part_size // MiB)
    p.add_argument("--concurrency", type=int, default=TransferTuning().concurrency)
    p.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--skip-default", action="store_true", help="skip the boto3 default TransferConfig rows")
    args = p.parse_args()
    configure_logging(json=False, level="WARNING")

    size = int(args.size_gib * 1024 * MiB)
    scratch = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    ep, server = start_s3(scratch / "s3")
    rows: list[tuple[str, float]] = []
    try:
        client = make_s3_client(
            S3Config(endpoint=ep.endpoint, access_key_id=ep.access_key, secret_access_key=ep.secret_key)
        )
        client.create_bucket(Bucket="bench")
        tuning = TransferTuning(
            part_size=args.part_size_mib * MiB, concurrency=args.concurrency, ranged_threshold=args.part_size_mib * MiB
        )
        store = EngineStore(client, StoreLocation(bucket="bench", endpoint=ep.endpoint), tuning)
        src = scratch / "engine"
        src.mkdir()
        rows.append(
            ("generate (test compiler writer)", timed(lambda: write_pseudo_random(src / "rank0.engine", size, 0)))
        )
        rows.append(
            ("local copy (shutil.copyfile)", timed(lambda: shutil.copyfile(src / "rank0.engine", scratch / "copy")))
        )
        (scratch / "copy").unlink()

        prov = Provenance(
            builder_image="bench",
            trtllm_version="1.2.1",
            compiler="test",
            gpu_class="none",
            sm="0.0",
            build_time="now",
            build_seconds=0,
            test_build=True,
        )
        shapes = BuildShapes(max_batch_size=1, max_input_len=1, max_seq_len=1, max_num_tokens=1)

        def upload() -> None:
            store.upload_engine("bench", src, backend="tensorrt", tp_size=1, pp_size=1, shapes=shapes, provenance=prov)

        rows.append(("EngineStore upload (+SHA-256, manifest)", timed(upload)))
        rows.append(
            (
                "EngineStore download (+ranged GETs, SHA-256 verify)",
                timed(lambda: store.download_engine("bench", scratch / "down")),
            )
        )
        shutil.rmtree(scratch / "down")
        if not args.skip_default:
            default = TransferConfig()
            rows.append(
                (
                    "boto3 default TransferConfig upload_file",
                    timed(
                        lambda: client.upload_file(
                            str(src / "rank0.engine"), "bench", "default/rank0.engine", Config=default
                        )
                    ),
                )
            )
            rows.append(
                (
                    "boto3 default TransferConfig download_file",
                    timed(
                        lambda: client.download_file(
                            "bench", "default/rank0.engine", str(scratch / "dl"), Config=default
                        )
                    ),
                )
            )
    finally:
        proc.stop_pid(server.pid)
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"\n{args.size_gib:g} GiB, part {args.part_size_mib} MiB, concurrency {args.concurrency}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}\n"
    )
    print("| operation | seconds | MiB/s |")
    print("|---|---:|---:|")
    for name, secs in rows:
        print(f"| {name} | {secs:.1f} | {size / MiB / secs:.0f} |")


if __name__ == "__main__":
    main()
