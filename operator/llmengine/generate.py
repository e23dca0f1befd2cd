"""`llmengine generate`: every file made from a source in the repository. The LLMEngine CRD (plain and as the chart's
template) from the API models, and the chart's README from its commented values.yaml. CI runs it with --check."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmengine import chartdoc
from llmengine.api import crdgen


def outputs(root: Path) -> dict[Path, str]:
    return {**crdgen.outputs(root), **chartdoc.outputs(root)}


def sync(files: dict[Path, str], check: bool) -> int:
    """Write the files that differ (or with `check`, write nothing): 1 when `check` found one out of date."""
    stale = []
    for path, text in files.items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if check and stale:
        for path in stale:
            print(f"out of date: {path} (run 'llmengine generate')")
        return 1
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmengine generate", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are out of date")
    args = parser.parse_args(argv)
    try:
        files = outputs(args.root)
    except chartdoc.ValuesDocError as e:
        print(f"{args.root / chartdoc.CHART_DIR / 'values.yaml'}: {e}")
        return 1
    return sync(files, args.check)
