"""Receiving a GET's body into a file (clients/store/receive.py) over real loopback TCP: spliced, copied, cut short,
too long, timed out, and refused by the kernel; always the same bytes in the file and the same hash."""

from __future__ import annotations

import errno
import hashlib
import http.client
import mmap
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from llmengine.clients.store import receive
from llmengine.clients.store.errors import IntegrityError, is_transient

MiB = 1024 * 1024


class _Body:
    """What botocore's StreamingBody looks like to receive.py: the urllib3 response under it keeps http.client's."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self._raw_stream = type("Raw", (), {"_fp": response})()


@contextmanager
def served(
    payload: bytes, *, length: int | None = None, pieces: int = 7, pause: float = 0.0, timeout: float = 5.0
) -> Iterator[_Body]:
    """A real HTTP response on loopback TCP: `payload` sent in `pieces` writes (with `pause` between them) under a
    Content-Length of `length` (default: the payload's), then the connection closed."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                head = f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(payload) if length is None else length}"
                conn.sendall(head.encode() + b"\r\n\r\n")
                step = -(-len(payload) // pieces) if payload else 1
                for off in range(0, len(payload), step):
                    conn.sendall(payload[off : off + step])
                    time.sleep(pause)
                conn.shutdown(socket.SHUT_WR)
                time.sleep(0.2)
        except OSError:
            pass  # the client went away first (a test of a timeout)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = socket.create_connection(listener.getsockname(), timeout=timeout)
    response = http.client.HTTPResponse(client)
    response.begin()
    try:
        yield _Body(response)
    finally:
        response.close()
        client.close()
        server.join(5)
        listener.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    path = tmp_path / "rank0.engine.llmengine-partial"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    fd = os.open(path, os.O_RDWR)
    try:
        yield fd, path
    finally:
        os.close(fd)


@pytest.fixture
def spliced(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each receive's spliced path returned (True: it moved the body); splice(2) allowed again for the test."""
    monkeypatch.setattr(receive, "_splice_works", hasattr(os, "splice"))
    outcomes: list[bool] = []
    real = receive._spliced

    def spy(*args: Any, **kwargs: Any) -> bool:
        outcomes.append(real(*args, **kwargs))
        return outcomes[-1]

    monkeypatch.setattr(receive, "_spliced", spy)
    return outcomes


def _receive(body: _Body, fd: int, start: int, end: int, sha: Any) -> tuple[list[int], list[int]]:
    reached, seen = [start], list[int]()
    receive.receive(body, fd, reached, end, sha, seen.append, "rank0.engine")
    return reached, seen


# An offset that is not a multiple of the page size: the hash's mapping of the file starts below it.
AT = 5 * MiB + 4160


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_a_plain_http_body_is_spliced_into_the_file_and_hashed_from_it(
    target: tuple[int, Path], spliced: list[bool]
) -> None:
    fd, path = target
    payload = os.urandom(3 * MiB + 123)
    fds = _fds()
    sha = hashlib.sha256()
    with served(payload, pieces=40) as body:
        reached, seen = _receive(body, fd, AT, AT + len(payload), sha)
    assert spliced == [True]
    assert reached == [AT + len(payload)] and sum(seen) == len(payload)
    assert sha.hexdigest() == hashlib.sha256(payload).hexdigest()
    data = path.read_bytes()
    assert data[AT : AT + len(payload)] == payload
    assert data[:AT].count(0) == AT  # nothing written outside the range
    assert _fds() == fds  # the pipe is closed


def test_the_copy_path_gives_the_same_file_and_hash(
    target: tuple[int, Path], spliced: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, path = target
    monkeypatch.setattr(receive, "_splice_works", False)
    payload = os.urandom(MiB + 5)
    sha = hashlib.sha256()
    with served(payload) as body:
        reached, _ = _receive(body, fd, AT, AT + len(payload), sha)
    assert spliced == []  # not even tried
    assert reached == [AT + len(payload)]
    assert sha.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert path.read_bytes()[AT : AT + len(payload)] == payload


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_a_body_cut_short_raises_a_transient_error_and_the_retry_goes_on_from_where_it_stopped(
    target: tuple[int, Path], spliced: list[bool]
) -> None:
    fd, path = target
    payload = os.urandom(4 * MiB + 77)
    end = AT + len(payload)
    sha = hashlib.sha256()
    reached = [AT]
    cut = served(payload[: 3 * MiB + 11], length=len(payload), pieces=9)
    with cut as body, pytest.raises(http.client.IncompleteRead) as exc:
        receive.receive(body, fd, reached, end, sha, lambda n: None, "rank0.engine")
    assert is_transient(exc.value)
    assert AT < reached[0] <= AT + 3 * MiB + 11  # only bytes written and hashed count
    # The store's retry: a ranged GET of what is missing, hashed on from the same hash.
    with served(payload[reached[0] - AT :]) as body:
        receive.receive(body, fd, reached, end, sha, lambda n: None, "rank0.engine")
    assert spliced == [True]  # the retry, spliced (the cut attempt raised)
    assert reached == [end]
    assert sha.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert path.read_bytes()[AT:end] == payload


def test_a_body_longer_than_the_manifest_says_is_refused_before_a_byte_is_written(
    target: tuple[int, Path], spliced: list[bool]
) -> None:
    fd, path = target
    payload = os.urandom(MiB)
    with served(payload) as body, pytest.raises(IntegrityError, match="longer in the store than the manifest says"):
        _receive(body, fd, AT, AT + len(payload) - 1, hashlib.sha256())
    assert path.read_bytes().count(0) == 16 * MiB


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_a_store_that_stops_sending_times_out_as_the_socket_says(target: tuple[int, Path], spliced: list[bool]) -> None:
    fd, _ = target
    payload = os.urandom(MiB)
    with served(payload, pieces=2, pause=1.5, timeout=0.3) as body, pytest.raises(TimeoutError) as exc:
        _receive(body, fd, AT, AT + len(payload), hashlib.sha256())
    assert is_transient(exc.value)


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
@pytest.mark.parametrize("refused", ["socket", "file"])
def test_where_the_kernel_refuses_splice_the_bytes_still_land_and_later_bodies_are_copied(
    target: tuple[int, Path], spliced: list[bool], monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    """EINVAL from splice(2): from the socket (nothing moved yet: the copy path takes the body from where it stands),
    or into the destination's file system (the bytes already in the pipe are read and written)."""
    fd, path = target
    real = os.splice

    def splice(src: int, dst: int, count: int, offset_src: Any = None, offset_dst: Any = None, flags: int = 0) -> int:
        if (offset_dst is None) == (refused == "socket"):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(src, dst, count, offset_src, offset_dst, flags)

    monkeypatch.setattr(os, "splice", splice)
    payload = os.urandom(2 * MiB + 9)
    fds = _fds()
    sha = hashlib.sha256()
    with served(payload) as body:
        reached, _ = _receive(body, fd, AT, AT + len(payload), sha)
    assert spliced == [refused == "file"]
    assert receive._splice_works is False
    assert reached == [AT + len(payload)]
    assert sha.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert path.read_bytes()[AT : AT + len(payload)] == payload
    assert _fds() == fds
    with served(payload) as body:
        _receive(body, fd, 0, len(payload), hashlib.sha256())
    assert len(spliced) == 1  # the next body is copied without trying


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_a_file_that_cannot_be_mapped_is_hashed_by_reading_it_back(
    target: tuple[int, Path], spliced: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, path = target

    def no_mmap(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    payload = os.urandom(3 * MiB + 1)
    sha = hashlib.sha256()
    with served(payload) as body:
        _receive(body, fd, AT, AT + len(payload), sha)
    assert spliced == [True]
    assert sha.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert path.read_bytes()[AT : AT + len(payload)] == payload


def test_tls_and_chunked_responses_are_never_spliced(spliced: list[bool]) -> None:
    """splice(2) would move a TLS stream's ciphertext: only a plain socket's body of known length is spliced."""

    def response(sock: socket.socket, chunked: bool) -> Any:
        fp = type("Fp", (), {"raw": type("Raw", (), {"_sock": sock})()})()
        return type("R", (), {"fp": fp, "chunked": chunked, "length": None if chunked else 10})()

    ctx = ssl.create_default_context()
    with socket.socket() as plain, ctx.wrap_socket(socket.socket(), server_hostname="s3.example") as tls:
        assert receive._plain_socket(response(tls, False)) is None
        assert receive._plain_socket(response(plain, True)) is None
        assert receive._plain_socket(response(plain, False)) is (plain if hasattr(os, "splice") else None)
