"""The generated CRD: no drift from the models, a structural schema, and the rules that hold without the operator."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmengine.api import crdgen
from llmengine.generate import sync

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return crdgen.crd()


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_committed_files_match_the_models(tmp_path: Path) -> None:
    assert sync(crdgen.outputs(tmp_path), check=False) == 0
    for rel in (crdgen.CRD_PATH, crdgen.CHART_CRD_PATH):
        generated = (tmp_path / rel).read_bytes()
        committed = (ROOT / rel).read_bytes()
        assert generated == committed, f"{rel} drifted from the API models: run `llmengine generate` and commit"


def test_check_mode(tmp_path: Path) -> None:
    assert sync(crdgen.outputs(tmp_path), check=True) == 1
    assert sync(crdgen.outputs(tmp_path), check=False) == 0
    assert sync(crdgen.outputs(tmp_path), check=True) == 0
    (tmp_path / crdgen.CRD_PATH).write_text("changed")
    assert sync(crdgen.outputs(tmp_path), check=True) == 1


def test_generation_is_deterministic() -> None:
    assert crdgen.outputs(Path(".")) == crdgen.outputs(Path("."))


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in _nodes(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        for banned in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const", "nullable"):
            assert banned not in node, f"{path} has {banned}"
        assert node.get("additionalProperties") is not False, f"{path}: additionalProperties: false"
        assert not ("properties" in node and "additionalProperties" in node), (
            f"{path}: both properties and additionalProperties"
        )
        if node.get("type") == "object" and path != ".metadata":  # metadata's schema is the API server's
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), path
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), f"{path}: array without items"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node
        for req in node.get("required", []):
            assert req in node.get("properties", {}), f"{path}: required {req} is not a property"


def test_defaults_are_valid_against_their_schema(schema: dict[str, Any]) -> None:
    py_types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}
    for path, node in _nodes(schema):
        if "default" in node:
            assert isinstance(node["default"], py_types[node["type"]]), path
            if "enum" in node:
                assert node["default"] in node["enum"], path


def test_every_spec_field_is_described(schema: dict[str, Any]) -> None:
    for path, node in _nodes(schema["properties"]["spec"], ".spec"):
        if path.endswith(".*") or path.endswith("[]"):
            continue
        assert node.get("description"), f"{path} has no description for kubectl explain"


def test_free_form_objects_preserve_unknown_fields(schema: dict[str, Any]) -> None:
    target = schema["properties"]["spec"]["properties"]["target"]["properties"]
    assert target["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    assert target["tolerations"]["items"]["x-kubernetes-preserve-unknown-fields"] is True
    resources = schema["properties"]["spec"]["properties"]["serving"]["properties"]["resources"]["properties"]
    assert resources["requests"]["additionalProperties"] == {"x-kubernetes-int-or-string": True}


def test_enums_defaults_and_bounds(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    assert spec["backend"] == {
        "default": "tensorrt",
        "description": spec["backend"]["description"],
        "enum": ["tensorrt", "pytorch"],
        "type": "string",
    }
    assert spec["target"]["properties"]["gpu"]["enum"] == [
        "A100-40GB",
        "A100-80GB",
        "L40S",
        "H100-80GB",
        "H100-NVL",
        "H200",
        "B200",
    ]
    frac = spec["serving"]["properties"]["runtime"]["properties"]["kvCacheFreeGpuMemoryFraction"]
    assert (frac["minimum"], frac["maximum"], frac["default"]) == (0.01, 1, 0.9)
    assert not frac.get("exclusiveMinimum") and frac["exclusiveMaximum"] is True
    assert spec["parallelism"]["properties"]["tensor"]["minimum"] == 1
    assert spec["serving"]["properties"]["replicas"]["minimum"] == 0
    assert spec["store"]["properties"]["prefix"]["default"] == "engines"
    assert spec["rebuildPolicy"]["properties"]["mode"]["default"] == "Manual"
    assert schema["required"] == ["spec"]
    assert sorted(schema["properties"]["spec"]["required"]) == ["model", "target"]


def test_names_columns_and_subresources(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "llmengines.llmengine.io"
    assert spec["group"] == "llmengine.io" and spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "LLMEngine",
        "llmengines",
        ["llme"],
        ["llm"],
    )
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.serving.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "Available": '.status.conditions[?(@.type=="Available")].status',
        "GPU": ".status.gpu",
        "Engine": ".status.servingEngine.short",
        "Replicas": ".status.readyReplicas",
        "URL": ".status.url",
        "Build-Stage": ".status.build.stage",
        "Build-Started": ".status.build.startedAt",
        "Reason": '.status.conditions[?(@.type=="Ready")].reason',
        "Age": ".metadata.creationTimestamp",
    }
    wide = {c["name"] for c in version["additionalPrinterColumns"] if c.get("priority")}
    assert wide == {"URL", "Build-Stage", "Build-Started", "Reason"}  # kubectl get -o wide


def _rules(node: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def _messages(schema: dict[str, Any]) -> list[str]:
    return [r["message"] for _, node in _nodes(schema) for r in node.get("x-kubernetes-validations", [])]


def test_cel_rules(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    model = spec["properties"]["model"]
    source = model["properties"]["source"]
    assert any("huggingFace" in r and "s3" in r for r in _rules(source))
    assert any("catalog" in r and "architecture" in r for r in _rules(model))
    assert "revision" in source["properties"]["huggingFace"]["required"]
    assert any("size(self.revision)" in r for r in _rules(source["properties"]["huggingFace"]))
    assert any("traffic" in r and "maxBatchSize" in r for r in _rules(spec))
    assert any("migProfile" in r and "pipeline" in r for r in _rules(spec))
    for name in ("maxBatchSize", "maxNumTokens", "maxSeqLen"):
        assert any(f"self.serving.runtime.{name} <= self.build.{name}" in r for r in _rules(spec))
    assert any("self.tensor >= 1" in r for r in _rules(spec["properties"]["parallelism"]))
    traffic = spec["properties"]["traffic"]["properties"]
    assert "self.max >= self.mean" in _rules(traffic["inputTokens"])
    assert "self.max >= self.mean" in _rules(traffic["outputTokens"])
    # Messages tell the user which field and what to do. A rule of a model used at several paths (spec.pods,
    # spec.pods.build, spec.serving.env) names its field; the API server puts the full path before it.
    for message in _messages(schema):
        assert "spec." in message or "max" in message or re.match(r"^[a-zA-Z]+: ", message), message
        assert any(w in message for w in ("set", "remove", "lower", "raise", "must", "required", "pin"))


def test_cel_rules_guard_optional_fields(schema: dict[str, Any]) -> None:
    # A rule reading an optional field without has() fails at admission when the field is absent.
    spec_rules = _rules(schema["properties"]["spec"])
    for rule in spec_rules:
        for field in ("self.serving.runtime.", "self.build.", "self.parallelism."):
            if field in rule:
                assert "has(" in rule


def test_helm_template_wraps_the_same_crd() -> None:
    text = (ROOT / crdgen.CHART_CRD_PATH).read_text()
    lines = text.splitlines()
    assert lines[1] == "{{- if .Values.crds.install }}"
    assert lines[-1] == "{{- end }}"
    # The chart's helper adds the annotations (keep, Argo CD's Prune=false, the sync wave)...
    assert lines[6] == '  {{- include "llmengine-operator.crdAnnotations" . | nindent 2 }}'
    # ...to what is otherwise the plain CRD, with no other template action in it.
    plain = "\n".join(line for line in lines if "{{" not in line)
    assert yaml.safe_load(plain) == yaml.safe_load((ROOT / crdgen.CRD_PATH).read_text())
    assert sum("{{" in line for line in lines) == 3


def test_chart_directory_holds_only_the_crd_from_us() -> None:
    generated = crdgen.outputs(ROOT)
    assert set(generated) == {ROOT / crdgen.CRD_PATH, ROOT / crdgen.CHART_CRD_PATH}
