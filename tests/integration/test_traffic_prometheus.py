"""traffic.source prometheus on the dev cluster: prompts go through the real metering proxy (the serving path, in
front of the test stand-in, as in test_serving_path.py), a real Prometheus scrapes it with the labels the chart's
serving PodMonitor gives the serving pods (llmengine.dev.prometheus), and the operator reads the traffic with its
PromQL query instead of scraping the pods. It judges and rebuilds as with the pods source; while Prometheus is down
the condition says so."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import Engines, jobs, run_operator, run_prometheus, run_serving_path
from llmengine.dev.proc import free_port
from llmengine.dev.seed import create_store_secret, engine, upload_tiny_checkpoint
from llmengine.dev.traffic import send
from tests.integration.test_serving_path import _cond, _healthy, _wait_envelope

pytestmark = pytest.mark.usefixtures("crd")


def _events(api: Any, ns: str, reason: str) -> list[str]:
    from kubernetes import client

    items = client.CoreV1Api(api).list_namespaced_event(ns).items
    return [e.message for e in items if e.reason == reason]


def test_traffic_read_with_promql_judges_and_rebuilds_as_scraping_the_pods_does(
    dev_cluster: ClusterInfo, api: Any, namespace: str, tmp_path: Path
) -> None:
    create_store_secret(api, dev_cluster, namespace)
    model = upload_tiny_checkpoint(dev_cluster, f"models/{uuid.uuid4().hex[:8]}")
    body = engine("prom", dev_cluster, model, f"engines-{uuid.uuid4().hex[:8]}", serving={"replicas": 1})
    body["spec"]["rebuildPolicy"] = {"mode": "Auto", "window": "1m", "minRequests": 20, "cooldown": "1h"}
    engines = Engines(api, namespace)
    prometheus = f"http://127.0.0.1:{free_port()}"
    env = {
        "LLMENGINE_TRAFFIC_SOURCE": "prometheus",
        "LLMENGINE_TRAFFIC_PROMETHEUS_URL": prometheus,
        "LLMENGINE_TRAFFIC_PROMETHEUS_TIMEOUT_SECONDS": "2",
        "LLMENGINE_TRAFFIC_SCRAPE_INTERVAL_SECONDS": "1",
    }

    with (
        run_serving_path(dev_cluster, namespace, "prom", tmp_path) as path,
        # No metrics URL template: the operator never asks the pods.
        run_operator(dev_cluster, namespace, tmp_path, extra_env=env) as op,
    ):
        engines.create(body)
        first = engines.wait_phase("prom", "Ready", timeout=180)
        built = first["status"]["servingEngine"]["digest"]

        # Prometheus is not up yet: the condition says the operator cannot read it, and where it asked.
        down = _cond(_wait_envelope(engines, "prom", "Unknown", "NoMetrics"), "EnvelopeExceeded")["message"]
        assert down.startswith(f"cannot read traffic from Prometheus at {prometheus}: "), down

        with run_prometheus(dev_cluster, [namespace], tmp_path, port=int(prometheus.rsplit(":", 1)[1])) as url:
            assert url == prometheus
            wait_for("the serving path answering for the ready pod", lambda: _healthy(path.url), timeout=30)
            _wait_envelope(engines, "prom", "Unknown", "NotEnoughTraffic")  # a baseline reading of the proxy's series

            within = asyncio.run(send(path.url, tokens=200, requests=25, concurrency=4))
            assert (within.answered, within.refused, within.failed) == (25, 0, 0)
            obj = _wait_envelope(engines, "prom", "False", "WithinEnvelope", requests=25)
            traffic = obj["status"]["traffic"]
            assert traffic["inputTokens"]["max"] == 256 and not traffic.get("rejectedTooLong")
            assert len(jobs(api, namespace)) == 1

            beyond = asyncio.run(send(path.url, tokens=800, requests=30, concurrency=4))
            assert (beyond.answered, beyond.refused, beyond.failed) == (0, 30, 0)
            exceeded = _wait_envelope(engines, "prom", "True", "TrafficExceedsEngine")
            message = _cond(exceeded, "EnvelopeExceeded")["message"]
            assert "maxInputLen 512 <" in message and "refused as too long" in message, message
            assert 0 < exceeded["status"]["traffic"]["rejectedTooLong"] <= 30

            def rolled_out() -> dict[str, Any] | None:
                obj = engines.get("prom")
                st = obj["status"]
                return obj if st.get("phase") == "Ready" and st["servingEngine"]["digest"] != built else None

            after = wait_for("the rebuilt engine serving", rolled_out, timeout=180, interval=0.5)
            assert after["status"]["envelope"]["autoShapes"]["maxInputLen"] > 512
            assert len(jobs(api, namespace)) == 2
            assert any("maxInputLen 512 <" in m for m in _events(api, namespace, "AutoRebuild"))
            # The new engine's pod is read afresh, by its own digest: the old engine's series are not its traffic.
            _wait_envelope(engines, "prom", "Unknown", "NotEnoughTraffic")
        logs = op.logs()
        assert "Traceback" not in logs
        assert "/llmengine/metrics" not in logs  # no pod was scraped by the operator
