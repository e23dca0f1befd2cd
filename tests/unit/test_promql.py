"""traffic.source prometheus: the PromQL query, the reading of Prometheus's answer (the same PodMetrics as a scrape
of the pods), the HTTP client against a server speaking the Prometheus API, and one query shared by every engine."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from llmengine.api.config import OperatorConfig
from llmengine.clients.prometheus import Prometheus, PrometheusError
from llmengine.plan import promql, traffic
from llmengine.reconcile import metrics
from llmengine.reconcile.gather import Gatherer, Memory
from llmengine.reconcile.traffic_source import Fetch, PrometheusSource
from tests.unit.test_traffic import TRTLLM_SAMPLE, Pod

DIGEST = "0123456789abcdef" * 4
SHORT = DIGEST[:12]


def _prom_le(value: str) -> str:
    """Prometheus 3 stores classic histograms' `le` as floats: "16" is "16.0", "+Inf" stays."""
    return value if value == "+Inf" else repr(float(value))


def answer(pods: dict[str, str], ns: str = "team", engine: str = "chat", digest: str = SHORT) -> dict[str, Any]:
    """What Prometheus answers to promql.query() when it scraped these pods' metrics text: the query's grouping
    applied (every label but the kept ones summed over), as a vector of the newest samples."""
    rows: dict[tuple[tuple[str, str], ...], float] = {}
    for pod, text in pods.items():
        for fam in traffic.text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name not in promql.SERIES:
                    continue
                labels = {"namespace": ns, "engine": engine, "engine_digest": digest, "pod": pod, "__name__": s.name}
                labels |= {k: (_prom_le(v) if k == "le" else v) for k, v in s.labels.items() if k in promql.KEPT}
                key = tuple(sorted(labels.items()))
                rows[key] = rows.get(key, 0.0) + float(s.value)
    result = [{"metric": dict(k), "value": [1796415782.8, _num(v)]} for k, v in rows.items()]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


def _num(v: float) -> str:
    return "NaN" if math.isnan(v) else format(v, "g")


# ---- the query ----


def test_one_query_selects_every_engines_series_by_the_pod_monitors_labels_and_sums_per_pod() -> None:
    q = promql.query()
    assert q.startswith("sum by (namespace, engine, engine_digest, pod, __name__, le, result, finished_reason) ({")
    assert 'engine!=""' in q and 'engine_digest!=""' in q
    for name in ("llmengine_request_prompt_tokens_bucket", "llmengine_requests_total", "trtllm_request_success_total"):
        assert name in promql.SERIES and name in q
    assert "llmengine_requests_in_flight" not in q  # a gauge the judge does not read
    assert promql.query('cluster="prod-a", job=~"podMonitor/.*",').endswith(
        'engine_digest!="", cluster="prod-a", job=~"podMonitor/.*"})'
    )


@pytest.mark.parametrize("bad", ["cluster=prod", '"a"="b"', 'a="b"}) or vector(1', "a=~'x'"])
def test_a_selector_that_is_not_label_matchers_is_refused_at_configuration(bad: str) -> None:
    with pytest.raises(ValueError, match="label matchers"):
        promql.query(bad)
    with pytest.raises(ValueError, match="TRAFFIC_PROMETHEUS_SELECTOR"):
        OperatorConfig(
            traffic_source="prometheus", traffic_prometheus_url="http://p:9090", traffic_prometheus_selector=bad
        )


def test_the_prometheus_source_needs_a_url() -> None:
    with pytest.raises(ValueError, match="TRAFFIC_PROMETHEUS_URL"):
        OperatorConfig(traffic_source="prometheus")
    cfg = OperatorConfig.from_env(
        {"LLMENGINE_TRAFFIC_SOURCE": "prometheus", "LLMENGINE_TRAFFIC_PROMETHEUS_URL": "https://prom.example:9090"}
    )
    assert cfg.traffic_prometheus_url == "https://prom.example:9090" and cfg.traffic_prometheus_timeout_seconds == 10


# ---- the answer ----


