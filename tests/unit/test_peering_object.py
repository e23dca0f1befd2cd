"""The Kopf peering object the operator creates at start-up: where it watches, only when missing, never fatal."""

from __future__ import annotations

from typing import cast

import pytest

from llmengine.clients.kube import ApiError, Kube
from llmengine.reconcile import peering


class FakePeeringApi:
    def __init__(self, existing: set[tuple[str, str | None]], refuse: bool = False) -> None:
        self.objects = set(existing)
        self.refuse = refuse

    async def create_peering(self, plural: str, name: str, ns: str | None) -> bool:
        if self.refuse:
            raise ApiError(403, "Forbidden")
        if (plural, ns) in self.objects:
            return False
        self.objects.add((plural, ns))
        return True


async def test_peering_object_is_created_where_the_operator_watches_unless_it_exists(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = FakePeeringApi({("kopfpeerings", "team-a")})
    await peering.ensure(cast(Kube, api), "llmengine-operator", ["team-a", "team-b"])
    assert api.objects == {("kopfpeerings", "team-a"), ("kopfpeerings", "team-b")}
    cluster = FakePeeringApi(set())
    await peering.ensure(cast(Kube, cluster), "llmengine-operator", [])
    assert cluster.objects == {("clusterkopfpeerings", None)}
    # Refused: logged, and start-up goes on (Kopf waits for the object, which someone else may create).
    await peering.ensure(cast(Kube, FakePeeringApi(set(), refuse=True)), "llmengine-operator", [])
    assert "stays paused until it exists" in caplog.text
