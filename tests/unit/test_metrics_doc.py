"""docs/metrics.md lists every metric the code defines, with its type, labels, meaning and an example query."""

from __future__ import annotations

import re
from pathlib import Path

from tests.metrics_catalog import defined_metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def _documented(page: str) -> dict[str, list[str]]:
    """Rows of the page's tables whose first cell is an llmengine_ metric: name -> the other cells."""
    rows: dict[str, list[str]] = {}
    for line in page.splitlines():
        m = re.match(r"\|\s*`(llmengine_[a-z0-9_]+)`\s*\|(.*)\|\s*$", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice"
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def _undocumented(page: str) -> list[str]:
    return sorted(set(defined_metrics()) - set(_documented(page)))


def test_the_code_defines_the_metrics_it_is_known_to_export() -> None:
    """The catalog reads the code: it finds both the operator's and the serving proxy's metrics."""
    metrics = defined_metrics()
    assert metrics["llmengine_engines"].kind == "gauge"
    assert metrics["llmengine_builds_total"].kind == "counter"
    assert metrics["llmengine_requests_total"].source.startswith("server/")
    assert metrics["llmengine_request_prompt_tokens"].kind == "histogram"


def test_every_defined_metric_is_documented_with_its_type() -> None:
    page = DOC.read_text()
    assert not _undocumented(page), f"docs/metrics.md does not list {_undocumented(page)}"
    documented = _documented(page)
    for name, metric in defined_metrics().items():
        assert documented[name][0] == metric.kind, f"{name}: documented as {documented[name][0]}, is {metric.kind}"


def test_a_missing_row_is_caught() -> None:
    page = "\n".join(ln for ln in DOC.read_text().splitlines() if not ln.startswith("| `llmengine_engines`"))
    assert _undocumented(page) == ["llmengine_engines"]


def test_every_documented_metric_exists_and_has_labels_meaning_and_example() -> None:
    metrics = defined_metrics()
    for name, cells in _documented(DOC.read_text()).items():
        assert name in metrics, f"docs/metrics.md lists {name}, which the code does not define"
        _kind, labels, meaning, example = cells
        assert labels and meaning, name
        # The example queries this metric (a histogram through its series).
        assert re.search(rf"\b{name}(_bucket|_sum|_count)?\b", example), (name, example)
