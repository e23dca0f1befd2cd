"""The chart installed with helm into the dev cluster (real kube-apiserver with RBAC), and the operator run exactly as
the installed Deployment says, authenticated only by a token of the chart's ServiceAccount: a whole engine
lifecycle proves the chart's RBAC is enough, real 403s prove it is not more. Then upgrade and uninstall."""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from llmengine.dev import proc
from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import Engines
from llmengine.dev.seed import create_store_secret as store_secret
from llmengine.dev.seed import engine, upload_tiny_checkpoint
from tests.e2e import argocd
from tests.e2e.chart_harness import (
    Release,
    adopt_crds,
    forbidden_lines,
    load_fixture,
    run_as_deployment,
    save_fixture,
    service_account_kubeconfig,
)

pytestmark = pytest.mark.cluster

CRDS = ["llmengines.llmengine.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]
PROGRESSING = ("Pending", "Queued", "Building", "Deploying")
UPDATE_FIXTURES = os.environ.get("LLMENGINE_UPDATE_FIXTURES") == "1"
HAVE_LUPA = importlib.util.find_spec("lupa") is not None


class Installed:
    def __init__(self, release: Release, values: Path, sets: list[str], store_prefix: str, webhook_port: int) -> None:
        self.release = release
        self.values = values
        self.sets = sets
        self.store_prefix = store_prefix
        self.webhook_port = webhook_port
        self.installed = False


@contextmanager
def _installed(info: ClusterInfo, api: Any, work: Path, *extra_sets: str) -> Iterator[Installed]:
    """The chart installed into a fresh llmengine-system-<random> namespace, pointed at the dev cluster's S3."""
    core = client.CoreV1Api(api)
    suffix = uuid.uuid4().hex[:6]
    rel = Release(info, f"llme-{suffix}", f"llmengine-system-{suffix}")
    core.create_namespace({"metadata": {"name": rel.namespace}})
    # The operator's own store credentials, referenced by name from the chart.
    core.create_namespaced_secret(
        rel.namespace,
        {
            "metadata": {"name": "operator-s3"},
            "stringData": {"AWS_ACCESS_KEY_ID": info.s3_access_key, "AWS_SECRET_ACCESS_KEY": info.s3_secret_key},
        },
    )
    prefix = f"e2e-{suffix}"
    # The operator runs on this machine (kwok nodes run no containers): the API server calls its webhook there.
    webhook_port = proc.free_port()
    values = work / f"values-{suffix}.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "images": {"trtllm": {"1.2.1": {"builder": "llmengine-builder:dev", "server": "llmengine-server:dev"}}},
                "operator": {"compiler": "test", "resyncSeconds": 5},
                "build": {"backoffBaseSeconds": 1, "maxAttempts": 2},
                "store": {
                    "bucket": info.s3_bucket,
                    "endpoint": info.s3_endpoint,
                    "prefix": prefix,
                    "credentialsSecret": "operator-s3",
                    "engineSecret": "s3-creds",
                },
                "extraEnv": [{"name": "LLMENGINE_TEST_ENGINE_BYTES", "value": str(256 * 1024)}],
                "webhook": {"url": f"https://127.0.0.1:{webhook_port}"},
            }
        )
    )
    sets = [
        "--set",
        "image.repository=llmengine-operator",
        "--set",
        "image.tag=e2e",
        "--set",
        "image.pullPolicy=Never",
        *extra_sets,
    ]
    if "crds.install=false" not in extra_sets:
        sets += ["--set", "crds.install=true"]
        adopt_crds(api, rel, CRDS)
    state = Installed(rel, values, sets, prefix, webhook_port)
    out = rel.install(values, *sets)
    state.installed = True
    # helm install prints the chart's NOTES: how to check this very release.
    assert f"kubectl -n {rel.namespace} rollout status deploy/{rel.fullname}" in out, out
    try:
        yield state
    finally:
        if state.installed:
            rel.uninstall()
        core.delete_namespace(rel.namespace, propagation_policy="Background")


