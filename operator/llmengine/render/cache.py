"""The node-local engine cache on a serving pod (docs/store.md): the node's directory as a hostPath volume, written
by fetch-engine (which fetches into it, or finds a verified copy there) and read-only in the server."""

from __future__ import annotations

from typing import Any

from llmengine.api.config import OperatorConfig
from llmengine.api.pods import ENGINE_CACHE_DIR as CACHE_DIR
from llmengine.api.pods import ENGINE_CACHE_VOLUME as VOLUME


def mount_engine_cache(
    pod_spec: dict[str, Any], fetch: dict[str, Any], server: dict[str, Any], cfg: OperatorConfig
) -> None:
    """Add the cache to a serving pod being rendered; nothing when the cache is off.

    Both containers mount it at the same path: the links fetch-engine leaves in the engine emptyDir resolve in the
    server too. DirectoryOrCreate only creates it owned by root: nodes must prepare it for the pods' uid.
    """
    if not cfg.engine_cache_host_path:
        return
    pod_spec["volumes"].append(
        {"name": VOLUME, "hostPath": {"path": cfg.engine_cache_host_path, "type": "DirectoryOrCreate"}}
    )
    fetch["args"] += ["--cache-dir", CACHE_DIR, "--cache-budget-bytes", str(cfg.engine_cache_size_budget)]
    fetch["volumeMounts"] = [*fetch["volumeMounts"], {"name": VOLUME, "mountPath": CACHE_DIR}]
    server["volumeMounts"] = [*server["volumeMounts"], {"name": VOLUME, "mountPath": CACHE_DIR, "readOnly": True}]
