"""Thin async adapter over the synchronous Kubernetes client's REST layer: every call runs in a worker thread."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llmengine import GROUP, PLURAL, VERSION


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
    """A write the API server refused, with its HTTP status and reason."""

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
    imported) and no typed models built and converted back to dicts on every read."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> Any:
        """One request (synchronous: run it through _call); the decoded JSON answer. ApiException on a non-2xx."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        params = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        rsp = self.api.call_api(*params)
        data = rsp.read()
        if not 200 <= rsp.status <= 299:
            raise ApiException.from_response(
                http_resp=rsp, body=data.decode(errors="replace") if data else None, data=None
            )
        return json.loads(data) if data else None

    async def _call(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self._request, method, path, *args, **kwargs)

    async def _get(self, path: str) -> dict[str, Any] | None:
        """The object exactly as the API server sent it; None on 404."""
        try:
            obj = await self._call("GET", path)
        except ApiException as e:
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
        except ApiException as e:
            if e.status == 409:
                return False
            raise ApiError(int(e.status or 0), str(e.reason or "")) from e
        return True

    async def replace_object(
        self, group: str, version: str, plural: str, obj: Mapping[str, Any], resource_version: str
    ) -> None:
        md = obj["metadata"]
        body = {**obj, "metadata": {**md, "resourceVersion": resource_version}}
        try:
            await self._call("PUT", _custom(group, version, plural, md["namespace"], md["name"]), body)
        except ApiException as e:
            raise ApiError(int(e.status or 0), str(e.reason or "")) from e

    async def delete_object(self, group: str, version: str, plural: str, ns: str, name: str) -> None:
        try:
            await self._call("DELETE", _custom(group, version, plural, ns, name))
        except ApiException as e:
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
        return await self._get(f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{quote(name)}")

    async def list_pods(self, ns: str, label_selector: str) -> list[dict[str, Any]]:
        return await self._list(f"/api/v1/namespaces/{quote(ns, safe='')}/pods", label_selector)

    async def list_jobs(self, label_selector: str) -> list[dict[str, Any]]:
        return await self._list("/apis/batch/v1/jobs", label_selector)

    # ---- writes -------------------------------------------------------------------------------------------
    async def _create(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create; the object as stored, None when it already exists."""
        try:
            got = await self._call("POST", _path(obj["kind"], obj["metadata"]["namespace"]), obj)
        except ApiException as e:
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
        except ApiException as e:
            if e.status != 404:
                raise

    async def write_secret_data(
        self, ns: str, name: str, data: Mapping[str, str], resource_version: str | None
    ) -> None:
        """Set a Secret's data: a merge patch of the Secret last read at `resource_version` (409 when it changed since),
        or a create when there was none (409 when another writer created it first)."""
        try:
            if resource_version is None:
                body = {"metadata": {"name": name, "namespace": ns}, "type": "Opaque", "data": dict(data)}
                await self._call("POST", _path("Secret", ns), body)
            else:
                patch = {"metadata": {"resourceVersion": resource_version}, "data": dict(data)}
                await self._call("PATCH", _path("Secret", ns, name), patch, content_type=MERGE_PATCH)
        except ApiException as e:
            raise ApiError(int(e.status or 0), str(e.reason or "")) from e

    async def patch_webhook_configuration(self, name: str, patch: Mapping[str, Any]) -> None:
        """Strategic merge patch: webhooks merge by name, so fields of each webhook not in the patch are kept."""
        try:
            path = f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{quote(name)}"
            await self._call("PATCH", path, dict(patch), content_type=STRATEGIC_MERGE_PATCH)
        except ApiException as e:
            raise ApiError(int(e.status or 0), str(e.reason or "")) from e

    async def create_peering(self, plural: str, name: str, ns: str | None) -> bool:
        """Create a Kopf peering object (kopf.dev/v1, `plural`), cluster-wide or in `ns`; False when it exists."""
        body = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": name}}
        try:
            if ns is None:
                body["kind"] = "ClusterKopfPeering"
            await self._call("POST", _custom("kopf.dev", "v1", plural, ns), body)
        except ApiException as e:
            if e.status == 409:
                return False
            raise ApiError(int(e.status or 0), str(e.reason or "")) from e
        return True

    async def delete_job(self, ns: str, name: str) -> None:
        for kind in ("Job", "ConfigMap"):
            try:
                await self._call("DELETE", _path(kind, ns, name), query={"propagationPolicy": "Background"})
            except ApiException as e:
                if e.status != 404:
                    raise

    async def patch_status(self, ns: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource; returns the object as stored."""
        path = _custom(GROUP, VERSION, PLURAL, ns, name) + "/status"
        res = await self._call("PATCH", path, {"status": patch}, content_type=MERGE_PATCH)
        return dict(res) if isinstance(res, Mapping) else {}
