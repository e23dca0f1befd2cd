"""Cluster fixtures: one real control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok nodes,
S3, pod runner) per test session, a fresh namespace per test, and component logs printed when a test fails."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmengine.dev.cluster import ClusterInfo, DevCluster

_CLUSTER: DevCluster | None = None


@pytest.fixture(scope="session")
def dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterInfo]:
    global _CLUSTER
    state = Path(os.environ.get("LLMENGINE_TEST_CLUSTER_DIR") or tmp_path_factory.mktemp("cluster"))
    # The pod runner re-runs a failed init container after 2 s (a kubelet: 10 s, doubling).
    cluster = DevCluster(f"test-{os.getpid()}", state, restart_backoff_s=2.0)
    _CLUSTER = cluster
    try:
        info = cluster.up()
    except Exception:
        _dump_logs(cluster)
        cluster.down(quiet=True)
        raise
    try:
        yield info
    finally:
        cluster.down(quiet=True)


@pytest.fixture(scope="session")
def api(dev_cluster: ClusterInfo) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=dev_cluster.kubeconfig)


@pytest.fixture
def namespace(api: Any) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(api)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name, propagation_policy="Background")


def _dump_logs(cluster: DevCluster, lines: int = 40) -> str:
    out = []
    for comp, path in cluster.logs().items():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"----- {comp} ({path}) -----\n" + "\n".join(tail))
    pods = cluster.dir / "pods"
    if pods.exists():
        for log in sorted(pods.glob("*/*.log"))[-10:]:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- pod {log.parent.name}/{log.name} -----\n" + "\n".join(tail))
    return "\n".join(out)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _CLUSTER is not None and "dev_cluster" in getattr(item, "fixturenames", ()):
        report.sections.append(("dev cluster component logs", _dump_logs(_CLUSTER)))


@pytest.fixture(scope="session")
def crd(api: Any) -> str:
    """The generated CRD, applied to the real API server and Established."""
    from llmengine.dev.seed import apply_crd

    return apply_crd(api)
