"""A rebuild driven by traffic through the real metering proxy, as `make demo` shows it.

The serving pods are simulated (kwok runs no containers): their serving container is played by the dev serving
path, the real metering proxy (llmengine.server.meter.make_app) in front of the test stand-in (TEST SERVER, not
trtllm-serve), which answers with the limits of the engine the pod downloaded and refuses longer prompts with
trtllm-serve 1.2's messages. Prompts go through it with `llmengine dev traffic`; the operator scrapes the proxy's
/llmengine/metrics. Operator, planner, builds, store, rollout, proxy and judgement are the real code."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmengine.dev import cli as dev_cli
from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import Engines, jobs, run_operator, run_serving_path
from llmengine.dev.seed import create_store_secret, engine, upload_tiny_checkpoint
from llmengine.dev.traffic import send

pytestmark = pytest.mark.usefixtures("crd")


def _cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def _wait_envelope(
    engines: Engines, name: str, status: str, reason: str, requests: int | None = None
) -> dict[str, Any]:
    """Until EnvelopeExceeded says status/reason (over a window of exactly `requests` requests, when given: a scrape
    can land while prompts are still being sent)."""

    def check() -> dict[str, Any] | None:
        obj = engines.get(name)
        c = _cond(obj, "EnvelopeExceeded")
        seen = ((obj.get("status") or {}).get("traffic") or {}).get("requests")
        ok = (c.get("status"), c.get("reason")) == (status, reason) and requests in (None, seen)
        return obj if ok else None

    try:
        return dict(wait_for(f"{name} EnvelopeExceeded={status}/{reason}", check, timeout=60, interval=0.5))
    except TimeoutError as e:
        raise AssertionError(f"{e}; status: {engines.get(name).get('status')}") from None


def _healthy(url: str) -> bool:
    """Whether the serving path answers; not yet (refused, reset: it is still starting) is False, not an error."""

    async def get() -> int:
        async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
            return r.status

    try:
        return asyncio.run(get()) == 200
    except (aiohttp.ClientError, OSError):
        return False


def test_prompts_beyond_max_input_len_through_the_meter_rebuild_and_roll_out_a_larger_engine(
    dev_cluster: ClusterInfo, api: Any, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_store_secret(api, dev_cluster, namespace)
    model = upload_tiny_checkpoint(dev_cluster, f"models/{uuid.uuid4().hex[:8]}")
    body = engine("shown", dev_cluster, model, f"engines-{uuid.uuid4().hex[:8]}", serving={"replicas": 1})
    body["spec"]["rebuildPolicy"] = {"mode": "Auto", "window": "1m", "minRequests": 20, "cooldown": "1h"}
    engines = Engines(api, namespace)

    with (
        run_serving_path(dev_cluster, namespace, "shown", tmp_path) as path,
        run_operator(
            dev_cluster, namespace, tmp_path, extra_env={"LLMENGINE_TRAFFIC_URL_TEMPLATE": path.metrics_template}
        ) as op,
    ):
        engines.create(body)
        first = engines.wait_phase("shown", "Ready", timeout=180)
        built = first["status"]["servingEngine"]["digest"]
        wait_for("the serving path answering for the ready pod", lambda: _healthy(path.url), timeout=30)
        _wait_envelope(engines, "shown", "Unknown", "NotEnoughTraffic")  # a baseline scrape of the real proxy

        # Within the envelope (maxInputLen 512): answered, metered, judged within.
        within = asyncio.run(send(path.url, tokens=200, requests=25, concurrency=4))
        assert (within.answered, within.refused, within.failed) == (25, 0, 0)
        obj = _wait_envelope(engines, "shown", "False", "WithinEnvelope", requests=25)
        traffic = obj["status"]["traffic"]
        assert traffic["inputTokens"]["max"] == 256 and not traffic.get("rejectedTooLong")  # the bucket above 200
        assert len(jobs(api, namespace)) == 1

        # Beyond it, through the command the demo shows: every prompt refused with trtllm-serve's message.
        argv = ["--state-dir", dev_cluster.state_dir, "traffic", "-n", namespace, "--engine", "shown"]
        assert dev_cli.main([*argv, "--tokens", "800", "--requests", "30", "--concurrency", "4"]) == 0
        out = capsys.readouterr().out
        assert "0 answered, 30 refused as too long, 0 failed" in out, out
        assert "Prompt length (800) exceeds maximum input length (512)." in out, out

        exceeded = _wait_envelope(engines, "shown", "True", "TrafficExceedsEngine")
        message = _cond(exceeded, "EnvelopeExceeded")["message"]
        assert "maxInputLen 512 <" in message and "refused as too long" in message, message
        # Judged on the first scrape that saw enough: possibly before the last of the 30 prompts.
        assert 0 < exceeded["status"]["traffic"]["rejectedTooLong"] <= 30

        def rolled_out() -> dict[str, Any] | None:
            obj = engines.get("shown")
            st = obj["status"]
            return obj if st.get("phase") == "Ready" and st["servingEngine"]["digest"] != built else None

        after = wait_for("the rebuilt engine serving", rolled_out, timeout=180, interval=0.5)
        envelope = after["status"]["envelope"]
        assert envelope["autoShapes"]["maxInputLen"] > 512 and envelope["lastAutoRebuild"]
        assert envelope["maxInputLen"] == envelope["autoShapes"]["maxInputLen"]
        assert len(jobs(api, namespace)) == 2
        assert after["spec"]["build"]["maxInputLen"] == 512  # the operator never writes spec

        # The same prompts are answered once the serving path stands in for the new engine's pod.
        def answered() -> bool:
            return asyncio.run(send(path.url, tokens=800, requests=1)).answered == 1

        wait_for("800-token prompts answered by the new engine", answered, timeout=30, interval=0.5)
        again = asyncio.run(send(path.url, tokens=800, requests=10, concurrency=4))
        assert (again.answered, again.refused, again.failed) == (10, 0, 0)
        assert "Traceback" not in op.logs()