def test_the_answer_reads_as_the_pods_own_text_does() -> None:
    a = Pod().serve(40, 300, 100, 3).serve(5, 900, 0, 4, result="too_long")
    b = Pod().serve(7, 20, 30, 1, result="length")
    trtllm = TRTLLM_SAMPLE.read_text()
    texts = {"chat-a": a.text() + trtllm, "chat-b": b.text()}
    reading = promql.parse(answer(texts))
    pods = reading.pods("team", "chat", DIGEST)  # the full digest finds the 12-digit label
    assert pods == {name: traffic.parse_metrics(text) for name, text in texts.items()}
    assert reading.series == len(answer(texts)["data"]["result"])
    assert traffic.TRTLLM_SUCCESS[0] in {fam for fam, _ in pods["chat-a"].counters}


def test_engines_namespaces_and_digests_are_kept_apart() -> None:
    one, two = answer({"p1": Pod().serve(3, 10, 10, 1).text()}), answer({"p2": Pod().text()}, ns="other")
    old = answer({"p0": Pod().text()}, digest="ffffffffffff")
    doc = {
        **one,
        "data": {**one["data"], "result": one["data"]["result"] + two["data"]["result"] + old["data"]["result"]},
    }
    reading = promql.parse(doc)
    assert set(reading.engines) == {("team", "chat", SHORT), ("other", "chat", SHORT), ("team", "chat", "ffffffffffff")}
    assert set(reading.pods("team", "chat", DIGEST)) == {"p1"}
    assert reading.pods("team", "missing", DIGEST) == {}


def test_an_empty_answer_has_no_engines() -> None:
    reading = promql.parse({"status": "success", "data": {"resultType": "vector", "result": []}})
    assert reading.engines == {} and reading.series == 0 and reading.pods("team", "chat", DIGEST) == {}


def test_series_without_the_engine_labels_and_nan_samples_are_left_out() -> None:
    doc = answer({"p1": Pod().serve(2, 10, 10, 1).text()})
    rows = doc["data"]["result"]
    rows.append(
        {"metric": {"__name__": "llmengine_requests_total", "namespace": "team", "pod": "x"}, "value": [1, "5"]}
    )
    nan = dict(rows[0], value=[1, "NaN"])
    rows.append({**nan, "metric": {**nan["metric"], "pod": "p2"}})
    reading = promql.parse(doc)
    assert set(reading.pods("team", "chat", DIGEST)) == {"p1"}


ROW = {"__name__": "llmengine_requests_total", "namespace": "t", "engine": "e", "engine_digest": SHORT, "pod": "p"}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"status": "error", "errorType": "bad_data", "error": "parse error at char 5"}, "bad_data: parse error"),
        ({"status": "error", "errorType": "timeout", "error": "query timed out"}, "timeout: query timed out"),
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "not an instant vector"),
        ({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}}]}}, "not a sample"),
        (
            {"status": "success", "data": {"resultType": "vector", "result": [{"metric": ROW, "value": [1, "x"]}]}},
            "'x'",
        ),
        (["not", "an", "object"], "not a JSON object"),
    ],
)
def test_an_error_answer_says_what_prometheus_said(doc: Any, message: str) -> None:
    with pytest.raises(promql.PrometheusAnswerError, match=message):
        promql.parse(doc)


def test_a_pod_whose_counters_went_down_restarted_and_counts_from_zero_as_with_the_pods_source() -> None:
    a, b = Pod().serve(50, 100, 10, 1), Pod().serve(30, 100, 10, 1)
    older = traffic.snapshot(0, promql.parse(answer({"a": a.text(), "b": b.text()})).pods("team", "chat", DIGEST))
    restarted = Pod().serve(5, 900, 10, 1, result="too_long")  # pod a's proxy started over
    b.serve(10, 100, 10, 1)
    texts = {"a": restarted.text(), "b": b.text()}
    newer = traffic.snapshot(60, promql.parse(answer(texts)).pods("team", "chat", DIGEST))
    delta = traffic.window_delta(newer, older)
    assert delta.counters[(traffic.REQUESTS, "too_long")] == 5  # all of the restarted pod's
    assert delta.counters[(traffic.REQUESTS, "stop")] == 10  # pod b's new requests only
    pods = {n: traffic.parse_metrics(t) for n, t in texts.items()}
    assert delta == traffic.window_delta(traffic.snapshot(60, pods), older)


# ---- the HTTP client ----