@pytest.fixture(scope="module")
def installed(dev_cluster: ClusterInfo, api: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    with _installed(dev_cluster, api, tmp_path_factory.mktemp("chart")) as inst:
        yield inst


def _sa_client(api: Any, inst: Installed, path: Path) -> tuple[Path, Any]:
    rel = inst.release
    kcfg = service_account_kubeconfig(api, rel.info, rel.namespace, rel.fullname, path)
    return kcfg, config.new_client_from_config(config_file=str(kcfg))


def _status_code(fn: Any, *args: Any) -> int:
    try:
        fn(*args)
    except ApiException as e:
        return int(e.status)
    return 200


def _refusal(engines: Engines, body: dict[str, Any]) -> ApiException | None:
    """The API server's refusal of a create, once the webhook answers (not while it is still starting)."""
    try:
        engines.create(body)
    except ApiException as e:
        return e if "denied the request" in (e.body or "") else None
    raise AssertionError(f"{body['metadata']['name']} was admitted")


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return int(r.status), r.read().decode(errors="replace")


def _delete_engines(engines: Engines, names: list[str]) -> None:
    for n in names:
        engines.delete(n)

    def gone() -> bool:
        existing = engines.co.list_namespaced_custom_object("llmengine.io", "v1alpha1", engines.ns, "llmengines")
        return not existing["items"]

    wait_for("engines deleted (finalizers released)", gone, timeout=60)


def _assert_operator_kept_the_webhook_certificate(api: Any, sa_api: Any, rel: Release) -> None:
    core = client.CoreV1Api(api)
    data = core.read_namespaced_secret(f"{rel.fullname}-webhook-cert", rel.namespace).data or {}
    assert sorted(data) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    raw = client.AdmissionregistrationV1Api(api).read_validating_webhook_configuration(
        rel.fullname, _preload_content=False
    )
    assert [w["clientConfig"].get("caBundle") for w in json.loads(raw.data)["webhooks"]] == [data["ca.crt"]]
    sa_core, sa_adm = client.CoreV1Api(sa_api), client.AdmissionregistrationV1Api(sa_api)
    touch = {"metadata": {"labels": {"touched": "yes"}}}
    assert _status_code(sa_core.patch_namespaced_secret, "operator-s3", rel.namespace, touch) == 403
    assert _status_code(sa_adm.patch_validating_webhook_configuration, "another-webhook", touch) == 403
    assert _status_code(sa_adm.list_validating_webhook_configuration) == 403


def test_chart_rbac_runs_full_lifecycle_and_denies_the_rest(
    installed: Installed, dev_cluster: ClusterInfo, api: Any, namespace: str, tmp_path: Path
) -> None:
    rel = installed.release
    kcfg, sa_api = _sa_client(api, installed, tmp_path / "operator.kubeconfig")
    store_secret(api, dev_cluster, namespace)
    model = upload_tiny_checkpoint(dev_cluster, f"models/{uuid.uuid4().hex[:8]}")
    engines = Engines(api, namespace)
    own_store = engine("tiny", dev_cluster, model, f"engines-{uuid.uuid4().hex[:8]}", serving={"replicas": 1})
    # Another identity (a Job per identity and namespace), kept in the chart's default store with the chart's
    # credentials: no spec.store.
    default_store = engine(
        "tiny-default", dev_cluster, model, "unused", serving={"replicas": 1}, build={"maxSeqLen": 2048}
    )
    del default_store["spec"]["store"]
    invalid = engine(
        "fp8a100", dev_cluster, model, "unused", precision={"quantization": "fp8"}, target={"gpu": "A100-80GB"}
    )
    # Passes admission, fails in the builder: the checkpoint is not there.
    unbuildable = engine(
        "no-ckpt",
        dev_cluster,
        model.rstrip("/") + "-missing/",
        f"engines-{uuid.uuid4().hex[:8]}",
        build={"maxSeqLen": 768},
    )
    progressing: dict[str, Any] = {}

    def ready_recording_progress() -> dict[str, Any] | None:
        obj = engines.get("tiny")
        st = obj.get("status") or {}
        if st.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        if st.get("phase") in PROGRESSING and not progressing:
            progressing.update(obj)
        return obj if st.get("phase") == "Ready" else None

    with run_as_deployment(api, rel, kcfg, tmp_path, webhook_port=installed.webhook_port) as op:
        assert "--all-namespaces" in op.argv
        # The chart's webhook, served with the chart's certificate, refuses what the planner rejects.
        refusal = wait_for("webhook answering", lambda: _refusal(engines, invalid), timeout=60, interval=0.5)
        assert refusal.status == 422, refusal
        assert "denied the request" in refusal.body and "spec.precision.quantization" in refusal.body
        # The certificate came from the operator: issued into the chart's empty Secret, its CA written into the
        # chart's configuration, with RBAC for exactly those two objects.
        _assert_operator_kept_the_webhook_certificate(api, sa_api, rel)
        engines.create(own_store)
        engines.create(default_store)
        try:
            ready = wait_for("tiny Ready", ready_recording_progress, timeout=180, interval=0.3)
        except TimeoutError as e:
            raise AssertionError(f"{e}; status: {engines.get('tiny').get('status')}") from None
        in_default = engines.wait_phase("tiny-default", "Ready", timeout=180)
        # store.access isolated (the chart's default): the default-store engine was built in the release namespace
        # with the store Secret there, and its pods read it through the grant the operator keeps next to them.
        short = in_default["status"]["desiredEngine"]["digest"][:12]
        built = client.BatchV1Api(api).list_namespaced_job(rel.namespace).items
        assert len(built) == 1 and built[0].metadata.name.startswith(f"llme-build-{short}-"), built
        assert _status_code(client.CoreV1Api(api).read_namespaced_secret, "llme-tiny-default-grant", namespace) == 200
        fetch = client.AppsV1Api(api).read_namespaced_deployment("llme-tiny-default", namespace)
        assert "--grant" in fetch.spec.template.spec.init_containers[0].args
        engines.create(unbuildable)
        failed = engines.wait_phase("no-ckpt", "Failed", timeout=120)

        # The probe path of the chart answers; the metrics port serves the operator's metrics.
        assert _get(f"http://127.0.0.1:{op.health_port}/healthz")[0] == 200
        code, text = _get(f"http://127.0.0.1:{op.metrics_port}/metrics")
        assert code == 200 and "llmengine_" in text
        # The metrics mean what their names say: engines per phase (two Ready, one Failed), no build waiting.
        samples = dict(
            line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("llmengine_") and " " in line
        )
        assert float(samples['llmengine_engines{phase="Ready"}']) == 2.0, samples
        assert float(samples['llmengine_engines{phase="Failed"}']) == 1.0, samples
        depths = [float(v) for k, v in samples.items() if k.startswith("llmengine_build_queue_depth{")]
        assert depths and all(v == 0.0 for v in depths), samples
        # Each engine built its own identity: no build was avoided through the store.
        assert float(samples.get("llmengine_store_hits_total", "0")) == 0.0, samples

        # What the chart does not grant is refused by the real API server.
        apps, core = client.AppsV1Api(sa_api), client.CoreV1Api(sa_api)
        co = client.CustomObjectsApi(sa_api)
        assert _status_code(apps.read_namespaced_deployment, "llme-tiny", namespace) == 200
        assert _status_code(core.read_namespaced_secret, "s3-creds", namespace) == 200
        assert _status_code(apps.delete_namespaced_deployment, "llme-tiny", namespace) == 403
        assert _status_code(core.list_namespaced_secret, namespace) == 403
        assert _status_code(core.delete_namespaced_pod, "any", namespace) == 403
        assert _status_code(core.list_node) == 403
        assert _status_code(core.read_namespaced_config_map, "kube-root-ca.crt", namespace) == 403
        new_engine = {**invalid, "metadata": {"name": "by-operator"}}
        assert (
            _status_code(
                co.create_namespaced_custom_object, "llmengine.io", "v1alpha1", namespace, "llmengines", new_engine
            )
            == 403
        )
        _delete_engines(engines, ["tiny", "tiny-default", "no-ckpt"])

    assert not forbidden_lines(op.logs()), "\n".join(forbidden_lines(op.logs()))
    # jsonLogs (the chart's default): every line is JSON, Kopf's too, and its per-object lines name the object.
    records = [json.loads(line) for line in op.log_lines() if line.strip()]
    per_object = [r for r in records if r.get("name") == "kopf.objects" or "object" in r]
    assert per_object and all(r["object"]["namespace"] and r["object"]["name"] for r in per_object), per_object[:3]
    st = ready["status"]
    assert st["servingEngine"]["digest"] == st["desiredEngine"]["digest"]
    envelope = next(c for c in st["conditions"] if c["type"] == "EnvelopeExceeded")
    assert "{" not in envelope["message"], envelope  # addresses filled in, not the URL template
    assert "FetchFailed" in failed["status"]["message"] and "check the model source URI" in failed["status"]["message"]
    # The chart's store values and the operator's Secret-referenced credentials reached the default store.
    digest = in_default["status"]["desiredEngine"]["digest"]
    key = f"{installed.store_prefix}/{digest}/manifest.json"
    assert "Contents" in dev_cluster.s3().client().list_objects_v2(Bucket=dev_cluster.s3_bucket, Prefix=key)
    assert progressing, "no Pending/Queued/Building/Deploying status was seen before Ready"

    if UPDATE_FIXTURES:
        save_fixture("ready.json", ready)
        save_fixture("failed.json", failed)
        save_fixture("progressing.json", progressing)
    for name, live in (("ready.json", ready), ("failed.json", failed)):
        fixture = load_fixture(name)
        assert live["status"]["phase"] == fixture["status"]["phase"]
        assert {c["type"] for c in live["status"]["conditions"]} == {c["type"] for c in fixture["status"]["conditions"]}
    if HAVE_LUPA:
        assert argocd.health(ready)["status"] == "Healthy"
        assert argocd.health(progressing)["status"] == "Progressing"
        assert argocd.health(failed) == {"status": "Degraded", "message": failed["status"]["message"]}


def test_upgrade_to_peering_and_uninstall_keeps_crds(
    installed: Installed, dev_cluster: ClusterInfo, api: Any, namespace: str, tmp_path: Path
) -> None:
    rel = installed.release
    rel.upgrade(installed.values, *installed.sets, "--set", "replicaCount=2")
    dep = client.AppsV1Api(api).read_namespaced_deployment(rel.fullname, rel.namespace)
    assert dep.spec.replicas == 2
    assert "--peering=llmengine-operator" in dep.spec.template.spec.containers[0].args
    co = client.CustomObjectsApi(api)
    # None left by another test or release: the operator has to create it.
    assert _status_code(
        co.delete_cluster_custom_object, "kopf.dev", "v1", "clusterkopfpeerings", "llmengine-operator"
    ) in (200, 404)

    kcfg, _ = _sa_client(api, installed, tmp_path / "operator.kubeconfig")
    store_secret(api, dev_cluster, namespace)
    model = upload_tiny_checkpoint(dev_cluster, f"models/{uuid.uuid4().hex[:8]}")
    engines = Engines(api, namespace)
    with run_as_deployment(api, rel, kcfg, tmp_path, webhook_port=installed.webhook_port) as op:
        assert "--peering=llmengine-operator" in op.argv

        def keepalive() -> bool:
            try:
                peering = co.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "llmengine-operator")
            except ApiException as e:
                if e.status == 404:
                    return False
                raise
            return bool(peering.get("status"))

        # The operator creates the peering object if the cluster has none (create granted), Kopf writes its
        # keep-alive into it (patch granted) and, alone there, acts.
        wait_for("operator keep-alive in the ClusterKopfPeering", keepalive, timeout=60)
        engines.create(engine("kept", dev_cluster, model, f"engines-{uuid.uuid4().hex[:8]}", serving={"replicas": 1}))
        engines.wait_phase("kept", "Ready", timeout=180)
    assert not forbidden_lines(op.logs()), "\n".join(forbidden_lines(op.logs()))

    rel.uninstall()
    installed.installed = False
    ext = client.ApiextensionsV1Api(api)
    for crd in CRDS:
        kept = ext.read_custom_resource_definition(crd)
        assert kept.metadata.annotations["helm.sh/resource-policy"] == "keep"
    # The engines (and so their serving Deployments) outlive the chart.
    assert engines.get("kept")["status"]["phase"] == "Ready"
    rbac = client.RbacAuthorizationV1Api(api)
    assert _status_code(rbac.read_cluster_role, rel.fullname) == 404
    assert _status_code(client.AppsV1Api(api).read_namespaced_deployment, rel.fullname, rel.namespace) == 404
    # No operator is left to release the finalizer: let the namespace go.
    co.patch_namespaced_custom_object(
        "llmengine.io", "v1alpha1", namespace, "llmengines", "kept", {"metadata": {"finalizers": None}}
    )


