"""Traffic-aware rebuilds on the dev cluster. The serving pods are simulated (kwok runs no containers), so their
/llmengine/metrics comes from a test fixture: a local HTTP server that serves, for any pod, Prometheus text made by
prometheus_client with the metering proxy's metric names. Everything else (operator, planner, builds, store,
rollout) is real."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import Engines, jobs, run_operator
from llmengine.dev.seed import create_store_secret, engine, upload_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("crd")

TOKEN_BUCKETS = [16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 16384, 32768]


class FakeServingMetrics:
    """Test fixture only: what every serving pod's metering endpoint would report."""

    def __init__(self) -> None:
        self.reg = CollectorRegistry()
        self.prompt = Histogram("llmengine_request_prompt_tokens", "p", buckets=TOKEN_BUCKETS, registry=self.reg)
        self.output = Histogram("llmengine_request_output_tokens", "o", buckets=TOKEN_BUCKETS, registry=self.reg)
        self.conc = Histogram("llmengine_request_concurrency", "c", buckets=[1, 2, 4, 8, 16, 32], registry=self.reg)
        self.results = Counter("llmengine_requests", "r", ["result"], registry=self.reg)
        self.scraped: set[str] = set()
        fixture = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fixture.scraped.add(self.path)
                body = generate_latest(fixture.reg)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, n: int, prompt: int, output: int, concurrency: int) -> None:
        for _ in range(n):
            self.prompt.observe(prompt)
            self.output.observe(output)
            self.conc.observe(concurrency)
            self.results.labels("stop").inc()

    @property
    def template(self) -> str:
        return f"http://127.0.0.1:{self.port}/{{namespace}}/{{pod}}/llmengine/metrics"


@pytest.fixture
def fed(dev_cluster: ClusterInfo, api: Any, namespace: str) -> Iterator[FakeServingMetrics]:
    create_store_secret(api, dev_cluster, namespace)
    m = FakeServingMetrics()
    yield m
    m.server.shutdown()


def _cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj["status"].get("conditions") or [] if c["type"] == type_), {})


def _wait_cond(engines: Engines, name: str, status: str, reason: str | None = None, timeout: float = 60) -> Any:
    def check() -> dict[str, Any] | None:
        obj = engines.get(name)
        c = _cond(obj, "EnvelopeExceeded")
        return obj if c.get("status") == status and (reason is None or c.get("reason") == reason) else None

    try:
        return wait_for(f"{name} EnvelopeExceeded={status}", check, timeout=timeout, interval=0.5)
    except TimeoutError as e:
        raise AssertionError(f"{e}; status: {engines.get(name).get('status')}") from None


def _body(info: ClusterInfo, namespace: str, name: str, mode: str) -> dict[str, Any]:
    model = upload_tiny_checkpoint(info, f"models/{uuid.uuid4().hex[:8]}")
    body = engine(name, info, model, f"engines-{uuid.uuid4().hex[:8]}", serving={"replicas": 1})
    body["spec"]["rebuildPolicy"] = {"mode": mode, "window": "1m", "minRequests": 50, "cooldown": "1h"}
    return body


