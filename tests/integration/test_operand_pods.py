"""Pods a platform team shapes: the chart's enginePods and an engine's spec.pods reach the build and serving pods as
the API server stores them, and a store behind TLS signed by a private CA is reached only through the CA bundle
setting, by the store client of the operator and of the pods alike."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import OperatorConfig
from llmengine.api.pods import CA_DIR, CA_ENV, CA_PATH, CaBundle
from llmengine.clients.store import (
    EngineStore,
    S3Config,
    UntrustedCertificate,
    make_s3_client,
    store_for,
)
from llmengine.dev.cluster import ClusterInfo
from llmengine.dev.harness import Engines, jobs, run_operator
from llmengine.dev.s3 import S3Endpoint
from llmengine.dev.seed import create_store_secret, engine, upload_tiny_checkpoint
from llmengine.dev.tlsproxy import PrivateCa, private_ca, tls_proxy
from tests.integration.test_store import PROV, SHAPES

# An unreachable proxy: anything the pods send through it fails, so a build that succeeds went direct (NO_PROXY).
NOWHERE = "http://127.0.0.1:9"


# -- the store client and a private CA -------------------------------------------------------------------------------


@pytest.fixture
def no_trust_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*CA_ENV, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_trust_from_the_environment")
def test_the_store_client_trusts_a_private_ca_only_when_the_ca_bundle_names_it(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, stranger = private_ca(tmp_path / "ca"), private_ca(tmp_path / "stranger", "someone-else")
    src = tmp_path / "engine"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "rank0.engine").write_bytes(uuid.uuid4().bytes * 4096)
    creds = {"access_key_id": s3_endpoint.access_key, "secret_access_key": s3_endpoint.secret_key}
    with tls_proxy(s3_endpoint.endpoint, ca) as https:
        loc = StoreLocation(bucket=s3_bucket, endpoint=https, region=s3_endpoint.region)

        def store(ca_bundle: str | None = None) -> EngineStore:
            return EngineStore(make_s3_client(S3Config.for_location(loc, ca_bundle=ca_bundle, **creds)), loc)

        def upload(s: EngineStore) -> Any:
            return s.upload_engine("d1", src, backend="tensorrt", tp_size=1, pp_size=1, shapes=SHAPES, provenance=PROV)

        # Without the CA, and with a CA that did not sign the endpoint's certificate: refused, naming the setting.
        for untrusted in (store(), store(str(stranger.ca))):
            with pytest.raises(UntrustedCertificate) as exc:
                untrusted.is_committed("d1")
            assert "is not trusted" in str(exc.value) and exc.value.setting == "spec.pods.caBundle"
            with pytest.raises(UntrustedCertificate):
                upload(untrusted)

        # The operator: the chart mounts enginePods.caBundle and names it in LLMENGINE_CA_BUNDLE.
        cfg = OperatorConfig.from_env({"LLMENGINE_CA_BUNDLE": str(ca.ca)})
        operator = store(cfg.ca_bundle)
        assert not operator.is_committed("d1")
        manifest = upload(operator)
        assert operator.is_committed("d1")

        # A pod: the variables a CA bundle sets in every container, pointing at the mounted file (here, the CA's
        # file), and the store as the builder and the server open it.
        for var in CaBundle.env():
            assert var["value"] == CA_PATH
            monkeypatch.setenv(var["name"], str(ca.ca))
        pod = store_for(loc, **creds)
        assert pod.is_committed("d1")
        assert pod.download_engine("d1", tmp_path / "down") == manifest
        assert (tmp_path / "down" / "rank0.engine").read_bytes() == (src / "rank0.engine").read_bytes()
        monkeypatch.setenv("AWS_CA_BUNDLE", str(stranger.ca))
        with pytest.raises(UntrustedCertificate):
            store_for(loc, **creds).is_committed("d1")


# -- an engine on a shaped cluster -----------------------------------------------------------------------------------


@pytest.fixture
def cluster_classes(api: Any, namespace: str) -> Iterator[tuple[str, str]]:
    """A PriorityClass and a RuntimeClass of this test's own (cluster-scoped: removed afterwards)."""
    sched, node = client.SchedulingV1Api(api), client.NodeV1Api(api)
    priority, runtime = f"llm-{namespace}", f"nvidia-{namespace}"
    sched.create_priority_class({"metadata": {"name": priority}, "value": 1000})
    node.create_runtime_class({"metadata": {"name": runtime}, "handler": "nvidia"})
    try:
        yield priority, runtime
    finally:
        sched.delete_priority_class(priority)
        node.delete_runtime_class(runtime)


