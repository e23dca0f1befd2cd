"""The metering proxy against a fake trtllm-serve: byte-exact relaying, streaming, metrics, and the child process.

The fake upstream imitates trtllm-serve 1.2.x's wire format (SSE events as `data: {...} \\n\\n`, a final usage-only
chunk with `choices: []` when `stream_options.include_usage` is on, `data: [DONE]`, and its flat error envelope);
its `/prometheus/metrics` serves a sample in the real exposition format. Nothing here ran a real trtllm-serve.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from llmengine.server import main as server_main
from llmengine.server.meter import (
    CONCURRENCY_BUCKETS,
    TOKEN_BUCKETS,
    MeterError,
    Outcome,
    SseTap,
    classify_error,
    classify_finish,
    error_message,
    exit_code,
    forwardable,
    make_app,
    prompt_len_in_error,
    serve_meter,
    upstream_port_for,
    with_usage_requested,
)
from tests.unit.test_server import FakeGPU, FakeNVML, _write_local, manifest

FIXTURES = Path(__file__).parent / "fixtures"
TRTLLM_METRICS = (FIXTURES / "trtllm_prometheus_metrics_v1.2.1.txt").read_bytes()
TOO_LONG = "The sum of prompt length (9000.0) and query length (0) max_tokens (16) should not exceed max_seq_len (4096)"


# -- a fake trtllm-serve -----------------------------------------------------------------------------------------------


def completion(finish: str, prompt: int, output: int) -> bytes:
    doc = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "héllo", "finish_reason": finish, "stop_reason": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output},
    }
    return json.dumps(doc, ensure_ascii=False).encode()


def sse(doc: dict[str, Any], space: bool = False) -> bytes:
    # trtllm-serve writes its first chat chunk with a space before the blank line.
    return b"data: " + json.dumps(doc).encode() + (b" \n\n" if space else b"\n\n")


def chat_chunks(include_usage: bool, finish: str = "stop", prompt: int = 50, output: int = 7) -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out = [
        sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}, space=True),
        sse({**base, "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}),
        sse({**base, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": finish}]}),
    ]
    if include_usage:
        usage = {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}
        out.append(sse({**base, "choices": [], "usage": usage}))
    return [*out, b"data: [DONE]\n\n"]


class Upstream:
    def __init__(self) -> None:
        self.gate = asyncio.Event()  # held streams and slow requests wait for it
        self.arrived = 0
        self.all_arrived = asyncio.Event()
        self.expect = 0
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.cancelled = 0
        self.metrics_status = 200

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        app.router.add_get("/prometheus/metrics", self.metrics)
        app.router.add_route("*", "/echo", self.echo)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        if self.metrics_status != 200:
            return web.Response(status=self.metrics_status)
        headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        if "gzip" in request.headers.get("Accept-Encoding", ""):  # as prometheus_client's ASGI app does
            return web.Response(body=gzip.compress(TRTLLM_METRICS), headers={**headers, "Content-Encoding": "gzip"})
        return web.Response(body=TRTLLM_METRICS, headers=headers)

    async def echo(self, request: web.Request) -> web.Response:
        doc = {"method": request.method, "raw_path": request.raw_path, "headers": dict(request.headers)}
        doc["body"] = (await request.read()).decode()
        return web.json_response(doc, headers={"X-Upstream": "yes", "Keep-Alive": "timeout=5"})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.bodies.append(raw)
        doc = json.loads(raw)
        kind = doc.get("prompt")
        if kind == "slow":
            self.arrived += 1
            if self.arrived >= self.expect:
                self.all_arrived.set()
            await self.gate.wait()
            return web.Response(body=completion("stop", 10, 1), content_type="application/json")
        if kind == "length":
            return web.Response(body=completion("length", 3000, 500), content_type="application/json")
        if kind == "too_long":
            err = {"object": "error", "message": TOO_LONG, "type": "BadRequestError", "param": None, "code": 400}
            return web.json_response(err, status=400)
        if kind == "boom":
            return web.Response(status=500, text="Internal Server Error")
        if kind == "garbage":
            return web.Response(body=b"{not json", content_type="application/json")
        if kind == "stream":
            return await self.stream(request, chat_chunks(bool((doc.get("stream_options") or {}).get("include_usage"))))
        return web.Response(body=completion("stop", 100, 20), content_type="application/json")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.bodies.append(raw)
        try:
            doc = json.loads(raw)
        except ValueError:
            return web.json_response({"object": "error", "message": "bad json", "code": 500}, status=500)
        include = bool((doc.get("stream_options") or {}).get("include_usage"))
        finish = doc.get("finish", "stop")
        return await self.stream(request, chat_chunks(include, finish), hold=bool(doc.get("hold")), die=doc.get("die"))

    async def stream(
        self, request: web.Request, chunks: list[bytes], hold: bool = False, die: bool | None = None
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        try:
            for i, chunk in enumerate(chunks):
                if hold and i == 1:
                    await self.gate.wait()
                if die and i == 2:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                await resp.write(chunk)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        await resp.write_eof()
        return resp


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, TestServer]]:
    up = Upstream()
    server = TestServer(up.app())  # its runner cancels handlers when the client hangs up, as serve_meter's does
    await server.start_server(access_log=None)
    yield up, server
    up.gate.set()
    await server.close()


@pytest.fixture
async def proxy(upstream: tuple[Upstream, TestServer]) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    server = TestServer(make_app(str(upstream[1].make_url(""))))
    await server.start_server(access_log=None)
    client = TestClient(server)
    await client.start_server()
    yield client
    await client.close()


Proxy = TestClient[web.Request, web.Application]


async def scrape(client: Proxy) -> dict[str, float]:
    resp = await client.get("/llmengine/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(await resp.text()):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def results(m: dict[str, float]) -> dict[str, float]:
    return {r: m[f"llmengine_requests_total{{result={r}}}"] for r in ("stop", "length", "too_long", "error", "other")}


def buckets(m: dict[str, float], name: str) -> dict[float, float]:
    prefix = f"{name}_bucket{{le="
    return {float(k[len(prefix) : -1]): v for k, v in m.items() if k.startswith(prefix)}


# -- relaying ----------------------------------------------------------------------------------------------------------


async def test_non_streaming_bodies_pass_through_byte_for_byte(proxy: Proxy) -> None:
    for prompt, expected in (("hi", completion("stop", 100, 20)), ("length", completion("length", 3000, 500))):
        resp = await proxy.post("/v1/completions", json={"model": "m", "prompt": prompt})
        assert resp.status == 200 and await resp.read() == expected
    resp = await proxy.post("/v1/completions", json={"prompt": "too_long"})
    assert resp.status == 400 and json.loads(await resp.read())["message"] == TOO_LONG
    resp = await proxy.post("/v1/completions", json={"prompt": "boom"})
    assert resp.status == 500 and await resp.text() == "Internal Server Error"


async def test_other_paths_headers_and_query_are_relayed(proxy: Proxy) -> None:
    resp = await proxy.put(
        "/echo?a=1&b=%26%20",
        data=b"raw body",
        headers={
            "Expect": "100-continue",
            "X-Custom": "v",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped",
            "Authorization": "Bearer t",
        },
    )
    assert resp.status == 200 and resp.headers["X-Upstream"] == "yes" and "Keep-Alive" not in resp.headers
    doc = await resp.json()
    assert doc["method"] == "PUT" and doc["raw_path"] == "/echo?a=1&b=%26%20" and doc["body"] == "raw body"
    assert doc["headers"]["X-Custom"] == "v" and doc["headers"]["Authorization"] == "Bearer t"
    assert "X-Hop" not in doc["headers"]
    assert (await proxy.get("/health")).status == 200


async def test_health_is_502_while_trtllm_serve_is_down(upstream: tuple[Upstream, TestServer], proxy: Proxy) -> None:
    await upstream[1].close()
    assert (await proxy.get("/health")).status == 502
    resp = await proxy.post("/v1/completions", json={"prompt": "hi"})
    assert resp.status == 502
    assert results(await scrape(proxy))["error"] == 1


@pytest.mark.parametrize("client_asks", [True, False])
async def test_streamed_chat_reaches_the_client_as_sent_minus_the_injected_usage_chunk(
    upstream: tuple[Upstream, TestServer], proxy: Proxy, client_asks: bool
) -> None:
    up, _ = upstream
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if client_asks:
        body["stream_options"] = {"include_usage": True}
    raw = json.dumps(body).encode()
    resp = await proxy.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    got = await resp.read()
    assert got == b"".join(chat_chunks(include_usage=client_asks))
    forwarded = json.loads(up.bodies[-1])
    assert forwarded["stream_options"]["include_usage"] is True  # asked upstream either way
    if client_asks:
        assert up.bodies[-1] == raw  # nothing to change: the request went through untouched
    m = await scrape(proxy)
    assert results(m)["stop"] == 1
    assert m["llmengine_request_prompt_tokens_sum"] == 50 and m["llmengine_request_output_tokens_sum"] == 7


async def test_streamed_completions_are_metered_too(proxy: Proxy) -> None:
    resp = await proxy.post("/v1/completions", json={"prompt": "stream", "stream": True})
    assert await resp.read() == b"".join(chat_chunks(include_usage=False))
    m = await scrape(proxy)
    assert results(m)["stop"] == 1 and m["llmengine_request_output_tokens_count"] == 1


@pytest.mark.parametrize("client_asks", [True, False])
async def test_streaming_is_incremental(upstream: tuple[Upstream, TestServer], proxy: Proxy, client_asks: bool) -> None:
    up, _ = upstream
    body: dict[str, Any] = {"messages": [], "stream": True, "hold": True}
    if client_asks:
        body["stream_options"] = {"include_usage": True}
    resp = await proxy.post("/v1/chat/completions", json=body)
    chunks = chat_chunks(include_usage=client_asks)
    # The upstream holds every chunk after the first until the gate opens: the first must already be here.
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
    assert first == chunks[0] and not up.gate.is_set()
    up.gate.set()
    assert first + await resp.read() == b"".join(chunks)


async def test_a_client_that_hangs_up_cancels_the_upstream_request(
    upstream: tuple[Upstream, TestServer], proxy: Proxy
) -> None:
    up, _ = upstream
    resp = await proxy.post("/v1/chat/completions", json={"messages": [], "stream": True, "hold": True})
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
    resp.close()
    for _ in range(100):
        m = await scrape(proxy)
        if results(m)["other"] == 1 and up.cancelled == 1:
            break
        await asyncio.sleep(0.02)
    assert results(m)["other"] == 1 and up.cancelled == 1 and m["llmengine_requests_in_flight"] == 0


async def test_an_upstream_that_dies_mid_stream_breaks_the_client_connection(proxy: Proxy) -> None:
    resp = await proxy.post("/v1/chat/completions", json={"messages": [], "stream": True, "die": True})
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert results(await scrape(proxy))["error"] == 1


# -- metrics -----------------------------------------------------------------------------------------------------------


async def test_metrics_after_a_mix_of_requests(proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for prompt in ("hi", "hi", "length", "too_long", "boom", "garbage"):
        await (await proxy.post("/v1/completions", json={"prompt": prompt})).read()
    await (await proxy.post("/v1/chat/completions", json={"messages": [], "stream": True, "finish": "length"})).read()
    resp = await proxy.post("/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    await resp.read()  # the fake upstream fails on it: a 500, counted as an error, and relayed
    await (await proxy.get("/health")).read()  # not a completion: not metered

    m = await scrape(proxy)
    assert results(m) == {"stop": 2, "length": 2, "too_long": 1, "error": 2, "other": 1}
    # prompts: 100, 100, 3000, 9000 (from the too-long error), 50 (stream); outputs: 20, 20, 500, 7
    p = buckets(m, "llmengine_request_prompt_tokens")
    assert sorted(p) == [*map(float, TOKEN_BUCKETS), float("inf")]
    assert m["llmengine_request_prompt_tokens_count"] == 5 and m["llmengine_request_prompt_tokens_sum"] == 12250
    assert p[64] == 1 and p[128] == 3 and p[3072] == 4 and p[8192] == 4 and p[12288] == 5
    o = buckets(m, "llmengine_request_output_tokens")
    assert m["llmengine_request_output_tokens_count"] == 4 and m["llmengine_request_output_tokens_sum"] == 547
    assert o[16] == 1 and o[32] == 3 and o[512] == 4
    assert m["llmengine_request_concurrency_count"] == 8 and m["llmengine_requests_in_flight"] == 0
    assert [r.getMessage() for r in caplog.records] == []  # nothing per request, ever


async def test_concurrency_under_parallel_slow_requests(upstream: tuple[Upstream, TestServer], proxy: Proxy) -> None:
    up, _ = upstream
    n = 8
    up.expect = n

    async def one() -> int:
        resp = await proxy.post("/v1/completions", json={"prompt": "slow"})
        await resp.read()
        return resp.status

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.wait_for(up.all_arrived.wait(), timeout=5)
    assert (await scrape(proxy))["llmengine_requests_in_flight"] == n
    up.gate.set()
    assert await asyncio.gather(*tasks) == [200] * n
    m = await scrape(proxy)
    c = buckets(m, "llmengine_request_concurrency")
    assert sorted(c) == [*map(float, CONCURRENCY_BUCKETS), float("inf")]
    # Arrivals saw 1, 2, ..., n in flight (counting themselves).
    assert m["llmengine_request_concurrency_count"] == n and m["llmengine_request_concurrency_sum"] == n * (n + 1) / 2
    assert c[1] == 1 and c[2] == 2 and c[4] == 4 and c[8] == n and c[16] == n
    assert m["llmengine_requests_in_flight"] == 0 and results(m)["stop"] == n


async def test_metrics_endpoint_appends_trtllm_serves_families(
    upstream: tuple[Upstream, TestServer], proxy: Proxy
) -> None:
    text = await (await proxy.get("/llmengine/metrics")).text()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["trtllm_request_success"] == "counter"
    for name in ("e2e_request_latency", "time_to_first_token", "time_per_output_token", "request_queue_time"):
        assert families[f"trtllm_{name}_seconds"] == "histogram"
    assert families["llmengine_requests"] == "counter" and families["llmengine_requests_in_flight"] == "gauge"
    for name in ("concurrency", "prompt_tokens", "output_tokens"):
        assert families[f"llmengine_request_{name}"] == "histogram"
    assert text.endswith(TRTLLM_METRICS.decode())

    upstream[0].metrics_status = 404  # return_perf_metrics off: only ours
    text = await (await proxy.get("/llmengine/metrics")).text()
    assert "trtllm_" not in text and "llmengine_requests_total" in text
    await upstream[1].close()  # trtllm-serve down: still ours
    assert "llmengine_requests_total" in await (await proxy.get("/llmengine/metrics")).text()


# -- pure helpers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "status", "result", "prompt_len"),
    [
        (TOO_LONG, 400, "too_long", 9000),
        (
            "The sum of prompt length (72417.0), query length (0) should not exceed max_num_tokens (69632)",
            400,
            "too_long",
            72417,
        ),
        ("Prompt length (9000) exceeds maximum input length (4096).", 400, "too_long", 9000),
        ("input length 9000 exceeds max_input_len 4096", 400, "too_long", 9000),
        ("The input length of 9000 tokens is over the context length", 400, "too_long", 9000),
        (
            "`default_max_tokens` (-152) must be greater than 0, `default_max_tokens` (-152) = max_seq_len (8192) - "
            "`splited_prompt_len` (8000) - `query_token_len` (344)",
            400,
            "too_long",
            8000,
        ),
        ("prompt exceeds max_input_len", 400, "too_long", None),
        ("sampling_params.n (8) cannot exceed max_batch_size (4) when use_beam_search is False", 400, "error", None),
        ("invalid temperature", 400, "error", None),
        (TOO_LONG, 500, "error", 9000),
    ],
)
def test_length_errors(message: str, status: int, result: str, prompt_len: int | None) -> None:
    assert classify_error(status, message) == result
    assert prompt_len_in_error(message) == prompt_len


def test_error_message_reads_the_known_envelopes() -> None:
    assert error_message(b'{"object":"error","message":"m1","code":400}') == "m1"
    assert error_message(b'{"error":{"message":"m2","type":"x"}}') == "m2"
    assert error_message(b'{"detail":"m3"}') == "m3"
    assert error_message(b"plain \xff text") == "plain \ufffd text"


@pytest.mark.parametrize(
    ("reasons", "result"),
    [
        (["stop"], "stop"),
        (["stop", "stop"], "stop"),
        (["stop", "length"], "length"),
        (["tool_calls"], "other"),
        (["timeout"], "other"),
        ([], "other"),
        ([None], "other"),
    ],
)
def test_classify_finish(reasons: list[str | None], result: str) -> None:
    assert classify_finish(reasons) == result


def test_usage_is_requested_only_for_streams_that_lack_it() -> None:
    def opts(doc: dict[str, Any]) -> Any:
        out = with_usage_requested(json.dumps(doc).encode())
        return None if out is None else json.loads(out)["stream_options"]

    assert opts({"stream": True}) == {"include_usage": True}
    assert opts({"stream": True, "stream_options": None}) == {"include_usage": True}
    assert opts({"stream": True, "stream_options": {"include_usage": False, "continuous_usage_stats": True}}) == {
        "include_usage": True,
        "continuous_usage_stats": False,
    }
    assert opts({"stream": True, "stream_options": {"include_usage": True}}) is None
    assert opts({"stream": False}) is None and opts({}) is None
    assert opts({"stream": True, "stream_options": "bad"}) is None
    assert with_usage_requested(b"{not json") is None and with_usage_requested(b"[1]") is None
    doc = json.loads(with_usage_requested(json.dumps({"stream": True, "messages": ["é"]}).encode()) or b"")
    assert doc["messages"] == ["é"] and doc["stream"] is True


@pytest.mark.parametrize("drop", [True, False])
def test_sse_tap_fed_byte_by_byte(drop: bool) -> None:
    chunks = chat_chunks(include_usage=True, finish="length", prompt=1234, output=99)
    outcome = Outcome(status=200)
    tap = SseTap(outcome, drop_usage_only=drop)
    raw = b"".join(chunks)
    out = b"".join(tap.feed(raw[i : i + 1]) for i in range(len(raw))) + tap.close()
    expected = b"".join(c for c in chunks if b'"choices": []' not in c) if drop else raw
    assert out == expected and outcome.result() == "length"
    assert (outcome.prompt_tokens, outcome.output_tokens) == (1234, 99)


def test_sse_tap_survives_garbage_and_crlf() -> None:
    outcome = Outcome(status=200)
    tap = SseTap(outcome, drop_usage_only=True)
    raw = b'data: {nope\r\n\r\n: comment\r\n\r\ndata: {"choices": [{"finish_reason": "stop"}]}\r\n\r\nda'
    assert tap.feed(raw) + tap.close() == raw
    assert outcome.result() == "stop" and outcome.prompt_tokens is None


def test_sse_error_event_is_classified() -> None:
    outcome = Outcome(status=200)
    tap = SseTap(outcome, drop_usage_only=False)
    tap.feed(b'data: {"object": "error", "message": "' + TOO_LONG.encode() + b'"}\n\n')
    tap.close()
    assert outcome.result() == "too_long"


def test_forwardable_drops_hop_by_hop_headers() -> None:
    h = {"Connection": "close, X-A", "X-A": "1", "Transfer-Encoding": "chunked", "Keep-Alive": "5", "X-B": "2"}
    assert dict(forwardable(h)) == {"X-B": "2"}
    assert dict(forwardable({"Content-Length": "3", "X-B": "2"}, drop=("content-length",))) == {"X-B": "2"}


def test_exit_codes_and_ports() -> None:
    assert (exit_code(0), exit_code(3), exit_code(-signal.SIGTERM)) == (0, 3, 143)
    assert (upstream_port_for(8000), upstream_port_for(65535)) == (8001, 65534)


# -- running next to trtllm-serve --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_child(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_for_proxy(port: int, path: str = "/") -> int:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                    if r.status == 200:
                        return r.status
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the proxy never answered 200")


async def test_sigterm_reaches_the_child_and_the_meter_exits_with_it(tmp_path: Path) -> None:
    port, up_port = free_port(), free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(up_port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    before = signal.getsignal(signal.SIGTERM)
    try:
        task = asyncio.create_task(serve_meter("127.0.0.1", port, up_port, child))
        await wait_for_proxy(port)  # the child's directory listing, through the proxy
        for _ in range(100):  # the handler goes in right after the site starts
            if signal.getsignal(signal.SIGTERM) != before:
                break
            await asyncio.sleep(0.01)
        assert signal.getsignal(signal.SIGTERM) != before
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, timeout=10) == 128 + signal.SIGTERM
        assert child.poll() == -signal.SIGTERM and signal.getsignal(signal.SIGTERM) == before
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


async def test_the_meter_stops_when_the_child_dies() -> None:
    port, up_port = free_port(), free_port()
    child = python_child("import time, sys; time.sleep(1); sys.exit(3)")
    rc = await asyncio.wait_for(serve_meter("127.0.0.1", port, up_port, child), timeout=10)
    assert rc == 3
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


async def test_a_taken_port_stops_the_child_and_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        child = python_child("import time; time.sleep(60)")
        try:
            with pytest.raises(MeterError, match=f"cannot listen on 127.0.0.1:{port}"):
                await serve_meter("127.0.0.1", port, free_port(), child)
            assert child.poll() is not None
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def _run_args(tmp_path: Path, *extra: str) -> list[str]:
    _write_local(tmp_path / "engine", manifest(tp=1))
    return [
        "run",
        "--engine-dir",
        str(tmp_path / "engine"),
        "--extra-options-file",
        str(tmp_path / "x.yaml"),
        "--min-free-bytes",
        "0",
        *extra,
    ]


@pytest.mark.parametrize(
    ("extra", "env", "metered"),
    [([], None, True), (["--no-meter"], None, False), ([], "false", False), ([], "true", True)],
)
def test_metering_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], env: str | None, metered: bool
) -> None:
    if env is None:
        monkeypatch.delenv("LLMENGINE_METER", raising=False)
    else:
        monkeypatch.setenv("LLMENGINE_METER", env)
    execs: list[list[str]] = []
    spawned: list[list[str]] = []
    meters: list[tuple[str, int, int]] = []
    seams = server_main.Seams(
        nvml=FakeNVML([FakeGPU()]),
        execvp=lambda f, a: execs.append(a),
        spawn=lambda a: spawned.append(a) or SimpleNamespace(pid=1),
        run_meter=lambda h, p, u, c: meters.append((h, p, u)) or 0,
    )
    assert server_main.main(_run_args(tmp_path, *extra), seams) == 0
    if metered:
        assert execs == [] and meters == [("0.0.0.0", 8000, 8001)]
        ((argv),) = spawned
        assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8001"
    else:
        assert spawned == [] and meters == []
        ((argv),) = execs
        assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "8000"


def test_upstream_port_can_be_chosen_but_not_the_public_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meters: list[tuple[str, int, int]] = []
    seams = server_main.Seams(
        nvml=FakeNVML([FakeGPU()]),
        spawn=lambda a: SimpleNamespace(pid=1),
        run_meter=lambda h, p, u, c: meters.append((h, p, u)) or 0,
    )
    assert server_main.main(_run_args(tmp_path, "--meter-upstream-port", "9100"), seams) == 0
    assert meters == [("0.0.0.0", 8000, 9100)]
    assert server_main.main(_run_args(tmp_path, "--meter-upstream-port", "8000"), seams) == 1
    assert "is the public --port" in capsys.readouterr().err


def test_a_missing_trtllm_serve_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def missing(argv: list[str]) -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    seams = server_main.Seams(nvml=FakeNVML([FakeGPU()]), spawn=missing)
    assert server_main.main(_run_args(tmp_path), seams) == 1
    assert "serve-engine: cannot start trtllm-serve: No such file or directory" in capsys.readouterr().err


def test_a_meter_that_cannot_start_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(h: str, p: int, u: int, c: Any) -> int:
        raise MeterError("cannot listen on 0.0.0.0:8000: Address already in use")

    seams = server_main.Seams(nvml=FakeNVML([FakeGPU()]), spawn=lambda a: SimpleNamespace(pid=1), run_meter=fail)
    assert server_main.main(_run_args(tmp_path), seams) == 1
    assert "serve-engine: cannot listen on 0.0.0.0:8000" in capsys.readouterr().err
