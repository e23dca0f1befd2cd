"""The dev cluster is a real control plane: the real scheduler places GPU pods, the real controllers run Jobs and
Deployments, RBAC is enforced, and S3 is a real server."""

from __future__ import annotations

import json
import ssl
import urllib.request
import uuid
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.nodes import POOL_LABEL

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _pod(name: str, resources: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "tolerations": [GPU_TOLERATION],
            "containers": [
                {"name": "c", "image": "busybox", "resources": {"limits": resources, "requests": resources}}
            ],
            **spec,
        },
    }


def _scheduled_node(core: client.CoreV1Api, ns: str, name: str) -> str:
    pod = wait_for(f"pod {name} bound", lambda: (p := core.read_namespaced_pod(name, ns)).spec.node_name and p)
    return str(pod.spec.node_name)


def _pool_of(core: client.CoreV1Api, node: str) -> str:
    return str(core.read_node(node).metadata.labels[POOL_LABEL])


def test_version_is_stamped(dev_cluster: ClusterInfo, api: Any) -> None:
    info = client.VersionApi(api).get_code()
    assert info.git_version == "v1.35.4"
    assert (info.major, info.minor) == ("1", "35")


def test_fleet_has_gpu_pools_with_gfd_labels(api: Any) -> None:
    nodes = client.CoreV1Api(api).list_node().items
    pools: dict[str, int] = {}
    for n in nodes:
        pools[n.metadata.labels[POOL_LABEL]] = pools.get(n.metadata.labels[POOL_LABEL], 0) + 1
    assert pools == {
        "a100-80gb": 2,
        "a100-40gb-mig": 1,
        "h100-80gb": 2,
        "h100-mig": 1,
        "h200": 1,
        "l40s": 1,
        "cpu": 2,
    }
    h100 = next(n for n in nodes if n.metadata.labels[POOL_LABEL] == "h100-80gb")
    assert h100.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert h100.metadata.labels["nvidia.com/gpu.compute.major"] == "9"
    assert h100.status.allocatable["nvidia.com/gpu"] == "8"
    assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in h100.spec.taints)
    mig = next(n for n in nodes if n.metadata.labels[POOL_LABEL] == "h100-mig")
    assert mig.status.allocatable["nvidia.com/mig-3g.40gb"] == "8"
    assert mig.metadata.labels["nvidia.com/mig.strategy"] == "mixed"
    cpu = next(n for n in nodes if n.metadata.labels[POOL_LABEL] == "cpu")
    assert "nvidia.com/gpu.present" not in cpu.metadata.labels and not cpu.spec.taints


def test_mig_pod_lands_only_on_h100_mig_node(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    for i in range(3):
        core.create_namespaced_pod(namespace, _pod(f"mig-{i}", {"nvidia.com/mig-3g.40gb": "1"}))
    for i in range(3):
        assert _pool_of(core, _scheduled_node(core, namespace, f"mig-{i}")) == "h100-mig"


def test_required_affinity_on_product_picks_that_product(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {
                                "key": "nvidia.com/gpu.product",
                                "operator": "In",
                                "values": ["NVIDIA-A100-SXM4-80GB"],
                            }
                        ]
                    }
                ]
            }
        }
    }
    core.create_namespaced_pod(namespace, _pod("a100", {"nvidia.com/gpu": "2"}, affinity=affinity))
    assert _pool_of(core, _scheduled_node(core, namespace, "a100")) == "a100-80gb"


def test_sixteen_gpus_on_one_node_stays_pending_with_scheduler_reason(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, _pod("big", {"nvidia.com/gpu": "16"}))

    def unschedulable() -> Any:
        p = core.read_namespaced_pod("big", namespace)
        return next(
            (c for c in p.status.conditions or [] if c.type == "PodScheduled" and c.reason == "Unschedulable"),
            None,
        )

    cond = wait_for("PodScheduled=False/Unschedulable", unschedulable, timeout=60)
    assert "Insufficient nvidia.com/gpu" in cond.message
    assert core.read_namespaced_pod("big", namespace).spec.node_name is None


def _job(name: str, script: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": {"devcluster.llmengine.io/run": "true"}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {POOL_LABEL: "cpu"},
                    "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}],
                },
            },
        },
    }


def _job_condition(batch: client.BatchV1Api, ns: str, name: str) -> Any:
    def done() -> Any:
        j = batch.read_namespaced_job(name, ns)
        return next(
            (c for c in j.status.conditions or [] if c.type in ("Complete", "Failed") and c.status == "True"),
            None,
        )

    return wait_for(f"job {name} finished", done, timeout=90)


def test_runner_runs_job_pods_for_real(api: Any, namespace: str) -> None:
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    batch.create_namespaced_job(namespace, _job("ok", 'echo "all good" > /dev/termination-log; exit 0'))
    batch.create_namespaced_job(namespace, _job("bad", 'echo "disk on fire" > /dev/termination-log; exit 3'))
    assert _job_condition(batch, namespace, "ok").type == "Complete"
    assert _job_condition(batch, namespace, "bad").type == "Failed"
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=bad").items
    term = pods[0].status.container_statuses[0].state.terminated
    assert term.exit_code == 3
    assert term.message.strip() == "disk on fire"
    assert pods[0].status.phase == "Failed"


