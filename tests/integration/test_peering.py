"""Two operator replicas on one namespace with Kopf peering: only the higher priority acts; killed with SIGKILL, the
other takes over once the dead peer's keep-alive expires.

The takeover waits for Kopf's peering lifetime (60 s by default; `llmengine operator` has no way to shorten it): the
standby resumes at the dead peer's lastseen + 60 s. Keep-alives come every 50-55 s, so a takeover takes 5-60 s after
the kill; measured here 50-53 s (kills 7-10 s after a keep-alive). A replica stopped gracefully (SIGTERM) withdraws
its record and the standby resumes within milliseconds.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import Engines, deployment, jobs, run_operator
from llmengine.dev.proc import free_port
from llmengine.dev.seed import apply_crd, engine, upload_tiny_checkpoint
from llmengine.dev.seed import create_store_secret as store_secret

pytestmark = pytest.mark.usefixtures("crd")

PEERING = "llmengine-operator"
# Kopf's own log lines (kopf/_core/engines/peering.py) when a peer pauses for a higher priority and resumes.
PAUSING = "Pausing operations in favour of"
RESUMING = "Resuming operations after the pause"
LOW, HIGH = 100, 200
LIFETIME = 60  # Kopf's default settings.peering.lifetime; `llmengine operator` has no flag for it


@pytest.fixture(scope="session")
def peering_crds(api: Any) -> None:
    """Kopf's peering CRDs as the chart installs them (templates/peering.yaml): group kopf.dev, free-form status."""
    for kind, scope in (("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")):
        plural = f"{kind.lower()}s"
        name = f"{plural}.kopf.dev"
        body: dict[str, Any] = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {
                "group": "kopf.dev",
                "scope": scope,
                "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "properties": {
                                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                                },
                            }
                        },
                    }
                ],
            },
        }
        apply_crd(api, body)


@pytest.fixture
def env(dev_cluster: ClusterInfo, api: Any, namespace: str, tmp_path: Path, peering_crds: None) -> Any:
    class Env:
        info = dev_cluster
        ns = namespace
        engines = Engines(api, namespace)
        prefix = f"engines-{uuid.uuid4().hex[:8]}"
        model = upload_tiny_checkpoint(dev_cluster, f"models/{uuid.uuid4().hex[:8]}")
        logs = tmp_path
        co = client.CustomObjectsApi(api)

        def body(self, name: str, **kw: Any) -> dict[str, Any]:
            return engine(name, dev_cluster, self.model, self.prefix, **kw)

        def peers(self) -> dict[str, Any]:
            obj = self.co.get_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", PEERING)
            return dict(obj.get("status") or {})

    store_secret(api, dev_cluster, namespace)
    # A namespaced operator (--namespace) meets its peers in the KopfPeering of that namespace; with --peering, Kopf
    # stays paused until the object exists, and the operator creates it at start-up (the test makes none).
    env = Env()
    return env


def _peering_args(priority: int) -> list[str]:
    # Each replica its own liveness port: run_operator's "127.0.0.1:0" makes Kopf bind port 80 (`port or 80`), which
    # a second operator on the host can not bind.
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    return ["--peering", PEERING, "--priority", str(priority), "--liveness", liveness]


def _lines(op: Any, needle: str) -> list[str]:
    return [line for line in op.logs().splitlines() if needle in line]


def _acted(op: Any) -> list[str]:
    """Kopf's per-object log lines ("Handler 'engine_changed' succeeded.", daemon lines): the replica acted. In
    JSON logs they are the records carrying the object; in text logs, the kopf.objects logger's."""
    out = []
    for line in op.logs().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if (isinstance(record, dict) and "object" in record) or "kopf.objects" in line:
            out.append(line)
    return out


def test_only_the_higher_priority_replica_acts_and_the_other_takes_over_after_kill9(env: Any, api: Any) -> None:
    started = time.monotonic()
    with run_operator(env.info, env.ns, env.logs, extra_args=_peering_args(LOW)) as low:
        # Alone in the peering, the low-priority replica un-pauses (Kopf starts every peered operator paused).
        wait_for("low replica resumes alone", lambda: _lines(low, RESUMING), timeout=30)
        with run_operator(env.info, env.ns, env.logs, extra_args=_peering_args(HIGH)) as high:
            wait_for("low replica pauses for the high one", lambda: _lines(low, PAUSING), timeout=30)
            wait_for("high replica resumes", lambda: _lines(high, RESUMING), timeout=30)
            peers = env.peers()
            assert sorted(p["priority"] for p in peers.values()) == [LOW, HIGH], peers
            assert f"priority={HIGH}" in _lines(low, PAUSING)[0]
            assert not _lines(high, PAUSING)

            env.engines.create(env.body("p", serving={"replicas": 1}))
            env.engines.wait_phase("p", "Ready", timeout=120)
            assert len(jobs(api, env.ns)) == 1
            # The paused replica ran no handler at all; the active one ran them (Kopf's per-object lines).
            assert not _acted(low), "\n".join(_acted(low))
            assert _acted(high)

            # SIGKILL: no goodbye in the peering object, so the dead peer's record holds the low replica paused
            # until its lastseen + lifetime; then the low replica cleans it out and resumes.
            record = env.peers()
            (high_id,) = [k for k, v in record.items() if v["priority"] == HIGH]
            lastseen = datetime.fromisoformat(record[high_id]["lastseen"])
            resumed_before = len(_lines(low, RESUMING))
            high.kill9()
            t_kill, killed_at = time.monotonic(), datetime.now(UTC)
            env.engines.patch_spec("p", {"serving": {"replicas": 2}})

            def resumed() -> bool:
                if len(_lines(low, RESUMING)) > resumed_before:
                    return True
                # Nobody acts in the gap: the change waits for the standby.
                assert deployment(api, env.ns, "p").spec.replicas == 1
                return False

            wait_for("standby resumes after kill -9", resumed, timeout=75)
            takeover = time.monotonic() - t_kill
            age = (killed_at - lastseen).total_seconds()
            print(f"\ntakeover after kill -9: {takeover:.1f}s (the dead peer's keep-alive was {age:.1f}s old)")
            assert takeover <= LIFETIME + 10
            assert high_id not in env.peers(), "the dead peer was not cleaned out of the peering"

            env.engines.wait_phase("p", "Ready", timeout=60)
            wait_for("2 replicas", lambda: deployment(api, env.ns, "p").status.available_replicas == 2, 30)
            assert len(jobs(api, env.ns)) == 1
            assert _acted(low)
    print(f"test body took {time.monotonic() - started:.1f}s")
