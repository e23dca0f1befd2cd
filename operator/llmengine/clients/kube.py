"""Async Kubernetes requests by path over one aiohttp session (the library Kopf itself talks to the API server with):
objects as the JSON the API server sends, no generated API classes, no worker threads."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from llmengine import GROUP, PLURAL, VERSION

_log = logging.getLogger("llmengine.kube")


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning old into new (None deletes a key); empty when nothing changed."""
    patch: dict[str, Any] = {}
    for k in old.keys() - new.keys():
        patch[k] = None
    for k, v in new.items():
        o = old.get(k)
        if isinstance(v, Mapping) and isinstance(o, Mapping):
            sub = merge_patch(o, v)
            if sub:
                patch[k] = sub
        elif o != v:
            patch[k] = v
    return patch


class ApiError(Exception):
    """A request the API server refused: its HTTP status and the reason it gave (its Status message when it sent
    one, else the HTTP reason phrase)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


# Where each kind the operator creates lives in the API (group/version path, plural).
_KIND_PATHS = {
    "Job": ("/apis/batch/v1", "jobs"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "Secret": ("/api/v1", "secrets"),
}
WEBHOOK_CONFIGURATIONS = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


def _path(kind: str, ns: str, name: str | None = None) -> str:
    prefix, plural = _KIND_PATHS[kind]
    return _named(f"{prefix}/namespaces/{quote(ns, safe='')}/{plural}", name)


def _custom(group: str, version: str, plural: str, ns: str | None, name: str | None = None) -> str:
    where = f"/namespaces/{quote(ns, safe='')}" if ns is not None else ""
    return _named(f"/apis/{group}/{version}{where}/{plural}", name)


def _named(path: str, name: str | None) -> str:
    return f"{path}/{quote(name, safe='')}" if name is not None else path


class Kube:
    """Requests by path, objects as the JSON the API server sends: no generated API classes (tens of MiB of code
    imported) and no typed models built and converted back to dicts on every read.

    `connect` gives the credentials (Kopf's ConnectionInfo, from the same login as Kopf's own session); they are asked
    again once when the API server answers 401 (a rotated service-account token). At most `connections` requests are
    in flight at once; the others wait for a free connection."""

    def __init__(
        self,
        connect: Callable[[], kopf.ConnectionInfo],
        connections: int = 16,
        timeout_s: float = 60.0,
    ) -> None:
        self._connect = connect
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._retired: set[asyncio.Task[None]] = set()

    def _open(self) -> aiohttp.ClientSession:
        info = self._connect()
        self._server = info.server.rstrip("/")
        self._session = api_session(info, self._connections, self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        retired = list(self._retired)
        for task in retired:
            task.cancel()
        await asyncio.gather(*retired, return_exceptions=True)

    def _retire(self, old: aiohttp.ClientSession) -> None:
        """The credentials of `old` were refused: the next request logs in again with a new session, while the
        requests still in flight on `old` finish on it (it is closed once they have had their time)."""
        if self._session is not old:
            return  # another request has already replaced it
        self._session = None

        async def close_later() -> None:
            try:
                await asyncio.sleep(self._timeout.total or 60.0)
            finally:
                await old.close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> Any:
        """One request; the decoded JSON answer. ApiError on a non-2xx answer."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type or "application/json"} if body is not None else None
        for attempt in (1, 2):
            session = self._session or self._open()
            async with session.request(method, self._server + path, data=data, params=query, headers=headers) as rsp:
                raw = await rsp.read()
                if rsp.status == 401 and attempt == 1:
                    self._retire(session)  # credentials rotated: log in again once
                    continue
                if not 200 <= rsp.status <= 299:
                    raise ApiError(rsp.status, _reason(raw, rsp.reason))
                return json.loads(raw) if raw else None
        raise AssertionError("unreachable")

    async def _get(self, path: str) -> dict[str, Any] | None:
        """The object exactly as the API server sent it; None on 404."""
        try:
            obj = await self._call("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return dict(obj)

    async def _list(self, path: str, label_selector: str) -> list[dict[str, Any]]:
        res = await self._call("GET", path, query={"labelSelector": label_selector})
        return list(res.get("items") or [])

    # ---- reads --------------------------------------------------------------------------------------------
    async def get_job(self, ns: str, name: str) -> dict[str, Any] | None:
        return await self._get(_path("Job", ns, name))

    async def get_deployment(self, ns: str, name: str) -> dict[str, Any] | None:
        return await self._get(_path("Deployment", ns, name))

    # ---- any namespaced object of a named API group (HPAs, Ingresses, HTTPRoutes) ----------------------------
    async def get_object(self, group: str, version: str, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        return await self._get(_custom(group, version, plural, ns, name))

    async def create_object(self, group: str, version: str, plural: str, obj: Mapping[str, Any]) -> bool:
        """Create; False when it already exists."""
        ns = obj["metadata"]["namespace"]
        try:
            await self._call("POST", _custom(group, version, plural, ns), obj)
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    async def replace_object(
        self, group: str, version: str, plural: str, obj: Mapping[str, Any], resource_version: str
    ) -> None:
        md = obj["metadata"]
        body = {**obj, "metadata": {**md, "resourceVersion": resource_version}}
        await self._call("PUT", _custom(group, version, plural, md["namespace"], md["name"]), body)

    async def delete_object(self, group: str, version: str, plural: str, ns: str, name: str) -> None:
        try:
            await self._call("DELETE", _custom(group, version, plural, ns, name))
        except ApiError as e:
            if e.status != 404:
                raise

    async def get_secret_data(self, ns: str, name: str) -> dict[str, str] | None:
        import base64

        s = await self.get_secret(ns, name)
        if s is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}

    async def get_secret(self, ns: str, name: str) -> dict[str, Any] | None:
        """The Secret as stored (data base64-encoded, with its resourceVersion); None when there is none."""
        return await self._get(_path("Secret", ns, name))

    async def get_webhook_configuration(self, name: str) -> dict[str, Any] | None:
        return await self._get(_named(WEBHOOK_CONFIGURATIONS, name))

    async def list_pods(self, ns: str, label_selector: str) -> list[dict[str, Any]]:
        return await self._list(f"/api/v1/namespaces/{quote(ns, safe='')}/pods", label_selector)

    async def list_jobs(self, label_selector: str) -> list[dict[str, Any]]:
        return await self._list("/apis/batch/v1/jobs", label_selector)

    # ---- writes -------------------------------------------------------------------------------------------
    async def _create(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create; the object as stored, None when it already exists."""
        try:
            got = await self._call("POST", _path(obj["kind"], obj["metadata"]["namespace"]), obj)
        except ApiError as e:
            if e.status == 409:
                return None
            raise
        return dict(got)

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create; False when it already exists (joining an existing object is not an error)."""
        return await self._create(obj) is not None

    async def replace_deployment(self, obj: Mapping[str, Any], resource_version: str) -> dict[str, Any]:
        """Replace; returns the Deployment as stored."""
        body = {**obj, "metadata": {**obj["metadata"], "resourceVersion": resource_version}}
        md = obj["metadata"]
        return dict(await self._call("PUT", _path("Deployment", md["namespace"], md["name"]), body))

    async def create_job(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create; returns the Job as stored (its uid owns what travels with it), None when it already exists."""
        return await self._create(obj)

    async def put_secret(self, obj: Mapping[str, Any]) -> None:
        """Create the Secret, or replace the one of its name (the operator is its only writer)."""
        md = obj["metadata"]
        if not await self.create(obj):
            await self._call("PUT", _path("Secret", md["namespace"], md["name"]), obj)

    async def create_deployment(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create; returns the Deployment as stored, None when it already exists."""
        return await self._create(obj)

    async def add_owner(
        self, kind: str, ns: str, name: str, known_owners: list[dict[str, Any]], owner: dict[str, Any]
    ) -> None:
        """Add `owner` unless `known_owners` already has it. A strategic merge patch merges ownerReferences by uid,
        so owners added concurrently by other engines are kept."""
        if any(o.get("uid") == owner["uid"] for o in known_owners):
            return
        patch = {"metadata": {"ownerReferences": [owner]}}
        try:
            await self._call("PATCH", _path(kind, ns, name), patch, content_type=STRATEGIC_MERGE_PATCH)
        except ApiError as e:
            if e.status != 404:
                raise

    async def write_secret_data(
        self, ns: str, name: str, data: Mapping[str, str], resource_version: str | None
    ) -> None:
        """Set a Secret's data: a merge patch of the Secret last read at `resource_version` (409 when it changed since),
        or a create when there was none (409 when another writer created it first)."""
        if resource_version is None:
            body = {"metadata": {"name": name, "namespace": ns}, "type": "Opaque", "data": dict(data)}
            await self._call("POST", _path("Secret", ns), body)
        else:
            patch = {"metadata": {"resourceVersion": resource_version}, "data": dict(data)}
            await self._call("PATCH", _path("Secret", ns, name), patch, content_type=MERGE_PATCH)

    async def patch_webhook_configuration(self, name: str, patch: Mapping[str, Any]) -> None:
        """Strategic merge patch: webhooks merge by name, so fields of each webhook not in the patch are kept."""
        await self._call("PATCH", _named(WEBHOOK_CONFIGURATIONS, name), dict(patch), content_type=STRATEGIC_MERGE_PATCH)

    async def create_peering(self, plural: str, name: str, ns: str | None) -> bool:
        """Create a Kopf peering object (kopf.dev/v1, `plural`), cluster-wide or in `ns`; False when it exists."""
        body = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": name}}
        try:
            if ns is None:
                body["kind"] = "ClusterKopfPeering"
            await self._call("POST", _custom("kopf.dev", "v1", plural, ns), body)
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    async def delete_job(self, ns: str, name: str) -> None:
        for kind in ("Job", "ConfigMap"):
            try:
                await self._call("DELETE", _path(kind, ns, name), query={"propagationPolicy": "Background"})
            except ApiError as e:
                if e.status != 404:
                    raise

    async def patch_status(self, ns: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource; returns the object as stored."""
        path = _custom(GROUP, VERSION, PLURAL, ns, name) + "/status"
        res = await self._call("PATCH", path, {"status": patch}, content_type=MERGE_PATCH)
        return dict(res) if isinstance(res, Mapping) else {}


def _reason(raw: bytes, fallback: str | None) -> str:
    """The API server's own message (a Status object's `message`), else the HTTP reason phrase."""
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, Mapping) and isinstance(doc.get("message"), str) and doc["message"]:
        return str(doc["message"])
    return fallback or ""


def api_session(
    info: kopf.ConnectionInfo, connections: int, timeout: aiohttp.ClientTimeout | None = None
) -> aiohttp.ClientSession:
    """An aiohttp session to the API server of `info` with at most `connections` open at once. Each TLS connection
    holds a 256 KiB read buffer (asyncio's SSL protocol), and a pool without a limit (Kopf's own) opens one connection
    per request in flight: in a burst of 1,000 new objects, 256 KiB per concurrent request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, ssl=info.as_ssl_context()),
        headers={**info.as_http_headers(), "Accept": "application/json", "User-Agent": "llmengine-operator"},
        proxy=info.proxy_url,
        trust_env=info.trust_env,
        timeout=timeout or aiohttp.client.DEFAULT_TIMEOUT,  # Kopf gives its own per request, watches included
    )


def kopf_connections(namespaces: int) -> int:
    """Connections for Kopf's session: its watch streams stay open (LLMEngines, Jobs, Deployments and peering per
    watched namespace, or once cluster-wide, plus its resource scan), and at least 32 more for its patches and
    events."""
    return 32 + 4 * max(1, namespaces) + 1


def connection(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """Credentials for Kopf's session and for Kube alike. In a pod: its service account, and the API server at
    KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT as client-go finds it (no cluster DNS needed). Elsewhere, the
    kubeconfig (KUBECONFIG or ~/.kube/config, current context): read by the kubernetes client library when it is
    installed (exec plugins, auth providers, paths relative to the kubeconfig), else by Kopf's own reader, which takes
    a token, a client certificate or a password."""
    info = kopf.login_with_service_account(settings=settings)
    if info is not None:
        return replace(info, server=_in_cluster_server() or info.server)
    try:
        info = kopf.login_via_client(settings=settings, logger=_log)  # None without the kubernetes package
    except kopf.LoginError:
        info = None
    info = info or kopf.login_with_kubeconfig(settings=settings)
    if info is None or not (info.token or info.certificate_path or info.certificate_data or info.username):
        raise kopf.LoginError(
            "no Kubernetes credentials: run in a pod with a service account, or point KUBECONFIG at a kubeconfig "
            "whose user has a token or a client certificate (an exec plugin needs the kubernetes package installed: "
            "pip install 'llmengine-operator[cluster]')"
        )
    return info


def _in_cluster_server() -> str | None:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
