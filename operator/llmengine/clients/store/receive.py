"""Receiving one GET's body into the partial file at its offset, hashing it on the way.

Two ways, the same bytes, the same hash:

- **spliced** (a plain-HTTP response on Linux): the body moves socket → pipe → file with splice(2), so the kernel
  puts it in the page cache without copying it through this process, and the hash reads it back from the page cache
  through a mapping of the file, a step (1 MiB) at a time, while it is still in the CPU's cache. One copy of every
  byte instead of two, and what is hashed is what landed in the file. On a 1 GiB download from a loopback S3 (8
  streams, 2 cores, docs/benchmarks.md) this moved 1,265 MB/s at 1.16 client CPU-s/GiB, against 1,158 MB/s at 1.33
  for the copy below and 1,215 MB/s at 1.16 for s5cmd, which does not hash.
- **copied** (TLS, a body of unknown length, urgent TCP data, no splice(2), a file system or socket that refuses it):
  the body is read into this thread's reused buffer, written with pwrite and hashed from the buffer.

Either way `reached[0]` moves on only past bytes that are written and hashed, so an attempt cut short is asked again
from there and the hash goes on where it stopped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.client
import mmap
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from llmengine.clients.store.errors import IntegrityError
from llmengine.clients.store.files import hash_range
from llmengine.clients.store.layout import MiB

# What the copy path reads the response into, one buffer per receiving thread (reused for every range it fetches).
# Each block is copied in from the socket, copied out into the page cache and hashed: three passes, all from the
# CPU's cache only while the block fits in the core's L2 with room to spare. Measured on a 4 GiB download (8 streams,
# AMD EPYC with 1 MiB of L2 per core, docs/benchmarks.md): 256 KiB 1,083 MB/s at 1.34 CPU-s/GiB, 128 KiB about the
# same, 64 KiB 978, 512 KiB 631, 1 MiB 606 MB/s at 2.41 CPU-s/GiB (the kernel's copy into the page cache missing the
# cache on every line).
RECEIVE_BLOCK = 256 * 1024
# What the spliced path moves per splice(2) (the pipe is grown to it where the system allows) and hashes per step.
SPLICE_STEP = MiB
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux
_receiving = threading.local()
# Cleared the first time the kernel refuses splice(2) for a socket or the destination's file system; the copy path
# serves from then on.
_splice_works = hasattr(os, "splice")


def receive_buffer() -> memoryview:
    buf = getattr(_receiving, "buf", None)
    if buf is None:
        buf = _receiving.buf = memoryview(bytearray(RECEIVE_BLOCK))
    return buf


def http_response(body: Any) -> http.client.HTTPResponse | None:
    """The http.client response under botocore's StreamingBody or a grant's urllib3 response (urllib3 2 keeps it as
    `_fp`), or None."""
    raw = getattr(body, "_raw_stream", None) or getattr(body, "raw", None)
    fp = getattr(raw, "_fp", None)
    return fp if isinstance(fp, http.client.HTTPResponse) else None


def body_reader(body: Any) -> Callable[[memoryview], int]:
    """`readinto` for a GET's response body (botocore's StreamingBody, or a grant's urllib3 response).

    Reads straight from the http.client response under botocore's and urllib3's wrappers when it is there: the
    kernel copies into the caller's buffer and that is all. Their own `read(n)` allocates a fresh n-byte buffer and
    copies it once more for every block; measured on a 1 GiB download from a loopback S3 (8 streams, per-part SHA-256
    in the receiving threads): 2.5 CPU-seconds per GiB that way, 1.1 this way (docs/benchmarks.md). The bytes are the
    same either way: botocore asks urllib3 for the body undecoded. Any other body is read through its `read`."""
    response = http_response(body)
    if response is not None:

        def from_response(view: memoryview) -> int:
            n = response.readinto(view)
            if not n and response.length:
                # http.client ends quietly when the connection closes early; urllib3 would raise: so does this.
                raise http.client.IncompleteRead(b"", response.length)
            return n

        return from_response

    def read_into(view: memoryview) -> int:
        data = body.read(len(view))
        view[: len(data)] = data
        return len(data)

    return read_into


def receive(
    body: Any, fd: int, reached: list[int], end: int, sha: Any | None, progress: Callable[[int], object], name: str
) -> None:
    """Write the body into fd (open for reading and writing) from reached[0] on, hashing it into sha when given;
    reached[0] follows the bytes written and hashed. A body reaching past `end` is refused (IntegrityError); one cut
    short raises http.client.IncompleteRead (transient: the caller asks again from reached[0])."""
    response = http_response(body)
    if response is not None and response.length is not None and reached[0] + response.length > end:
        raise _longer(name)
    sock = _plain_socket(response) if response is not None else None
    if sock is not None and response is not None and _spliced(response, sock, fd, reached, end, sha, progress):
        return
    readinto, buf = body_reader(body), receive_buffer()
    while n := readinto(buf):
        if reached[0] + n > end:
            raise _longer(name)
        _land(fd, buf[:n], reached, sha, progress)


def close(body: Any) -> None:
    """Close a GET's body. One read to its end first gives its connection back to the pool for the next GET:
    urllib3 releases a connection only after its own reads, and closing botocore's body would drop it."""
    response = http_response(body)
    raw = getattr(body, "_raw_stream", None)
    if response is not None and response.isclosed() and response.length == 0 and raw is not None:
        raw.release_conn()
    body.close()


def _longer(name: str) -> IntegrityError:
    return IntegrityError(f"'{name}' is longer in the store than the manifest says", name)


