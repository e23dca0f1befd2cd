"""docs/argocd-health.lua against LLMEngine objects the operator wrote in the chart lifecycle test (fixtures/, refreshed
with LLMENGINE_UPDATE_FIXTURES=1), and against variants of them for the phases that run does not stop in."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.e2e.argocd import health
from tests.e2e.chart_harness import load_fixture

pytest.importorskip("lupa")


def _with(obj: dict[str, Any], phase: str, message: str, ready: str = "False", **extra: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    st = out["status"]
    st.update(phase=phase, message=message, **extra)
    for c in st["conditions"]:
        if c["type"] == "Ready":
            c["status"] = ready
            c["message"] = message
        if c["type"] == "Stalled":
            c["status"] = "False"
    return out


def test_ready_object_from_the_operator_is_healthy() -> None:
    ready = load_fixture("ready.json")
    assert ready["status"]["phase"] == "Ready"
    assert health(ready)["status"] == "Healthy"


def test_failed_object_from_the_operator_is_degraded_with_its_message() -> None:
    failed = load_fixture("failed.json")
    hs = health(failed)
    assert hs == {"status": "Degraded", "message": failed["status"]["message"]}
    assert "FetchFailed" in hs["message"] and "gave up after" in hs["message"]


def test_in_progress_object_from_the_operator_is_progressing() -> None:
    obj = load_fixture("progressing.json")
    assert obj["status"]["phase"] in ("Pending", "Queued", "Building", "Deploying")
    hs = health(obj)
    assert hs["status"] == "Progressing"
    assert hs["message"].startswith(obj["status"]["phase"])


@pytest.mark.parametrize("phase", ["Pending", "Queued", "Building", "Deploying"])
def test_every_in_progress_phase_is_progressing(phase: str) -> None:
    obj = _with(load_fixture("ready.json"), phase, f"{phase.lower()} the engine")
    assert health(obj) == {"status": "Progressing", "message": f"{phase}: {phase.lower()} the engine"}


def test_degraded_phase_is_degraded_with_its_message() -> None:
    obj = _with(load_fixture("ready.json"), "Degraded", "1/2 serving replicas ready", readyReplicas=1)
    assert health(obj) == {"status": "Degraded", "message": "1/2 serving replicas ready"}


def test_stalled_condition_alone_is_degraded() -> None:
    obj = _with(load_fixture("ready.json"), "Building", "attempt 5 failed")
    next(c for c in obj["status"]["conditions"] if c["type"] == "Stalled")["status"] = "True"
    assert health(obj)["status"] == "Degraded"


def test_ready_but_spec_not_yet_observed_is_progressing() -> None:
    obj = load_fixture("ready.json")
    obj["metadata"]["generation"] = obj["status"]["observedGeneration"] + 1
    hs = health(obj)
    assert hs["status"] == "Progressing"
    assert str(obj["metadata"]["generation"]) in hs["message"]


def test_no_status_yet_is_progressing() -> None:
    obj = load_fixture("ready.json")
    del obj["status"]
    assert health(obj)["status"] == "Progressing"
