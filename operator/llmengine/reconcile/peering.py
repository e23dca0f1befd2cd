"""The Kopf peering object the replicas meet in (`llmengine operator --peering NAME`), created at start-up when it is
missing: a replica with mandatory peering stays paused until it sees that object. The chart installs the peering
CRDs but not the object, which Helm could only install as a post-install hook, and a GitOps tool applies such hooks
after everything else of the sync is healthy: LLMEngines applied with the chart would wait for a paused operator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from llmengine.clients.kube import ApiError, Kube

log = logging.getLogger("llmengine.peering")


async def ensure(kube: Kube, name: str, namespaces: Sequence[str]) -> None:
    """The ClusterKopfPeering `name` (no namespaces: the operator watches the whole cluster), or the KopfPeering
    `name` in each watched namespace. Another replica creating it first is no error; being refused is logged and
    left to whoever installs the operator, since Kopf keeps the replica paused until the object exists."""
    targets: list[str | None] = [*namespaces] or [None]
    for ns in targets:
        plural = "clusterkopfpeerings" if ns is None else "kopfpeerings"
        where = "cluster-wide" if ns is None else f"in namespace {ns}"
        try:
            if await kube.create_peering(plural, name, ns):
                log.info("created the peering object %s %s", name, where)
        except ApiError as e:
            log.warning(
                "could not create the peering object %s %s (%s): this replica stays paused until it exists",
                name,
                where,
                e,
            )
