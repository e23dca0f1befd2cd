"""SHA-256 that can be stopped at a 64-byte boundary and resumed there: its chaining value.

SHA-256 (FIPS 180-4) hashes a message in 64-byte blocks; after each block its whole state is eight 32-bit words,
the chaining value, plus the count of bytes so far. A file's SHA-256 computed once, in order, with the chaining value
noted at the end of every part (parts are multiples of 64 bytes), lets a download verify each part on its own: start
from the value before the part, hash the part, and the result must equal the value noted after it; the last part,
finished, must give the file's SHA-256. One hash of every byte on upload yields both the whole-file digest and a
check per part, where separate part digests cost a second hash of every byte (docs/benchmarks.md).

Python's `hashlib` does not expose the chaining value, so this reads it through OpenSSL's SHA256_* functions, in
the same libcrypto that `hashlib` uses, by ctypes (which lets go of the GIL during each call, as `hashlib` does).
Those functions are deprecated since OpenSSL 3.0 in favour of EVP but still exported; the structure they fill has
been the same since 0.9.8. `AVAILABLE` is False (and callers fall back to separate part digests) when the library
or the functions are missing or a self-test against `hashlib` fails on load.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
from typing import Any

from llmengine.clients.store.layout import SHA256_BLOCK as BLOCK  # a chaining value exists only at multiples of it

_IV = bytes.fromhex("6a09e667bb67ae853c6ef372a54ff53a510e527f9b05688c1f83d9ab5be0cd19")


class _Ctx(ctypes.Structure):
    # OpenSSL's SHA256_CTX (include/openssl/sha.h): h[8], Nl, Nh, data[16], num, md_len; SHA_LONG is 32 bits.
    _fields_ = [
        ("h", ctypes.c_uint32 * 8),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint32 * 16),
        ("num", ctypes.c_uint),
        ("md_len", ctypes.c_uint),
    ]


# Set to 0 (or off, false, no) to leave OpenSSL's SHA256_* alone: uploads then write separate part digests and
# downloads hash files with chaining values whole, in order.
SWITCH = "LLMENGINE_SHA256_CHAINING"


def _load() -> tuple[Any, str]:
    """SHA256_* from the libcrypto that `hashlib` is linked against: looked up through `_hashlib`'s own handle, which
    searches the libraries it depends on, so that no second OpenSSL is loaded (nor a system one: macOS aborts a
    process that loads its unversioned libcrypto)."""
    if os.environ.get(SWITCH, "").strip().lower() in ("0", "off", "false", "no"):
        return None, f"{SWITCH} turns them off"
    try:
        import _hashlib

        where = str(_hashlib.__file__)
        lib = ctypes.CDLL(where)
        for name in ("SHA256_Init", "SHA256_Update", "SHA256_Final"):
            getattr(lib, name)
    except (ImportError, OSError, AttributeError) as exc:
        return None, f"OpenSSL's SHA256_* not found through hashlib: {exc}"
    ctx_p = ctypes.POINTER(_Ctx)
    lib.SHA256_Init.argtypes = [ctx_p]
    lib.SHA256_Update.argtypes = [ctx_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.SHA256_Final.argtypes = [ctypes.c_char_p, ctx_p]
    for f in (lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final):
        f.restype = ctypes.c_int
    return lib, where


_lib, _where = _load()


class ChainedSha256:
    """A SHA-256 in progress: `update` as hashlib's; `state()` the chaining value (64 hex digits, the eight words
    big-endian as FIPS 180-4 writes them) when the bytes so far are a multiple of 64; `hexdigest()` the finished
    digest. Built from a chaining value and the number of bytes it covers, it goes on from there."""

    def __init__(self, state: str | None = None, offset: int = 0) -> None:
        if _lib is None:
            raise RuntimeError(f"SHA-256 chaining values are not available here ({_where})")
        if offset % BLOCK or (state is None) != (offset == 0):
            raise ValueError("a SHA-256 resumes only at a multiple of 64 bytes, from the chaining value there")
        self._ctx = _Ctx()
        _lib.SHA256_Init(ctypes.byref(self._ctx))
        if state is not None:
            words = struct.unpack(">8I", bytes.fromhex(state))
            self._ctx.h[:] = words
            bits = offset * 8
            self._ctx.Nl, self._ctx.Nh = bits & 0xFFFFFFFF, bits >> 32

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """As hashlib's: any buffer, hashed as its bytes. A writable contiguous one (what the store passes) is
        hashed where it lies; any other is copied first."""
        if not isinstance(data, bytes):
            with memoryview(data) as view:  # released here, even on an error: a mapped file can then be closed
                if view.readonly or not view.c_contiguous:
                    data = view.tobytes()
                else:
                    self._update_in_place(view.cast("B"))
                    return
        if data:
            _lib.SHA256_Update(ctypes.byref(self._ctx), data, len(data))

    def _update_in_place(self, view: memoryview) -> None:
        if not view.nbytes:
            return
        window = (ctypes.c_char * view.nbytes).from_buffer(view)
        try:
            _lib.SHA256_Update(ctypes.byref(self._ctx), window, view.nbytes)
        finally:
            del window
            view.release()

    def state(self) -> str:
        if self._ctx.num:
            raise ValueError("no SHA-256 chaining value mid-block: the bytes so far are not a multiple of 64")
        return struct.pack(">8I", *self._ctx.h).hex()

    def hexdigest(self) -> str:
        done = _Ctx.from_buffer_copy(self._ctx)  # finish a copy: this one can go on
        out = ctypes.create_string_buffer(32)
        _lib.SHA256_Final(out, ctypes.byref(done))
        return out.raw.hex()


def _self_test() -> str | None:
    """Compare with hashlib across a resume: None when the chaining values are SHA-256's."""
    data = bytes(range(256)) * 5 + b"tail"
    try:
        first = ChainedSha256()
        first.update(memoryview(bytearray(data[:256])))
        if ChainedSha256().state() != _IV.hex():
            return "the initial chaining value is not SHA-256's"
        resumed = ChainedSha256(first.state(), 256)
        resumed.update(data[256:])
        if (
            resumed.hexdigest() != hashlib.sha256(data).hexdigest()
            or first.hexdigest() != hashlib.sha256(data[:256]).hexdigest()
        ):
            return "a resumed SHA-256 differs from hashlib's"
    except (OSError, ValueError, RuntimeError, ctypes.ArgumentError) as exc:
        return str(exc)
    return None


if _lib is not None and (_problem := _self_test()) is not None:
    _lib, _where = None, f"{_where}: {_problem}"

AVAILABLE = _lib is not None
WHY_NOT = "" if AVAILABLE else _where
