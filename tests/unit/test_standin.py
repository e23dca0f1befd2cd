"""The dev cluster's serving path: the test stand-in (TEST SERVER, not trtllm-serve) behind the real metering proxy,
following one simulated serving pod's engine; and `llmengine dev traffic` sending prompts through it.

Nothing here ran trtllm-serve: the refusals the stand-in sends are checked against what the metering proxy reads as
too long (llmengine.server.meter.responses), which tests/unit/test_meter.py holds to trtllm-serve 1.2's messages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmengine.dev import runner
from llmengine.dev.proc import free_port
from llmengine.dev.servingpath import ServingPath, engine_limits, metrics_template, stand_in_for
from llmengine.dev.standin import MODEL_ID, SERVER_HEADER, Limits, count_tokens, refusal
from llmengine.dev.traffic import prompt_of, send
from llmengine.render.common import DIGEST_LABEL
from llmengine.server.meter import classify_error, prompt_len_in_error

LIMITS = Limits(max_input_len=512, max_seq_len=1024)


def pod(name: str, digest: str, created: str, is_ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"{name}-uid-0000",
            "creationTimestamp": created,
            "labels": {DIGEST_LABEL: digest},
        },
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "args": ["--digest", digest, "--engine-dir", "/engine", "--port", "8000"],
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "eng", "mountPath": "/engine"}],
                }
            ]
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if is_ready else "False"}],
        },
    }


def downloaded(cluster_dir: Path, p: dict[str, Any], max_input_len: int, max_seq_len: int) -> None:
    """What the pod runner leaves after a serving pod's init container downloaded its engine."""
    d = runner.pod_dir(runner.work_dir(cluster_dir), p) / "volumes" / "eng"
    d.mkdir(parents=True)
    build = {"max_batch_size": 8, "max_input_len": max_input_len, "max_seq_len": max_seq_len}
    (d / "config.json").write_text(json.dumps({"version": "1.2.1", "build_config": build}))


# -- pure parts -------------------------------------------------------------------------------------------------------


def test_tokens_are_whitespace_separated_words() -> None:
    assert count_tokens("a bb  ccc\n d") == 4 and count_tokens("") == 0
    assert count_tokens(prompt_of(800)) == 800


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "limits", "fits"),
    [
        (512, 16, LIMITS, True),
        (513, 16, LIMITS, False),  # over max_input_len
        (1000, 24, Limits(1000, 1024), True),
        (1000, 25, Limits(1000, 1024), False),  # prompt + max_tokens over max_seq_len
        (1009, 16, Limits(1000, 1024), False),  # both: the max_seq_len check comes first
    ],
)
def test_refusals_are_what_the_meter_reads_as_too_long_with_the_prompt_length(
    prompt: int, max_tokens: int, limits: Limits, fits: bool
) -> None:
    message = refusal(prompt, max_tokens, limits)
    if fits:
        assert message is None
        return
    assert message is not None
    assert classify_error(400, message) == "too_long"
    assert prompt_len_in_error(message) == prompt


def test_refusal_messages_are_trtllm_serves() -> None:
    assert refusal(600, 16, LIMITS) == "Prompt length (600) exceeds maximum input length (512)."
    assert refusal(1020, 16, Limits(2048, 1024)) == (
        "The sum of prompt length (1020.0) and query length (0) max_tokens (16) should not exceed max_seq_len (1024)"
    )


def test_limits_come_from_the_engine_config_the_pod_downloaded(tmp_path: Path) -> None:
    p = pod("llme-a-1", "d1", "2026-01-01T00:00:00Z")
    downloaded(tmp_path, p, 768, 1536)
    assert engine_limits(runner.work_dir(tmp_path), p) == Limits(768, 1536)
    with pytest.raises(ValueError, match=r"config\.json"):
        engine_limits(runner.work_dir(tmp_path), pod("llme-a-2", "d1", "2026-01-01T00:00:00Z"))


def test_stands_in_for_the_newest_ready_pod_and_keeps_it_while_it_runs_that_engine() -> None:
    old = pod("a", "d1", "2026-01-01T00:00:00Z")
    same = pod("b", "d1", "2026-01-01T00:01:00Z")
    newer_engine = pod("c", "d2", "2026-01-01T00:02:00Z")
    unready = pod("d", "d2", "2026-01-01T00:03:00Z", is_ready=False)
    assert stand_in_for([], None) is None
    assert stand_in_for([old, same], None) is same
    assert stand_in_for([old, same], "a") is old  # a scale-up does not move it
    assert stand_in_for([old, same, newer_engine, unready], "a") is newer_engine  # a rollout does
    assert stand_in_for([unready], "d") is None


# -- the serving path -------------------------------------------------------------------------------------------------


class Pods:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    async def __call__(self) -> list[dict[str, Any]]:
        return list(self.items)


@pytest.fixture
async def path(tmp_path: Path) -> AsyncIterator[tuple[ServingPath, Pods, str]]:
    pods = Pods()
    sp = ServingPath(tmp_path, "ns", "tiny", free_port(), pods)
    await sp.start()
    yield sp, pods, f"http://127.0.0.1:{sp.port}"
    await sp.stop()


