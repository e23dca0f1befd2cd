"""Engine store throughput against the clients a user could pick instead, on one versitygw on loopback.

One run starts one S3 server (llmengine.dev.s3.start_s3, versitygw's posix backend) and, for each size, uploads and
downloads the same bytes through every client with the same part size and the same number of parallel streams:

- ours: EngineStore.upload_engine / download_engine (SHA-256 of every byte into the manifest on the way up, verified
  against it on the way down, manifest commit);
- boto3: upload_file / download_file with a TransferConfig tuned to the same parts and streams;
- crt: the AWS Common Runtime S3 client through s3transfer's CRTTransferManager (what `boto3[crt]` uses), with the
  same part size and at most as many connections;
- obstore: obstore.put (multipart) and parallel obstore.get_range calls written with os.pwrite;
- s5cmd: `s5cmd cp --part-size --concurrency`, built from its Go module (devcluster/build-tools.sh s5cmd).

Only ours hashes and verifies; the peers move bytes (the CRT adds its own CRC32 to uploads). Rounds rotate the
order of the clients; the table shows medians in MB/s (10^6 bytes), the ratio of ours to the best peer, the CPU time
the client spent per GiB (every thread of this process, or the s5cmd process), which a loaded machine disturbs less
than the wall time, and the CPU time the server spent per GiB on the same transfer. On one machine the server shares
the client's cores, so what a client asks of the server (versitygw computes a CRC64NVME of every upload unless the
client names another checksum, as the CRT does with CRC32) counts against its own speed too. The last column is each
client's CPU ceiling: the MB/s its transfer would reach if the CPU it and the server spent were the only limit on the
cores they run on; where ours' ceiling is below the best peer's measured rate, ours cannot catch that peer on this
machine without spending less CPU per GiB.

    .venv/bin/python scripts/bench_store.py                      # 1 and 4 GiB, 3 rounds, every client
    .venv/bin/python scripts/bench_store.py --sizes-gib 1 --rounds 1 --clients ours s5cmd
    .venv/bin/python scripts/bench_store.py --split-cpus       # the server on half the CPUs, the clients on the rest

Before the timed rounds of each size, one untimed round (`--warmup-rounds`) moves the same bytes through every client:
the first transfer on a fresh server and page cache, and each client's first use (its threads, its connections),
are paid there instead of by whichever client the first round puts first. On a virtual machine whose kernel hands
freed memory back to its host (virtio-balloon free page reporting), the host takes those pages away and must supply
them again when the guest next writes them, which the page cache of a transfer does by the gigabyte; the header
prints the kernel's reporting settings and how much freed memory went back to the host during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from boto3.s3.transfer import TransferConfig

from llmengine.api.artifacts import StoreLocation
from llmengine.builder.testcompiler import write_pseudo_random
from llmengine.clients.store import EngineStore, S3Client, S3Config, TransferTuning, make_s3_client
from llmengine.dev import proc, tools
from llmengine.dev.s3 import S3Endpoint, start_s3
from llmengine.dev.seed import BENCH_SHAPES, bench_provenance
from llmengine.logging import configure_logging

MiB = 1024 * 1024
GiB = 1024 * MiB
BUCKET = "bench"
FILE = "rank0.engine"
CLIENTS = ("ours", "boto3", "crt", "obstore", "s5cmd")
PEER_PACKAGES = "pip install 'boto3[crt]' obstore (or: pip install -e '.[dev]')"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    """The 1/5/15-minute load averages, as uptime prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass(frozen=True)
class Cpus:
    """The cores the clients and the server run on: the same ones (shared), or each side its own (--split-cpus)."""

    client: int
    server: int
    shared: bool

    def __str__(self) -> str:
        if self.shared:
            return f"{self.client} shared cores"
        return f"{self.client} client + {self.server} server cores"


class Client(Protocol):
    name: str

    def upload(self, src: Path, key: str) -> None: ...

    def download(self, key: str, dest: Path) -> None: ...


class Ours:
    """EngineStore: the source directory holds only the engine file; the key is the engine digest."""

    name = "ours"

    def __init__(self, client: S3Client, ep: S3Endpoint, tuning: TransferTuning) -> None:
        self.store = EngineStore(client, StoreLocation(bucket=BUCKET, endpoint=ep.endpoint), tuning)
        self.shapes = BENCH_SHAPES
        self.prov = bench_provenance()

    def upload(self, src: Path, key: str) -> None:
        self.store.upload_engine(
            key, src.parent, backend="tensorrt", tp_size=1, pp_size=1, shapes=self.shapes, provenance=self.prov
        )

    def download(self, key: str, dest: Path) -> None:
        self.store.download_engine(key, dest.parent)


