"""Every status the reconciler writes survives the real API server's structural-schema pruning whole.

The statuses come from the controller-level passes (tests/unit/test_passes.py: every phase transition, the
benchmark gate, traffic and Auto rebuilds); each is written through the status subresource of a real LLMEngine
and read back. A field the CRD does not declare would come back missing, and the test names it.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from llmengine import GROUP, PLURAL, VERSION
from llmengine.dev.seed import engine_manifest
from tests.unit import passes, test_passes

pytestmark = pytest.mark.cluster


def _every_status() -> list[dict[str, Any]]:
    passes.WRITTEN.clear()
    for name, fn in inspect.getmembers(test_passes, inspect.isfunction):
        if name.startswith("test_") and not inspect.signature(fn).parameters:
            fn()
    unique = {repr(sorted(s.items())): s for s in passes.WRITTEN}
    return list(unique.values())


def _missing(sent: Any, got: Any, path: str = "status") -> list[str]:
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [path]
        return [m for k, v in sent.items() for m in _missing(v, got.get(k), f"{path}.{k}")]
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [path]
        return [m for i, (a, b) in enumerate(zip(sent, got, strict=True)) for m in _missing(a, b, f"{path}[{i}]")]
    return [] if sent == got else [f"{path} ({sent!r} -> {got!r})"]


def test_every_status_the_reconciler_writes_is_kept_by_the_api_server(api: Any, crd: str, namespace: str) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    body = engine_manifest("status-roundtrip")
    body["metadata"]["namespace"] = namespace
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    statuses = _every_status()
    assert len(statuses) >= 20, "the passes should cover every phase and condition"
    seen_phases = {s.get("phase") for s in statuses}
    assert {"Pending", "Queued", "Building", "Deploying", "Ready", "Degraded", "Failed"} <= seen_phases
    problems: list[str] = []
    for status in statuses:
        # Replace the whole status, so that nothing left by the previous one is compared.
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "status-roundtrip")
        obj["status"] = status
        stored = custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "status-roundtrip", obj
        )
        problems += _missing(status, stored.get("status"))
    assert not problems, f"the API server dropped or changed: {sorted(set(problems))[:20]}"
