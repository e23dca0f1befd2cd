"""The admission verdict: what the validating webhook refuses, allows and warns about."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmengine.plan.admission import Verdict, rejection_message, review

EXAMPLES = Path(__file__).parents[2] / "examples"


def _example(name: str = "llama3.1-8b-fp8-h100.yaml") -> dict[str, Any]:
    obj = yaml.safe_load((EXAMPLES / name).read_text())
    obj["metadata"]["namespace"] = "team-a"
    return obj


def _fp8_on_a100() -> dict[str, Any]:
    obj = _example()
    obj["spec"]["target"]["gpu"] = "A100-80GB"
    return obj


def test_valid_create_is_allowed() -> None:
    v = review(_example(), None, "CREATE")
    assert v == Verdict(allowed=True, warnings=v.warnings)
    assert v.allowed and not v.errors


def test_fp8_on_a100_is_refused_with_the_planner_message() -> None:
    v = review(_fp8_on_a100(), None, "CREATE")
    assert not v.allowed
    assert v.message.startswith("LLMEngine team-a/llama31-8b-fp8 is invalid: ")
    assert "spec.precision" in v.message and "8.9" in v.message
    assert all(e.field.startswith("spec.") for e in v.errors)


def test_schema_errors_name_the_field() -> None:
    obj = _example()
    obj["spec"]["build"] = {"maxBatchSize": "many"}
    v = review(obj, None, "CREATE")
    assert not v.allowed
    assert "spec.build.maxBatchSize" in v.message


def test_update_that_breaks_the_spec_is_refused() -> None:
    old = _example()
    v = review(_fp8_on_a100(), old, "UPDATE")
    assert not v.allowed and "A100" in v.message


def test_update_without_spec_change_is_allowed_even_when_the_stored_spec_is_invalid() -> None:
    # An object stored before the webhook existed: Kopf's annotations and finalizer edits must still go through.
    old = _fp8_on_a100()
    new = copy.deepcopy(old)
    new["metadata"]["annotations"] = {"llmengine.io/last-handled": "x"}
    assert review(new, old, "UPDATE").allowed


def test_update_of_an_object_being_deleted_is_allowed() -> None:
    old = _fp8_on_a100()
    new = copy.deepcopy(old)
    new["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    new["spec"]["build"] = {"maxBatchSize": -1}
    assert review(new, old, "UPDATE").allowed


@pytest.mark.parametrize("operation", ["DELETE", "CONNECT"])
def test_other_operations_are_allowed(operation: str) -> None:
    assert review(_fp8_on_a100(), None, operation).allowed


def test_update_that_changes_identity_warns_about_the_rebuild() -> None:
    old = _example()
    new = copy.deepcopy(old)
    new["spec"].setdefault("build", {})["maxSeqLen"] = 12288
    v = review(new, old, "UPDATE")
    assert v.allowed
    assert any("builds a new engine" in w and "keeps serving" in w for w in v.warnings)
    assert any("engine.build_config.max_seq_len: 16384 → 12288" in w for w in v.warnings), v.warnings


def test_update_that_only_rolls_out_does_not_warn_about_a_rebuild() -> None:
    old = _example()
    new = copy.deepcopy(old)
    new["spec"].setdefault("serving", {})["replicas"] = 3
    v = review(new, old, "UPDATE")
    assert v.allowed
    assert not any("builds a new engine" in w for w in v.warnings)


def test_long_error_lists_are_cut_with_a_pointer_to_the_cli() -> None:
    from llmengine.api.v1alpha1 import FieldError

    errors = [FieldError(f"spec.f{i}", "bad") for i in range(12)]
    msg = rejection_message({"metadata": {"name": "x"}}, errors)
    assert msg.count("spec.f") == 8 and "4 more" in msg and "llmengine plan" in msg


@pytest.mark.parametrize("obj", [{}, {"spec": None}, {"metadata": "x", "spec": []}, {"kind": "LLMEngine"}])
def test_garbage_is_refused_not_crashed(obj: dict[str, Any]) -> None:
    v = review(obj, None, "CREATE")
    assert not v.allowed and v.errors and all(e.field for e in v.errors)
