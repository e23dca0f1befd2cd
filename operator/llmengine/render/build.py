"""Build Job and its request ConfigMap: pure functions of the plan and the operator settings."""

from __future__ import annotations

from typing import Any

from llmengine.api.artifacts import BuildRequest
from llmengine.api.config import OperatorConfig
from llmengine.plan.identity import store_key
from llmengine.render import common as c

REQUEST_DIR = "/etc/llmengine/build"


def build_labels(short_digest: str, pool: str) -> dict[str, str]:
    return {**c.base_labels("build"), c.DIGEST_LABEL: short_digest, c.POOL_LABEL: pool}


def request_configmap(request: BuildRequest, where: c.Placement) -> dict[str, Any]:
    labels = build_labels(where.short_digest, where.pool)
    return c.request_configmap(where.build_job, where.namespace, labels, where.owners, request.to_json())


def build_job(*, request: BuildRequest, where: c.Placement, attempt: int, cfg: OperatorConfig) -> dict[str, Any]:
    """One Job per engine identity; every resource that wants this engine is an owner (none is the controller)."""
    env = c.store_env(where.store_secret, request.store.endpoint, request.store.region)
    env.append({"name": "LLMENGINE_BUILDER_IMAGE", "value": request.image})
    env += c.hf_token_env(where.hf_token)
    return c.tool_job(
        name=where.build_job,
        container="build",
        subcommand="build-engine",
        request_dir=REQUEST_DIR,
        labels=build_labels(where.short_digest, where.pool),
        annotations={
            c.ATTEMPT_ANNOTATION: str(attempt),
            c.DIGEST_ANNOTATION: request.engine_digest,
            c.STORE_ANNOTATION: store_key(request.store),
        },
        env=env,
        where=where,
        image=request.image,
        cfg=cfg,
        active_deadline_seconds=cfg.build_active_deadline_seconds,
        ttl_seconds_after_finished=cfg.build_ttl_seconds_after_finished,
    )


TOKEN_KEY = "token"


def token_copy_name(build_job: str) -> str:
    """The copy of an engine's Hugging Face token next to a build in the operator's namespace."""
    return f"{build_job}-hf"


def token_copy(where: c.Placement, job_owner: dict[str, Any], token: str) -> dict[str, Any]:
    """That copy as a Secret owned by the build Job, so that it goes when the Job goes (by value: it is a Secret)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": token_copy_name(where.build_job),
            "namespace": where.namespace,
            "labels": build_labels(where.short_digest, where.pool),
            "ownerReferences": [job_owner],
        },
        "stringData": {TOKEN_KEY: token},
    }