def test_auto_rebuilds_once_for_traffic_beyond_the_envelope_and_holds_for_the_cooldown(
    dev_cluster: ClusterInfo, api: Any, namespace: str, fed: FakeServingMetrics, tmp_path: Path
) -> None:
    engines = Engines(api, namespace)
    env = {"LLMENGINE_TRAFFIC_URL_TEMPLATE": fed.template}
    with run_operator(dev_cluster, namespace, tmp_path, extra_env=env) as op:
        engines.create(_body(dev_cluster, namespace, "auto", "Auto"))
        first = engines.wait_phase("auto", "Ready", timeout=180)
        built = first["status"]["desiredEngine"]["digest"]
        # Traffic inside the envelope (maxInputLen 512, maxSeqLen 1024, maxBatchSize 8): nothing happens.
        _wait_cond(engines, "auto", "Unknown", "NotEnoughTraffic")  # two snapshots, no traffic yet
        fed.serve(100, prompt=300, output=200, concurrency=4)
        within = _wait_cond(engines, "auto", "False", "WithinEnvelope")
        assert within["status"]["traffic"]["requests"] >= 50
        assert within["status"]["envelope"]["maxInputLen"] == 512
        assert len(jobs(api, namespace)) == 1

        # Prompts of ~900 tokens: beyond maxInputLen. Auto raises the shapes, builds and rolls out.
        fed.serve(200, prompt=900, output=100, concurrency=4)
        exceeded = _wait_cond(engines, "auto", "True", "TrafficExceedsEngine")
        assert "maxInputLen 512 <" in _cond(exceeded, "EnvelopeExceeded")["message"]

        def rebuilt() -> dict[str, Any] | None:
            obj = engines.get("auto")
            st = obj["status"]
            ok = st.get("phase") == "Ready" and st["servingEngine"]["digest"] != built
            return obj if ok else None

        after = wait_for("rebuilt and rolled out", rebuilt, timeout=180, interval=0.5)
        env_st = after["status"]["envelope"]
        assert env_st["autoShapes"]["maxInputLen"] >= 1024 and env_st["lastAutoRebuild"]
        assert env_st["maxInputLen"] == env_st["autoShapes"]["maxInputLen"]
        assert len(jobs(api, namespace)) == 2
        # The operator never writes spec: what Git holds is unchanged.
        assert "rebuildPolicy" in after["spec"] and "maxInputLen" in after["spec"]["build"]
        assert after["spec"]["build"]["maxInputLen"] == 512

        # Traffic grows again inside the cool-down: the condition says so, no second rebuild. (The new engine's
        # series starts from its first snapshot: wait until the operator has two before sending more.)
        _wait_cond(engines, "auto", "Unknown", "NotEnoughTraffic")
        fed.serve(300, prompt=3000, output=100, concurrency=4)
        held = _wait_cond(engines, "auto", "True")
        assert "next automatic rebuild allowed" in _cond(held, "EnvelopeExceeded")["message"]
        assert len(jobs(api, namespace)) == 2
        assert held["status"]["desiredEngine"]["digest"] == after["status"]["desiredEngine"]["digest"]
        assert "Traceback" not in op.logs()


def test_manual_only_recommends_the_patch(
    dev_cluster: ClusterInfo, api: Any, namespace: str, fed: FakeServingMetrics, tmp_path: Path
) -> None:
    engines = Engines(api, namespace)
    env = {"LLMENGINE_TRAFFIC_URL_TEMPLATE": fed.template}
    with run_operator(dev_cluster, namespace, tmp_path, extra_env=env):
        engines.create(_body(dev_cluster, namespace, "manual", "Manual"))
        ready = engines.wait_phase("manual", "Ready", timeout=180)
        _wait_cond(engines, "manual", "Unknown", "NotEnoughTraffic")
        fed.serve(200, prompt=200, output=100, concurrency=20)
        obj = _wait_cond(engines, "manual", "True", "TrafficExceedsEngine")
        rec = obj["status"]["envelope"]["recommendation"]
        # p99 in flight ~32 (histogram bucket), x1.2 headroom, rounded to trtllm-bench's batch steps (min 64).
        assert rec["patch"] == '{"spec":{"build":{"maxBatchSize":64}}}', rec
        assert "apply status.envelope.recommendation.patch" in _cond(obj, "EnvelopeExceeded")["message"]
        assert obj["status"]["desiredEngine"] == ready["status"]["desiredEngine"]
        assert "autoShapes" not in obj["status"]["envelope"]
        assert len(jobs(api, namespace)) == 1
    assert any(p.startswith(f"/{namespace}/llme-manual-") for p in fed.scraped)
