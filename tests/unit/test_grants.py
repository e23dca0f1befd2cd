"""Isolated store access: builds in the operator's namespace, benchmark and serving pods through an engine grant."""

from __future__ import annotations

import datetime
from typing import Any

from llmengine.api.artifacts import EngineGrant, StoreLocation
from llmengine.api.config import OperatorConfig
from llmengine.api.v1alpha1 import parse_engine
from llmengine.plan.planner import plan_object
from llmengine.reconcile.actions import AdoptBuildJob, Grant, Serve
from llmengine.reconcile.snapshot import Snapshot
from llmengine.reconcile.views import GrantView, grant_view
from llmengine.render import common, grants
from tests.unit.passes import NOW, SPEC, deployment, job, run, snapshot

D, OLD = "a" * 64, "b" * 64
SPEC_TARGET = SPEC.target
HOURS_12 = 12 * 3600


def isolated(**kw: Any) -> Snapshot:
    return snapshot(build_owned=False, grant_seconds=HOURS_12, **kw)


def test_a_committed_engine_is_granted_before_it_is_served() -> None:
    actions = run(isolated(committed=True)).decision.actions
    assert actions[0] == Grant((D,))
    assert any(isinstance(a, Serve) for a in actions[1:])


def test_a_rollout_grants_the_old_engine_and_the_new_until_the_old_is_gone() -> None:
    snap = isolated(committed=True, deployment=deployment(OLD))
    assert run(snap).decision.actions[0] == Grant((D, OLD))


def test_a_fresh_grant_is_not_written_again_and_one_past_half_its_life_is_renewed() -> None:
    fresh = GrantView((D,), NOW + datetime.timedelta(hours=11))
    assert not any(isinstance(a, Grant) for a in run(isolated(committed=True, grant=fresh)).decision.actions)
    due = GrantView((D,), NOW + datetime.timedelta(hours=5))
    assert run(isolated(committed=True, grant=due)).decision.actions[0] == Grant((D,))
    moved = GrantView((OLD,), NOW + datetime.timedelta(hours=11))
    assert run(isolated(committed=True, grant=moved)).decision.actions[0] == Grant((D,))


def test_nothing_is_granted_before_the_engine_is_committed_nor_with_store_keys() -> None:
    assert not any(isinstance(a, Grant) for a in run(isolated(committed=False)).decision.actions)
    assert not any(isinstance(a, Grant) for a in run(snapshot(committed=True)).decision.actions)


def test_a_build_in_the_operators_namespace_is_never_adopted() -> None:
    foreign = job(owners=())
    assert any(isinstance(a, AdoptBuildJob) for a in run(snapshot(job=foreign)).decision.actions)
    assert not any(isinstance(a, AdoptBuildJob) for a in run(isolated(job=foreign)).decision.actions)


def test_the_grant_secret_round_trips_to_what_the_operator_wrote() -> None:
    engine = parse_engine(
        {
            "apiVersion": "llmengine.io/v1alpha1",
            "kind": "LLMEngine",
            "metadata": {"name": "llama", "namespace": "team-a", "uid": "u1"},
            "spec": {
                "model": {"source": {"huggingFace": {"repo": "org/m", "revision": "0" * 40}}, "catalog": "llama-2-7b"},
                "target": {"gpu": "H100-80GB"},
            },
        }
    )
    grant = EngineGrant(location=StoreLocation(bucket="b"), expires_at="2026-11-26T18:00:00Z", engines={})
    secret = grants.secret(engine, grant)
    assert secret["metadata"]["name"] == "llme-llama-grant"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u1"
    view = grant_view({grants.KEY: secret["stringData"][grants.KEY]})
    assert view == GrantView((), datetime.datetime(2026, 11, 26, 18, tzinfo=datetime.UTC))
    assert grant_view({grants.KEY: "{not json"}) is None
    assert grant_view(None) is None
    assert len(grants.secret_name("x" * 80)) <= 63


def test_isolated_builds_refuse_build_pod_settings_naming_the_field_and_the_fix() -> None:
    obj = {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "LLMEngine",
        "metadata": {"name": "llama", "namespace": "team-a"},
        "spec": {
            "model": {"source": {"huggingFace": {"repo": "org/m", "revision": "0" * 40}}, "catalog": "llama-2-7b"},
            "target": {"gpu": "H100-80GB"},
            "pods": {"build": {"serviceAccountName": "builder"}},
        },
    }
    store = StoreLocation(bucket="engines")
    assert plan_object(obj, default_store=store).valid
    refused = plan_object(obj, default_store=store, isolated_builds=True)
    assert not refused.valid and refused.build_request is None
    assert [e.field for e in refused.errors] == ["spec.pods.build"]
    assert "set spec.store" in refused.errors[0].message
    own_store = {**obj, "spec": {**obj["spec"], "store": {"bucket": "mine"}}}
    assert plan_object(own_store, default_store=store, isolated_builds=True).valid


def test_isolated_access_needs_the_operators_namespace() -> None:
    try:
        OperatorConfig(store_access="isolated")
    except ValueError as e:
        assert "LLMENGINE_BUILD_NAMESPACE" in str(e)
    else:
        raise AssertionError("isolated access without a build namespace was accepted")
    cfg = OperatorConfig.from_env(
        {
            "LLMENGINE_STORE_ACCESS": "isolated",
            "LLMENGINE_BUILD_NAMESPACE": "llmengine-system",
            "LLMENGINE_STORE_BUCKET": "engines",
        }
    )
    assert cfg.isolated and cfg.build_namespace == "llmengine-system"
    assert not replace_store(cfg).isolated


def replace_store(cfg: OperatorConfig) -> OperatorConfig:
    return cfg.model_copy(update={"default_store": None})


def test_grant_volume_is_read_only_and_named_as_the_operators() -> None:
    assert common.GRANT_MOUNT["readOnly"] is True
    assert common.grant_volume("s") == {"name": common.GRANT_VOLUME, "secret": {"secretName": "s"}}


def test_the_token_copy_is_the_secret_the_shared_build_pod_reads() -> None:
    from llmengine.render import build as render_build

    where = common.Placement(
        namespace="llmengine-system",
        owners=[],
        short_digest="e-0123456789ab",
        build_job="llme-build-0123456789ab-01234567",
        bench_job="llme-bench-0123456789ab-01234567",
        pool="h100-80gb",
        product_labels=["NVIDIA-H100-80GB-HBM3"],
        gpu_resource="nvidia.com/gpu",
        gpu_count=1,
        target=SPEC_TARGET,
        store_secret="s3-creds",
        hf_token=None,
    )
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "llme-build-0123456789ab-01234567", "uid": "j1"}
    copy = render_build.token_copy(where, owner, "hf_secret")
    assert (
        copy["metadata"]["name"]
        == render_build.token_copy_name(where.build_job)
        == "llme-build-0123456789ab-01234567-hf"
    )
    assert copy["metadata"]["namespace"] == "llmengine-system" and copy["metadata"]["ownerReferences"] == [owner]
    assert copy["stringData"] == {render_build.TOKEN_KEY: "hf_secret"}
