"""The node-local engine cache (server/cache.py): hits, LRU eviction under the budget, copies in use kept, one fetch
for two processes, verification of cached copies, interrupted fetches and partial directories ignored."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from llmengine.api.artifacts import EngineGrant, GrantedEngine, Manifest, StoreLocation
from llmengine.logging import configure_logging
from llmengine.server import main as server_main
from llmengine.server.cache import (
    LEASE_LINK,
    VERIFIED_NAME,
    CacheSettings,
    EngineCache,
    Outcome,
    Verify,
    check,
    hold_lease,
    tree_bytes,
)

KiB = 1024


@pytest.fixture(autouse=True)
def _logs_to_this_tests_stderr() -> Iterator[None]:
    """The cache logs evictions; an earlier test's `main()` may have pointed structlog at a stream now closed. This
    test's stderr is closed after it in turn: later tests get structlog's defaults back."""
    configure_logging(json=True)
    yield
    structlog.reset_defaults()


def engine_files(digest: str, size: int = 64 * KiB) -> dict[str, bytes]:
    seed = hashlib.sha256(digest.encode()).digest()
    return {"config.json": b'{"digest": "' + digest.encode() + b'"}', "rank0.engine": (seed * (size // 32 + 1))[:size]}


def manifest_for(digest: str, files: dict[str, bytes]) -> Manifest:
    return Manifest.model_validate(
        {
            "engineDigest": digest,
            "backend": "tensorrt",
            "tpSize": 1,
            "ppSize": 1,
            "shapes": {"maxBatchSize": 1, "maxInputLen": 1, "maxSeqLen": 2, "maxNumTokens": 2},
            "files": [
                {"path": p, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for p, b in sorted(files.items())
            ],
            "provenance": {
                "builderImage": "i",
                "trtllmVersion": "1.2.1",
                "compiler": "test",
                "gpuClass": "H100-80GB",
                "sm": "9.0",
                "buildTime": "t",
                "buildSeconds": 1.0,
                "testBuild": True,
            },
        }
    )


class Store:
    """Stands in for EngineStore.download_engine: writes the engine into a directory, counting fetches (in a file, so
    that several processes add up)."""

    def __init__(self, tmp: Path, pause: float = 0.0) -> None:
        self.counter = tmp / "fetches"
        self.pause = pause
        self.seen_during_fetch: list[bool] = []

    def fetches(self) -> list[str]:
        return self.counter.read_text().split() if self.counter.exists() else []

    def fetcher(self, digest: str, cache: EngineCache | None = None) -> Callable[[Path], Manifest]:
        def fetch(dest: Path) -> Manifest:
            with open(self.counter, "a") as f:
                f.write(digest + "\n")
            files = engine_files(digest)
            dest.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (dest / name).write_bytes(data)
                time.sleep(self.pause)  # widen the window in which a second fetcher could interfere
            if cache is not None:
                self.seen_during_fetch.append(cache.copy_of(digest).exists())
            m = manifest_for(digest, files)
            (dest / "manifest.json").write_text(m.to_json())
            return m

        return fetch


def size_of(digest: str) -> Callable[[], int]:
    return lambda: manifest_for(digest, engine_files(digest)).total_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def tick(self) -> float:
        self.now += 10
        return self.now


def cache_at(root: Path, budget: int = 10**9, verify: Verify = "stat", grace: float = 0.0, clock: Any = None) -> Any:
    return EngineCache(CacheSettings(root, budget, verify, grace), clock or Clock())


def provide(cache: EngineCache, store: Store, digest: str, dest: Path) -> Outcome:
    return cache.provide(digest, dest, size_of(digest), store.fetcher(digest, cache))


def assert_engine(dest: Path, digest: str) -> None:
    for name, data in engine_files(digest).items():
        assert (dest / name).read_bytes() == data
    assert Manifest.model_validate_json((dest / "manifest.json").read_bytes()).engine_digest == digest


def test_a_second_pod_on_the_node_links_the_verified_copy_without_fetching(tmp_path: Path) -> None:
    cache, store = cache_at(tmp_path / "cache"), Store(tmp_path)
    first = provide(cache, store, "e1", tmp_path / "pod1")
    second = provide(cache, store, "e1", tmp_path / "pod2")
    assert (first.hit, first.cached, first.fetched_bytes > 0) == (False, True, True)
    assert (second.hit, second.fetched_bytes, second.copy) == (True, 0, cache.copy_of("e1"))
    assert store.fetches() == ["e1"]
    for pod in ("pod1", "pod2"):
        assert_engine(tmp_path / pod, "e1")
        assert (tmp_path / pod / "rank0.engine").resolve() == cache.copy_of("e1") / "rank0.engine"
    # The shared copy is read-only and was never visible while it was being fetched.
    assert not os.access(cache.copy_of("e1") / "rank0.engine", os.W_OK) or os.getuid() == 0
    assert (cache.copy_of("e1") / "rank0.engine").stat().st_mode & 0o222 == 0
    assert store.seen_during_fetch == [False]


def test_a_restarted_init_container_replaces_its_links_or_the_files_it_fetched_itself(tmp_path: Path) -> None:
    cache, store = cache_at(tmp_path / "cache"), Store(tmp_path)
    provide(cache, store, "e1", tmp_path / "pod")
    again = provide(cache, store, "e1", tmp_path / "pod")
    assert again.hit and store.fetches() == ["e1"]
    assert_engine(tmp_path / "pod", "e1")
    store.fetcher("e2")(tmp_path / "fell-back")  # an earlier run found no room and fetched into its emptyDir
    provide(cache, store, "e2", tmp_path / "other")
    assert provide(cache, store, "e2", tmp_path / "fell-back").hit
    assert (tmp_path / "fell-back" / "rank0.engine").is_symlink()
    assert_engine(tmp_path / "fell-back", "e2")


def _one_copy_bytes(tmp_path: Path) -> int:
    probe = cache_at(tmp_path / "probe")
    provide(probe, Store(tmp_path / "probe"), "e0", tmp_path / "probe-pod")
    return tree_bytes(probe.copy_of("e0"))


def _gone(dest: Path) -> None:
    """The pod was deleted: kubelet removes its emptyDir (and with it the lease's second link)."""
    shutil.rmtree(dest)


def test_least_recently_used_copies_go_first_when_the_budget_is_full(tmp_path: Path) -> None:
    (tmp_path / "probe").mkdir()
    one = _one_copy_bytes(tmp_path)
    clock = Clock()
    cache, store = cache_at(tmp_path / "cache", budget=2 * one + one // 2, clock=clock), Store(tmp_path)
    for digest in ("a", "b"):
        clock.tick()
        provide(cache, store, digest, tmp_path / digest)
        _gone(tmp_path / digest)
    clock.tick()
    assert provide(cache, store, "a", tmp_path / "a2").hit  # a is now the most recently used
    _gone(tmp_path / "a2")
    clock.tick()
    c = provide(cache, store, "c", tmp_path / "c")
    assert c.cached and not c.hit
    assert sorted(p.name for p in cache.engines.iterdir()) == ["a", "c"]
    assert tree_bytes(cache.engines) <= 2 * one + one // 2
    assert store.fetches() == ["a", "b", "c"]


def test_copies_in_use_are_never_evicted(tmp_path: Path) -> None:
    (tmp_path / "probe").mkdir()
    one = _one_copy_bytes(tmp_path)
    clock = Clock()
    cache, store = cache_at(tmp_path / "cache", budget=2 * one + one // 2, clock=clock), Store(tmp_path)
    clock.tick()
    provide(cache, store, "a", tmp_path / "a")  # its pod lives on (the emptyDir links the lease): in use
    clock.tick()
    provide(cache, store, "b", tmp_path / "b")
    # b's pod is gone but its server still holds the lease (a node where the emptyDir cannot hard-link it).
    fd = hold_lease(tmp_path / "b")
    assert fd is not None
    _gone(tmp_path / "b")
    try:
        clock.tick()
        c = provide(cache, store, "c", tmp_path / "c")
        # No room without evicting a copy in use: c is fetched into its pod, as without a cache.
        assert (c.hit, c.cached) == (False, False) and "cannot make room" in c.reason
        assert_engine(tmp_path / "c", "c")
        assert not (tmp_path / "c" / "rank0.engine").is_symlink()
        assert sorted(p.name for p in cache.engines.iterdir()) == ["a", "b"]
    finally:
        os.close(fd)
    clock.tick()
    assert provide(cache, store, "c", tmp_path / "c2").cached  # b's lease is free now: b goes, a stays
    assert sorted(p.name for p in cache.engines.iterdir()) == ["a", "c"]


def test_a_fresh_lease_keeps_a_copy_through_the_grace_between_init_and_server(tmp_path: Path) -> None:
    (tmp_path / "probe").mkdir()
    one = _one_copy_bytes(tmp_path)
    clock = Clock()
    cache = cache_at(tmp_path / "cache", budget=one + one // 2, grace=600, clock=clock)
    store = Store(tmp_path)
    provide(cache, store, "a", tmp_path / "a")
    (tmp_path / "a" / LEASE_LINK).unlink()  # no hard link, no server yet: only the grace protects it
    clock.now += 300
    assert not provide(cache, store, "b", tmp_path / "b").cached
    clock.now += 600
    assert provide(cache, store, "b", tmp_path / "b2").cached
    assert [p.name for p in cache.engines.iterdir()] == ["b"]
    assert not any((cache.leases / "a").iterdir())  # the stale lease was removed


def test_an_engine_bigger_than_the_budget_is_fetched_into_the_pod(tmp_path: Path) -> None:
    cache, store = cache_at(tmp_path / "cache", budget=1000), Store(tmp_path)
    out = provide(cache, store, "big", tmp_path / "pod")
    assert (out.hit, out.cached) == (False, False)
    assert_engine(tmp_path / "pod", "big")
    assert not any(cache.engines.iterdir())


def _provide_in_process(root: str, tmp: str, dest: str, q: Any) -> None:
    cache = EngineCache(CacheSettings(Path(root), 10**9))
    out = provide(cache, Store(Path(tmp), pause=0.2), "e1", Path(dest))
    q.put((out.hit, out.cached))


def test_two_pods_fetching_one_engine_at_once_fetch_it_once_and_share_one_intact_copy(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_provide_in_process, args=(str(tmp_path / "cache"), str(tmp_path), str(tmp_path / p), q))
        for p in ("pod1", "pod2")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted([q.get(), q.get()]) == [(False, True), (True, True)]
    assert Store(tmp_path).fetches() == ["e1"]
    cache = cache_at(tmp_path / "cache")
    assert check(cache.copy_of("e1"), "e1", "sha256") is None
    assert_engine(tmp_path / "pod1", "e1")
    assert_engine(tmp_path / "pod2", "e1")
    assert not any(cache.tmp.iterdir())


def test_a_failed_fetch_leaves_no_copy_and_the_next_pod_fetches_again(tmp_path: Path) -> None:
    cache, store = cache_at(tmp_path / "cache"), Store(tmp_path)

    def broken(dest: Path) -> Manifest:
        store.fetcher("e1")(dest)
        raise RuntimeError("connection reset")

    with pytest.raises(RuntimeError):
        cache.provide("e1", tmp_path / "pod1", size_of("e1"), broken)
    assert not cache.copy_of("e1").exists() and not any(cache.tmp.iterdir())
    assert not provide(cache, store, "e1", tmp_path / "pod2").hit
    assert_engine(tmp_path / "pod2", "e1")


def _corrupt_in_place(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_cached_file_changed_after_verification_is_detected_and_fetched_again(tmp_path: Path) -> None:
    cache, store = cache_at(tmp_path / "cache"), Store(tmp_path)
    provide(cache, store, "e1", tmp_path / "pod1")
    _corrupt_in_place(cache.copy_of("e1") / "rank0.engine", keep_mtime=False)
    assert "changed after it was verified" in (check(cache.copy_of("e1"), "e1", "stat") or "")
    again = provide(cache, store, "e1", tmp_path / "pod2")
    assert not again.hit and again.cached
    assert store.fetches() == ["e1", "e1"]
    assert_engine(tmp_path / "pod2", "e1")


def test_the_stat_rule_trusts_size_and_mtime_and_the_sha256_rule_reads_every_byte(tmp_path: Path) -> None:
    """The trade-off docs/store.md states: damage that keeps a file's size and mtime passes the stat rule."""
    cache, store = cache_at(tmp_path / "cache"), Store(tmp_path)
    provide(cache, store, "e1", tmp_path / "pod1")
    _corrupt_in_place(cache.copy_of("e1") / "rank0.engine", keep_mtime=True)
    assert check(cache.copy_of("e1"), "e1", "stat") is None
    assert "SHA-256" in (check(cache.copy_of("e1"), "e1", "sha256") or "")
    strict = cache_at(tmp_path / "cache", verify="sha256")
    assert not provide(strict, store, "e1", tmp_path / "pod2").hit
    assert_engine(tmp_path / "pod2", "e1")


@pytest.mark.parametrize("damage", ["no-record", "missing-file", "partial-tmp"])
def test_missing_or_partial_directories_are_ignored_and_cleared(tmp_path: Path, damage: str) -> None:
    cache, store = cache_at(tmp_path / "cache"), Store(tmp_path)
    provide(cache, store, "e1", tmp_path / "pod1")
    copy = cache.copy_of("e1")
    if damage == "no-record":
        (copy / VERIFIED_NAME).unlink()
    elif damage == "missing-file":
        (copy / "rank0.engine").unlink()
    else:  # a fetch that crashed midway: a fetch directory nobody holds
        (cache.tmp / "e2.dead").mkdir()
        (cache.tmp / "e2.dead" / "rank0.engine").write_bytes(b"half")
        (cache.tmp / "e2.dead.size").write_text(str(10**6))
    out = provide(cache, store, "e1" if damage != "partial-tmp" else "e3", tmp_path / "pod2")
    assert not out.hit and out.cached
    assert_engine(tmp_path / "pod2", "e1" if damage != "partial-tmp" else "e3")
    assert not any(cache.tmp.iterdir())


def test_a_cache_directory_this_uid_cannot_use_falls_back_to_fetching_into_the_pod(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    cache, store = cache_at(tmp_path / "file" / "cache"), Store(tmp_path)
    out = provide(cache, store, "e1", tmp_path / "pod")
    assert (out.hit, out.cached) == (False, False) and "not usable" in out.reason
    assert_engine(tmp_path / "pod", "e1")


class FakeStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def get_manifest(self, digest: str) -> Manifest:
        return manifest_for(digest, engine_files(digest))

    def download_engine(self, digest: str, dest: Path, parallelism: int | None = None) -> Manifest:
        return self.store.fetcher(digest)(dest)

    def download_granted(self, grant: EngineGrant, digest: str, dest: Path, parallelism: int | None = None) -> Manifest:
        assert digest in grant.engines
        return self.store.fetcher(digest)(dest)


def test_serve_engine_download_with_a_cache_dir_reports_the_hit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(tmp_path)
    seams = server_main.Seams(store_factory=lambda loc: FakeStore(store))  # type: ignore[arg-type,return-value]
    reports = []
    for pod in ("pod1", "pod2"):
        argv = ["download", "--digest", "e1", "--bucket", "b", "--engine-dir", str(tmp_path / pod)]
        assert server_main.main([*argv, "--cache-dir", str(tmp_path / "cache")], seams) == 0
        reports.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert [(r["cacheHit"], r["fetchedBytes"] > 0) for r in reports] == [(False, True), (True, False)]
    assert store.fetches() == ["e1"]
    assert_engine(tmp_path / "pod2", "e1")


def test_a_download_through_a_grant_uses_the_cache_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path)
    granted = GrantedEngine(manifest=manifest_for("e1", engine_files("e1")), urls={})
    grant = EngineGrant(location=StoreLocation(bucket="b"), expires_at="2026-11-26T18:00:00Z", engines={"e1": granted})
    (tmp_path / "grant.json").write_text(grant.model_dump_json(by_alias=True))
    seams = server_main.Seams(store_factory=lambda loc: FakeStore(store))  # type: ignore[arg-type,return-value]
    hits = []
    for pod in ("pod1", "pod2"):
        argv = [
            "download",
            "--digest",
            "e1",
            "--grant",
            str(tmp_path / "grant.json"),
            "--engine-dir",
            str(tmp_path / pod),
        ]
        assert server_main.main([*argv, "--cache-dir", str(tmp_path / "cache")], seams) == 0
        hits.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cacheHit"])
    assert hits == [False, True] and store.fetches() == ["e1"]
    assert_engine(tmp_path / "pod2", "e1")
