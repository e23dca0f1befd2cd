"""Simulated GPU node pools: kwok-managed Node objects labelled like GPU Feature Discovery would label them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
POOL_LABEL = "devcluster.llmengine.io/pool"


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MigProfile(_M):
    count: int
    memory_mib: int = Field(alias="memoryMiB")


class Mig(_M):
    strategy: str = "mixed"
    profiles: dict[str, MigProfile]


class Pool(_M):
    name: str
    count: int = 1
    gpus: int = 0
    product: str | None = None
    family: str | None = None
    compute: str | None = None
    memory_mib: int | None = Field(default=None, alias="memoryMiB")
    mig: Mig | None = None
    cpu: str = "64"
    memory: str = "512Gi"
    labels: dict[str, str] = Field(default_factory=dict)


class Taint(_M):
    key: str
    value: str
    effect: str


class Fleet(_M):
    gpu_taint: Taint | None = Field(default=None, alias="gpuTaint")
    pools: list[Pool]


def load_fleet(path: Path) -> Fleet:
    return Fleet.model_validate(yaml.safe_load(path.read_text()))


def node_manifests(fleet: Fleet) -> list[dict[str, Any]]:
    out = []
    for pool in fleet.pools:
        for i in range(pool.count):
            out.append(_node(fleet, pool, f"{pool.name}-{i}"))
    return out


def _node(fleet: Fleet, pool: Pool, name: str) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        POOL_LABEL: pool.name,
        **pool.labels,
    }
    resources: dict[str, str] = {"cpu": pool.cpu, "memory": pool.memory, "pods": "110"}
    taints: list[dict[str, str]] = []
    if pool.gpus:
        assert pool.product and pool.compute, f"pool {pool.name}: GPU pools need product and compute"
        major, minor = pool.compute.split(".")
        labels.update(
            {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": pool.product,
                "nvidia.com/gpu.count": str(pool.gpus),
                "nvidia.com/gpu.memory": str(pool.memory_mib or 0),
                "nvidia.com/gpu.family": pool.family or "",
                "nvidia.com/gpu.compute.major": major,
                "nvidia.com/gpu.compute.minor": minor,
                "nvidia.com/mig.capable": str(pool.family in ("ampere", "hopper", "blackwell")).lower(),
                "nvidia.com/mig.strategy": pool.mig.strategy if pool.mig else "none",
                "nvidia.com/cuda.driver.major": "580",
            }
        )
        if pool.mig:
            # Mixed strategy: every GPU of this node is sliced, so no whole nvidia.com/gpu is offered.
            labels["nvidia.com/mig.config"] = "custom"
            resources["nvidia.com/gpu"] = "0"
            for prof, p in pool.mig.profiles.items():
                resources[f"nvidia.com/mig-{prof}"] = str(p.count)
                labels[f"nvidia.com/mig-{prof}.count"] = str(p.count)
                labels[f"nvidia.com/mig-{prof}.memory"] = str(p.memory_mib)
                labels[f"nvidia.com/mig-{prof}.slices.gi"] = prof.split("g.")[0]
        else:
            resources["nvidia.com/gpu"] = str(pool.gpus)
        if fleet.gpu_taint:
            taints.append(fleet.gpu_taint.model_dump())
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
        "spec": {"taints": taints} if taints else {},
        "status": {"capacity": resources, "allocatable": resources},
    }


def apply_fleet(api: Any, fleet: Fleet) -> list[str]:
    """Create the fleet's nodes (existing ones are left as they are); returns node names."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api)
    names = []
    for node in node_manifests(fleet):
        names.append(node["metadata"]["name"])
        try:
            core.create_node(node)
        except ApiException as e:
            if e.status != 409:
                raise
    return names
