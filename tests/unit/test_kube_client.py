"""clients/kube.Kube against a real HTTP server (aiohttp's): paths, verbs, content types, the answers it decodes,
the errors it raises and the one new login after a 401."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from aiohttp import web

from llmengine.clients.kube import ApiError, Kube, connection


class FakeApiServer:
    """Answers like the API server for a few paths; records every request it got."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.tokens_accepted = {"Bearer token-1"}
        self.objects: dict[str, dict[str, Any]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "content_type": request.headers.get("Content-Type"),
                "authorization": request.headers.get("Authorization"),
                "body": json.loads(body) if body else None,
            }
        )
        if request.headers.get("Authorization") not in self.tokens_accepted:
            return web.json_response({"kind": "Status", "message": "Unauthorized", "code": 401}, status=401)
        if request.method == "GET" and request.path in self.objects:
            return web.json_response(self.objects[request.path])
        if request.method == "GET" and request.path.endswith("/pods"):
            return web.json_response({"items": [{"metadata": {"name": "p1"}}]})
        if request.method == "POST" and request.path.endswith("/jobs"):
            obj = json.loads(body)
            path = f"{request.path}/{obj['metadata']['name']}"
            if path in self.objects:
                msg = f'jobs.batch "{obj["metadata"]["name"]}" already exists'
                return web.json_response({"kind": "Status", "message": msg, "code": 409}, status=409)
            stored = {**obj, "metadata": {**obj["metadata"], "uid": "u-1", "resourceVersion": "7"}}
            self.objects[path] = stored
            return web.json_response(stored, status=201)
        if request.method == "PATCH" and request.path.endswith("/status"):
            msg = 'LLMEngine.llmengine.io "e1" is invalid: status.phase: Unsupported value: "Nope"'
            return web.json_response({"kind": "Status", "message": msg, "code": 422}, status=422)
        if request.method == "DELETE":
            return web.Response(status=404, reason="Not Found")
        return web.Response(status=404)


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApiServer, str]]:
    fake = FakeApiServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _kube(server: str, tokens: list[str]) -> tuple[Kube, list[str]]:
    handed: list[str] = []

    def connect() -> kopf.ConnectionInfo:
        token = tokens[min(len(handed), len(tokens) - 1)]
        handed.append(token)
        return kopf.ConnectionInfo(server=server, token=token)

    return Kube(connect), handed


async def test_requests_by_path_with_json_answers(api: tuple[FakeApiServer, str]) -> None:
    fake, server = api
    kube, _ = _kube(server, ["token-1"])
    try:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "e-1", "namespace": "team a"}}
        stored = await kube.create_job(job)
        assert stored is not None and stored["metadata"]["uid"] == "u-1"
        assert await kube.create_job(job) is None  # 409: it exists, joining is not an error
        assert (await kube.get_job("team a", "e-1")) == stored
        assert await kube.get_job("team a", "gone") is None  # 404
        pods = await kube.list_pods("team a", "app=x,tier in (a,b)")
        assert [p["metadata"]["name"] for p in pods] == ["p1"]
        await kube.delete_job("team a", "gone")  # 404 on both the Job and its ConfigMap: nothing to do
    finally:
        await kube.close()
    first = fake.requests[0]
    assert (first["method"], first["path"]) == ("POST", "/apis/batch/v1/namespaces/team a/jobs")
    assert first["content_type"] == "application/json" and first["body"] == job
    assert first["authorization"] == "Bearer token-1"
    listing = next(r for r in fake.requests if r["path"].endswith("/pods"))
    assert listing["query"] == {"labelSelector": "app=x,tier in (a,b)"}
    deletes = [r for r in fake.requests if r["method"] == "DELETE"]
    assert [r["query"] for r in deletes] == [{"propagationPolicy": "Background"}] * 2


