"""The engine store while S3 goes away: a TCP relay in front of the real S3 server cuts a transfer in the middle
(connections reset, the port refusing connections for a while) and the store must finish the transfer within its
retry budget, resuming downloads at the byte they reached, or fail with the one-line error when it has no budget.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from llmengine.clients.store import EngineStore, StoreError, TransferTuning
from llmengine.dev import proc
from llmengine.dev.s3 import S3Endpoint

from .test_store import MiB, make_store, small_engine, upload


class FlakyRelay:
    """Forwards 127.0.0.1:<port> to the S3 server. `outage_after(n, down_s)`: once n bytes have passed in the
    watched direction, reset every connection and refuse new ones for down_s seconds (the listener is closed, so
    clients see ECONNREFUSED, as with a restarting server), then listen on the same port again."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = proc.free_port()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.trigger: tuple[str, int, float] | None = None  # (direction, bytes, down seconds)
        self.moved = {"up": 0, "down": 0}  # client -> S3, S3 -> client
        self.outages: list[tuple[float, float]] = []
        self.listener: socket.socket | None = None
        self.closed = threading.Event()
        self._listen()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outage_after(self, direction: str, nbytes: int, down_s: float) -> None:
        with self.lock:
            self.moved = {"up": 0, "down": 0}
            self.trigger = (direction, nbytes, down_s)

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                client, _ = s.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()  # as a dead server would; the relay keeps accepting
                continue
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(256 * 1024):
                dst.sendall(data)
                with self.lock:
                    self.moved[direction] += len(data)
                    fire = self.trigger is not None and self.trigger[0] == direction
                    fire = fire and self.moved[direction] >= self.trigger[1]  # type: ignore[index]
                    down_s = self.trigger[2] if fire and self.trigger else 0.0
                    if fire:
                        self.trigger = None
                if fire:
                    self._outage(down_s)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _outage(self, down_s: float) -> None:
        start = time.monotonic()
        assert self.listener is not None
        self.listener.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:  # cut, as when the server process dies (shutdown wakes the pumps blocked in recv)
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        time.sleep(down_s)
        if not self.closed.is_set():
            self._listen()
        self.outages.append((start, time.monotonic()))

    def close(self) -> None:
        self.closed.set()
        if self.listener is not None:
            self.listener.close()
        with self.lock:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.close()


@pytest.fixture
def relay(s3_endpoint: S3Endpoint) -> Iterator[FlakyRelay]:
    r = FlakyRelay(int(s3_endpoint.endpoint.rsplit(":", 1)[1]))
    yield r
    r.close()


def relayed_store(
    relay: FlakyRelay, ep: S3Endpoint, bucket: str, retry_seconds: float, concurrency: int = 2
) -> EngineStore:
    tuning = TransferTuning(
        part_size=16 * MiB, ranged_threshold=16 * MiB, concurrency=concurrency, retry_seconds=retry_seconds
    )
    return make_store(S3Endpoint(relay.endpoint, ep.access_key, ep.secret_key), bucket, tuning, connect_timeout=1)


def retries_logged(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == "S3 request failed; retrying"]


