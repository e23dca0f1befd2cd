"""The reads a pass starts before the store answers (gather.py, `_Early`): only for an engine whose identity moved,
awaited instead of read twice when needed, and dropped quietly when the store says the engine is committed."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import OperatorConfig
from llmengine.reconcile.gather import Gatherer, Memory
from llmengine.reconcile.queue import BuildQueue
from llmengine.reconcile.snapshot import StoreView
from tests.unit.test_plan_cli import engine as plain_engine

OLD = "0" * 64


def engine(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**plain_engine("e"), "status": status or {}}


class Kube:
    """Records each API call as it starts; the reads find nothing (no build Job yet)."""

    def __init__(self, calls: list[str], failing: bool = False) -> None:
        self.calls, self.failing = calls, failing

    async def get_job(self, ns: str, name: str) -> None:
        self.calls.append("get_job")
        if self.failing:
            raise RuntimeError("the API server went away")

    async def list_jobs(self, selector: str) -> list[Any]:
        self.calls.append("list_jobs")
        if self.failing:
            raise RuntimeError("the API server went away")
        return []

    async def list_pods(self, ns: str, selector: str) -> list[Any]:
        self.calls.append("list_pods")
        return []


class Stores:
    """A store that takes a while to answer; `committed` is its answer."""

    def __init__(self, calls: list[str], committed: bool, remembered: bool = False) -> None:
        self.calls, self.committed, self.remembered = calls, committed, remembered

    def remembers(self, access: Any, digest: str) -> bool:
        return self.remembered

    async def view(self, ns: str, access: Any, digest: str) -> StoreView:
        self.calls.append("store asked")
        await asyncio.sleep(0.05)
        self.calls.append("store answered")
        return StoreView(self.committed, None, f"s3://engines/{digest}")

    async def progress(self, *args: Any) -> None:
        return None


async def gather(body: dict[str, Any], kube: Kube, stores: Stores) -> Any:
    cfg = OperatorConfig(default_store=StoreLocation(bucket="engines"))
    g = Gatherer(kube, cfg, BuildQueue(4), Memory(), stores)  # type: ignore[arg-type]
    snap, _ = await g.gather(body, lambda ns, name: None)
    assert snap.plan.valid and snap.plan.engine_digest != OLD
    return snap


async def test_a_new_engine_reads_its_build_only_after_the_store_answers() -> None:
    calls: list[str] = []
    snap = await gather(engine(), Kube(calls), Stores(calls, committed=False))
    assert calls == ["store asked", "store answered", "get_job", "list_jobs"]
    assert snap.job is None and snap.store.committed is False


async def test_an_identity_that_moved_reads_its_build_while_the_store_answers_and_only_once() -> None:
    calls: list[str] = []
    moved = engine({"desiredEngine": {"digest": OLD}})
    await gather(moved, Kube(calls), Stores(calls, committed=False))
    answered = calls.index("store answered")
    assert calls.index("get_job") < answered and calls.index("list_jobs") < answered
    assert calls.count("get_job") == 1 and calls.count("list_jobs") == 1  # awaited, not read again


async def test_an_identity_that_moved_to_an_engine_known_committed_reads_nothing_early() -> None:
    calls: list[str] = []
    await gather(engine({"desiredEngine": {"digest": OLD}}), Kube(calls), Stores(calls, True, remembered=True))
    assert "get_job" not in calls and "list_jobs" not in calls


@pytest.mark.parametrize("failing", [False, True])
async def test_early_reads_the_store_made_unneeded_are_dropped_quietly(failing: bool) -> None:
    """A committed engine needs neither read: both are cancelled or their outcome retrieved, a failed one too (no
    'exception was never retrieved' from the loop)."""
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    calls: list[str] = []
    snap = await gather(engine({"desiredEngine": {"digest": OLD}}), Kube(calls, failing), Stores(calls, True))
    assert snap.store.committed and snap.job is None
    assert "get_job" in calls  # it was asked early, while the store answered
    await asyncio.sleep(0)
    gc.collect()
    await asyncio.sleep(0)
    assert unretrieved == []