@pytest.fixture
async def server() -> AsyncIterator[Callable[[web.Response | None], tuple[str, list[web.Request]]]]:
    """A server answering /api/v1/query with the response set for the test (or made by it, for each request); it
    records each request."""
    state: dict[str, Any] = {"response": None, "seen": []}

    async def handle(request: web.Request) -> web.StreamResponse:
        state["seen"].append(request)
        if state["response"] == "hang":
            await asyncio.sleep(1)
        resp = state["response"]
        return resp() if callable(resp) else resp

    app = web.Application()
    app.router.add_get("/prom/api/v1/query", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def set_response(resp: Any) -> tuple[str, list[web.Request]]:
        state["response"] = resp
        return f"http://127.0.0.1:{port}/prom/", state["seen"]

    yield set_response
    await runner.cleanup()


async def test_the_client_asks_the_instant_query_with_the_bearer_token_read_each_time(
    server: Any, tmp_path: Path
) -> None:
    doc = answer({"p": Pod().serve(1, 10, 10, 1).text()})
    url, seen = server(lambda: web.json_response(doc))
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    client = Prometheus(url, 5, bearer_token_file=str(token))
    assert await client.query(promql.query()) == doc
    assert seen[0].query["query"] == promql.query() and seen[0].headers["Authorization"] == "Bearer s3cret"
    token.write_text("rotated")
    await client.query("up")
    assert seen[1].headers["Authorization"] == "Bearer rotated"


async def test_prometheus_error_statuses_are_read_for_their_message(server: Any) -> None:
    url, _ = server(web.json_response({"status": "error", "errorType": "bad_data", "error": "bad"}, status=400))
    with pytest.raises(promql.PrometheusAnswerError, match="bad_data: bad"):
        promql.parse(await Prometheus(url, 5).query("up{"))


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            web.Response(status=502, text="Bad Gateway from the ingress"),
            "HTTP 502 .*not the Prometheus API: Bad Gateway",
        ),
        (web.Response(status=200, text="{not json", content_type="application/json"), "does not parse"),
        ("hang", "did not answer within 0.2 s"),
    ],
)
async def test_answers_that_are_not_the_api_are_errors_naming_the_endpoint(
    server: Any, response: Any, message: str
) -> None:
    url, _ = server(response)
    with pytest.raises(PrometheusError, match=message):
        await Prometheus(url, 0.2).query("up")


async def test_prometheus_down_is_an_error_naming_the_endpoint(tmp_path: Path) -> None:
    with pytest.raises(PrometheusError, match=r"127\.0\.0\.1:9/api/v1/query: ClientConnectorError"):
        await Prometheus("http://127.0.0.1:9", 2).query("up")
    with pytest.raises(PrometheusError, match="cannot read the bearer token file"):
        await Prometheus("http://127.0.0.1:9", 2, bearer_token_file=str(tmp_path / "none")).query("up")


# ---- one query for every engine ----


class FakeClient:
    url = "http://prometheus:9090"

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.asked = 0

    async def query(self, promql_text: str) -> Any:
        self.asked += 1
        await asyncio.sleep(0)  # let other passes ask meanwhile
        got = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(got, Exception):
            raise got
        return got


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_every_engine_shares_one_query_per_interval() -> None:
    clock, client = Clock(), FakeClient(answer({"p": Pod().text()}))
    source = PrometheusSource(client, "", 15, clock)  # type: ignore[arg-type]
    first = await asyncio.gather(*(source.read() for _ in range(1000)))
    assert client.asked == 1 and all(f is first[0] for f in first) and first[0].reading is not None
    clock.now += 14.9
    assert await source.read() is first[0] and client.asked == 1
    clock.now += 0.1
    assert (await source.read()).at == clock.now and client.asked == 2


async def test_a_failed_query_is_counted_and_its_reason_kept_for_the_status() -> None:
    before = metrics.TRAFFIC_QUERIES.labels("error")._value.get()
    source = PrometheusSource(FakeClient(PrometheusError("http://prometheus:9090/api/v1/query: refused")), "", 15)  # type: ignore[arg-type]
    fetch = await source.read()
    assert fetch.reading is None and fetch.error is not None
    assert fetch.error.startswith("cannot read traffic from Prometheus at http://prometheus:9090: ")
    assert "refused" in fetch.error and metrics.TRAFFIC_QUERIES.labels("error")._value.get() == before + 1