def test_runner_restarts_a_failed_init_container_like_a_kubelet(api: Any, namespace: str) -> None:
    """restartPolicy Always: an init container that fails leaves the pod unready with its error and a restart
    count, runs again after the back-off, and the pod becomes Ready once it succeeds."""
    core = client.CoreV1Api(api)
    script = 'if [ -f "$MARK" ]; then exit 0; fi; touch "$MARK"; echo "not yet" > /dev/termination-log; exit 4'
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "crashy", "annotations": {"devcluster.llmengine.io/run": "true"}},
            "spec": {
                "nodeSelector": {POOL_LABEL: "cpu"},
                "volumes": [{"name": "scratch", "emptyDir": {}}],
                "initContainers": [
                    {
                        "name": "once-fails",
                        "image": "busybox",
                        "command": ["sh", "-c", script],
                        "env": [{"name": "MARK", "value": "/scratch/tried"}],
                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                    }
                ],
                "containers": [{"name": "main", "image": "busybox"}],
            },
        },
    )
    ann = "devcluster.llmengine.io"

    def failed_once() -> Any:
        a = core.read_namespaced_pod("crashy", namespace).metadata.annotations or {}
        return a if a.get(f"{ann}/restarts") else None

    first = wait_for("init container failed once", failed_once, timeout=60)
    assert (first[f"{ann}/exit-code"], first[f"{ann}/message"].strip()) == ("4", "not yet")

    def crash_loop() -> Any:
        st = core.read_namespaced_pod("crashy", namespace).status
        return st.init_container_statuses[0] if st.init_container_statuses else None

    ics = wait_for("kubelet-shaped init container status", crash_loop, timeout=30)
    assert ics.state.waiting.reason == "CrashLoopBackOff"
    assert (ics.last_state.terminated.exit_code, ics.last_state.terminated.message.strip()) == (4, "not yet")

    def ready() -> Any:
        p = core.read_namespaced_pod("crashy", namespace)
        return p if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []) else None

    pod = wait_for("pod Ready after the restart", ready, timeout=90)
    assert pod.metadata.annotations[f"{ann}/restarts"] == "1"


def test_three_replica_deployment_becomes_available(api: Any, namespace: str) -> None:
    apps = client.AppsV1Api(api)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "web", "image": "nginx"}]},
                },
            },
        },
    )

    def available() -> bool:
        d = apps.read_namespaced_deployment("web", namespace)
        return (d.status.available_replicas or 0) == 3

    wait_for("3 available replicas", available, timeout=90)


def test_serviceaccount_without_role_is_denied(dev_cluster: ClusterInfo, api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    cfg = client.Configuration()
    cfg.host = dev_cluster.apiserver
    cfg.ssl_ca_cert = str(dev_cluster_ca(dev_cluster))
    cfg.api_key = {"authorization": f"Bearer {token}"}
    sa_core = client.CoreV1Api(client.ApiClient(cfg))
    with pytest.raises(ApiException) as e:
        sa_core.list_namespaced_pod(namespace)
    assert e.value.status == 403
    assert f"system:serviceaccount:{namespace}:nobody" in json.loads(e.value.body)["message"]


def dev_cluster_ca(info: ClusterInfo) -> str:
    return f"{info.state_dir}/pki/ca.crt"


def test_apiserver_requires_client_certificates(dev_cluster: ClusterInfo) -> None:
    ctx = ssl.create_default_context(cafile=dev_cluster_ca(dev_cluster))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{dev_cluster.apiserver}/api/v1/namespaces", context=ctx, timeout=5)
    assert e.value.code in (401, 403)


def test_s3_object_round_trip(dev_cluster: ClusterInfo) -> None:
    s3 = dev_cluster.s3().client()
    key = f"probe/{uuid.uuid4().hex}"
    s3.put_object(Bucket=dev_cluster.s3_bucket, Key=key, Body=b"hello engines")
    assert s3.get_object(Bucket=dev_cluster.s3_bucket, Key=key)["Body"].read() == b"hello engines"


def test_runner_gives_pods_on_one_node_one_host_path_and_other_nodes_their_own(api: Any, namespace: str) -> None:
    """hostPath volumes are per simulated node: a second pod on a node sees what the first left there, a pod on
    another node does not."""
    core = client.CoreV1Api(api)
    host_path = f"/var/cache/{namespace}"
    # Paths inside a script are not rewritten to the runner's directories; paths in the environment are.
    script = 'echo "$POD" >> "$SEEN"; tr "\\n" " " < "$SEEN" > /dev/termination-log'

    def run(name: str, node: str) -> str:
        core.create_namespaced_pod(
            namespace,
            {
                "metadata": {"name": name, "annotations": {"devcluster.llmengine.io/run": "true"}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "tolerations": [GPU_TOLERATION],
                    "volumes": [{"name": "h", "hostPath": {"path": host_path, "type": "DirectoryOrCreate"}}],
                    "containers": [
                        {
                            "name": "c",
                            "image": "busybox",
                            "command": ["sh", "-c", script],
                            "env": [{"name": "POD", "value": name}, {"name": "SEEN", "value": "/host/seen"}],
                            "volumeMounts": [{"name": "h", "mountPath": "/host"}],
                        }
                    ],
                },
            },
        )

        def finished() -> Any:
            st = core.read_namespaced_pod(name, namespace).status
            return st.container_statuses[0].state.terminated if st.container_statuses else None

        return str(wait_for(f"pod {name} finished", finished, timeout=60).message).strip()

    assert run("first", "h100-80gb-0") == "first"
    assert run("second", "h100-80gb-0") == "first second"
    assert run("elsewhere", "h100-80gb-1") == "elsewhere"
