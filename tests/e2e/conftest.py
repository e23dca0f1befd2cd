"""The dev cluster fixtures (real control plane with RBAC, kwok GPU nodes, S3, pod runner) for the chart tests.

`dev_cluster` is redefined here so that one session runs one cluster: tests/integration's fixture is a separate
fixture (a conftest of its own) and would otherwise start a second control plane beside this one. This one joins
a cluster tests/integration already started, or starts one in a state directory that tests/integration's fixture
then finds running (it reads LLMENGINE_TEST_CLUSTER_DIR) and reuses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmengine.dev.cluster import ClusterInfo, DevCluster
from tests.integration import conftest as _integration
from tests.integration.conftest import *  # noqa: F403


@pytest.fixture(scope="session")
def dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterInfo]:
    running = _integration._CLUSTER
    info = running.info() if running is not None else None
    if running is not None and info is not None and all(running.status().values()):
        yield info
        return
    state = os.environ.get("LLMENGINE_TEST_CLUSTER_DIR")
    if not state:
        state = str(tmp_path_factory.mktemp("cluster"))
        os.environ["LLMENGINE_TEST_CLUSTER_DIR"] = state
    cluster = DevCluster(f"test-{os.getpid()}", Path(state))
    _integration._CLUSTER = cluster  # its failure hook prints this cluster's component logs
    try:
        info = cluster.up()
    except Exception:
        print(_integration._dump_logs(cluster))
        cluster.down(quiet=True)
        raise
    try:
        yield info
    finally:
        cluster.down(quiet=True)
