"""No credential value reaches a log line, an Event, a status or a rendered object.

A dedicated test rather than a hook over the whole suite: it runs one lifecycle with every secret in play (the
store Secret of the dev S3 server, a Hugging Face token Secret), including the path that logs the most (a build
that fails at fetch, retried until the engine is Failed), a build to Ready, a rebuild with a rollout and a deletion.
Then it scans everything that lifecycle, and the session before it, left behind:

- the operator's log; every file the pod runner wrote for every pod of the session (container logs, termination
  messages, the container's HOME), except the materialised volumes, which hold Secret files on purpose;
- the dev cluster's component logs (API server, controllers, scheduler, kwok, the S3 server, the pod runner);
- every Event in the namespace; every LLMEngine (status included), Job, Deployment, ReplicaSet, Pod, ConfigMap and
  Service, serialised whole at several points of the lifecycle; the containers' termination messages.

No value of the S3 access key id, the S3 secret key or the token may appear: neither verbatim nor base64-encoded
(at any alignment, as inside a larger encoded blob). The scanner is first shown to find each value in each form,
and a canary (not a secret: the Hugging Face repo name) is shown to reach each kind of place scanned, so a place
that silently stopped being collected fails the test too. Pod specs must reference the credentials through
secretKeyRef, never carry them as a literal `value`.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import Engines, jobs, run_operator
from llmengine.dev.seed import create_store_secret, engine, upload_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("crd")

HF_SECRET = "hf-token"
STORE_SECRET = "s3-creds"
# Environment variables that carry credentials: in a pod spec only ever as a reference to a Secret.
CREDENTIAL_ENV = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
}
TERMINATION = "termination message"
POD_FILE = "pod runner file"


@dataclass(frozen=True)
class Needle:
    label: str
    text: str


@dataclass(frozen=True)
class Source:
    kind: str  # "Event", "LLMEngine", "operator log", ...: a canary must reach every kind
    where: str
    text: str


@dataclass(frozen=True)
class Finding:
    where: str
    needle: str
    line: int
    excerpt: str


def needles(label: str, value: str) -> list[Needle]:
    """The value verbatim and base64-encoded (standard and URL-safe) at each of the three alignments it can have
    inside a larger encoded stream: only the characters that depend on the value's bytes alone."""
    raw = value.encode()
    out = [Needle(label, value)]
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw + b"\0\0").decode()
        core = enc[-(-8 * shift // 6) : 8 * (shift + len(raw)) // 6]
        out.append(Needle(f"{label} (base64, offset {shift})", core))
        out.append(Needle(f"{label} (base64url, offset {shift})", core.replace("+", "-").replace("/", "_")))
    return out


def scan(sources: Iterable[Source], all_needles: list[Needle]) -> list[Finding]:
    found = []
    for src in sources:
        for n in all_needles:
            if n.text not in src.text:
                continue
            for i, line in enumerate(src.text.splitlines(), 1):
                if n.text in line:
                    at = line.index(n.text)
                    before, after = line[max(0, at - 120) : at], line[at + len(n.text) : at + len(n.text) + 120]
                    found.append(Finding(src.where, n.label, i, f"{before}<{n.label}>{after}"))
    return found


def report(found: list[Finding]) -> str:
    # The excerpts show where, with the value itself replaced: a failing test must not print the secret either.
    return "\n".join(f"{f.where}:{f.line}: {f.needle}: {f.excerpt}" for f in found[:50])


def _assert_scanner_finds(all_needles: list[Needle], values: dict[str, str]) -> None:
    """The scanner itself: each value is found verbatim, base64-encoded alone (a Secret's data) and at every offset
    inside a larger base64 blob; the report never shows the value; clean text is not flagged."""
    for label, value in values.items():
        blobs = {
            "verbatim": f'{{"event": "reconcile", "detail": "key={value};"}}',
            "secret data": json.dumps({"data": {"k": base64.b64encode(value.encode()).decode()}}),
        }
        for pad in range(3):
            blobs[f"blob +{pad}"] = base64.b64encode(b"x" * pad + f"prefix {value} suffix".encode()).decode()
            blobs[f"url blob +{pad}"] = base64.urlsafe_b64encode(b"\xfb" * pad + value.encode() + b"\xff").decode()
        for form, text in blobs.items():
            hits = scan([Source("test", form, text)], all_needles)
            assert any(h.needle.startswith(label) for h in hits), f"scanner misses {label} ({form})"
            assert value not in report(hits)
    clean = f"AWS_SECRET_ACCESS_KEY from secretKeyRef {STORE_SECRET}; HF_TOKEN from {HF_SECRET}"
    assert not scan([Source("test", "clean", clean)], all_needles)


class Evidence:
    """Every serialised object and log, labelled with where it came from."""

    def __init__(self, api: Any, ns: str) -> None:
        self.api, self.ns = api, ns
        self.sources: list[Source] = []
        self.pod_specs: list[tuple[str, dict[str, Any]]] = []
        self.termination_messages: list[str] = []

    def add(self, kind: str, where: str, text: str) -> None:
        self.sources.append(Source(kind, where, text))

    def _object(self, when: str, kind: str, obj: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.api.sanitize_for_serialization(obj)
        self.add(kind, f"[{when}] {kind} {data['metadata']['name']}", json.dumps(data, indent=1, sort_keys=True))
        return data

    def snapshot(self, when: str) -> None:
        core, apps, batch = client.CoreV1Api(self.api), client.AppsV1Api(self.api), client.BatchV1Api(self.api)
        co = client.CustomObjectsApi(self.api)
        for e in co.list_namespaced_custom_object("llmengine.io", "v1alpha1", self.ns, "llmengines")["items"]:
            self._object(when, "LLMEngine", e)
        for j in batch.list_namespaced_job(self.ns).items:
            d = self._object(when, "Job", j)
            self.pod_specs.append((f"Job {j.metadata.name}", d["spec"]["template"]["spec"]))
        for kind, items in (
            ("Deployment", apps.list_namespaced_deployment(self.ns).items),
            ("ReplicaSet", apps.list_namespaced_replica_set(self.ns).items),
        ):
            for o in items:
                d = self._object(when, kind, o)
                self.pod_specs.append((f"{kind} {o.metadata.name}", d["spec"]["template"]["spec"]))
        for p in core.list_namespaced_pod(self.ns).items:
            d = self._object(when, "Pod", p)
            self.pod_specs.append((f"Pod {p.metadata.name}", d["spec"]))
            st = d.get("status") or {}
            for cs in (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or []):
                for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                    msg = (state.get("terminated") or {}).get("message")
                    if msg:
                        self.termination_messages.append(msg)
                        self.add(TERMINATION, f"[{when}] {TERMINATION} of {p.metadata.name}/{cs['name']}", msg)
        for cm in core.list_namespaced_config_map(self.ns).items:
            self._object(when, "ConfigMap", cm)
        for svc in core.list_namespaced_service(self.ns).items:
            self._object(when, "Service", svc)
        for ev in core.list_namespaced_event(self.ns).items:
            self._object(when, "Event", ev)

    def files(self, kind: str, root: Path, skip_dirs: tuple[str, ...] = ()) -> int:
        n = 0
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and not any(part in skip_dirs for part in rel.parts):
                self.add(kind, f"{kind} {rel}", path.read_bytes().decode(errors="replace"))
                n += 1
        return n


@pytest.fixture
def hf_token(api: Any, namespace: str) -> str:
    token = "hf_" + secrets.token_hex(17)
    client.CoreV1Api(api).create_namespaced_secret(
        namespace, {"metadata": {"name": HF_SECRET}, "stringData": {"token": token}}
    )
    return token


def test_no_secret_value_in_logs_events_status_or_objects(
    dev_cluster: ClusterInfo, api: Any, namespace: str, hf_token: str, tmp_path: Path
) -> None:
    info, ns = dev_cluster, namespace
    values = {"S3 access key id": info.s3_access_key, "S3 secret key": info.s3_secret_key, "HF token": hf_token}
    all_needles = [n for label, v in values.items() for n in needles(label, v)]
    _assert_scanner_finds(all_needles, values)

    assert create_store_secret(api, info, ns) == STORE_SECRET
    engines = Engines(api, ns)
    prefix = f"engines-{uuid.uuid4().hex[:8]}"
    model = upload_tiny_checkpoint(info, f"models/{uuid.uuid4().hex[:8]}")
    evidence = Evidence(api, ns)
    # Not a secret: a value that must show up wherever the build's failure is told, to prove those places are scanned.
    canary = f"canary-{secrets.token_hex(8)}"
    hf_source = {
        "huggingFace": {
            "repo": f"llmengine-tests/{canary}",
            "revision": "0123456789abcdef0123456789abcdef01234567",
            "tokenSecretRef": {"name": HF_SECRET},
        }
    }
    with run_operator(info, ns, tmp_path, {"LLMENGINE_BUILD_MAX_ATTEMPTS": "2"}) as op:
        # The Hugging Face build can not reach the Hub: it fails at fetch, is retried, and the engine is Failed.
        engines.create(engine("hf", info, model, prefix, model={"source": hf_source}, serving={"replicas": 1}))
        engines.create(engine("s3", info, model, prefix, serving={"replicas": 1}))
        engines.wait_phase("s3", "Ready", timeout=180)
        evidence.snapshot("s3 ready")
        # A spec change that rebuilds and rolls out.
        engines.patch_spec("s3", {"build": {"maxSeqLen": 2048}, "serving": {"replicas": 2}})
        engines.wait_phase("s3", "Ready", timeout=180)
        evidence.snapshot("s3 rebuilt")
        failed = engines.wait_phase("hf", "Failed", timeout=180)
        assert "fetch" in failed["status"]["build"]["lastFailure"]
        evidence.snapshot("hf failed")
        engines.delete("hf")
        engines.delete("s3")
        apps = client.AppsV1Api(api)
        wait_for("deployments gone", lambda: not apps.list_namespaced_deployment(ns).items, 60)
        wait_for("jobs gone", lambda: not jobs(api, ns), 60)
        time.sleep(2)  # let the last log lines of the deletion land
        evidence.snapshot("deleted")
        evidence.add("operator log", "operator log", op.logs())

    state = Path(info.state_dir)
    # Secret volumes are materialised under <pod>/volumes: they hold the values by design, they are no log.
    assert evidence.files(POD_FILE, state / "pods", skip_dirs=("volumes",)) > 0
    assert evidence.files("component log", state / "logs") >= 6

    # Pod specs reference the credentials, never carry them.
    refs: dict[str, set[str]] = {}
    for where, spec in evidence.pod_specs:
        for c in (spec.get("initContainers") or []) + spec["containers"]:
            for e in c.get("env") or []:
                if e["name"] in CREDENTIAL_ENV:
                    assert "value" not in e, f"{where} container {c['name']}: {e['name']} has a literal value"
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    assert ref, f"{where} container {c['name']}: {e['name']} is not a secretKeyRef"
                    refs.setdefault(e["name"], set()).add(ref["name"])
    # Not vacuous: the builds and the servers did get the credentials, from the Secrets.
    assert refs.get("HF_TOKEN") == {HF_SECRET}, refs
    assert refs.get("AWS_ACCESS_KEY_ID") == refs.get("AWS_SECRET_ACCESS_KEY") == {STORE_SECRET}, refs
    assert any(canary in m for m in evidence.termination_messages), "no termination message of the failed build"
    assert canary in json.dumps(failed["status"])
    reached = {s.kind for s in evidence.sources if any(n.text in s.text for n in needles("canary", canary))}
    assert {"LLMEngine", "Event", "ConfigMap", TERMINATION, POD_FILE} <= reached, reached
    kinds = Counter(s.kind for s in evidence.sources)
    print(f"\nscanned {len(evidence.sources)} texts, {sum(len(s.text) for s in evidence.sources)} chars: {kinds}")

    found = scan(evidence.sources, all_needles)
    assert not found, f"{len(found)} secret value(s) leaked:\n{report(found)}"