async def test_a_refusal_carries_the_api_servers_message(api: tuple[FakeApiServer, str]) -> None:
    fake, server = api
    kube, _ = _kube(server, ["token-1"])
    try:
        with pytest.raises(ApiError) as err:
            await kube.patch_status("ns", "e1", {"phase": "Nope"})
    finally:
        await kube.close()
    assert err.value.status == 422
    assert 'Unsupported value: "Nope"' in err.value.reason
    patch = fake.requests[-1]
    assert patch["content_type"] == "application/merge-patch+json"
    assert patch["body"] == {"status": {"phase": "Nope"}}


async def test_a_rotated_token_is_read_again_once(api: tuple[FakeApiServer, str]) -> None:
    fake, server = api
    fake.tokens_accepted = {"Bearer token-2"}
    kube, handed = _kube(server, ["token-1", "token-2"])
    try:
        assert await kube.list_pods("ns", "a=b")
        assert handed == ["token-1", "token-2"]
        retired = list(kube._retired)  # the refused session stays open for requests still in flight on it
        assert len(retired) == 1 and not retired[0].done()
        fake.tokens_accepted = {"Bearer token-3"}  # refused with every token it can get: the 401 is raised
        with pytest.raises(ApiError) as err:
            await kube.list_pods("ns", "a=b")
    finally:
        await kube.close()
    assert err.value.status == 401
    assert handed == ["token-1", "token-2", "token-2"]
    assert not kube._retired and all(t.done() for t in retired)  # closing the client closes the refused ones too


def test_connection_reads_a_static_kubeconfig_and_refuses_one_without_credentials(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def kubeconfig(user: dict[str, Any]) -> str:
        path = tmp_path / f"kubeconfig-{len(list(tmp_path.iterdir()))}"
        path.write_text(
            json.dumps(
                {
                    "current-context": "c",
                    "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                    "clusters": [{"name": "k", "cluster": {"server": "https://10.0.0.1:6443"}}],
                    "users": [{"name": "u", "user": user}],
                }
            )
        )
        return str(path)

    settings = kopf.OperatorSettings()
    monkeypatch.setenv("KUBECONFIG", kubeconfig({"token": "abc"}))
    info = connection(settings)
    assert (info.server, info.token) == ("https://10.0.0.1:6443", "abc")
    # A path in a kubeconfig is relative to the kubeconfig's directory, not to where the operator runs.
    (tmp_path / "ca.crt").write_text("not read here")
    path = kubeconfig({"token": "abc"})
    doc = json.loads(Path(path).read_text())
    doc["clusters"][0]["cluster"]["certificate-authority"] = "ca.crt"
    Path(path).write_text(json.dumps(doc))
    monkeypatch.setenv("KUBECONFIG", path)
    # The client library reads KUBECONFIG when it is first imported (in the operator: at its first login).
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", path)
    monkeypatch.chdir("/")
    assert connection(settings).ca_path == str(tmp_path / "ca.crt")
    monkeypatch.setenv("KUBECONFIG", kubeconfig({"exec": {"command": "aws", "apiVersion": "x"}}))
    monkeypatch.setitem(__import__("sys").modules, "kubernetes", None)  # as in the operator image
    with pytest.raises(kopf.LoginError, match="exec plugin needs the kubernetes package"):
        connection(settings)


def test_in_a_pod_the_api_server_is_where_the_service_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """As client-go's in-cluster config: KUBERNETES_SERVICE_HOST and _PORT, not the DNS name Kopf's loader assumes."""
    sa = kopf.ConnectionInfo(server="https://kubernetes.default.svc", token="sa-token", default_namespace="ops")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: sa)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    info = connection(kopf.OperatorSettings())
    assert (info.server, info.token, info.default_namespace) == ("https://10.96.0.1:443", "sa-token", "ops")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    assert connection(kopf.OperatorSettings()).server == "https://[fd00::1]:443"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert connection(kopf.OperatorSettings()).server == "https://kubernetes.default.svc"
