"""Benchmark Job and its request ConfigMap: pure functions of the bench request, the plan's GPUs and the settings.

The Job runs `llmengine bench-engine` in the builder image (it has trtllm-bench) on the same GPUs the serving pods
get: same product affinity, tolerations, GPU resource and count.
"""

from __future__ import annotations

from typing import Any

from llmengine.api.bench import BenchRequest
from llmengine.api.config import OperatorConfig
from llmengine.render import common as c

REQUEST_DIR = "/etc/llmengine/bench"
COMPONENT = "benchmark"
DEFAULT_ACTIVE_DEADLINE_SECONDS = 2 * 3600
DEFAULT_TTL_SECONDS_AFTER_FINISHED = 24 * 3600


def bench_labels(short_digest: str, pool: str) -> dict[str, str]:
    return {**c.base_labels(COMPONENT), c.DIGEST_LABEL: short_digest, c.POOL_LABEL: pool}


def bench_request_configmap(request: BenchRequest, where: c.Placement) -> dict[str, Any]:
    labels = bench_labels(where.short_digest, where.pool)
    return c.request_configmap(where.bench_job, where.namespace, labels, where.owners, request.to_json())


def bench_job(
    *,
    request: BenchRequest,
    where: c.Placement,
    image: str,
    cfg: OperatorConfig,
    active_deadline_seconds: int = DEFAULT_ACTIVE_DEADLINE_SECONDS,
    ttl_seconds_after_finished: int = DEFAULT_TTL_SECONDS_AFTER_FINISHED,
) -> dict[str, Any]:
    """One Job per engine identity, like the build Job; every resource that wants the engine is an owner.
    The tokenizer and config.json of a gated repository need the token the build used."""
    env = c.store_env(where.store_secret, request.store.endpoint, request.store.region) + c.hf_token_env(where.hf_token)
    return c.tool_job(
        name=where.bench_job,
        container=COMPONENT,
        subcommand="bench-engine",
        request_dir=REQUEST_DIR,
        labels=bench_labels(where.short_digest, where.pool),
        annotations={c.DIGEST_ANNOTATION: request.engine_digest},
        env=env,
        where=where,
        image=image,
        cfg=cfg,
        active_deadline_seconds=active_deadline_seconds,
        ttl_seconds_after_finished=ttl_seconds_after_finished,
        shared_memory=True,
    )
