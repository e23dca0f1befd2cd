"""SHA-256 chaining values (clients/store/chain.py): checked against hashlib and against FIPS 180-4 itself."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from llmengine.clients.store import chain
from llmengine.clients.store.files import FileJob, range_checks

pytestmark = pytest.mark.skipif(not chain.AVAILABLE, reason=f"no SHA-256 chaining values here: {chain.WHY_NOT}")

# FIPS 180-4, 4.2.2 and 5.3.3: SHA-256's round constants and initial value, for an oracle that is not OpenSSL.
_K = [
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
]  # fmt: skip
_H0 = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19]


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & 0xFFFFFFFF


def _compress(h: list[int], block: bytes) -> list[int]:
    """FIPS 180-4, 6.2.2: one 64-byte block into the chaining value."""
    w = list(struct.unpack(">16I", block))
    for t in range(16, 64):
        s0 = _rotr(w[t - 15], 7) ^ _rotr(w[t - 15], 18) ^ (w[t - 15] >> 3)
        s1 = _rotr(w[t - 2], 17) ^ _rotr(w[t - 2], 19) ^ (w[t - 2] >> 10)
        w.append((w[t - 16] + s0 + w[t - 7] + s1) & 0xFFFFFFFF)
    a, b, c, d, e, f, g, hh = h
    for t in range(64):
        t1 = (hh + (_rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)) + ((e & f) ^ (~e & g)) + _K[t] + w[t]) & 0xFFFFFFFF
        t2 = ((_rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) & 0xFFFFFFFF
        a, b, c, d, e, f, g, hh = (t1 + t2) & 0xFFFFFFFF, a, b, c, (d + t1) & 0xFFFFFFFF, e, f, g
    return [(x + y) & 0xFFFFFFFF for x, y in zip(h, [a, b, c, d, e, f, g, hh], strict=True)]


def _fips_state(data: bytes) -> str:
    h = _H0
    for i in range(0, len(data), 64):
        h = _compress(h, data[i : i + 64])
    return struct.pack(">8I", *h).hex()


def test_the_chaining_value_is_fips_180_4s_and_a_resumed_hash_finishes_as_hashlibs() -> None:
    data = os.urandom(64 * 40 + 17)
    whole = chain.ChainedSha256()
    states = []
    for off in range(0, 64 * 40, 640):  # four parts of 640 bytes, then 17
        whole.update(memoryview(bytearray(data[off : off + 640])))
        states.append(whole.state())
        assert states[-1] == _fips_state(data[: off + 640])
    whole.update(data[64 * 40 :])
    assert whole.hexdigest() == hashlib.sha256(data).hexdigest()
    assert chain.ChainedSha256().state() == _fips_state(b"")  # the initial value
    # Each part on its own, from the value before it, reaches the value after it; the last one the file's digest.
    for i in range(1, 4):
        part = chain.ChainedSha256(states[i - 1], 640 * i)
        part.update(data[640 * i : 640 * (i + 1)])
        assert part.state() == states[i]
    last = chain.ChainedSha256(states[3], 2560)
    last.update(bytes(data[2560:]))
    assert last.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_changed_byte_moves_the_parts_chaining_value_and_nothing_resumes_mid_block() -> None:
    data = bytearray(os.urandom(1024))
    start = chain.ChainedSha256()
    start.update(data[:512])
    good = chain.ChainedSha256(start.state(), 512)
    good.update(data[512:])
    data[700] ^= 1
    bad = chain.ChainedSha256(start.state(), 512)
    bad.update(memoryview(data)[512:])
    assert bad.state() != good.state()
    mid = chain.ChainedSha256()
    mid.update(b"x" * 65)
    with pytest.raises(ValueError, match="not a multiple of 64"):
        mid.state()
    with pytest.raises(ValueError, match="multiple of 64"):
        chain.ChainedSha256(start.state(), 100)
    with pytest.raises(ValueError, match="multiple of 64"):
        chain.ChainedSha256(None, 512)  # an offset without the value there


def test_a_download_checks_each_part_from_its_chaining_values_or_hashes_the_file_whole_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * 256 + 10)
    states = [_fips_state(data[: 256 * i]) for i in (1, 2, 3)]
    job = FileJob(
        key="k",
        dest=tmp_path / "f",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        name="f",
        part_size=256,
        part_states=states,
    )
    ranges = [(0, 256), (256, 256), (512, 256), (768, 10)]
    checks = range_checks(job, ranges)
    assert checks is not None
    for check, (off, ln) in zip(checks, ranges, strict=True):
        sha = check.start()
        sha.update(data[off : off + ln])
        assert check.result(sha) == check.want
    assert [c.want for c in checks] == [*states, job.sha256]
    monkeypatch.setattr(chain, "AVAILABLE", False)
    assert range_checks(job, ranges) is None  # the caller hashes the whole file in order against its SHA-256


@pytest.mark.parametrize("offset", [2**29 - 64, 2**29, 2**32, 8_123_456_768, 2**40])
def test_a_hash_resumed_deep_into_a_file_counts_its_bytes_as_fips_180_4_pads_them(offset: int) -> None:
    """Engine files resume far past 512 MiB, where the bit count needs more than 32 bits."""
    start = os.urandom(32).hex()
    tail = os.urandom(64 * 3 + 17)
    h = [int(start[i : i + 8], 16) for i in range(0, 64, 8)]
    for i in range(0, 64 * 3, 64):
        h = _compress(h, tail[i : i + 64])
    after_blocks = struct.pack(">8I", *h).hex()
    rest = tail[64 * 3 :] + b"\x80"
    rest += b"\x00" * ((56 - len(rest)) % 64) + struct.pack(">Q", (offset + len(tail)) * 8)
    for i in range(0, len(rest), 64):
        h = _compress(h, rest[i : i + 64])
    resumed = chain.ChainedSha256(start, offset)
    resumed.update(memoryview(bytearray(tail[: 64 * 3])))
    assert resumed.state() == after_blocks
    resumed.update(tail[64 * 3 :])
    assert resumed.hexdigest() == struct.pack(">8I", *h).hex()


def test_the_switch_leaves_openssl_alone_and_says_why() -> None:
    import subprocess
    import sys

    probe = "from llmengine.clients.store import chain; print(chain.AVAILABLE, '|', chain.WHY_NOT)"
    for value, available in (("0", "False"), ("off", "False"), ("1", "True"), ("", "True")):
        env = {**os.environ, chain.SWITCH: value}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split(" | ")[0] == available, (value, out.stdout)
        if available == "False":
            assert chain.SWITCH in out.stdout
