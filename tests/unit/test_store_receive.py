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

from llmengine.clients.store import chain, receive
from llmengine.clients.store.errors import IntegrityError, is_transient

MiB = 1024 * 1024


class _Body:
    """What botocore's StreamingBody looks like to receive.py: the urllib3 response under it keeps http.client's."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self._raw_stream = type("Raw", (), {"_fp": response})()


@contextmanager
def served(
    payload: bytes,
    *,
    length: int | None = None,
    pieces: int = 7,
    pause: float = 0.0,
    timeout: float = 5.0,
    urgent: bool = False,
) -> Iterator[_Body]:
    """A real HTTP response on loopback TCP: `payload` sent in `pieces` writes (with `pause` between them) under a
    Content-Length of `length` (default: the payload's), then the connection closed. `urgent`: one TCP urgent
    (out-of-band) byte after the first piece, which is not part of the body."""
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
                    if urgent and off == 0:
                        time.sleep(0.1)
                        conn.send(b"!", socket.MSG_OOB)
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
def spliced(monkeypatch: pytest.MonkeyPatch) -> list[bool | str]:
    """What each receive's spliced path returned (True: it moved the body; False: it handed the body to the copy
    path) or raised (the exception's name); splice(2) allowed again for the test."""
    monkeypatch.setattr(receive, "_splice_works", hasattr(os, "splice"))
    outcomes: list[bool | str] = []
    real = receive._spliced

    def spy(*args: Any, **kwargs: Any) -> bool:
        try:
            outcomes.append(real(*args, **kwargs))
        except Exception as exc:
            outcomes.append(type(exc).__name__)
            raise
        return bool(outcomes[-1])

    monkeypatch.setattr(receive, "_spliced", spy)
    return outcomes


def _receive(body: _Body, fd: int, start: int, end: int, sha: Any) -> tuple[list[int], list[int]]:
    reached, seen = [start], list[int]()
    receive.receive(body, fd, reached, end, sha, seen.append, "rank0.engine")
    return reached, seen


# An offset that is not a multiple of the page size: the hash's mapping of the file starts below it.
AT = 5 * MiB + 4160


def _hashes() -> list[Any]:
    kinds: list[Any] = [hashlib.sha256, None]
    if chain.AVAILABLE:
        kinds.append(chain.ChainedSha256)  # hashes a writable buffer in place: the mapping itself
    return kinds


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
@pytest.mark.parametrize("make_hash", _hashes(), ids=lambda k: getattr(k, "__name__", "unhashed"))
def test_a_plain_http_body_is_spliced_into_the_file_and_hashed_from_it(
    target: tuple[int, Path], spliced: list[bool | str], make_hash: Any
) -> None:
    fd, path = target
    payload = os.urandom(3 * MiB + 123)
    fds = _fds()
    sha = make_hash() if make_hash else None
    with served(payload, pieces=40) as body:
        reached, seen = _receive(body, fd, AT, AT + len(payload), sha)
    assert spliced == [True]
    assert reached == [AT + len(payload)] and sum(seen) == len(payload)
    if sha is not None:
        assert sha.hexdigest() == hashlib.sha256(payload).hexdigest()
    data = path.read_bytes()
    assert data[AT : AT + len(payload)] == payload
    assert data[:AT].count(0) == AT  # nothing written outside the range
    assert _fds() == fds  # the pipe is closed


def test_the_copy_path_gives_the_same_file_and_hash(
    target: tuple[int, Path], spliced: list[bool | str], monkeypatch: pytest.MonkeyPatch
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
    target: tuple[int, Path], spliced: list[bool | str]
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
    assert spliced == ["IncompleteRead", True]
    assert reached == [end]
    assert sha.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert path.read_bytes()[AT:end] == payload


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "copied"])
def test_a_body_longer_than_the_manifest_says_is_refused_before_a_byte_is_written(
    target: tuple[int, Path], spliced: list[bool | str], monkeypatch: pytest.MonkeyPatch, splice: bool
) -> None:
    monkeypatch.setattr(receive, "_splice_works", splice and hasattr(os, "splice"))
    fd, path = target
    payload = os.urandom(MiB)
    with served(payload) as body, pytest.raises(IntegrityError, match="longer in the store than the manifest says"):
        _receive(body, fd, AT, AT + len(payload) - 1, hashlib.sha256())
    assert path.read_bytes().count(0) == 16 * MiB


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_a_store_that_stops_sending_times_out_as_the_socket_says(
    target: tuple[int, Path], spliced: list[bool | str]
) -> None:
    fd, _ = target
    payload = os.urandom(MiB)
    fds = _fds()
    sha = hashlib.sha256()
    reached = [AT]
    stalled = served(payload, pieces=2, pause=1.5, timeout=0.3)
    with stalled as body, pytest.raises(TimeoutError) as exc:
        receive.receive(body, fd, reached, AT + len(payload), sha, lambda n: None, "rank0.engine")
    assert spliced == ["TimeoutError"]
    assert is_transient(exc.value)
    assert sha.hexdigest() == hashlib.sha256(payload[: reached[0] - AT]).hexdigest()  # a retry goes on from here
    assert _fds() == fds


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
@pytest.mark.parametrize("refused", ["socket", "file", "seccomp"])
def test_where_the_kernel_refuses_splice_the_bytes_still_land_and_later_bodies_are_copied(
    target: tuple[int, Path], spliced: list[bool | str], monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    """EINVAL from splice(2): from the socket (nothing moved yet: the copy path takes the body from where it stands),
    or into the destination's file system (the bytes already in the pipe are read and written); EPERM, as a seccomp
    profile denies it."""
    fd, path = target
    real = os.splice

    def splice(src: int, dst: int, count: int, offset_src: Any = None, offset_dst: Any = None, flags: int = 0) -> int:
        if refused == "seccomp":
            raise OSError(errno.EPERM, "Operation not permitted")
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
    target: tuple[int, Path], spliced: list[bool | str], monkeypatch: pytest.MonkeyPatch
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


def test_tls_and_chunked_responses_are_never_spliced(spliced: list[bool | str]) -> None:
    """splice(2) would move a TLS stream's ciphertext: only a plain socket's body of known length is spliced."""

    def response(sock: socket.socket, chunked: bool) -> Any:
        fp = type("Fp", (), {"raw": type("Raw", (), {"_sock": sock})()})()
        return type("R", (), {"fp": fp, "chunked": chunked, "length": 10})()

    ctx = ssl.create_default_context()
    with socket.socket() as plain, ctx.wrap_socket(socket.socket(), server_hostname="s3.example") as tls:
        assert receive._plain_socket(response(tls, False)) is None
        assert receive._plain_socket(response(plain, True)) is None
        assert receive._plain_socket(response(plain, False)) is (plain if hasattr(os, "splice") else None)


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")
def test_urgent_data_hands_the_body_to_the_copy_path_instead_of_spinning(
    target: tuple[int, Path], spliced: list[bool | str]
) -> None:
    """splice(2) never reads past TCP urgent data, and the socket stays readable: the spliced path hands over (the
    copy path's recv skips the urgent byte) instead of asking again forever."""
    fd, path = target
    payload = os.urandom(2 * MiB)
    sha = hashlib.sha256()
    reached = [AT]
    with served(payload, pieces=4, pause=0.2, urgent=True) as body:
        worker = threading.Thread(
            target=receive.receive, args=(body, fd, reached, AT + len(payload), sha, lambda n: None, "rank0.engine")
        )
        started = time.process_time()
        worker.start()
        worker.join(10)
        assert not worker.is_alive()  # it asked splice(2) again for ever, spinning a core, before
    assert time.process_time() - started < 2
    assert spliced == [False]
    assert reached == [AT + len(payload)]
    assert sha.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert path.read_bytes()[AT : AT + len(payload)] == payload


@contextmanager
def http_server(payload: bytes, stall_first: bool = False) -> Iterator[tuple[str, list[int]]]:
    """A real HTTP/1.1 server (keep-alive) serving `payload` on every GET; its URL and one entry per connection it
    accepted. `stall_first`: the first GET gets half its body, then nothing for 2 s."""
    import http.server
    import socketserver

    accepted: list[int] = []
    gets: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            accepted.append(1)
            super().setup()

        def do_GET(self) -> None:
            gets.append(1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if stall_first and len(gets) == 1:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                time.sleep(2)
                self.close_connection = True
                return
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/k", accepted
    finally:
        server.shutdown()
        server.server_close()


def _streaming_get(pool: Any, url: str, size: int) -> Any:
    """A GET as botocore makes it: urllib3 not preloading the body, botocore's StreamingBody around it."""
    from botocore.response import StreamingBody

    return StreamingBody(pool.request("GET", url, preload_content=False), size)


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "copied"])
def test_a_body_read_to_its_end_gives_its_connection_back_for_the_next_get(
    target: tuple[int, Path], monkeypatch: pytest.MonkeyPatch, splice: bool
) -> None:
    """Three GETs, one TCP connection (botocore's own close() drops a connection urllib3 did not see read to its
    end: three connections)."""
    import urllib3

    monkeypatch.setattr(receive, "_splice_works", splice and hasattr(os, "splice"))
    fd, _ = target
    payload = os.urandom(MiB + 7)
    pool = urllib3.PoolManager(maxsize=2, retries=False)
    with http_server(payload) as (url, accepted):
        for _ in range(3):
            body = _streaming_get(pool, url, len(payload))
            sha = hashlib.sha256()
            receive.receive(body, fd, [0], len(payload), sha, lambda n: None, "rank0.engine")
            receive.close(body)
            assert sha.hexdigest() == hashlib.sha256(payload).hexdigest()
        pool.clear()
    assert len(accepted) == 1


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "copied"])
def test_a_body_not_read_to_its_end_never_goes_back_to_the_pool(
    target: tuple[int, Path], monkeypatch: pytest.MonkeyPatch, splice: bool
) -> None:
    """A GET that timed out mid-body: its connection still has the rest of that body on it, so it is closed, and the
    next GET (the store's retry) gets a connection of its own and the right bytes."""
    import urllib3

    monkeypatch.setattr(receive, "_splice_works", splice and hasattr(os, "splice"))
    fd, _ = target
    payload = os.urandom(MiB + 7)
    pool = urllib3.PoolManager(maxsize=2, retries=False, timeout=urllib3.Timeout(connect=2, read=0.3))
    with http_server(payload, stall_first=True) as (url, accepted):
        body = _streaming_get(pool, url, len(payload))
        with pytest.raises(TimeoutError):
            receive.receive(body, fd, [0], len(payload), hashlib.sha256(), lambda n: None, "rank0.engine")
        receive.close(body)
        body = _streaming_get(pool, url, len(payload))
        sha = hashlib.sha256()
        receive.receive(body, fd, [0], len(payload), sha, lambda n: None, "rank0.engine")
        receive.close(body)
        pool.clear()
    assert sha.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert len(accepted) == 2


@pytest.mark.skipif(not chain.AVAILABLE, reason="OpenSSL's SHA256_* not available here")
def test_an_error_while_hashing_a_mapped_step_is_the_error_the_caller_sees(
    target: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash lets go of its view of the mapping even when it fails, so the mapping closes and the failure, not a
    BufferError from closing it, is what the retry logic sees."""
    fd, _ = target
    sha = chain.ChainedSha256()

    class Boom(Exception):
        pass

    class FailingLib:
        def SHA256_Update(self, *args: Any) -> int:  # OpenSSL's name
            del args  # a C function holds none of its arguments once it returns
            raise Boom("inside SHA256_Update")

    monkeypatch.setattr(chain, "_lib", FailingLib())
    window = receive._Window(fd, AT, AT + MiB)
    failed = False
    try:
        window.hash(sha, AT, AT + MiB)
    except Boom:
        failed = True
        window.close()  # as the spliced path's `finally` does while the failure goes up
    assert failed
    assert window._map is not None and window._map.closed
