"""Kopf wiring: what the engine event handler trims from the object Kopf keeps, alone and through Kopf's own event
processing."""

from __future__ import annotations

import copy
from typing import Any

from llmengine.handlers import drop_managed_fields


def test_field_ownership_records_are_dropped_from_the_watched_engine_in_place() -> None:
    obj: dict[str, Any] = {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "LLMEngine",
        "metadata": {
            "name": "e1",
            "namespace": "ml",
            "resourceVersion": "42",
            "annotations": {"a": "b"},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:model": {}}}}],
        },
        "spec": {"model": {}},
        "status": {"phase": "Ready"},
    }
    event: Any = {"type": "MODIFIED", "object": obj}
    expected = copy.deepcopy(obj)
    del expected["metadata"]["managedFields"]
    drop_managed_fields(event)
    assert event["object"] is obj and obj == expected  # the same dict Kopf holds, without the records only
    drop_managed_fields(event)  # none left: nothing to do
    for odd in ({"type": "ERROR", "object": {"kind": "Status"}}, {"type": "DELETED", "object": None}, {}):
        drop_managed_fields(odd)  # an event without an object's metadata is left alone


async def test_the_body_kopf_keeps_for_an_engines_daemon_loses_the_records_through_kopfs_own_event_processing() -> None:
    """What the drop is for: the object Kopf keeps for the engine's daemon between events. Kopf's own event
    processing (`process_resource_event`, as its watch calls it, no API server needed for an event handler) hands the
    handler the watch's dict and puts that same dict, not a copy, into the body it keeps for the daemon. A Kopf that
    copied it would keep the records whatever the handler drops, and this fails. The daemon's start (which needs an
    API server for its finalizer) is stood in for: its body is set as Kopf sets it when it spawns a daemon."""
    import asyncio

    import kopf
    from kopf._cogs.structs import references
    from kopf._core.actions import lifecycles
    from kopf._core.engines import indexing
    from kopf._core.intents import registries
    from kopf._core.reactor import inventory, processing

    from llmengine import GROUP, KIND, PLURAL, VERSION
    from llmengine.handlers import engine_changed

    class Wakeups:
        def __init__(self) -> None:
            self.woken: list[tuple[str, str]] = []

        def wake(self, namespace: str, name: str) -> None:
            self.woken.append((namespace, name))

    registry = registries.OperatorRegistry()
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(engine_changed)
    verbs = frozenset({"list", "watch", "patch"})
    resource = references.Resource(GROUP, VERSION, PLURAL, kind=KIND, namespaced=True, verbs=verbs)
    memories = inventory.ResourceMemories()
    wakeups = Wakeups()

    def engine(rv: int) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": "e1",
                "namespace": "ml",
                "uid": "u-1",
                "resourceVersion": str(rv),
                "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}] * 3,
            },
            "spec": {"model": {}},
        }

    async def deliver(obj: dict[str, Any]) -> None:
        await processing.process_resource_event(
            lifecycle=lifecycles.all_at_once,
            indexers=indexing.OperatorIndexers(),
            registry=registry,
            settings=kopf.OperatorSettings(),
            memories=memories,
            memobase=kopf.Memo(wakeups=wakeups),
            resource=resource,
            raw_event={"type": "MODIFIED", "object": obj},
            event_queue=asyncio.Queue(),
            no_throttling=True,
        )

    first = engine(1)
    await deliver(first)
    memory = await memories.recall(first)
    # Stand-in for the daemon's start: Kopf keeps the first event's body for it (processing.py, when spawning).
    memory.daemons_memory.live_fresh_body = kopf.Body(first)
    second = engine(2)
    await deliver(second)
    kept = memory.daemons_memory.live_fresh_body
    assert kept is not None and kept.metadata["resourceVersion"] == "2"  # the daemon sees the latest event
    assert "managedFields" not in kept.metadata and "managedFields" not in second["metadata"]
    assert wakeups.woken == [("ml", "e1"), ("ml", "e1")]  # and each event woke the engine's pass