def _land(fd: int, view: memoryview, reached: list[int], sha: Any | None, progress: Callable[[int], object]) -> None:
    """Write a block received into a buffer at reached[0], hash it, move reached[0] past it."""
    _pwrite_all(fd, view, reached[0])
    if sha is not None:
        sha.update(view)
    reached[0] += len(view)
    progress(len(view))


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    while view:
        w = os.pwrite(fd, view, pos)
        view, pos = view[w:], pos + w


def _plain_socket(response: http.client.HTTPResponse) -> socket.socket | None:
    """The response's socket when its remaining body is raw bytes of a known length on a plain TCP socket: not TLS
    (an ssl.SSLSocket, or urllib3's SSLTransport through an HTTPS proxy), not chunked. Reads http.client's private
    `raw._sock`; without it the copy path serves."""
    if not _splice_works or response.chunked or response.length is None:
        return None
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
    return sock if type(sock) is socket.socket else None


def _spliced(
    response: http.client.HTTPResponse,
    sock: socket.socket,
    fd: int,
    reached: list[int],
    end: int,
    sha: Any | None,
    progress: Callable[[int], object],
) -> bool:
    """The spliced path; False when it hands the rest of the body to the copy path, which goes on from reached[0]
    (hashed up to where the body stands): the kernel refused splice(2) before a byte of the socket went through a
    pipe, or the socket holds urgent (out-of-band) data, which splice(2) never reads past."""
    global _splice_works
    length = response.length or 0
    # What http.client has read past the headers waits in its buffer (peek reads once if it is empty, within the
    # socket's timeout): take it the ordinary way.
    buffered = len(response.fp.peek(0)[:length]) if length else 0
    buf = receive_buffer()
    while buffered:
        n = response.readinto(buf[: min(buffered, len(buf))])
        _land(fd, buf[:n], reached, sha, progress)
        buffered -= n
    left = response.length or 0
    if not left:
        return True
    r, w = os.pipe()
    pos = hashed = reached[0]
    window: _Window | None = None

    def catch_up() -> None:
        nonlocal hashed
        if sha is not None and pos > hashed:
            assert window is not None
            window.hash(sha, hashed, pos)
        progress(pos - hashed)
        hashed = reached[0] = pos

    try:
        if sha is not None:
            window = _Window(fd, pos, pos + left)
        with contextlib.suppress(OSError):  # beyond the system's pipe limits: smaller steps
            fcntl.fcntl(w, _F_SETPIPE_SZ, SPLICE_STEP)
        timeout = sock.gettimeout()
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        waited = False
        while left:
            try:
                n = os.splice(sock.fileno(), w, min(SPLICE_STEP, left), flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if waited:  # readable, and still nothing to splice: urgent data ahead
                    catch_up()
                    return False
                events = poller.poll(-1 if timeout is None else int(timeout * 1000) + 1)
                if not events:
                    raise TimeoutError(f"no data from the store for {timeout} s") from None
                if any(ev & select.POLLPRI for _, ev in events):
                    catch_up()
                    return False
                waited = True
                continue
            except OSError as exc:
                if pos == reached[0] == hashed and exc.errno in _REFUSED:
                    _splice_works = False
                    return False
                raise
            waited = False
            if not n:
                raise http.client.IncompleteRead(b"", left)
            left -= n
            response.length = left  # as http.client's own reads keep it
            _drain(r, fd, n, pos)
            pos += n
            if sha is None or pos - hashed >= SPLICE_STEP or not left:
                catch_up()
        response.read()  # nothing left: http.client closes its side as after reading the body itself
        return True
    finally:
        os.close(r)
        os.close(w)
        if window is not None:
            window.close()


# How the kernel (or a seccomp profile) says no to splice(2) for a socket or a file system.
_REFUSED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES)


def _drain(r: int, fd: int, n: int, pos: int) -> None:
    """Move n bytes from the pipe into the file at pos (spliced, or read and written where the file system refuses
    splice(2))."""
    global _splice_works
    while n:
        if _splice_works:
            try:
                m = os.splice(r, fd, n, offset_dst=pos, flags=os.SPLICE_F_MOVE)
            except OSError as exc:
                if exc.errno not in _REFUSED:
                    raise
                _splice_works = False
                continue
        else:
            block = os.read(r, min(n, RECEIVE_BLOCK))
            _pwrite_all(fd, memoryview(block), pos)
            m = len(block)
        n, pos = n - m, pos + m


_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # on a shared file mapping: unmap, the data stays


class _Window:
    """The bytes of [start, end) of the file, read back for hashing: through a shared mapping (no copy; a file
    system that cannot map falls back to reading into this thread's buffer). Mapped writable only because ctypes
    hashes a writable buffer in place; nothing writes through it."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd = fd
        self._base = start - start % mmap.ALLOCATIONGRANULARITY
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        try:
            self._map = mmap.mmap(fd, end - self._base, offset=self._base)
        except (OSError, ValueError):
            return
        self._view = memoryview(self._map)

    def hash(self, sha: Any, lo: int, hi: int) -> None:
        if self._view is not None and self._map is not None:
            with self._view[lo - self._base : hi - self._base] as part:
                sha.update(part)
            if _DONTNEED is not None:
                # Unmap the pages hashed (they stay in the page cache): a mapped page costs the kernel more to
                # reclaim. A 4 GiB download under page-cache pressure: 842 MB/s against 777 keeping them mapped.
                start = lo - self._base
                start -= start % mmap.PAGESIZE
                self._map.madvise(_DONTNEED, start, hi - self._base - start)
            return
        if hash_range(self._fd, lo, hi - lo, sha, receive_buffer()) != hi - lo:
            raise OSError(errno.EIO, f"the partial file ended before {hi} bytes while hashing it")

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
        if self._map is not None:
            # A view still held (by the traceback of an error raised while hashing) keeps the mapping until it goes;
            # that error, not this one, is what the caller should see.
            with contextlib.suppress(BufferError):
                self._map.close()