async def metrics(url: str, query: str = "") -> tuple[int, dict[str, float]]:
    async with aiohttp.ClientSession() as s, s.get(url + "/llmengine/metrics" + query) as r:
        text = await r.text()
        if r.status != 200:
            return r.status, {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
            out[f"{smp.name}{{{labels}}}" if labels else smp.name] = smp.value
    return 200, out


async def post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        return r.status, dict(r.headers), await r.read()


async def test_answers_503_until_a_serving_pod_is_ready(path: tuple[ServingPath, Pods, str]) -> None:
    sp, _, url = path
    await sp.follow()
    status, _, body = await post(url, "/v1/completions", {"prompt": "hello"})
    assert status == 503 and b"TEST SERVER" in body
    async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
        assert r.status == 503


async def test_answers_through_the_real_meter_and_says_it_is_a_stand_in(
    tmp_path: Path, path: tuple[ServingPath, Pods, str]
) -> None:
    sp, pods, url = path
    p = pod("llme-tiny-1", "d1", "2026-01-01T00:00:00Z")
    downloaded(tmp_path, p, 512, 1024)
    pods.items = [p]
    await sp.follow()
    assert sp.pod == "llme-tiny-1" and sp.limits == LIMITS

    status, headers, body = await post(url, "/v1/completions", {"prompt": prompt_of(100), "max_tokens": 4})
    doc = json.loads(body)
    assert status == 200 and headers["Server"] == SERVER_HEADER and doc["model"] == MODEL_ID
    assert doc["usage"] == {"prompt_tokens": 100, "completion_tokens": 4, "total_tokens": 104}
    assert doc["choices"][0]["finish_reason"] == "length"

    chat = {"messages": [{"role": "user", "content": prompt_of(50)}], "stream": True}
    status, _, body = await post(url, "/v1/chat/completions", chat)
    events = [ln for ln in body.decode().split("\n\n") if ln.strip()]
    assert status == 200 and events[-1] == "data: [DONE]"
    # The proxy asked for the usage-only chunk and cut it out again: the client sees none.
    assert all('"usage"' not in e for e in events)
    assert "stop" in events[-2]

    status, _, body = await post(url, "/v1/completions", {"prompt": prompt_of(600)})
    assert status == 400
    err = json.loads(body)
    assert err == {
        "object": "error",
        "message": "Prompt length (600) exceeds maximum input length (512).",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }

    code, m = await metrics(url, "?namespace=ns&pod=llme-tiny-1")
    assert code == 200
    assert m["llmengine_requests_total{result=length}"] == 1
    assert m["llmengine_requests_total{result=stop}"] == 1
    assert m["llmengine_requests_total{result=too_long}"] == 1
    assert m["llmengine_request_prompt_tokens_count"] == 3  # 100, 50 and the refused 600
    assert m["llmengine_request_prompt_tokens_sum"] == 750
    assert (await metrics(url, "?namespace=ns&pod=llme-other-1"))[0] == 404  # nothing listens in another pod
    assert (await metrics(url, "?namespace=other&pod=llme-tiny-1"))[0] == 404


async def test_a_rollout_to_a_larger_engine_moves_the_limits_and_starts_the_counts_over(
    tmp_path: Path, path: tuple[ServingPath, Pods, str]
) -> None:
    sp, pods, url = path
    first = pod("llme-tiny-1", "d1", "2026-01-01T00:00:00Z")
    downloaded(tmp_path, first, 512, 1024)
    pods.items = [first]
    await sp.follow()
    refused = await send(url, tokens=800, requests=6, concurrency=3)
    assert (refused.answered, refused.refused, refused.failed) == (0, 6, 0)
    assert refused.refusal == "Prompt length (800) exceeds maximum input length (512)."

    second = pod("llme-tiny-2", "d2", "2026-01-01T00:05:00Z")
    downloaded(tmp_path, second, 1280, 1792)
    pods.items = [first, second]
    await sp.follow()
    assert sp.pod == "llme-tiny-2" and sp.limits == Limits(1280, 1792)
    answered = await send(url, tokens=800, requests=5, concurrency=2, chat=True)
    assert (answered.answered, answered.refused, answered.failed) == (5, 0, 0)
    code, m = await metrics(url, "?namespace=ns&pod=llme-tiny-2")
    assert code == 200 and m["llmengine_requests_total{result=too_long}"] == 0
    assert m["llmengine_request_prompt_tokens_count"] == 5
    assert (await metrics(url, "?namespace=ns&pod=llme-tiny-1"))[0] == 404


def test_metrics_template_fills_like_the_operators() -> None:
    from llmengine.clients.scrape import pod_url

    url = pod_url(metrics_template(4321), {"metadata": {"name": "p", "namespace": "n"}, "status": {}}, 8000)
    assert url == "http://127.0.0.1:4321/llmengine/metrics?namespace=n&pod=p"