def _gatherer(client: FakeClient, clock: Clock, interval: float = 10) -> Gatherer:
    cfg = OperatorConfig(
        traffic_source="prometheus", traffic_prometheus_url=client.url, traffic_scrape_interval_seconds=interval
    )
    source = PrometheusSource(client, 'cluster="a"', interval, clock)  # type: ignore[arg-type]
    return Gatherer(None, cfg, None, Memory(), None, clock=clock, prometheus=source)  # type: ignore[arg-type]


PLAN = SimpleNamespace(engine_digest=DIGEST)


async def test_the_gatherer_snapshots_the_engines_pods_from_the_shared_reading() -> None:
    pod, clock = Pod(), Clock()
    client = FakeClient(answer({"p": pod.text()}))
    g = _gatherer(client, clock)
    first = await g._traffic("team", "chat", PLAN, 8000, "1m")  # type: ignore[arg-type]
    assert first is not None and first.answered and first.newest is not None and first.start is None
    assert first.newest.pods == {"p": traffic.parse_metrics(pod.text())} and first.error is None
    assert await g._traffic("team", "chat", PLAN, 8000, "1m") is None  # within the interval: nothing new
    pod.serve(30, 100, 10, 2)
    client.answers = [answer({"p": pod.text()})]
    clock.now += 10
    second = await g._traffic("team", "chat", PLAN, 8000, "1m")  # type: ignore[arg-type]
    assert second is not None and second.start is first.newest and second.newest is not None
    profile = traffic.profile(traffic.window_delta(second.newest, second.start), 10, "t")
    assert profile["requests"] == 30 and client.asked == 2


async def test_no_series_and_prometheus_down_say_why_in_the_view() -> None:
    clock = Clock()
    client = FakeClient(answer({"p": Pod().text()}, engine="another"))
    g = _gatherer(client, clock)
    view = await g._traffic("team", "chat", PLAN, 8000, "1m")  # type: ignore[arg-type]
    assert view is not None and not view.answered and view.newest is None and view.error is not None
    assert (
        'no traffic series of this engine\'s serving pods (namespace="team", engine="chat", engine_digest='
        in view.error
    )
    assert f'engine_digest="{SHORT}", cluster="a")' in view.error and "servingPodMonitor" in view.error
    client.answers = [PrometheusError("down")]
    clock.now += 10
    view = await g._traffic("team", "chat", PLAN, 8000, "1m")  # type: ignore[arg-type]
    assert view is not None and view.error == "cannot read traffic from Prometheus at http://prometheus:9090: down"


def test_fetch_is_a_value() -> None:
    assert Fetch(1.0, None, "x") == Fetch(1.0, None, "x")


# ---- the dev cluster's Prometheus ----


def test_the_dev_prometheus_targets_each_running_serving_pod_at_its_engines_serving_path() -> None:
    from llmengine.dev.prometheus import targets
    from llmengine.dev.servingpath import ServingPathInfo

    def pod(name: str, engine: str, phase: str = "Running") -> dict[str, Any]:
        labels = {"llmengine.io/engine": engine, "llmengine.io/engine-digest": SHORT}
        return {"metadata": {"namespace": "team", "name": name, "labels": labels}, "status": {"phase": phase}}

    paths = [ServingPathInfo("team", "chat", "http://127.0.0.1:4321", "")]
    pods = [pod("chat-b", "chat"), pod("chat-a", "chat"), pod("chat-c", "chat", "Succeeded"), pod("x-a", "other")]
    found = targets(pods, paths)
    assert [t["targets"] for t in found] == [["127.0.0.1:4321"], ["127.0.0.1:4321"]]
    assert found[0]["labels"] == {
        "__meta_kubernetes_namespace": "team",
        "__meta_kubernetes_pod_name": "chat-a",
        "__meta_kubernetes_pod_label_llmengine_io_engine": "chat",
        "__meta_kubernetes_pod_label_llmengine_io_engine_digest": SHORT,
        "__param_namespace": "team",
        "__param_pod": "chat-a",
    }
