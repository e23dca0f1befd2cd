"""The arithmetic of scripts/bench_store.py's table: each client's CPU ceiling and the ratios against the best peer."""

from __future__ import annotations

import pytest

from tests.scripts import load_script

GiB = 1 << 30

bench = load_script("bench_store")


def _secs(wall: float, client: float, server: float, rounds: int = 3) -> dict[str, list[float]]:
    """Seconds of one client over `rounds` rounds, the same in both directions (medians of constant lists)."""
    return {
        d + k: [v] * rounds
        for d in ("upload", "download")
        for k, v in (("", wall), ("_cpu", client), ("_server_cpu", server))
    }


def test_shared_cores_ceiling_spreads_client_and_server_cpu_over_the_cores() -> None:
    # 1 GiB: 0.6 CPU-s in the client and 0.4 in the server on 2 shared cores: 0.5 s of wall time at the most.
    got = bench.ceiling(GiB, _secs(1.0, 0.6, 0.4), "upload", bench.Cpus(2, 2, shared=True))
    assert got == pytest.approx(GiB / 0.5 / 1e6)


def test_split_cores_ceiling_is_the_side_that_runs_out_first() -> None:
    cpus = bench.Cpus(1, 1, shared=False)
    assert bench.ceiling(GiB, _secs(1.0, 0.6, 0.4), "download", cpus) == pytest.approx(GiB / 0.6 / 1e6)
    assert bench.ceiling(GiB, _secs(1.0, 0.2, 0.9), "download", cpus) == pytest.approx(GiB / 0.9 / 1e6)
    assert str(cpus) == "1 client + 1 server cores"


def test_table_names_the_best_peer_and_ours_ceiling_against_it() -> None:
    secs = {
        "ours": _secs(2.0, 1.5, 0.5),  # 537 MB/s; ceiling on 2 shared cores: 1 s, 1,074 MB/s
        "boto3": _secs(1.6, 0.8, 0.4),  # 671 MB/s, the best peer
        "s5cmd": _secs(4.0, 2.0, 1.0),
    }
    lines = bench.table(GiB, secs, bench.Cpus(2, 2, shared=True))
    assert "CPU ceiling on 2 shared cores" in lines[0]
    ours = next(line for line in lines if line.startswith("| ours |"))
    assert ours == "| ours | 537 | 537 | 1.50 + 0.50 | 1.50 + 0.50 | 1074 / 1074 |"
    last = lines[-1]
    assert last.startswith("| ours / best peer | 0.80x of boto3 | 0.80x of boto3 |")
    assert last.endswith("ours' ceiling: 1.60x / 1.60x |")