class Boto3:
    name = "boto3"

    def __init__(self, client: S3Client, part: int, conc: int) -> None:
        self.client = client
        self.config = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=conc, io_chunksize=MiB
        )

    def upload(self, src: Path, key: str) -> None:
        self.client.upload_file(str(src), BUCKET, key, Config=self.config)

    def download(self, key: str, dest: Path) -> None:
        self.client.download_file(BUCKET, key, str(dest), Config=self.config)


class Crt:
    name = "crt"

    def __init__(self, ep: S3Endpoint, part: int, conc: int) -> None:
        try:
            import awscrt.s3
            from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
            from botocore.config import Config
            from botocore.credentials import Credentials
            from botocore.session import Session
            from s3transfer.crt import BotocoreCRTCredentialsWrapper, BotocoreCRTRequestSerializer, CRTTransferManager
        except ImportError as exc:
            raise SystemExit(f"the crt client needs awscrt: {PEER_PACKAGES}") from exc
        creds = BotocoreCRTCredentialsWrapper(Credentials(ep.access_key, ep.secret_key)).to_crt_credentials_provider()
        elg = EventLoopGroup()
        crt = awscrt.s3.S3Client(
            bootstrap=ClientBootstrap(elg, DefaultHostResolver(elg)),
            region=ep.region,
            credential_provider=creds,
            part_size=part,
            multipart_upload_threshold=part,
            tls_mode=awscrt.s3.S3RequestTlsMode.DISABLED,
            max_active_connections_override=conc,
        )
        serializer = BotocoreCRTRequestSerializer(
            Session(),
            {
                "region_name": ep.region,
                "endpoint_url": ep.endpoint,
                "aws_access_key_id": ep.access_key,
                "aws_secret_access_key": ep.secret_key,
                "config": Config(s3={"addressing_style": "path"}),
            },
        )
        self.tm: Any = CRTTransferManager(crt, serializer)

    def upload(self, src: Path, key: str) -> None:
        self.tm.upload(str(src), BUCKET, key).result()

    def download(self, key: str, dest: Path) -> None:
        fut = self.tm.download(BUCKET, key, str(dest))
        fut.result()
        # result() returns when the last byte is in the temporary file; the rename to dest is a done-callback that
        # may still be running (s3transfer's own S3Transfer returns here as well). The download ends with it.
        fut._coordinator.wait_until_on_done_callbacks_complete()


class Obstore:
    name = "obstore"

    def __init__(self, ep: S3Endpoint, part: int, conc: int) -> None:
        try:
            import obstore
            from obstore.store import S3Store
        except ImportError as exc:
            raise SystemExit(f"the obstore client needs obstore: {PEER_PACKAGES}") from exc
        self.obstore: Any = obstore
        self.store = S3Store(
            BUCKET,
            endpoint=ep.endpoint,
            access_key_id=ep.access_key,
            secret_access_key=ep.secret_key,
            region=ep.region,
            client_options={"allow_http": True, "timeout": "300s"},
        )
        self.part, self.conc = part, conc

    def upload(self, src: Path, key: str) -> None:
        self.obstore.put(self.store, key, src, chunk_size=self.part, max_concurrency=self.conc)

    def download(self, key: str, dest: Path) -> None:
        size = int(self.obstore.head(self.store, key)["size"])
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

        def get(off: int) -> None:
            buf = self.obstore.get_range(self.store, key, start=off, length=min(self.part, size - off))
            view = memoryview(buf)
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n

        try:
            with ThreadPoolExecutor(max_workers=self.conc) as pool:
                list(pool.map(get, range(0, size, self.part)))
        finally:
            os.close(fd)


