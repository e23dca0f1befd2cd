"""Two dev clusters on one S3 server build the same engine identity at once: one engine is committed, the other
build leaves it untouched, and every serving replica on both clusters downloads and verifies that one engine,
whichever build reaches its commit first.

Each cluster (its own API server, etcd, kwok nodes, pod runner and operator, knowing nothing of the other) gets an
LLMEngine of the same identity at the same moment and runs its own build Job; the test compiler writes different
bytes on every build, so the two uploads differ and a replica that verified the wrong build's files would fail.
The builders reach the store through a relay (`CommitGate`) that holds each build's manifest PUT, the commit, until
both builds have uploaded everything and looked for a manifest, then lets them through in a planned order: cluster
A's first (B's commit must then be refused), B's first, or both in the same instant. Without the relay, which build
commits first, and whether both ever race at all, would be up to timing.

The three races run at once, each under a store prefix of its own, on two clusters shared by this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from kubernetes import client

from llmengine.api.artifacts import BuildResult, Manifest
from llmengine.dev.cluster import ClusterInfo, DevCluster
from llmengine.dev.harness import Engines, jobs, run_operator, served_digest
from llmengine.dev.runner import pod_dir, work_dir
from llmengine.dev.s3 import S3Endpoint
from llmengine.dev.seed import apply_crd, create_store_secret, engine, upload_tiny_checkpoint
from llmengine.render.common import DIGEST_ANNOTATION

CLUSTERS = ("a", "b")
# The order the relay lets the two commits through: one cluster's first, the other's once that manifest is stored;
# or both in the same instant.
ORDERS: dict[str, tuple[str, ...]] = {"a-first": ("a", "b"), "b-first": ("b", "a"), "together": ()}
HOLD_S = 240.0  # only a safety catch: a commit that waits this long for the other build goes through alone


class CommitGate:
    """An HTTP relay in front of the shared S3 server, one port per cluster. Every request passes through untouched,
    except that a PUT of an engine's manifest.json (the commit) under a store prefix given to `plan` is held until
    both clusters' builds have sent theirs, then let through in the planned order. Records, per prefix, the clusters
    in the order their commits arrived and the manifest each one sent."""

    def __init__(self, upstream: S3Endpoint) -> None:
        self.upstream_port = int(urlparse(upstream.endpoint).port or 80)
        self.s3 = upstream.client()
        self.lock = threading.Lock()
        self.plans: dict[str, tuple[str, ...]] = {}
        self.arrived: dict[str, list[str]] = {}
        self.sent: dict[str, dict[str, bytes]] = {}
        self.released: dict[str, dict[str, threading.Event]] = {}
        self.timed_out: set[str] = set()
        self.errors: list[str] = []
        self.socks: list[socket.socket] = []
        self.ports: dict[str, int] = {}
        for front in CLUSTERS:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            self.ports[front] = listener.getsockname()[1]
            self.socks.append(listener)
            threading.Thread(target=self._accept, args=(listener, front), daemon=True).start()

    def endpoint(self, front: str) -> str:
        return f"http://127.0.0.1:{self.ports[front]}"

    def plan(self, prefix: str, order: tuple[str, ...]) -> None:
        with self.lock:
            self.plans[prefix] = order
            self.arrived[prefix], self.sent[prefix] = [], {}
            self.released[prefix] = {f: threading.Event() for f in CLUSTERS}

    def close(self) -> None:
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket, front: str) -> None:
        while True:
            try:
                conn, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            with self.lock:
                self.socks += [conn, upstream]
            threading.Thread(target=self._requests, args=(conn, upstream, front), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(256 * 1024):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _requests(self, conn: socket.socket, upstream: socket.socket, front: str) -> None:
        """Client to server, one HTTP/1.1 request at a time (boto3 does not pipeline): the head, then the
        Content-Length bytes of the body."""
        buf = b""
        with contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(256 * 1024)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                if "chunked" in headers.get("transfer-encoding", ""):
                    self.errors.append(f"{method} {target}: a chunked body (the relay reads Content-Length ones)")
                    return
                left = int(headers.get("content-length", "0"))
                path = unquote(target.split("?")[0])
                prefix = self._hold(front, path) if method == "PUT" and path.endswith("/manifest.json") else None
                upstream.sendall(head + b"\r\n\r\n")
                body = bytearray()
                while left > 0:
                    if not buf:
                        buf = conn.recv(min(left, 256 * 1024))
                        if not buf:
                            return
                    chunk, buf = buf[:left], buf[left:]
                    upstream.sendall(chunk)
                    left -= len(chunk)
                    if prefix is not None:
                        body += chunk
                if prefix is not None:
                    with self.lock:
                        self.sent[prefix].setdefault(front, bytes(body))

    def _hold(self, front: str, path: str) -> str | None:
        """Wait until this commit may go; the store prefix it belongs to, when planned."""
        parts = path.strip("/").split("/")  # bucket, prefix, digest, manifest.json
        prefix = parts[1] if len(parts) == 4 else ""
        with self.lock:
            if prefix not in self.plans:
                return None
            release = self.released[prefix][front]
            if release.is_set():
                return prefix  # a retried write: the order is settled
            self.arrived[prefix].append(front)
            both = len(set(self.arrived[prefix])) == len(CLUSTERS)
        if both:
            threading.Thread(target=self._release, args=(prefix, path.strip("/").split("/", 1)), daemon=True).start()
        if not release.wait(HOLD_S):
            with self.lock:
                self.timed_out.add(prefix)
            release.set()
        return prefix

    def _release(self, prefix: str, bucket_key: list[str]) -> None:
        bucket, key = bucket_key
        order, events = self.plans[prefix], self.released[prefix]
        if not order:
            for ev in events.values():
                ev.set()
            return
        first, second = order
        events[first].set()
        deadline = time.monotonic() + HOLD_S
        while time.monotonic() < deadline and not self._stored(bucket, key):
            time.sleep(0.05)
        events[second].set()

    def _stored(self, bucket: str, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
        except Exception:
            return False
        return True


@dataclass
class Race:
    """What one race left behind, gathered once both clusters serve."""

    order: tuple[str, ...]
    prefix: str
    status: dict[str, dict[str, Any]] = field(default_factory=dict)  # cluster -> LLMEngine status
    served: dict[str, str] = field(default_factory=dict)  # cluster -> the digest its Deployment serves
    reports: dict[str, list[BuildResult | None]] = field(default_factory=dict)  # cluster -> its build pods' results
    replicas: dict[str, list[tuple[str, bool, Path]]] = field(default_factory=dict)  # (pod, ready, engine dir)
    arrived: list[str] = field(default_factory=list)
    sent: dict[str, bytes] = field(default_factory=dict)
    timed_out: bool = False
    relay_errors: list[str] = field(default_factory=list)
    stored_manifest: bytes = b""
    objects: dict[str, int] = field(default_factory=dict)  # key under the engine's prefix -> size
    hashes: dict[str, str] = field(default_factory=dict)  # key -> SHA-256 of the stored bytes


@dataclass
class Side:
    """One cluster as the races use it."""

    name: str
    cluster: DevCluster
    info: ClusterInfo
    api: Any
    ns: str


@pytest.fixture(scope="module")
def races(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Race], str]]:
    """Both clusters, then the three races at once; each race's record and, for failure messages, the logs."""
    root = tmp_path_factory.mktemp("shared-store")
    logs = root / "operator-logs"
    logs.mkdir()
    first = DevCluster(f"shared-a-{os.getpid()}", root / "a", restart_backoff_s=2.0)
    clusters = [first]
    gate: CommitGate | None = None
    try:
        info_a = first.up()
        second = DevCluster(f"shared-b-{os.getpid()}", root / "b", restart_backoff_s=2.0, s3=info_a.s3())
        clusters.append(second)
        info_b = second.up()
        gate = CommitGate(info_a.s3())
        model = upload_tiny_checkpoint(info_a, f"models/{uuid.uuid4().hex[:8]}")
        sides = [_side(name, c, i) for name, c, i in zip(CLUSTERS, clusters, (info_a, info_b), strict=True)]
        with run_operator(sides[0].info, sides[0].ns, logs), run_operator(sides[1].info, sides[1].ns, logs):
            found = _run_races(gate, sides, model)
    except BaseException:
        print(_logs(clusters, logs))  # pytest shows it with the error
        raise
    else:
        yield found, _logs(clusters, logs)
    finally:
        if gate is not None:
            gate.close()
        for c in reversed(clusters):
            c.down(quiet=True)


