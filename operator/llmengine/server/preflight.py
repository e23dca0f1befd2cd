"""GPU preflight before serving: enough GPUs, the engine's SM, enough free memory, no TP across MIG slices.

Standalone: ``python -m llmengine.server.preflight --expect-sm 9.0 --world-size 1 --min-free-bytes N`` prints a
JSON report of what NVML shows and what failed; exit 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from llmengine.server.gpus import GpuReport, probe

GiB = 1024**3
DEFAULT_MARGIN_BYTES = 2 * GiB


@dataclass(frozen=True)
class Expectation:
    world_size: int
    sm: str | None = None
    min_free_bytes: int = 0


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def check(report: GpuReport, exp: Expectation) -> list[str]:
    """One line per failed check (empty when the GPUs can serve the engine)."""
    if report.error is not None:
        return [f"{report.error}: no usable GPU in this container (request nvidia.com/gpu)"]
    devices = report.devices
    problems: list[str] = []
    if len(devices) < exp.world_size:
        problems.append(
            f"the engine needs {exp.world_size} GPUs (tp x pp) but {len(devices)} are visible: "
            f"give the pod {exp.world_size} GPUs"
        )
    used = devices[: exp.world_size]
    if exp.world_size > 1 and any(d.mig_device for d in used):
        problems.append("tensor/pipeline parallelism across MIG slices is not supported: serve on full GPUs")
    for i, d in enumerate(used):
        mig = f", MIG {d.mig_profile}" if d.mig_profile and d.mig_profile not in d.name else ""
        label = f"GPU {i} ({d.name}{mig})"
        if exp.sm is not None and d.compute_capability != exp.sm:
            problems.append(
                f"{label} is SM {d.compute_capability} but the engine was built for SM {exp.sm}: "
                "schedule on the engine's GPU class or rebuild"
            )
        if d.memory_free_bytes < exp.min_free_bytes:
            problems.append(
                f"{label} has {_gib(d.memory_free_bytes)} free, needs at least {_gib(exp.min_free_bytes)} "
                "(engine rank + margin)"
            )
    return problems


def run_preflight(exp: Expectation, nvml: Any = None) -> tuple[dict[str, Any], list[str]]:
    report = probe(nvml)
    problems = check(report, exp)
    doc = {
        "ok": not problems,
        "problems": problems,
        "expect": {"world_size": exp.world_size, "sm": exp.sm, "min_free_bytes": exp.min_free_bytes},
        **report.to_dict(),
    }
    return doc, problems


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmengine.server.preflight", description=__doc__.splitlines()[0])
    p.add_argument("--expect-sm", default=None, help="compute capability the engine was built for, e.g. 9.0")
    p.add_argument("--world-size", type=int, default=1, help="GPUs the engine needs (tp x pp)")
    p.add_argument("--min-free-bytes", type=int, default=0, help="free memory every used GPU must have")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, nvml: Any = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    doc, problems = run_preflight(Expectation(args.world_size, args.expect_sm, args.min_free_bytes), nvml)
    print(json.dumps(doc, indent=2))
    for p in problems:
        print(f"preflight: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
