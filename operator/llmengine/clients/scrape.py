"""Scrape the serving pods' /llmengine/metrics (Prometheus text) concurrently, with a short timeout each."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp

from llmengine.plan.traffic import MetricsParseError, PodMetrics, parse_metrics

# A pod that does not answer in time is left out of this snapshot (its counters are cumulative: nothing is lost).
MAX_BYTES = 4 * 1024 * 1024


def pod_url(template: str, pod: Mapping[str, Any], port: int) -> str | None:
    md, st = pod.get("metadata") or {}, pod.get("status") or {}
    ip = st.get("podIP")
    if "{pod_ip}" in template and not ip:
        return None
    return template.format(pod_ip=ip or "", port=port, namespace=md.get("namespace", ""), pod=md.get("name", ""))


def ready(pod: Mapping[str, Any]) -> bool:
    st = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp") or st.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


async def _one(session: aiohttp.ClientSession, url: str) -> PodMetrics | None:
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            body = await resp.content.read(MAX_BYTES + 1)
            if len(body) > MAX_BYTES:
                return None
            return parse_metrics(body.decode("utf-8", errors="replace"))
    except (aiohttp.ClientError, TimeoutError, MetricsParseError, UnicodeError):
        return None


async def scrape(urls: Mapping[str, str], timeout_seconds: float) -> dict[str, PodMetrics]:
    """{pod name: metrics} for the pods that answered."""
    if not urls:
        return {}
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        names = list(urls)
        results = await asyncio.gather(*(_one(session, urls[n]) for n in names))
    return {n: r for n, r in zip(names, results, strict=True) if r is not None}
