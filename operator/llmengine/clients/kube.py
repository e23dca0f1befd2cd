"""Thin async adapter over the synchronous Kubernetes client: every call runs in a worker thread."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

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


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.admission = client.AdmissionregistrationV1Api(api)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _get(self, fn: Any, *args: Any) -> dict[str, Any] | None:
        try:
            obj = await self._call(fn, *args)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return dict(self.api.sanitize_for_serialization(obj))

    # ---- reads --------------------------------------------------------------------------------------------
    async def get_job(self, ns: str, name: str) -> dict[str, Any] | None:
        return await self._get(self.batch.read_namespaced_job, name, ns)

    async def get_deployment(self, ns: str, name: str) -> dict[str, Any] | None:
        return await self._get(self.apps.read_namespaced_deployment, name, ns)

    # ---- any namespaced object of a named API group (HPAs, Ingresses, HTTPRoutes) ----------------------------
    async def get_object(self, group: str, version: str, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        try:
            obj = await self._call(self.custom.get_namespaced_custom_object, group, version, ns, plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return dict(obj)

    async def create_object(self, group: str, version: str, plural: str, obj: Mapping[str, Any]) -> bool:
        """Create; False when it already exists."""
        ns = obj["metadata"]["namespace"]
        try:
            await self._call(self.custom.create_namespaced_custom_object, group, version, ns, plural, obj)
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
            await self._call(
                self.custom.replace_namespaced_custom_object, group, version, md["namespace"], plural, md["name"], body
            )
        except ApiException as e:
            raise ApiError(int(e.status or 0), str(e.reason or "")) from e

    async def delete_object(self, group: str, version: str, plural: str, ns: str, name: str) -> None:
        try:
            await self._call(self.custom.delete_namespaced_custom_object, group, version, ns, plural, name)
        except ApiException as e:
            if e.status != 404:
                raise

    async def get_secret_data(self, ns: str, name: str) -> dict[str, str] | None:
        import base64

        s = await self._get(self.core.read_namespaced_secret, name, ns)
        if s is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}

    async def _get_json(self, fn: Any, *args: Any) -> dict[str, Any] | None:
        """The object exactly as the API server sent it (no client model in between); None on 404."""
        try:
            rsp = await self._call(fn, *args, _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return dict(json.loads(rsp.data))

    async def get_secret(self, ns: str, name: str) -> dict[str, Any] | None:
        """The Secret as stored (data base64-encoded, with its resourceVersion); None when there is none."""
        return await self._get_json(self.core.read_namespaced_secret, name, ns)

    async def get_webhook_configuration(self, name: str) -> dict[str, Any] | None:
        return await self._get_json(self.admission.read_validating_webhook_configuration, name)

    async def list_pods(self, ns: str, label_selector: str) -> list[dict[str, Any]]:
        res = await self._call(self.core.list_namespaced_pod, ns, label_selector=label_selector)
        return list(self.api.sanitize_for_serialization(res).get("items") or [])

    async def list_jobs(self, label_selector: str) -> list[dict[str, Any]]:
        res = await self._call(self.batch.list_job_for_all_namespaces, label_selector=label_selector)
        return list(self.api.sanitize_for_serialization(res).get("items") or [])

    # ---- writes -------------------------------------------------------------------------------------------
    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create; False when it already exists (joining an existing object is not an error)."""
        kind, ns = obj["kind"], obj["metadata"]["namespace"]
        fn = {
            "Job": self.batch.create_namespaced_job,
            "ConfigMap": self.core.create_namespaced_config_map,
            "Deployment": self.apps.create_namespaced_deployment,
            "Service": self.core.create_namespaced_service,
            "Secret": self.core.create_namespaced_secret,
        }[kind]
        try:
            await self._call(fn, ns, obj)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    async def replace_deployment(self, obj: Mapping[str, Any], resource_version: str) -> dict[str, Any]:
        """Replace; returns the Deployment as stored."""
        body = {**obj, "metadata": {**obj["metadata"], "resourceVersion": resource_version}}
        md = obj["metadata"]
        got = await self._call(self.apps.replace_namespaced_deployment, md["name"], md["namespace"], body)
        return dict(self.api.sanitize_for_serialization(got))

    async def create_job(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create; returns the Job as stored (its uid owns what travels with it), None when it already exists."""
        try:
            got = await self._call(self.batch.create_namespaced_job, obj["metadata"]["namespace"], obj)
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        return dict(self.api.sanitize_for_serialization(got))

    async def put_secret(self, obj: Mapping[str, Any]) -> None:
        """Create the Secret, or replace the one of its name (the operator is its only writer)."""
        md = obj["metadata"]
        if not await self.create(obj):
            await self._call(self.core.replace_namespaced_secret, md["name"], md["namespace"], obj)

    async def create_deployment(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create; returns the Deployment as stored, None when it already exists."""
        try:
            got = await self._call(self.apps.create_namespaced_deployment, obj["metadata"]["namespace"], obj)
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        return dict(self.api.sanitize_for_serialization(got))

    async def add_owner(
        self, kind: str, ns: str, name: str, known_owners: list[dict[str, Any]], owner: dict[str, Any]
    ) -> None:
        """Add `owner` unless `known_owners` already has it. A strategic merge patch merges ownerReferences by uid,
        so owners added concurrently by other engines are kept."""
        if any(o.get("uid") == owner["uid"] for o in known_owners):
            return
        patch = {"metadata": {"ownerReferences": [owner]}}
        fn = {"Job": self.batch.patch_namespaced_job, "ConfigMap": self.core.patch_namespaced_config_map}[kind]
        try:
            await self._call(fn, name, ns, patch)
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
                await self._call(self.core.create_namespaced_secret, ns, body)
            else:
                patch = {"metadata": {"resourceVersion": resource_version}, "data": dict(data)}
                await self._call(
                    self.core.patch_namespaced_secret, name, ns, patch, _content_type="application/merge-patch+json"
                )
        except ApiException as e:
            raise ApiError(int(e.status or 0), str(e.reason or "")) from e

    async def patch_webhook_configuration(self, name: str, patch: Mapping[str, Any]) -> None:
        """Strategic merge patch: webhooks merge by name, so fields of each webhook not in the patch are kept."""
        try:
            await self._call(
                self.admission.patch_validating_webhook_configuration,
                name,
                dict(patch),
                _content_type="application/strategic-merge-patch+json",
            )
        except ApiException as e:
            raise ApiError(int(e.status or 0), str(e.reason or "")) from e

    async def create_peering(self, plural: str, name: str, ns: str | None) -> bool:
        """Create a Kopf peering object (kopf.dev/v1, `plural`), cluster-wide or in `ns`; False when it exists."""
        body = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": name}}
        try:
            if ns is None:
                body["kind"] = "ClusterKopfPeering"
                await self._call(self.custom.create_cluster_custom_object, "kopf.dev", "v1", plural, body)
            else:
                await self._call(self.custom.create_namespaced_custom_object, "kopf.dev", "v1", ns, plural, body)
        except ApiException as e:
            if e.status == 409:
                return False
            raise ApiError(int(e.status or 0), str(e.reason or "")) from e
        return True

    async def delete_job(self, ns: str, name: str) -> None:
        for fn in (self.batch.delete_namespaced_job, self.core.delete_namespaced_config_map):
            try:
                await self._call(fn, name, ns, propagation_policy="Background")
            except ApiException as e:
                if e.status != 404:
                    raise

    async def patch_status(self, ns: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource; returns the object as stored."""
        res = await self._call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            ns,
            PLURAL,
            name,
            {"status": patch},
            _content_type="application/merge-patch+json",
        )
        return dict(res) if isinstance(res, Mapping) else {}
