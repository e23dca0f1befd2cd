"""A running build of the same identity into the same store is joined, not repeated, whatever its Job is named
(gather.py, `_pool_builds`): in another namespace, the default store's Job for an engine that names the same place
as its own, a Job an earlier operator named."""

from __future__ import annotations

from typing import Any

import pytest

from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import OperatorConfig
from llmengine.plan import plan_object
from llmengine.plan.identity import store_key
from llmengine.reconcile.gather import Gatherer, Memory
from llmengine.reconcile.queue import BuildQueue
from llmengine.render import common
from tests.unit.test_gather_early import Kube as NoJobs
from tests.unit.test_gather_early import Stores
from tests.unit.test_plan_cli import engine

DEFAULT = StoreLocation(bucket="engines", prefix="fleet")
CFG = OperatorConfig(default_store=DEFAULT)
OWN_AT_DEFAULT = {"bucket": "engines", "prefix": "fleet", "credentialsSecretRef": {"name": "s3"}}


class Kube(NoJobs):
    """No build Job of this engine's own name; the pool holds `jobs`."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        super().__init__([])
        self.jobs = jobs

    async def list_jobs(self, selector: str) -> list[Any]:
        return self.jobs


def job(ns: str, name: str, digest: str, store: StoreLocation, ended: bool = False) -> dict[str, Any]:
    notes = {common.DIGEST_ANNOTATION: digest, common.STORE_ANNOTATION: store_key(store)}
    status = {"conditions": [{"type": "Complete", "status": "True"}]} if ended else {}
    return {"metadata": {"namespace": ns, "name": name, "annotations": notes}, "status": status}


async def elsewhere(body: dict[str, Any], jobs: list[dict[str, Any]]) -> str | None:
    g = Gatherer(Kube(jobs), CFG, BuildQueue(4), Memory(), Stores([], committed=False))  # type: ignore[arg-type]
    snap, _ = await g.gather(body, lambda ns, name: None)
    assert snap.plan.valid and snap.job is None, snap.plan.errors
    return snap.building_elsewhere


def digest_of(body: dict[str, Any]) -> str:
    return plan_object(body, default_store=DEFAULT).engine_digest


@pytest.mark.parametrize(
    ("case", "spec_store", "where", "name", "store", "joined"),
    [
        ("another namespace, default store", None, "team-b", "llme-build-x", DEFAULT, True),
        ("another namespace, another store", None, "team-b", "llme-build-x", StoreLocation(bucket="b"), False),
        (
            "own store at the default's place: the default store's Job",
            OWN_AT_DEFAULT,
            "ml",
            "llme-build-x",
            DEFAULT,
            True,
        ),
        (
            "own store, a Job an earlier operator named without the store",
            OWN_AT_DEFAULT,
            "ml",
            "old-name",
            DEFAULT,
            True,
        ),
    ],
)
async def test_a_running_build_of_the_identity_into_the_store_is_joined_whatever_its_name(
    case: str, spec_store: dict[str, Any] | None, where: str, name: str, store: StoreLocation, joined: bool
) -> None:
    body = engine("e", **({"store": spec_store} if spec_store else {}))
    found = await elsewhere(body, [job(where, name, digest_of(body), store)])
    assert found == (f"{where}/{name}" if joined else None), case


async def test_an_ended_build_or_another_identity_is_not_joined() -> None:
    body = engine("e")
    digest = digest_of(body)
    assert await elsewhere(body, [job("team-b", "llme-build-x", digest, DEFAULT, ended=True)]) is None
    assert await elsewhere(body, [job("team-b", "llme-build-x", "f" * 64, DEFAULT)]) is None


async def test_its_own_running_build_is_not_elsewhere() -> None:
    """The pool lists the engine's own running Job (its name, its namespace): that is its build, not another's."""
    body = engine("e")
    plan = plan_object(body, default_store=DEFAULT)
    assert await elsewhere(body, [job("ml", plan.build_job, plan.engine_digest, DEFAULT)]) is None
    # The same build in another namespace is another engine's, and is joined.
    found = await elsewhere(body, [job("team-b", plan.build_job, plan.engine_digest, DEFAULT)])
    assert found == f"team-b/{plan.build_job}"


async def test_a_claim_is_held_only_by_a_pass_that_starts_the_build() -> None:
    """The claim closing the window before a build's Job exists is kept only by a pass that starts the build. An
    engine that does not (it failed for good, waits out a backoff, or queues) gives it back in the same pass, so that
    passing every resync it never keeps another namespace's engine of the identity waiting on a start that does not
    come."""
    from llmengine.reconcile.act import Actor
    from llmengine.reconcile.decide import Decision

    queue = BuildQueue(4)
    here, there = engine("e", namespace="team-a"), engine("e", namespace="team-b")
    g = Gatherer(Kube([]), CFG, queue, Memory(), Stores([], committed=False))  # type: ignore[arg-type]
    actor = Actor(Kube([]), CFG, queue, Memory(), None, lambda *a: None)  # type: ignore[arg-type]
    snap, target = await g.gather(here, lambda ns, name: None)
    assert target.claim is not None and snap.building_elsewhere is None
    # Meanwhile the other namespace's engine sees the build claimed ("starting").
    other, _ = await g.gather(there, lambda ns, name: None)
    assert other.building_elsewhere == f"team-a/{snap.plan.build_job} (starting)"
    # This pass decides not to build (no StartBuild): the claim goes with it.
    await actor.act(snap, target, Decision(status=snap.status))
    other, _ = await g.gather(there, lambda ns, name: None)
    assert other.building_elsewhere is None