def _namespace_objects(api: Any, ns: str, ca: PrivateCa, stranger: PrivateCa) -> None:
    """What the settings name, in the engine's namespace: the operator reads none of it, the pods do."""
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "corp-ca"}, "data": {"bundle.pem": ca.ca.read_text()}})
    core.create_namespaced_config_map(
        ns, {"metadata": {"name": "other-ca"}, "data": {"ca.crt": stranger.ca.read_text()}}
    )
    core.create_namespaced_config_map(ns, {"metadata": {"name": "tuning"}, "data": {"TUNING": "fast"}})
    core.create_namespaced_secret(ns, {"metadata": {"name": "db"}, "stringData": {"password": "not-in-any-spec"}})
    auth = base64.b64encode(b"robot:token").decode()
    docker = json.dumps({"auths": {"registry.corp.example": {"auth": auth}}})
    core.create_namespaced_secret(
        ns,
        {
            "metadata": {"name": "regcred"},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": docker},
        },
    )
    core.create_namespaced_service_account(ns, {"metadata": {"name": "llm-runner"}})


def _env(container: Any) -> dict[str, Any]:
    return {e.name: e for e in container.env or []}


def _assert_shaped(pod: Any, priority: str, runtime: str, containers: list[Any]) -> None:
    spec, md = pod.spec, pod.metadata
    assert [s.name for s in spec.image_pull_secrets] == ["regcred"]
    assert spec.runtime_class_name == runtime
    assert spec.priority_class_name == priority and spec.priority == 1000
    assert spec.service_account_name == "llm-runner" and spec.automount_service_account_token is False
    assert md.labels["team"] == "platform" and md.annotations["example.com/owner"] == "search"
    assert spec.security_context.run_as_non_root is True
    volumes = {v.name: v for v in spec.volumes}
    assert volumes["scratch"].empty_dir is not None
    assert volumes["llmengine-ca"].config_map.name == "corp-ca"
    assert [(i.key, i.path) for i in volumes["llmengine-ca"].config_map.items] == [("bundle.pem", "ca.crt")]
    for c in containers:
        env = _env(c)
        assert env["DB_PASSWORD"].value is None
        assert env["DB_PASSWORD"].value_from.secret_key_ref.name == "db"
        assert env["HTTPS_PROXY"].value == env["https_proxy"].value == NOWHERE
        assert env["NO_PROXY"].value == "127.0.0.1,localhost"
        for name in CA_ENV:
            assert env[name].value == CA_PATH
        assert [e.config_map_ref.name for e in c.env_from] == ["tuning"]
        mounts = {m.mount_path: m.name for m in c.volume_mounts}
        assert mounts["/scratch"] == "scratch" and mounts[CA_DIR] == "llmengine-ca"
        assert c.security_context.read_only_root_filesystem is True


