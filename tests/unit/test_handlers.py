"""Kopf wiring that is plain code: what the engine event handler trims from the object Kopf keeps."""

from __future__ import annotations

import copy
from typing import Any

from llmengine.handlers import drop_managed_fields


def test_field_ownership_records_are_dropped_from_the_watched_engine_in_place() -> None:
    obj: dict[str, Any] = {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "LLMEngine",
        "metadata": {
            "name": "e1",
            "namespace": "ml",
            "resourceVersion": "42",
            "annotations": {"a": "b"},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:model": {}}}}],
        },
        "spec": {"model": {}},
        "status": {"phase": "Ready"},
    }
    event: Any = {"type": "MODIFIED", "object": obj}
    expected = copy.deepcopy(obj)
    del expected["metadata"]["managedFields"]
    drop_managed_fields(event)
    assert event["object"] is obj and obj == expected  # the same dict Kopf holds, without the records only
    drop_managed_fields(event)  # none left: nothing to do
    for odd in ({"type": "ERROR", "object": {"kind": "Status"}}, {"type": "DELETED", "object": None}, {}):
        drop_managed_fields(odd)  # an event without an object's metadata is left alone