def test_namespaced_install_runs_lifecycle_with_roles_only_there(
    installed: Installed, dev_cluster: ClusterInfo, api: Any, namespace: str, tmp_path: Path
) -> None:
    """watchNamespaces: a Role in the watched namespace, cluster-wide only CRDs, namespaces and the Job count."""
    # The module's release installed the CRD (which outlives it). Its webhook (failurePolicy Fail) would refuse
    # engines while no operator of that release runs: this test installs its own.
    if installed.installed:
        installed.release.uninstall()
        installed.installed = False
    with _installed(
        dev_cluster, api, tmp_path, "--set", "crds.install=false", "--set", f"watchNamespaces={{{namespace}}}"
    ) as inst:
        rel = inst.release
        kcfg, sa_api = _sa_client(api, inst, tmp_path / "operator.kubeconfig")
        store_secret(api, dev_cluster, namespace)
        model = upload_tiny_checkpoint(dev_cluster, f"models/{uuid.uuid4().hex[:8]}")
        engines = Engines(api, namespace)
        with run_as_deployment(api, rel, kcfg, tmp_path, webhook_port=inst.webhook_port) as op:
            assert f"--namespace={namespace}" in op.argv and "--all-namespaces" not in op.argv
            _assert_operator_kept_the_webhook_certificate(api, sa_api, rel)
            engines.create(
                engine("scoped", dev_cluster, model, f"engines-{uuid.uuid4().hex[:8]}", serving={"replicas": 1})
            )
            engines.wait_phase("scoped", "Ready", timeout=180)
            # Outside the watched namespace the token reads nothing, not even Deployments.
            apps = client.AppsV1Api(sa_api)
            assert _status_code(apps.read_namespaced_deployment, "llme-scoped", namespace) == 200
            assert _status_code(apps.list_namespaced_deployment, rel.namespace) == 403
            assert _status_code(apps.list_deployment_for_all_namespaces) == 403
            _delete_engines(engines, ["scoped"])
        assert not forbidden_lines(op.logs()), "\n".join(forbidden_lines(op.logs()))