def test_an_engine_shaped_by_chart_defaults_and_its_spec_builds_and_serves_through_a_private_ca(
    dev_cluster: ClusterInfo,
    api: Any,
    namespace: str,
    crd: str,
    cluster_classes: tuple[str, str],
    tmp_path: Path,
) -> None:
    info, ns, (priority, runtime) = dev_cluster, namespace, cluster_classes
    core = client.CoreV1Api(api)
    ca, stranger = private_ca(tmp_path / "ca"), private_ca(tmp_path / "stranger", "someone-else")
    _namespace_objects(api, ns, ca, stranger)
    create_store_secret(api, info, ns)
    model = upload_tiny_checkpoint(info, f"models/{uuid.uuid4().hex[:8]}")
    prefix = f"engines-{uuid.uuid4().hex[:8]}"
    # The chart's enginePods: pull secret, runtime class, labels, proxy, the corporate CA; serving pods' priority.
    chart = {
        "imagePullSecrets": [{"name": "regcred"}],
        "runtimeClassName": runtime,
        "labels": {"team": "platform"},
        "proxy": {"httpProxy": NOWHERE, "httpsProxy": NOWHERE, "noProxy": "127.0.0.1,localhost"},
        "caBundle": {"configMapKeyRef": {"name": "corp-ca", "key": "bundle.pem"}},
        "serving": {"priorityClassName": priority},
    }
    # The engine's spec.pods over them: a service account, environment by reference, a volume; build priority.
    pods = {
        "serviceAccountName": "llm-runner",
        "annotations": {"example.com/owner": "search"},
        "env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}],
        "envFrom": [{"configMapRef": {"name": "tuning"}}],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        "build": {"priorityClassName": priority},
    }
    server_env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    operator_env = {
        "LLMENGINE_ENGINE_PODS": json.dumps(chart),
        "LLMENGINE_CA_BUNDLE": str(ca.ca),
        "LLMENGINE_BUILD_MAX_ATTEMPTS": "2",
    }
    engines = Engines(api, ns)
    with tls_proxy(info.s3_endpoint, ca) as https, run_operator(info, ns, tmp_path, operator_env):
        store = {"endpoint": https}
        engines.create(
            engine("shaped", info, model, prefix, store=store, pods=pods, serving={"replicas": 1, "env": server_env})
        )
        # Same model, another identity; its own CA bundle (not the one that signed the store) replaces the chart's.
        wrong = {"caBundle": {"configMapKeyRef": {"name": "other-ca", "key": "ca.crt"}}}
        build = {"maxBatchSize": 8, "maxInputLen": 512, "maxSeqLen": 2048, "maxNumTokens": 2048}
        engines.create(engine("untrusting", info, model, prefix, store=store, pods=wrong, build=build))

        # Built through the TLS endpoint by a pod trusting the ConfigMap's CA, found committed by the operator
        # trusting the chart's, downloaded by a serving pod trusting the ConfigMap's again.
        obj = engines.wait_phase("shaped", "Ready", timeout=180)
        digest = obj["status"]["desiredEngine"]["digest"]
        s3 = info.s3().client()
        assert "Contents" in s3.list_objects_v2(Bucket=info.s3_bucket, Prefix=f"{prefix}/{digest}/manifest.json")

        job = next(j for j in jobs(api, ns) if j.metadata.annotations.get("llmengine.io/engine-digest") == digest)
        (build_pod,) = core.list_namespaced_pod(ns, label_selector=f"job-name={job.metadata.name}").items
        _assert_shaped(build_pod, priority, runtime, build_pod.spec.containers)
        assert _env(build_pod.spec.containers[0])["AWS_ENDPOINT_URL_S3"].value == https

        (serving_pod,) = core.list_namespaced_pod(ns, label_selector="llmengine.io/engine=shaped").items
        _assert_shaped(
            serving_pod, priority, runtime, [*serving_pod.spec.init_containers, *serving_pod.spec.containers]
        )
        server = serving_pod.spec.containers[0]
        assert _env(server)["POD_NAME"].value_from.field_ref.field_path == "metadata.name"
        assert "POD_NAME" not in _env(serving_pod.spec.init_containers[0])

        # The engine whose pods trust another CA: its build is refused by the endpoint's certificate, and the
        # status says which setting gives the CA.
        failed = engines.wait_phase("untrusting", "Failed", timeout=180)["status"]
        assert "is not trusted" in failed["build"]["lastFailure"], failed
        assert "spec.pods.caBundle" in failed["build"]["lastFailure"], failed
        (other_pod,) = [
            p
            for p in core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/component=build").items
            if p.metadata.name != build_pod.metadata.name
        ]
        assert {v.name: v for v in other_pod.spec.volumes}["llmengine-ca"].config_map.name == "other-ca"
        assert other_pod.spec.runtime_class_name == runtime  # the chart's settings still apply


@pytest.mark.parametrize(
    ("pods", "message"),
    [
        ({"caBundle": {}}, "caBundle: set exactly one of configMapKeyRef or secretKeyRef"),
        ({"serving": {"volumes": [{"name": "engine", "emptyDir": {}}]}}, "are the operator's: set another name"),
        ({"volumeMounts": [{"name": "x", "mountPath": "/etc/llmengine/ca"}]}, "set another mountPath"),
        ({"env": [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "a"}}}]}, "not both"),
        ({"envFrom": [{"prefix": "A_"}]}, "envFrom: set exactly one of configMapRef or secretRef"),
    ],
)
def test_the_api_server_refuses_pod_settings_that_could_not_work(
    dev_cluster: ClusterInfo, api: Any, namespace: str, crd: str, pods: dict[str, Any], message: str
) -> None:
    """The CRD's rules hold with no operator running (the webhook is not installed here)."""
    body = engine("refused", dev_cluster, "s3://models/tiny/", "engines", pods=pods)
    with pytest.raises(client.ApiException) as exc:
        Engines(api, namespace).create(body)
    assert exc.value.status == 422 and message in str(exc.value.body), exc.value.body