def _side(name: str, cluster: DevCluster, info: ClusterInfo) -> Side:
    from kubernetes import config

    api = config.new_client_from_config(config_file=info.kubeconfig)
    apply_crd(api)
    ns = f"race-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
    create_store_secret(api, info, ns)
    return Side(name, cluster, info, api, ns)


def _run_races(gate: CommitGate, sides: list[Side], model: str) -> dict[str, Race]:
    found: dict[str, Race] = {}
    for case, order in ORDERS.items():
        prefix = f"race-{case}-{uuid.uuid4().hex[:6]}"
        gate.plan(prefix, order)
        found[case] = Race(order, prefix)
    # One identity per race (its own maxSeqLen), the same on both clusters, all created together. Only the store
    # endpoint (each cluster's relay port) differs between the clusters: the store is not part of the identity.
    bodies = [
        (
            side,
            engine(
                case,
                side.info,
                model,
                race.prefix,
                build={"maxSeqLen": 768 + 256 * i},
                store={"endpoint": gate.endpoint(side.name)},
            ),
        )
        for i, (case, race) in enumerate(found.items())
        for side in sides
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        for done in [pool.submit(Engines(s.api, s.ns).create, b) for s, b in bodies]:
            done.result()
    for case, race in found.items():
        for side in sides:
            obj = Engines(side.api, side.ns).wait_phase(case, "Ready", timeout=240)
            race.status[side.name] = obj["status"]
            race.served[side.name] = served_digest(side.api, side.ns, case)
            race.reports[side.name] = _build_reports(side, obj["status"]["desiredEngine"]["digest"])
            race.replicas[side.name] = _replicas(side, obj["status"]["selector"])
        _gather_store(gate, sides[0].info, race)
    return found


def _build_reports(side: Side, digest: str) -> list[BuildResult | None]:
    """The BuildResult each build pod of this engine left as its termination message."""
    core = client.CoreV1Api(side.api)
    out: list[BuildResult | None] = []
    for job in jobs(side.api, side.ns):
        if (job.metadata.annotations or {}).get(DIGEST_ANNOTATION) != digest:
            continue
        for pod in core.list_namespaced_pod(side.ns, label_selector=f"job-name={job.metadata.name}").items:
            for cs in pod.status.container_statuses or []:
                term = cs.state.terminated if cs.state else None
                out.append(BuildResult.parse(term.message) if term and term.message else None)
    return out


def _replicas(side: Side, selector: str) -> list[tuple[str, bool, Path]]:
    """Each serving pod: its name, whether it is Ready, and where the pod runner put its engine volume."""
    pods = client.CoreV1Api(side.api).list_namespaced_pod(side.ns, label_selector=selector).items
    work = work_dir(side.cluster.dir)
    out = []
    for p in pods:
        ready = any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        md = {"metadata": {"namespace": p.metadata.namespace, "name": p.metadata.name, "uid": p.metadata.uid}}
        out.append((p.metadata.name, ready, pod_dir(work, md) / "volumes" / "engine"))
    return out


def _gather_store(gate: CommitGate, info: ClusterInfo, race: Race) -> None:
    digest = race.status["a"]["desiredEngine"]["digest"]
    s3 = info.s3().client()
    base = f"{race.prefix}/{digest}/"
    race.stored_manifest = s3.get_object(Bucket=info.s3_bucket, Key=base + "manifest.json")["Body"].read()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=info.s3_bucket, Prefix=base):
        for obj in page.get("Contents", []):
            key = obj["Key"][len(base) :]
            race.objects[key] = obj["Size"]
            body = s3.get_object(Bucket=info.s3_bucket, Key=obj["Key"])["Body"].read()
            race.hashes[key] = hashlib.sha256(body).hexdigest()
    with gate.lock:
        race.arrived = list(gate.arrived[race.prefix])
        race.sent = dict(gate.sent[race.prefix])
        race.timed_out = race.prefix in gate.timed_out
        race.relay_errors = list(gate.errors)


