"""The Prometheus metrics the code defines, read from its prometheus_client constructor calls (no import: the
serving proxy's metrics live in a per-instance registry)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "operator" / "llmengine"
KINDS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "Info": "info",
    # Families a custom collector makes at scrape time (per-engine series read from the operator's state).
    "GaugeMetricFamily": "gauge",
}


@dataclass(frozen=True)
class Metric:
    name: str  # as exported: a counter's with its _total suffix
    kind: str
    source: str  # the module that defines it, relative to the package

    def series(self) -> set[str]:
        """The sample names the metric exports (what a query can name)."""
        if self.kind == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        if self.kind == "summary":
            return {self.name, f"{self.name}_sum", f"{self.name}_count"}
        if self.kind == "info":
            return {f"{self.name}_info"}
        return {self.name}


def _constructor(call: ast.Call) -> str | None:
    f = call.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return name if name in KINDS else None


def defined_metrics() -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or (ctor := _constructor(node)) is None:
                continue
            if not node.args or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str):
                continue
            name = node.args[0].value
            kind = KINDS[ctor]
            if kind == "counter":  # prometheus_client exports a counter as <name>_total, with or without the suffix
                name = name.removesuffix("_total") + "_total"
            out[name] = Metric(name, kind, str(path.relative_to(PACKAGE)))
    return out