def test_a_download_cut_mid_body_resumes_where_it_stopped(
    relay: FlakyRelay, s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    src = small_engine(tmp_path / "src", ranks=1, size=24 * MiB + 3)
    direct = make_store(s3_endpoint, s3_bucket)
    manifest = upload(direct, "outage-dl", src, tp=1)
    store = relayed_store(relay, s3_endpoint, s3_bucket, retry_seconds=60)
    relay.outage_after("down", 12 * MiB, down_s=3.0)  # inside the two 16 MiB ranges in flight
    with structlog.testing.capture_logs() as logs:
        got = store.download_engine("outage-dl", tmp_path / "dest")
    assert got == manifest
    assert relay.outages, "the relay never cut the download"
    assert (tmp_path / "dest" / "rank0.engine").read_bytes() == (src / "rank0.engine").read_bytes()
    assert retries_logged(logs), "the outage was survived without a logged retry"
    assert any(e["op"] == "download rank0.engine" for e in retries_logged(logs)), retries_logged(logs)
    # Resumed at the byte reached, not from the part's start: fetching the cut part again would move the 12 MiB
    # before the cut twice (36 MiB in all); what else crosses twice is what sat in socket buffers at the cut.
    assert relay.moved["down"] < manifest.total_bytes + 8 * MiB, relay.moved


def test_an_upload_survives_the_store_going_away_and_commits_last(
    relay: FlakyRelay, s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    src = small_engine(tmp_path / "src", ranks=1, size=40 * MiB + 1)  # three parts, sent one at a time
    store = relayed_store(relay, s3_endpoint, s3_bucket, retry_seconds=60, concurrency=1)
    relay.outage_after("up", 20 * MiB, down_s=3.0)  # into part 2 or 3 (the relay trails the client)
    with structlog.testing.capture_logs() as logs:
        manifest = upload(store, "outage-ul", src, tp=1)
    assert relay.outages, "the relay never cut the upload"
    assert any(e["op"].startswith("upload rank0.engine part ") for e in retries_logged(logs)), retries_logged(logs)
    # Only the cut part went again: sending the file again would move the 20 MiB before the cut twice (60 MiB+).
    assert relay.moved["up"] < manifest.total_bytes + 12 * MiB, relay.moved
    # Committed after the outage, and what the store holds verifies against the manifest.
    assert make_store(s3_endpoint, s3_bucket).get_manifest("outage-ul") == manifest
    make_store(s3_endpoint, s3_bucket).download_engine("outage-ul", tmp_path / "check")
    for f in manifest.files:
        assert (tmp_path / "check" / f.path).read_bytes() == (src / f.path).read_bytes()


def cut_download(
    relay: FlakyRelay, ep: S3Endpoint, bucket: str, tmp_path: Path, name: str, retry_seconds: float, down_s: float
) -> tuple[StoreError, float, list[dict[str, Any]]]:
    """A committed 24 MiB engine, downloaded through the relay, cut 9 MiB in for down_s seconds: the error it fails
    with, how long it took to fail, and the log events meanwhile."""
    upload(make_store(ep, bucket), name, small_engine(tmp_path / "src", ranks=1, size=24 * MiB), tp=1)
    store = relayed_store(relay, ep, bucket, retry_seconds=retry_seconds)
    relay.outage_after("down", 9 * MiB, down_s=down_s)
    t = time.monotonic()
    with structlog.testing.capture_logs() as logs, pytest.raises(StoreError) as exc:
        store.download_engine(name, tmp_path / "dest")
    return exc.value, time.monotonic() - t, logs


def test_without_a_budget_a_cut_download_fails_with_one_line_and_leaves_no_partial_file(
    relay: FlakyRelay, s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    err, _, logs = cut_download(relay, s3_endpoint, s3_bucket, tmp_path, "outage-nb", retry_seconds=0, down_s=5.0)
    assert "\n" not in str(err) and relay.endpoint in str(err), str(err)
    assert not retries_logged(logs), "retried without a budget"
    assert (tmp_path / "dest").is_dir() and not list((tmp_path / "dest").rglob("*.llmengine-partial"))


def test_a_budget_that_runs_out_gives_up_with_the_unreachable_error(
    relay: FlakyRelay, s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    err, took, logs = cut_download(relay, s3_endpoint, s3_bucket, tmp_path, "outage-long", retry_seconds=3, down_s=30.0)
    assert retries_logged(logs), "gave up without retrying inside its budget"
    # Each attempt against the closed port ends within about a second (connect timeout 1 s): the budget plus that.
    assert took < 3 + 5, f"gave up {took:.1f} s after the cut, long after its 3 s budget"
    assert str(err) == f"cannot reach S3 endpoint {relay.endpoint}: check spec.store.endpoint"
