"""The chart's README made from values.yaml: the committed one is current, every value is documented and declared in
the schema, and a values.yaml that is not is refused with the keys named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmengine import chartdoc
from llmengine.generate import sync

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / chartdoc.CHART_DIR

SAMPLE = """\
# == General
# -- How many.
replicaCount: 1

# The image.
image:
  # -- Repository, continued
  # on a second line.
  repository: "reg/x|y"
  tag: ""

# == The pod
# -- Free-form, documented as a whole.
resources:
  limits:
    cpu: "1"
"""
SCHEMA = {
    "type": "object",
    "properties": {
        "replicaCount": {"type": "integer"},
        "image": {"type": "object", "properties": {"repository": {"type": "string"}, "tag": {"type": "string"}}},
        "resources": {"type": "object", "additionalProperties": {"type": "object"}},
    },
}
CHART_META = {"name": "c", "description": "A chart.", "version": "1", "appVersion": "2"}


def test_committed_readme_is_what_values_yaml_makes() -> None:
    """Fails when values.yaml, values.schema.json or Chart.yaml changed without `llmengine generate`."""
    assert sync(chartdoc.outputs(ROOT), check=True) == 0, "charts/llmengine-operator/README.md is stale"


def test_stale_readme_is_reported(tmp_path: Path) -> None:
    target = tmp_path / chartdoc.CHART_DIR
    target.mkdir(parents=True)
    for name in ("values.yaml", "values.schema.json", "Chart.yaml"):
        (target / name).write_text((CHART / name).read_text())
    (target / "README.md").write_text((CHART / "README.md").read_text())
    assert sync(chartdoc.outputs(tmp_path), check=True) == 0
    values = (target / "values.yaml").read_text()
    (target / "values.yaml").write_text(values.replace("replicaCount: 1", "replicaCount: 2"))
    assert sync(chartdoc.outputs(tmp_path), check=True) == 1


def test_parse_reads_documentation_groups_and_continuations() -> None:
    keys = {k.path: k for k in chartdoc.parse(SAMPLE)}
    assert keys[("replicaCount",)].doc == "How many." and keys[("replicaCount",)].title == "General"
    assert keys[("image",)].group == "The image." and not keys[("image",)].doc
    assert keys[("image", "repository")].doc == "Repository, continued on a second line."
    assert keys[("image", "tag")].doc == ""
    assert keys[("resources", "limits", "cpu")].doc == ""


def test_every_value_must_be_documented_and_declared() -> None:
    with pytest.raises(chartdoc.ValuesDocError, match=r"comment.*: image\.tag$"):
        chartdoc.render(SAMPLE, SCHEMA, CHART_META)
    documented = SAMPLE.replace('  tag: ""', '  # -- The tag.\n  tag: ""')
    text = chartdoc.render(documented, SCHEMA, CHART_META)
    assert '| `image.repository` | string | `"reg/x\\|y"` | Repository, continued on a second line. |' in text
    assert '| `resources` | object | `{"limits": {"cpu": "1"}}` | Free-form, documented as a whole. |' in text
    assert "### `image`\n\nThe image.\n" in text
    assert text.index("### General") < text.index("### `image`") < text.index("### The pod")
    undeclared = {**SCHEMA, "properties": {k: v for k, v in SCHEMA["properties"].items() if k != "replicaCount"}}
    with pytest.raises(chartdoc.ValuesDocError, match=r"values\.schema\.json: replicaCount"):
        chartdoc.render(documented, undeclared, CHART_META)


def test_every_documented_chart_value_has_a_row_with_its_schema_type() -> None:
    values_text = (CHART / "values.yaml").read_text()
    readme = (CHART / "README.md").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    for key in chartdoc.parse(values_text):
        if key.doc:
            assert f"| `{'.'.join(key.path)}` |" in readme or '"' in "".join(key.path)
    assert yaml.safe_load(values_text).keys() <= schema["properties"].keys()
    assert schema["additionalProperties"] is False