class S5cmd:
    name = "s5cmd"

    def __init__(self, ep: S3Endpoint, part: int, conc: int) -> None:
        try:
            self.binary = str(tools.binary("s5cmd"))
        except tools.ToolMissing as exc:
            raise SystemExit(str(exc)) from exc
        self.env = {**os.environ, **ep.env(), "AWS_ENDPOINT_URL_S3": ""}
        self.args = ["--endpoint-url", ep.endpoint]
        self.cp = ["cp", "--part-size", str(part // MiB), "--concurrency", str(conc)]

    def _run(self, *args: str) -> None:
        subprocess.run([self.binary, *self.args, *self.cp, *args], env=self.env, check=True, capture_output=True)

    def upload(self, src: Path, key: str) -> None:
        self._run(str(src), f"s3://{BUCKET}/{key}")

    def download(self, key: str, dest: Path) -> None:
        self._run(f"s3://{BUCKET}/{key}", str(dest))


def make_clients(names: list[str], s3: S3Client, ep: S3Endpoint, part: int, conc: int) -> list[Client]:
    tuning = TransferTuning(part_size=part, concurrency=conc, ranged_threshold=part)
    makers: dict[str, Callable[[], Client]] = {
        "ours": lambda: Ours(s3, ep, tuning),
        "boto3": lambda: Boto3(s3, part, conc),
        "crt": lambda: Crt(ep, part, conc),
        "obstore": lambda: Obstore(ep, part, conc),
        "s5cmd": lambda: S5cmd(ep, part, conc),
    }
    return [makers[n]() for n in names]


PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")


def page_reporting() -> dict[str, str]:
    """The kernel's free page reporting parameters (virtio-balloon hands freed guest memory back to the host), if
    this kernel has them: empty on bare metal and on VMs without it."""
    if not PAGE_REPORTING.is_dir():
        return {}
    return {p.name: p.read_text().strip() for p in sorted(PAGE_REPORTING.iterdir()) if os.access(p, os.R_OK)}


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its finished children (s5cmd)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def process_cpu_seconds(pid: int) -> float:
    """CPU time of another process, every thread (proc(5): utime and stime of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], object], server_pid: int) -> tuple[float, float, float]:
    """Wall seconds, client CPU seconds and server CPU seconds of fn(), from a page cache with nothing left to write
    back: the server's copy of the previous upload (its parts and the object it assembles) is flushed first, or the
    next transfer pays for writing it out (the faster the upload before it, the more)."""
    os.sync()
    s, c, t = process_cpu_seconds(server_pid), cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t, cpu_seconds() - c, process_cpu_seconds(server_pid) - s


def empty_bucket(s3: S3Client) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        objs: list[Any] = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objs:
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": objs, "Quiet": True})


def measure(
    clients: list[Client], s3: S3Client, server_pid: int, scratch: Path, size: int, rounds: int, warmup: int
) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    """Seconds per client and direction over the rounds, and the load average before each round; `warmup` untimed
    rounds first."""
    src = scratch / f"src-{size}" / FILE
    src.parent.mkdir()
    log(f"writing {size / GiB:g} GiB of test bytes")
    write_pseudo_random(src, size, 0)
    secs: dict[str, dict[str, list[float]]] = {
        c.name: {d + k: [] for d in ("upload", "download") for k in ("", "_cpu", "_server_cpu")} for c in clients
    }
    loads = []
    for r in range(-warmup, rounds):
        if r < 0:
            log(f"{size / GiB:g} GiB warm-up round {r + warmup + 1}/{warmup} (not counted), load {load()}")
        else:
            loads.append(load())
            log(f"{size / GiB:g} GiB round {r + 1}/{rounds}, load {loads[-1]}")
        order = clients[r % len(clients) :] + clients[: r % len(clients)]
        for c in order:
            key = f"{c.name}-{size}-{r}"
            dest = scratch / "down" / FILE
            dest.parent.mkdir()
            up = timed(lambda c=c, key=key: c.upload(src, key), server_pid)  # type: ignore[misc]
            down = timed(lambda c=c, key=key, dest=dest: c.download(key, dest), server_pid)  # type: ignore[misc]
            if dest.stat().st_size != size:
                raise SystemExit(f"{c.name} downloaded {dest.stat().st_size} bytes, expected {size}")
            for d, (wall, cpu, server_cpu) in (("upload", up), ("download", down)) if r >= 0 else ():
                secs[c.name][d].append(wall)
                secs[c.name][d + "_cpu"].append(cpu)
                secs[c.name][d + "_server_cpu"].append(server_cpu)
            log(
                f"  {c.name:8} up {size / up[0] / 1e6:5.0f} MB/s {up[1]:4.1f} CPU s (server {up[2]:4.1f})   "
                f"down {size / down[0] / 1e6:5.0f} MB/s {down[1]:4.1f} CPU s (server {down[2]:4.1f})"
            )
            shutil.rmtree(dest.parent)
            empty_bucket(s3)
    shutil.rmtree(src.parent)
    return secs, loads


def ceiling(size: int, secs: dict[str, list[float]], direction: str, cpus: Cpus) -> float:
    """MB/s a client's transfer would reach if the CPU were the only limit: the CPU seconds it and the server spent
    (medians), spread over the cores they run on. A transfer near its ceiling is bound by the CPU there; a client whose
    ceiling is below another's measured rate can tie it on these cores only by keeping them entirely busy, and pass it
    only by spending less CPU per GiB."""
    client = statistics.median(secs[direction + "_cpu"])
    server = statistics.median(secs[direction + "_server_cpu"])
    seconds = (client + server) / cpus.client if cpus.shared else max(client / cpus.client, server / cpus.server)
    return size / seconds / 1e6 if seconds > 0 else float("inf")


def table(size: int, secs: dict[str, dict[str, list[float]]], cpus: Cpus) -> list[str]:
    def rate(name: str, direction: str) -> float:
        return size / statistics.median(secs[name][direction]) / 1e6

    def cpu(name: str, what: str) -> str:
        return f"{statistics.median(secs[name][what]) / (size / GiB):.2f}"

    def cap(name: str, direction: str) -> str:
        return f"{ceiling(size, secs[name], direction, cpus):.0f}"

    lines = [
        f"| {size / GiB:g} GiB | upload MB/s | download MB/s | upload CPU s/GiB, client + server "
        f"| download CPU s/GiB, client + server | CPU ceiling on {cpus}, up / down MB/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in secs:
        lines.append(
            f"| {name} | {rate(name, 'upload'):.0f} | {rate(name, 'download'):.0f} "
            f"| {cpu(name, 'upload_cpu')} + {cpu(name, 'upload_server_cpu')} "
            f"| {cpu(name, 'download_cpu')} + {cpu(name, 'download_server_cpu')} "
            f"| {cap(name, 'upload')} / {cap(name, 'download')} |"
        )
    peers = [n for n in secs if n != "ours"]
    if "ours" in secs and peers:
        cells, caps = [], []
        for d in ("upload", "download"):
            best = max(peers, key=lambda n, d=d: rate(n, d))  # type: ignore[misc]
            cells.append(f"{rate('ours', d) / rate(best, d):.2f}x of {best}")
            caps.append(f"{ceiling(size, secs['ours'], d, cpus) / rate(best, d):.2f}x")
        lines.append(f"| ours / best peer | {cells[0]} | {cells[1]} | | | ours' ceiling: {caps[0]} / {caps[1]} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-gib", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds before the timed ones (default 1)")
    p.add_argument("--part-size-mib", type=int, default=TransferTuning().part_size // MiB)
    p.add_argument("--concurrency", type=int, default=TransferTuning().concurrency)
    p.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    p.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write every round's seconds here")
    p.add_argument(
        "--split-cpus",
        action="store_true",
        help="pin the server to the first half of the CPUs and the clients to the rest, so neither takes the other's "
        "cores (a transfer is then bound by whichever side runs out first)",
    )
    args = p.parse_args()
    configure_logging(json=False, level="WARNING")
    part, conc = args.part_size_mib * MiB, args.concurrency

    reporting = page_reporting()
    scratch = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    usable = sorted(os.sched_getaffinity(0))  # the CPUs this process (and the server it starts) may run on
    cpus = Cpus(len(usable), len(usable), shared=True)
    if args.split_cpus:
        if len(usable) < 2:
            raise SystemExit("--split-cpus needs at least 2 CPUs")
        server_cpus, client_cpus = usable[: len(usable) // 2], usable[len(usable) // 2 :]
        cpus = Cpus(len(client_cpus), len(server_cpus), shared=False)
        os.sched_setaffinity(0, server_cpus)  # the server inherits it
    ep, server = start_s3(scratch / "s3")
    if args.split_cpus:
        os.sched_setaffinity(0, client_cpus)  # this thread, the threads it starts, and s5cmd
        log(f"server on CPUs {server_cpus}, clients on CPUs {client_cpus}")
    results: dict[str, Any] = {}
    try:
        s3 = make_s3_client(
            S3Config(endpoint=ep.endpoint, access_key_id=ep.access_key, secret_access_key=ep.secret_key)
        )
        s3.create_bucket(Bucket=BUCKET)
        clients = make_clients(args.clients, s3, ep, part, conc)
        for gib in args.sizes_gib:
            size = int(gib * GiB)
            results[f"{gib:g}"] = measure(clients, s3, server.pid, scratch, size, args.rounds, args.warmup_rounds)
    finally:
        proc.stop_pid(server.pid)
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"\nversitygw {tools.versions()['VERSITYGW_VERSION']} on loopback; part {args.part_size_mib} MiB, "
        f"{conc} streams, median of {args.rounds} rounds; {len(usable)} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}; load average after the run {load()}"
    )
    if reporting:
        settings = ", ".join(f"{k}={v}" for k, v in reporting.items() if k not in ("reported_kib", "passes", "walked"))
        after = page_reporting().get("reported_kib")
        handed = (  # upstream Linux has no count of it; this machine's kernel does
            f"{(int(after) - int(reporting['reported_kib'])) / 2**20:.1f} GiB of freed memory handed back to the host"
            if after is not None and "reported_kib" in reporting
            else "the kernel does not count what it hands back"
        )
        print(f"free page reporting: {settings}; {handed}")
    print()
    for gib, (secs, loads) in results.items():
        print(f"load average (1/5/15 min) before each round of {gib} GiB: {'; '.join(loads)}\n")
        print("\n".join(table(int(float(gib) * GiB), secs, cpus)) + "\n")
    if args.json:
        args.json.write_text(json.dumps({g: {"seconds": s, "loads": ld} for g, (s, ld) in results.items()}, indent=1))


if __name__ == "__main__":
    main()
