"""Tenants on one shared default store (store access `isolated`), on the real API server with its built-in `edit`
role: a tenant's user reads no Secret that grants the shared bucket, cannot read another tenant's engine, cannot
write the store, and its own engine still builds and serves."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llmengine.api.artifacts import EngineGrant
from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import Engines, run_operator
from llmengine.dev.seed import create_store_secret, engine, upload_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("crd")

USER = "alice@team-a"


@pytest.fixture
def tenants(api: Any) -> Iterator[tuple[str, str, str]]:
    """The operator's namespace and two tenant namespaces; alice holds `edit` in the first tenant's only."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    suffix = uuid.uuid4().hex[:6]
    names = (f"llme-sys-{suffix}", f"team-a-{suffix}", f"team-b-{suffix}")
    for n in names:
        core.create_namespace({"metadata": {"name": n}})
    rbac.create_namespaced_role_binding(
        names[1],
        {
            "metadata": {"name": "alice-edit"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}],
        },
    )
    yield names
    for n in names:
        core.delete_namespace(n, propagation_policy="Background")


def _as_alice(api: Any) -> Any:
    """A client of the same API server that acts as alice (impersonation by the cluster admin)."""
    return client.ApiClient(api.configuration, header_name="Impersonate-User", header_value=USER)


def _code(fn: Any, *args: Any) -> int:
    try:
        fn(*args)
    except ApiException as e:
        return int(e.status)
    return 200


def _http(url: str, method: str, data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_a_tenant_reads_no_store_keys_nor_other_tenants_engines_and_still_builds_and_serves(
    dev_cluster: ClusterInfo, api: Any, tenants: tuple[str, str, str], tmp_path: Path
) -> None:
    system, team_a, team_b = tenants
    info = dev_cluster
    # The shared store's keys live in the operator's namespace only.
    create_store_secret(api, info, system)
    prefix = f"shared-{uuid.uuid4().hex[:8]}"
    model = upload_tiny_checkpoint(info, f"models/{uuid.uuid4().hex[:8]}")

    def default_store(name: str, **kw: Any) -> dict[str, Any]:
        body = engine(name, info, model, "unused", serving={"replicas": 1}, **kw)
        del body["spec"]["store"]
        return body

    env = {
        "LLMENGINE_STORE_ACCESS": "isolated",
        "LLMENGINE_BUILD_NAMESPACE": system,
        "LLMENGINE_STORE_BUCKET": info.s3_bucket,
        "LLMENGINE_STORE_ENDPOINT": info.s3_endpoint,
        "LLMENGINE_STORE_PREFIX": prefix,
        "LLMENGINE_STORE_SECRET": "s3-creds",
        "LLMENGINE_GRANT_SECONDS": "3600",
        "AWS_ACCESS_KEY_ID": info.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": info.s3_secret_key,
    }
    core = client.CoreV1Api(api)
    with run_operator(info, team_a, tmp_path, extra_env=env, also_watch=[team_b]):
        Engines(api, team_a).create(default_store("tiny"))
        Engines(api, team_b).create(default_store("other", build={"maxSeqLen": 2048}))
        a = Engines(api, team_a).wait_phase("tiny", "Ready", timeout=240)
        b = Engines(api, team_b).wait_phase("other", "Ready", timeout=240)

        # Both built in the operator's namespace, nothing in the tenants'.
        built = client.BatchV1Api(api).list_namespaced_job(system).items
        assert {j.metadata.annotations["llmengine.io/engine-digest"] for j in built} == {
            a["status"]["desiredEngine"]["digest"],
            b["status"]["desiredEngine"]["digest"],
        }
        assert all(not j.metadata.owner_references for j in built)
        assert not client.BatchV1Api(api).list_namespaced_job(team_a).items

        alice = _as_alice(api)
        a_core, a_custom = client.CoreV1Api(alice), client.CustomObjectsApi(alice)
        # `edit` reads every Secret of team-a: none holds the store's keys.
        secrets = a_core.list_namespaced_secret(team_a).items
        values = {base64.b64decode(v).decode(errors="replace") for s in secrets for v in (s.data or {}).values()}
        assert secrets and not any(info.s3_secret_key in v for v in values)
        assert not any("AWS_SECRET_ACCESS_KEY" in (s.data or {}) for s in secrets)
        # (The access key id is no secret: it is in every presigned URL, as AWS signs them.)
        # Nor the operator's namespace, nor the other tenant's engine, Secrets or pods.
        assert _code(a_core.read_namespaced_secret, "s3-creds", system) == 403
        assert _code(a_core.list_namespaced_secret, system) == 403
        assert (
            _code(a_custom.get_namespaced_custom_object, "llmengine.io", "v1alpha1", team_b, "llmengines", "other")
            == 403
        )
        assert _code(a_core.list_namespaced_secret, team_b) == 403
        assert _code(a_core.list_namespaced_pod, team_b) == 403

        # What alice can read is the grant of her own engine: read-only URLs for its files, no other engine's.
        grant_secret = a_core.read_namespaced_secret("llme-tiny-grant", team_a)
        grant = EngineGrant.model_validate_json(base64.b64decode(grant_secret.data["grant.json"]))
        assert sorted(grant.engines) == [a["status"]["desiredEngine"]["digest"]]
        urls = list(grant.engines[a["status"]["desiredEngine"]["digest"]].urls.values())
        assert urls and all(_http(u, "GET") == 200 for u in urls)
        assert all(_http(u, "PUT", b"tampered") == 403 for u in urls)
        assert all(_http(u, "DELETE") == 403 for u in urls)
        b_digest = b["status"]["desiredEngine"]["digest"]
        assert all(_http(u.replace(a["status"]["desiredEngine"]["digest"], b_digest), "GET") == 403 for u in urls)

        # Her engine's pods downloaded through that grant, with no store keys in their spec.
        dep = client.AppsV1Api(api).read_namespaced_deployment("llme-tiny", team_a)
        fetch = dep.spec.template.spec.init_containers[0]
        assert "--grant" in fetch.args
        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
        assert not [e for e in fetch.env or [] if e.name in keys]

        def fetched() -> bool:
            pods = core.list_namespaced_pod(team_a, label_selector="app.kubernetes.io/instance=tiny").items
            return bool(pods) and all(p.status.phase == "Running" for p in pods)

        wait_for("tiny's serving pod running on its grant", fetched, timeout=60)
