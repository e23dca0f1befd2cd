"""Benchmark Job and its request ConfigMap: pure functions of the bench request, the plan's GPUs and the settings.

The Job runs `llmengine bench-engine` in the builder image (it has trtllm-bench) on the same GPUs the serving pods
get: same product affinity, tolerations, GPU resource and count.
"""

from __future__ import annotations

from typing import Any

from llmengine.api.bench import BenchRequest
from llmengine.api.config import OperatorConfig
from llmengine.api.v1alpha1 import SecretKeySelector, Target
from llmengine.render import common as c

REQUEST_DIR = "/etc/llmengine/bench"
COMPONENT = "benchmark"
DEFAULT_ACTIVE_DEADLINE_SECONDS = 2 * 3600
DEFAULT_TTL_SECONDS_AFTER_FINISHED = 24 * 3600


def bench_job_name(short_digest: str) -> str:
    """llme-bench-<12 hex>: 23 characters, well under the 63 a Job name may have (its pods' job-name label)."""
    return f"llme-bench-{short_digest.removeprefix('e-')}"


def bench_labels(short_digest: str, pool: str) -> dict[str, str]:
    return {**c.base_labels(COMPONENT), c.DIGEST_LABEL: short_digest, c.POOL_LABEL: pool}


def bench_request_configmap(
    request: BenchRequest, short_digest: str, pool: str, namespace: str, owners: list[dict[str, Any]]
) -> dict[str, Any]:
    return c.request_configmap(
        bench_job_name(short_digest), namespace, bench_labels(short_digest, pool), owners, request.to_json()
    )


def bench_job(
    *,
    request: BenchRequest,
    short_digest: str,
    pool: str,
    namespace: str,
    owners: list[dict[str, Any]],
    product_labels: list[str],
    gpu_resource: str,
    gpu_count: int,
    target: Target,
    store_secret: str | None,
    hf_token: SecretKeySelector | None,
    image: str,
    cfg: OperatorConfig,
    active_deadline_seconds: int = DEFAULT_ACTIVE_DEADLINE_SECONDS,
    ttl_seconds_after_finished: int = DEFAULT_TTL_SECONDS_AFTER_FINISHED,
) -> dict[str, Any]:
    """One Job per engine identity, like the build Job; every resource that wants the engine is an owner.
    The tokenizer and config.json of a gated repository need the token the build used."""
    env = c.store_env(store_secret, request.store.endpoint, request.store.region) + c.hf_token_env(hf_token)
    return c.tool_job(
        name=bench_job_name(short_digest),
        namespace=namespace,
        container=COMPONENT,
        subcommand="bench-engine",
        request_dir=REQUEST_DIR,
        labels=bench_labels(short_digest, pool),
        annotations={c.DIGEST_ANNOTATION: request.engine_digest},
        owners=owners,
        env=env,
        product_labels=product_labels,
        gpu_resource=gpu_resource,
        gpu_count=gpu_count,
        target=target,
        image=image,
        cfg=cfg,
        active_deadline_seconds=active_deadline_seconds,
        ttl_seconds_after_finished=ttl_seconds_after_finished,
        shared_memory=True,
    )