def _logs(clusters: list[DevCluster], operator_logs: Path, lines: int = 30) -> str:
    out = []
    for c in clusters:
        for comp, path in c.logs().items():
            out.append(
                f"----- {c.name} {comp} -----\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            )
        for log in sorted((c.dir / "pods").glob("*/*.log")):
            if "-build-" in log.parent.name or "fetch" in log.name:
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"----- {c.name} pod {log.parent.name}/{log.name} -----\n" + "\n".join(tail))
    for log in sorted(operator_logs.glob("*.log")):
        out.append(f"----- {log.name} -----\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


def _build_id(manifest: bytes) -> str:
    build_id = Manifest.model_validate_json(manifest).build_id
    assert build_id
    return build_id


@pytest.mark.parametrize("case", list(ORDERS))
def test_two_clusters_building_one_identity_commit_one_engine_every_replica_verifies(
    races: tuple[dict[str, Race], str], case: str
) -> None:
    found, logs = races
    race = found[case]
    context = f"race {case}: {json.dumps({'arrived': race.arrived, 'objects': race.objects}, indent=1)}\n{logs}"

    # Both builds uploaded, looked for a manifest, found none and sent their commit: a real race, not a build that
    # saw the other's engine before it started.
    assert not race.relay_errors, race.relay_errors
    assert sorted(race.arrived) == sorted(CLUSTERS) and not race.timed_out, context
    assert set(race.sent) == set(CLUSTERS), context
    manifests = {c: Manifest.model_validate_json(body) for c, body in race.sent.items()}
    ids = {c: _build_id(body) for c, body in race.sent.items()}
    assert ids["a"] != ids["b"], context
    # The test compiler wrote different bytes on each cluster: verifying against the wrong build would fail.
    rank = {c: {f.path: f.sha256 for f in m.files}["rank0.engine"] for c, m in manifests.items()}
    assert rank["a"] != rank["b"], context

    # Exactly one commit: the manifest stored is, byte for byte, the one the first commit let through sent.
    stored = Manifest.model_validate_json(race.stored_manifest)
    assert stored.build_id in ids.values(), context
    winner = race.order[0] if race.order else next(c for c in CLUSTERS if ids[c] == stored.build_id)
    loser = next(c for c in CLUSTERS if c != winner)
    assert race.stored_manifest == race.sent[winner], context
    assert stored.build_id == ids[winner] and stored.files_prefix == f"builds/{ids[winner]}/", context

    # No torn state: every file the manifest lists is stored with its size and SHA-256; no other build's files are
    # listed; the losing build's directory is gone (its builder removes it, docs/store.md).
    for f in stored.files:
        key = stored.files_prefix + f.path
        assert (race.objects.get(key), race.hashes.get(key)) == (f.size, f.sha256), f"{key}\n{context}"
    builds = {k.split("/")[1] for k in race.objects if k.startswith("builds/")}
    assert builds == {ids[winner]}, context
    assert not any(k.startswith(f"builds/{ids[loser]}/") for k in race.objects), context

    # Each builder says what happened: the winner committed, the loser found the winner's commit and kept it.
    (won,) = race.reports[winner]
    (lost,) = race.reports[loser]
    assert won is not None and won.succeeded and won.message is not None, context
    assert won.message.startswith("built and committed"), won.message
    assert lost is not None and lost.succeeded, context
    assert lost.message == f"built, but build {ids[winner]} committed this engine first; it stands", lost.message

    # Both clusters serve the one committed engine: Ready, the same desired digest, and every replica's engine
    # directory holds exactly the committed files, verified by their SHA-256.
    digest = race.status["a"]["desiredEngine"]["digest"]
    assert stored.engine_digest == digest, context
    for c in CLUSTERS:
        st = race.status[c]
        assert st["phase"] == "Ready" and st["desiredEngine"]["digest"] == digest, f"{c}: {st}"
        assert st["servingEngine"]["digest"] == digest and race.served[c] == digest, f"{c}: {st}"
        built = next(x for x in st["conditions"] if x["type"] == "EngineBuilt")
        assert (built["status"], built["reason"]) == ("True", "BuildSucceeded"), f"{c}: {built}"
        replicas = race.replicas[c]
        assert len(replicas) == 2 and all(ready for _, ready, _ in replicas), f"{c}: {replicas}"
        for pod, _, engine_dir in replicas:
            assert (engine_dir / "manifest.json").read_bytes() == race.stored_manifest, f"{c}/{pod}"
            local = {p.relative_to(engine_dir).as_posix() for p in engine_dir.rglob("*") if p.is_file()}
            assert local == {f.path for f in stored.files} | {"manifest.json"}, f"{c}/{pod}: {sorted(local)}"
            for f in stored.files:
                data = (engine_dir / f.path).read_bytes()
                assert (len(data), hashlib.sha256(data).hexdigest()) == (f.size, f.sha256), f"{c}/{pod}: {f.path}"
