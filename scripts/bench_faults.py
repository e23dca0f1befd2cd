"""Fault injection over engine lifecycles on a dev cluster: duplicate builds, engines served without a committed
manifest and resources stuck must all be zero, and every engine must be Ready again after its fault.

Each lifecycle creates an LLMEngine with an identity of its own (maxSeqLen, maxBatchSize), every --rebuild-every'th
changes maxSeqLen once Ready (a rebuild and a rollout), injects one fault while it progresses, waits until it is
Ready again, then deletes it and waits until its children are gone. Faults, round-robin in an order shuffled by
--seed:

- operator-kill9:     SIGKILL the operator after a random 0-5 s, start it again 0.2-3 s later
- s3-mid-upload:      SIGKILL + restart the S3 server once a build pod of the engine has logged "upload started"
                      and 15-60% of the engine's bytes have reached the server
- s3-mid-download:    the same while a serving pod's init container downloads the engine (bytes received)
- apiserver-restart:  restart kube-apiserver after a random 0-5 s (SIGTERM or SIGKILL, drawn or --restarts)
- etcd-restart:       restart etcd, same data, after a random 0-5 s (likewise)

The dev pod runner plays the kubelet: a failed init container runs again after a back-off (--restart-backoff,
10 s doubling as a kubelet's crash loop), and its API calls are retried while the API server is away. The summary
counts the restarts it needed.

The run has its own dev cluster and operator (the test compiler). Prints a JSON summary; exits 1 when a count that
must be zero is not, keeping the stopped cluster's state directory (logs, pod logs, S3 data) for a post-mortem.
docs/reliability.md explains the counts.

    .venv/bin/python scripts/bench_faults.py --lifecycles 30 --seed 1      # make bench-faults
"""

from __future__ import annotations

# ruff: noqa: E402 - this file's folder goes on sys.path first, for benchlib (tests load this file by path)
import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

import benchlib as bl
from llmengine import GROUP, PLURAL, VERSION
from llmengine.api.artifacts import StoreLocation
from llmengine.clients.store import (
    MANIFEST_NAME,
    EngineStore,
    IntegrityError,
    ManifestInvalid,
    S3Config,
    StoreError,
    make_s3_client,
)
from llmengine.dev import proc
from llmengine.dev.cluster import ClusterInfo, DevCluster
from llmengine.dev.harness import run_operator
from llmengine.dev.runner import API_RETRY, POD_FILE
from llmengine.dev.runner import RESTARTS as RUNNER_RESTARTS
from llmengine.dev.seed import apply_crd, create_store_secret, engine, upload_tiny_checkpoint
from llmengine.render.common import ATTEMPT_ANNOTATION, DIGEST_ANNOTATION, ENGINE_LABEL

FAULTS = ("operator-kill9", "s3-mid-upload", "s3-mid-download", "apiserver-restart", "etcd-restart")
MiB = 1024 * 1024


def now() -> float:
    return time.time()


def parse_ts(s: str | None) -> float | None:
    if not s:
        return None
    try:
        return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def retry(what: str, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Call fn until it stops raising connection-level errors (the API server may be restarting right now)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except ApiException as e:
            if e.status is not None and e.status < 500 and e.status != 429:
                raise
            err: Exception = e
        except Exception as e:  # urllib3 / connection refused while a component restarts
            err = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: still failing after {timeout:.0f}s: {err}") from err
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------------------
# What the API showed: every Job, every (Deployment, digest) and every Ready serving pod, watched all run long


@dataclass
class JobSeen:
    uid: str
    name: str
    digest: str
    attempt: str
    created: float | None
    first_seen: float
    outcome: str = "active"


@dataclass
class Recorder:
    """Watches Jobs, Deployments and serving pods in the namespace, each from its own thread (list, then watch from
    that resourceVersion; after an API server or etcd restart, list and watch again), so that no Job, no engine a
    Deployment served and no pod that was Ready slips between two looks. Times are taken when an event arrives:
    the object was in that state no later than that."""

    api: Any
    ns: str
    store: EngineStore
    jobs: dict[str, JobSeen] = field(default_factory=dict)
    # (deployment, digest) -> wall time first seen serving it (in the pod template)
    served: dict[tuple[str, str], float] = field(default_factory=dict)
    # pod uid -> (pod name, digest, first seen Ready)
    ready_pods: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    # Deployments whose engine had no manifest when asked right after the Deployment was seen serving it
    uncommitted: list[dict[str, Any]] = field(default_factory=list)
    # serving pod uid -> init-container restarts the pod runner made (a kubelet's crash loop)
    init_restarts: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # lists and watches that failed (restarts) or expired, then started again

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str]] = []  # (deployment, digest) whose manifest is still to be checked
        batch, apps, core = client.BatchV1Api(self.api), client.AppsV1Api(self.api), client.CoreV1Api(self.api)
        sel = "app.kubernetes.io/component=server"
        self._threads = [
            threading.Thread(target=self._watch, args=(batch.list_namespaced_job, {}, self._job), daemon=True),
            threading.Thread(
                target=self._watch, args=(apps.list_namespaced_deployment, {}, self._deployment), daemon=True
            ),
            threading.Thread(
                target=self._watch, args=(core.list_namespaced_pod, {"label_selector": sel}, self._pod), daemon=True
            ),
            threading.Thread(target=self._check_manifests, daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _watch(self, list_fn: Any, kwargs: dict[str, Any], on: Callable[[Any], None]) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                listed = list_fn(self.ns, _request_timeout=10, **kwargs)
                for obj in listed.items:
                    on(obj)
                w = watch.Watch()
                stream = w.stream(
                    list_fn,
                    self.ns,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=5,
                    _request_timeout=15,
                    **kwargs,
                )
                for ev in stream:
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        on(ev["object"])
                    if self._stop.is_set():
                        w.stop()
            except Exception:
                self.errors += 1  # the API server or etcd is restarting, or the watch expired: list again
                self._stop.wait(0.3)

    def _job(self, j: Any) -> None:
        md = j.metadata
        ann = md.annotations or {}
        created = md.creation_timestamp.timestamp() if md.creation_timestamp else None
        seen = self.jobs.setdefault(
            md.uid,
            JobSeen(md.uid, md.name, ann.get(DIGEST_ANNOTATION, ""), ann.get(ATTEMPT_ANNOTATION, ""), created, now()),
        )
        for c in (j.status.conditions or []) if j.status else []:
            if c.status == "True" and c.type in ("Complete", "Failed"):
                seen.outcome = c.type

    def _deployment(self, d: Any) -> None:
        digest = (d.spec.template.metadata.annotations or {}).get(DIGEST_ANNOTATION)
        if not digest:
            return
        key = (str(d.metadata.name), str(digest))
        if key not in self.served:
            self.served[key] = now()
            with self._lock:
                self._pending.append(key)

    def _pod(self, p: Any) -> None:
        t = now()
        ready = any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
        digest = (p.metadata.annotations or {}).get(DIGEST_ANNOTATION, "")
        if ready and p.metadata.uid not in self.ready_pods:
            self.ready_pods[p.metadata.uid] = (p.metadata.name, digest, t)
        restarts = int((p.metadata.annotations or {}).get(RUNNER_RESTARTS) or 0)
        if restarts:
            self.init_restarts[p.metadata.uid] = max(restarts, self.init_restarts.get(p.metadata.uid, 0))

    def _check_manifests(self) -> None:
        """A manifest is never deleted: absent now, after the Deployment was seen serving its engine, means the
        Deployment served it uncommitted. Checks that S3 cannot answer yet (it may be restarting) are retried."""
        while not (self._stop.is_set() and not self._pending):
            with self._lock:
                pending, self._pending = self._pending, []
            for dep, digest in pending:
                try:
                    present = self.store.get_manifest(digest) is not None
                except (ManifestInvalid, IntegrityError):
                    present = False
                except StoreError:
                    with self._lock:
                        self._pending.append((dep, digest))
                    continue
                if not present:
                    self.uncommitted.append(
                        {"deployment": dep, "digest": digest[:12], "why": "no committed manifest when it was served"}
                    )
            self._stop.wait(0.1)


# ---------------------------------------------------------------------------------------------------------------
# What the pods wrote: the pod runner keeps every container's log under <cluster>/pods/<ns>_<pod>_<uid8>/


def read_events(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict):
                out.append(doc)
    return out


@dataclass
class BuildRun:
    pod_dir: str
    digest: str
    start: float
    end: float
    outcome: str  # succeeded | noop (already committed) | failed | unfinished
    commit: float | None  # "upload committed"
    error: str | None = None
    job_uid: str | None = None  # the UID of the Job that made the pod (its controller-uid label), when recorded


def build_runs(pods_dir: Path, ns: str) -> list[BuildRun]:
    runs = []
    for log in sorted(pods_dir.glob(f"{ns}_llme-build-*/build.log")):
        ev = read_events(log)
        started = next((e for e in ev if e.get("event") == "build started"), None)
        if started is None:
            continue
        times = [t for t in (parse_ts(e.get("timestamp")) for e in ev) if t is not None]
        names = [e.get("event") for e in ev]
        failed = next((e for e in ev if e.get("event") == "build failed"), None)
        commit = next((e for e in ev if e.get("event") == "upload committed"), None)
        if "engine already committed; nothing to do" in names:
            outcome = "noop"
        elif "build succeeded" in names:
            outcome = "succeeded"
        elif failed is not None:
            outcome = "failed"
        else:
            outcome = "unfinished"
        runs.append(
            BuildRun(
                pod_dir=log.parent.name,
                digest=str(started.get("engine_digest")),
                start=parse_ts(started.get("timestamp")) or 0.0,
                end=max(times) if times else 0.0,
                outcome=outcome,
                commit=parse_ts(commit.get("timestamp")) if commit else None,
                error=f"{failed.get('stage')}: {failed.get('error')}" if failed else None,
                job_uid=job_uid(log.parent),
            )
        )
    return runs


def job_uid(pod_dir: Path) -> str | None:
    """The UID of the Job that made the pod in `pod_dir`, from what the pod runner recorded of it."""
    try:
        identity = json.loads((pod_dir / POD_FILE).read_text())
    except (OSError, ValueError):
        return None
    uid = (identity.get("labels") or {}).get("batch.kubernetes.io/controller-uid")
    return str(uid) if uid else None


def judge_builds(
    runs: list[BuildRun],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Split the builder runs of each identity into duplicates, legitimate retries and repeats of one Job's pod.

    The first run of a digest is the build. A later run is a legitimate retry when every earlier run of the same
    digest had ended (its last log line is older than the new run's first) without committing the engine. It is a
    duplicate when an earlier run was still running (two builders of one identity at once) or had already
    committed the engine (a rebuild of something the store holds: the operator should have taken the store hit).

    One exception, a *repeat*: a run that started after a run of the same Job (the same Job UID) committed and after
    every earlier run had ended, and that found the manifest and did nothing. Kubernetes' Job controller may start the
    same program twice, also with parallelism 1 and completions 1 (its documentation says so;
    kubernetes/kubernetes#130103 shows how, when its cache lags), which the operator does not control; the builder's
    check of the store makes it harmless. A repeat that did anything but find the manifest, or one by another Job,
    stays a duplicate.
    """
    dups, retries, repeats = [], [], []
    by_digest: dict[str, list[BuildRun]] = {}
    for r in runs:
        by_digest.setdefault(r.digest, []).append(r)
    for digest, rs in by_digest.items():
        rs.sort(key=lambda r: r.start)
        for k, r in enumerate(rs[1:], start=1):
            earlier = rs[:k]
            committed = [p for p in earlier if p.commit is not None and p.commit <= r.start]
            overlapping = [p for p in earlier if p.end > r.start]
            if committed and not overlapping and r.outcome == "noop" and r.job_uid is not None:
                by_same_job = [p for p in committed if p.job_uid == r.job_uid]
                if by_same_job:
                    repeats.append({"digest": digest[:12], "run": r.pod_dir, "committed_by": by_same_job[0].pod_dir})
                    continue
            if committed or overlapping:
                why = "after-commit" if committed else "concurrent"
                dups.append({"digest": digest[:12], "run": r.pod_dir, "why": why, "outcome": r.outcome})
            else:
                prev = earlier[-1]
                retries.append({"digest": digest[:12], "run": r.pod_dir, "after": prev.outcome, "error": prev.error})
    return dups, retries, repeats


# ---------------------------------------------------------------------------------------------------------------
# Faults


@dataclass
class FaultRecord:
    lifecycle: int
    engine: str
    kind: str
    phase: str  # build or rebuild: which part of the lifecycle it was aimed at
    hard: bool
    injected_at: float = 0.0
    hit: bool | None = None  # for transfers: whether the transfer was still running when S3 died
    bytes_moved: float | None = None  # for transfers: share of the engine's bytes sent or received at the kill
    note: str = ""
    engine_phase: str | None = None  # the engine's status.phase just before the fault
    component_down_s: float = 0.0
    ready_after_s: float | None = None  # from the injection until the engine is Ready again


class Bench:
    def __init__(
        self,
        cluster: DevCluster,
        info: ClusterInfo,
        ns: str,
        model_uri: str,
        prefix: str,
        operator: Any,
        rng: random.Random,
        ready_timeout: float,
        replicas: int,
        s3_down_max: float,
        delete: bool = True,
        engine_bytes: int = 64 * MiB,
    ) -> None:
        self.cluster, self.info, self.ns = cluster, info, ns
        self.s3_down_max = s3_down_max
        self.delete = delete
        self.engine_bytes = engine_bytes
        self.kept: set[str] = set()  # Ready engines left in place (delete=False)
        self.model_uri, self.prefix = model_uri, prefix
        self.operator = operator
        self.rng = rng
        self.ready_timeout = ready_timeout
        self.replicas = replicas
        self.api = config.new_client_from_config(config_file=info.kubeconfig)
        self.co = client.CustomObjectsApi(self.api)
        self.pods_dir = cluster.dir / "pods"
        # One fault at a time per component (a restart must not overlap a restart of the same process); faults
        # of different components may overlap when lifecycles run in parallel.
        self.locks = {c: threading.Lock() for c in ("operator", "s3", "kube-apiserver", "etcd")}
        self.rng_lock = threading.Lock()
        self.faults: list[FaultRecord] = []
        self.stuck: list[dict[str, Any]] = []
        self.lifecycle_seconds: list[float] = []
        self.lifecycles: list[dict[str, Any]] = []
        # engine -> what was seen the first time its status said Ready before its pods were
        self.ready_early: dict[str, dict[str, Any]] = {}

    # ---- engines ----------------------------------------------------------------------------------------------
    def body(self, i: int, seq_offset: int = 0) -> dict[str, Any]:
        return engine(
            f"e{i:03d}",
            self.info,
            self.model_uri,
            self.prefix,
            build={"maxSeqLen": 1024 + 32 * i + seq_offset, "maxBatchSize": (4, 8, 16)[i % 3]},
            serving={"replicas": self.replicas},
        )

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.co.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, _request_timeout=5))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def create(self, body: dict[str, Any]) -> None:
        def go() -> None:
            try:
                self.co.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body, _request_timeout=10)
            except ApiException as e:
                if e.status != 409:  # a retry after a lost response
                    raise

        retry(f"create {body['metadata']['name']}", go)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        retry(
            f"patch {name}",
            lambda: self.co.patch_namespaced_custom_object(
                GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec}, _request_timeout=10
            ),
        )

    def desired_digest(self, name: str, timeout: float = 60.0) -> str | None:
        """The digest the operator planned for the current generation."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                obj = self.get(name)
                st = (obj or {}).get("status") or {}
                if obj and st.get("observedGeneration") == obj["metadata"]["generation"]:
                    digest = (st.get("desiredEngine") or {}).get("digest")
                    if digest:
                        return str(digest)
            time.sleep(0.2)
        return None

    def is_ready(self, name: str) -> bool:
        """Ready as the status says (this generation, serving the desired engine) and as the pods say: as many
        Ready serving pods of the desired engine as replicas wanted. A status that says Ready before the pods do is
        recorded (ready_before_rollout) and not taken for Ready."""
        obj = self.get(name)
        if obj is None:
            return False
        st = obj.get("status") or {}
        desired = (st.get("desiredEngine") or {}).get("digest")
        says_ready = (
            st.get("phase") == "Ready"
            and st.get("observedGeneration") == obj["metadata"]["generation"]
            and (st.get("servingEngine") or {}).get("digest") == desired
        )
        if not says_ready:
            return False
        pods = client.CoreV1Api(self.api).list_namespaced_pod(
            self.ns, label_selector=f"{ENGINE_LABEL}={name}", _request_timeout=5
        )
        serving = [
            p.metadata.name
            for p in pods.items
            if (p.metadata.annotations or {}).get(DIGEST_ANNOTATION) == desired
            and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
        ]
        wanted = int(((obj.get("spec") or {}).get("serving") or {}).get("replicas", 1))
        if len(serving) >= wanted:
            return True
        if name not in self.ready_early:
            self.ready_early[name] = {
                "engine": name,
                "generation": obj["metadata"]["generation"],
                "digest": str(desired)[:12],
                "ready_pods_of_that_engine": len(serving),
                "replicas": wanted,
                "status_message": st.get("message"),
                "pods": {
                    p.metadata.name: (p.metadata.annotations or {}).get(DIGEST_ANNOTATION, "")[:12]
                    + (
                        " Ready"
                        if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
                        else " not Ready"
                    )
                    for p in pods.items
                },
            }
        return False

    def wait_ready(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.is_ready(name):
                    return True
            time.sleep(0.5)
        return False

    def delete_and_wait_gone(self, name: str, timeout: float) -> str | None:
        """Delete the engine; None when it and its children are gone in time, else what is left."""

        def go() -> None:
            try:
                self.co.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, _request_timeout=10)
            except ApiException as e:
                if e.status != 404:
                    raise

        retry(f"delete {name}", go)
        apps, core = client.AppsV1Api(self.api), client.CoreV1Api(self.api)
        deadline = time.monotonic() + timeout
        left = "?"
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                cr = self.get(name) is not None
                dep = any(d.metadata.name == f"llme-{name}" for d in apps.list_namespaced_deployment(self.ns).items)
                pods = [
                    p.metadata.name
                    for p in core.list_namespaced_pod(self.ns).items
                    if p.metadata.name.startswith(f"llme-{name}-")
                ]
                if not (cr or dep or pods):
                    return None
                left = f"engine={cr} deployment={dep} pods={pods}"
            time.sleep(0.5)
        return left

    # ---- triggers ---------------------------------------------------------------------------------------------
    def wait_transfer(self, pattern: str, logname: str, started: str, done: str, timeout: float) -> Path | None:
        """The first pod log (runner's pods dir) matching `pattern` that logs `started`, ignoring logs whose
        transfer had already finished when the wait began (the old ReplicaSet's pod, an earlier build). Whether
        the transfer is still running when S3 dies is judged afterwards, from the log's timestamps."""

        def logs() -> list[Path]:
            return list(self.pods_dir.glob(f"{self.ns}_{pattern}/{logname}"))

        before = {log for log in logs() if done in log.read_text(errors="replace")}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for log in logs():
                if log not in before and started in log.read_text(errors="replace"):
                    return log
            time.sleep(0.005)
        return None

    # ---- one fault --------------------------------------------------------------------------------------------
    def phase_now(self, name: str) -> str | None:
        obj = self.get_quiet(name)
        return str(((obj or {}).get("status") or {}).get("phase")) if obj else None

    def inject(self, f: FaultRecord, digest: str | None) -> None:
        name = f.engine
        if f.kind == "operator-kill9":
            with self.rng_lock:
                delay, down = self.rng.uniform(0.0, 5.0), self.rng.uniform(0.2, 3.0)
            time.sleep(delay)
            with self.locks["operator"]:
                f.engine_phase = self.phase_now(name)
                f.injected_at = now()
                self.operator.kill9()
                time.sleep(down)
                self.operator.restart()
                f.component_down_s = round(now() - f.injected_at, 2)
                f.note = f"after {delay:.1f}s, down {down:.1f}s"
        elif f.kind in ("apiserver-restart", "etcd-restart"):
            with self.rng_lock:
                delay = self.rng.uniform(0.0, 5.0)
            time.sleep(delay)
            comp = "kube-apiserver" if f.kind == "apiserver-restart" else "etcd"
            with self.locks[comp]:
                f.engine_phase = self.phase_now(name)
                f.injected_at = now()
                self.cluster.restart(comp, hard=f.hard)
                # Back when the API server answers again (after etcd, it needs a moment to reconnect).
                retry("API server after restart", lambda: client.CoreV1Api(self.api).list_namespace(_request_timeout=3))
                f.component_down_s = round(now() - f.injected_at, 2)
                f.note = f"after {delay:.1f}s"
        elif f.kind == "s3-mid-upload":
            pattern = f"llme-build-{digest[:12]}-*" if digest else "llme-build-*"
            log = self.wait_transfer(pattern, "build.log", '"upload started"', '"upload committed"', 120)
            self._s3_crash(f, log, '"upload committed"', "wchar")
        elif f.kind == "s3-mid-download":
            log = self.wait_transfer(
                f"llme-{name}-*", "fetch-engine.log", '"download started"', '"download verified"', 120
            )
            self._s3_crash(f, log, '"download verified"', "rchar")

    def _server_io(self, field: str) -> Callable[[], int]:
        """Bytes the S3 server has written (`wchar`: an upload lands in its data directory) or read (`rchar`: a
        download is read from it, sendfile included) since now, from /proc/<pid>/io. Not the client's own
        counters: Linux counts socket sends in none of them, and a download's partial files have all their blocks
        from the start (allocated ahead). Other transfers at the same time count too, which only moves the crash a
        little earlier in this one. The server's PID is looked up on every read: another fault may have restarted
        it since."""

        def counter() -> tuple[int | None, int]:
            pid = proc.running(self.cluster.dir, "s3")
            try:
                text = Path(f"/proc/{pid}/io").read_text() if pid else ""
                return pid, int(dict(line.split(": ") for line in text.splitlines())[field])
            except (OSError, KeyError, ValueError):
                return None, 0

        first_pid, first_base = counter()
        seen = {"pid": first_pid, "base": first_base}

        def moved() -> int:
            pid, now_n = counter()
            if pid is None:
                return 0
            if pid != seen["pid"]:  # a new server process: count from its start
                seen["pid"], seen["base"] = pid, 0
            return now_n - (seen["base"] or 0)

        return moved

    def _s3_crash(self, f: FaultRecord, log: Path | None, done: str, counter: str) -> None:
        """Crash S3 once a random share (15-60%) of the engine's bytes has moved: in the middle of the bodies,
        not before the first request (which the client's own retries would absorb). The bytes are the server's
        `counter` (_server_io), counted from once this fault holds S3 (no other S3 fault can restart it
        meanwhile)."""
        with self.rng_lock:
            down = self.rng.uniform(0.0, self.s3_down_max)
            share = self.rng.uniform(0.15, 0.6)
        with self.locks["s3"]:
            f.engine_phase = self.phase_now(f.engine)  # read as the wait for the transfer's share begins
            if log is not None:
                moved = self._server_io(counter)
                deadline = time.monotonic() + 60
                while moved() < share * self.engine_bytes and time.monotonic() < deadline:
                    if done in log.read_text(errors="replace"):
                        break  # finished (or failed) before the share moved: too late
                    time.sleep(0.002)
                f.bytes_moved = round(max(0, moved()) / self.engine_bytes, 2)
            f.injected_at = now()
            self.cluster.restart("s3", hard=True, down_s=down)
            f.component_down_s = round(now() - f.injected_at, 2)
        if log is None:
            f.hit, f.note = False, "transfer not seen in time; S3 restarted anyway"
            return
        # Did the transfer finish before the kill landed? (A failed transfer never logs `done`.)
        text = log.read_text(errors="replace")
        lines = [json.loads(x) for x in text.splitlines() if done in x and x.startswith("{")]
        finished = parse_ts(lines[0].get("timestamp")) if lines else None
        f.hit = finished is None or finished > f.injected_at
        f.note = log.parent.name

    # ---- one lifecycle ----------------------------------------------------------------------------------------
    def lifecycle(self, i: int, kind: str, rebuild: bool, hard: bool) -> None:
        t0 = time.monotonic()
        name = f"e{i:03d}"
        f = FaultRecord(i, name, kind, "rebuild" if rebuild else "build", hard)
        self.create(self.body(i))
        if rebuild:
            if not self.wait_ready(name, self.ready_timeout):
                self.stuck.append({"engine": name, "what": "not Ready before the rebuild (no fault injected)"})
                return
            self.patch_spec(name, {"build": {"maxSeqLen": 1024 + 32 * i + 16}})
        digest = self.desired_digest(name) if kind == "s3-mid-upload" else None
        self.inject(f, digest)
        self.faults.append(f)
        if not self.wait_ready(name, self.ready_timeout):
            obj = self.get_quiet(name)
            self.stuck.append({"engine": name, "what": "not Ready", "status": (obj or {}).get("status")})
            return
        f.ready_after_s = round(now() - f.injected_at, 2)
        t_ready = time.monotonic()
        if self.delete:
            left = self.delete_and_wait_gone(name, self.ready_timeout)
            if left is not None:
                self.stuck.append({"engine": name, "what": f"not gone after delete: {left}"})
                return
        else:
            self.kept.add(name)
        t_end = time.monotonic()
        self.lifecycle_seconds.append(t_end - t0)
        self.lifecycles.append(
            {
                "engine": name,
                "fault": kind,
                "rebuild": rebuild,
                "to_ready_s": round(t_ready - t0, 1),
                "delete_s": round(t_end - t_ready, 1) if self.delete else None,
            }
        )

    def get_quiet(self, name: str) -> dict[str, Any] | None:
        try:
            return self.get(name)
        except Exception:
            return None


# ---------------------------------------------------------------------------------------------------------------
# Invariants at the end


def engine_store(info: ClusterInfo, prefix: str, **client: Any) -> EngineStore:
    loc = StoreLocation(bucket=info.s3_bucket, prefix=prefix, endpoint=info.s3_endpoint, region=info.s3_region)
    cfg = S3Config.for_location(loc, access_key_id=info.s3_access_key, secret_access_key=info.s3_secret_key, **client)
    return EngineStore(make_s3_client(cfg), loc)


def verify_served(store: EngineStore, served: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """Every engine a Deployment ever served: committed (manifest.json present), every file's size and SHA-256 as
    the manifest says (the store's own download verification), and committed before the Deployment showed it."""
    loc = store.location
    bad = []
    for (dep, digest), first_seen in sorted(served.items(), key=lambda kv: kv[1]):
        try:
            head = store.client.head_object(Bucket=loc.bucket, Key=store.key(digest, MANIFEST_NAME))
        except Exception:
            bad.append({"deployment": dep, "digest": digest[:12], "why": "no manifest.json in the store"})
            continue
        committed_at = head["LastModified"].timestamp()  # whole seconds, rounded down: never after the commit
        if first_seen < committed_at:
            bad.append(
                {
                    "deployment": dep,
                    "digest": digest[:12],
                    "why": f"Deployment served it {committed_at - first_seen:.1f}s before the manifest was written",
                }
            )
        tmp = Path(tempfile.mkdtemp(prefix="llmengine-verify-"))
        try:
            store.download_engine(digest, tmp)
        except StoreError as e:
            bad.append({"deployment": dep, "digest": digest[:12], "why": f"verification failed: {e}"})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return bad


def unverified_pods(pods_dir: Path, ns: str, ready: dict[str, tuple[str, str, float]]) -> list[dict[str, Any]]:
    """Serving pods seen Ready whose init container never logged a verified download of the pod's engine."""
    bad = []
    for uid, (pod, digest, _) in ready.items():
        logs = list(pods_dir.glob(f"{ns}_{pod}_{uid[:8]}/fetch-engine.log"))
        events = read_events(logs[0]) if logs else []
        ok = any(e.get("event") == "download verified" and e.get("engine_digest") == digest for e in events)
        if not ok:
            bad.append({"pod": pod, "digest": digest[:12], "why": "Ready without a verified download"})
    return bad


def leftovers(api: Any, ns: str, stuck_engines: set[str]) -> list[str]:
    """Objects that outlived their engine: every lifecycle deleted its engine, except the stuck ones (counted
    already; their children are not counted again) and those kept on purpose (delete=False)."""

    def orphan(owners: list[Any] | None) -> bool:
        return not any(o.kind == "LLMEngine" and o.name in stuck_engines for o in owners or [])

    batch, apps, core = client.BatchV1Api(api), client.AppsV1Api(api), client.CoreV1Api(api)
    jobs = {j.metadata.name: orphan(j.metadata.owner_references) for j in batch.list_namespaced_job(ns).items}
    out = [f"job/{name}" for name, o in jobs.items() if o]
    out += [
        f"deployment/{d.metadata.name}"
        for d in apps.list_namespaced_deployment(ns).items
        if orphan(d.metadata.owner_references)
    ]
    for p in core.list_namespaced_pod(ns).items:
        labels = p.metadata.labels or {}
        if ENGINE_LABEL in labels:
            gone = labels[ENGINE_LABEL] not in stuck_engines
        else:
            gone = jobs.get(labels.get("job-name", ""), True)
        if gone:
            out.append(f"pod/{p.metadata.name}")
    co = client.CustomObjectsApi(api)
    out += [
        f"llmengine/{o['metadata']['name']}"
        for o in co.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        if o["metadata"]["name"] not in stuck_engines
    ]
    return out


def pct(xs: list[float], p: float) -> float | None:
    return round(bl.percentile(xs, p), 1) if xs else None


# ---------------------------------------------------------------------------------------------------------------
# The run


def schedule(n: int, rng: random.Random, kinds: tuple[str, ...] = FAULTS) -> list[str]:
    """Round-robin over the fault kinds, each round in an order drawn from the seed."""
    out: list[str] = []
    while len(out) < n:
        rnd = list(kinds)
        rng.shuffle(rnd)
        out += rnd
    return out[:n]


@contextlib.contextmanager
def bench_env(cluster: DevCluster, info: ClusterInfo, engine_bytes: int) -> Iterator[tuple[str, str, str, Any]]:
    """Namespace, store Secret, tiny checkpoint and the operator (test compiler) on a running dev cluster."""
    api = config.new_client_from_config(config_file=info.kubeconfig)
    apply_crd(api)
    ns = f"faults-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
    create_store_secret(api, info, ns)
    model = upload_tiny_checkpoint(info, f"models/{ns}")
    prefix = f"engines-{ns}"
    logs = cluster.dir / "operator-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {"LLMENGINE_TEST_ENGINE_BYTES": str(engine_bytes)}
    with run_operator(info, ns, logs, env) as op:
        yield ns, model, prefix, op


def run(
    cluster: DevCluster,
    info: ClusterInfo,
    kinds: list[str],
    *,
    seed: int,
    engine_bytes: int,
    parallel: int,
    ready_timeout: float,
    rebuild_every: int,
    replicas: int,
    s3_down_max: float = 0.0,
    hard_restarts: bool | None = None,
    delete: bool = True,
) -> dict[str, Any]:
    """Run one lifecycle per entry of `kinds`; returns the summary (counts that must be zero under "counts").

    delete=False leaves each engine in place once Ready (quicker: no wait for the garbage collector)."""
    rng = random.Random(seed)
    t_start = time.monotonic()
    with bench_env(cluster, info, engine_bytes) as (ns, model, prefix, op):
        bench = Bench(
            cluster, info, ns, model, prefix, op, rng, ready_timeout, replicas, s3_down_max, delete, engine_bytes
        )
        quick = engine_store(info, prefix, max_attempts=1, connect_timeout=1.0, read_timeout=3.0)
        recorder = Recorder(bench.api, ns, quick)
        recorder.start()
        plans = []
        for i, kind in enumerate(kinds):
            rebuild = rebuild_every > 0 and i % rebuild_every == rebuild_every - 1
            hard = rng.random() < 0.5 if hard_restarts is None else hard_restarts
            plans.append((i, kind, rebuild, hard or kind.startswith("s3") or kind == "operator-kill9"))
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="lifecycle") as pool:
            futs = [pool.submit(bench.lifecycle, *p) for p in plans]
            crashed = []
            for p, fut in zip(plans, futs, strict=True):
                try:
                    fut.result()
                except Exception as e:
                    crashed.append({"engine": f"e{p[0]:03d}", "what": f"lifecycle crashed: {type(e).__name__}: {e}"})
        bench.stuck += crashed
        # Engines that did not make it get one more chance now that no fault is running.
        for s in list(bench.stuck):
            if s["what"] == "not Ready" and bench.wait_ready(s["engine"], ready_timeout):
                s["recovered_late"] = True
        time.sleep(1.0)
        recorder.stop()
        runs = build_runs(bench.pods_dir, ns)
        dups, retries, repeats = judge_builds(runs)
        attempts: dict[tuple[str, str], int] = {}
        for j in recorder.jobs.values():
            attempts[(j.digest, j.attempt)] = attempts.get((j.digest, j.attempt), 0) + 1
        dup_jobs = [{"digest": d[:12], "attempt": a, "jobs": n} for (d, a), n in attempts.items() if n > 1]
        served_bad = recorder.uncommitted + verify_served(engine_store(info, prefix), recorder.served)
        pods_bad = unverified_pods(bench.pods_dir, ns, recorder.ready_pods)
        stuck = [s for s in bench.stuck if not s.get("recovered_late")]
        keep = bench.kept | {s["engine"] for s in bench.stuck}
        left = retry("leftovers", lambda: leftovers(bench.api, ns, keep))
        wall = time.monotonic() - t_start

    by_kind: dict[str, dict[str, Any]] = {}
    for f in bench.faults:
        k = by_kind.setdefault(f.kind, {"injected": 0, "mid_transfer": 0, "ready_after_s": []})
        k["injected"] += 1
        k["mid_transfer"] += 1 if f.hit else 0
        if f.ready_after_s is not None:
            k["ready_after_s"].append(f.ready_after_s)
    for kind, k in by_kind.items():
        xs = k.pop("ready_after_s")
        k["ready_after_s_p50"], k["ready_after_s_max"] = pct(xs, 50), (max(xs) if xs else None)
        if not kind.startswith("s3"):
            k.pop("mid_transfer")
    counts = {
        "duplicate_builds": len(dups) + len(dup_jobs),
        "served_without_committed_manifest": len(served_bad) + len(pods_bad),
        "stuck": len(stuck) + len(left),
        "ready_before_rollout": len(bench.ready_early),
        # A lifecycle that never got to its fault proves nothing about it.
        "faults_not_injected": len(kinds) - len(bench.faults),
    }
    return {
        "counts": counts,
        "lifecycles": len(kinds),
        "seed": seed,
        "engine_bytes": engine_bytes,
        "parallel": parallel,
        "s3_down_max_s": s3_down_max,
        "wall_seconds": round(wall, 1),
        "lifecycle_seconds": {
            "p50": pct(bench.lifecycle_seconds, 50),
            "p95": pct(bench.lifecycle_seconds, 95),
            "max": round(max(bench.lifecycle_seconds), 1) if bench.lifecycle_seconds else None,
        },
        "faults": by_kind,
        "builds": {
            "builder_runs": len(runs),
            "build_jobs_seen": len(recorder.jobs),
            "identities": len({r.digest for r in runs}),
            "legitimate_retries": len(retries),
            "job_pod_repeats": len(repeats),  # a Job's pod started again after it committed; found the manifest
            "runs_without_job_uid": sum(1 for r in runs if r.job_uid is None),  # the judge cannot tell repeats there
            "engines_served": len(recorder.served),
            "serving_pods_ready": len(recorder.ready_pods),
        },
        "details": {
            "duplicates": dups + dup_jobs,
            "retries": retries,
            "job_pod_repeats": repeats,
            "served_without_committed_manifest": served_bad + pods_bad,
            "stuck": stuck,
            "leftovers": left,
            "ready_before_rollout": list(bench.ready_early.values()),
            "faults": [asdict(f) for f in bench.faults],
            "lifecycles": bench.lifecycles,
            "recorder_watch_restarts": recorder.errors,
            "serving_pods_with_init_restarts": len(recorder.init_restarts),
            "init_container_restarts": sum(recorder.init_restarts.values()),
            "runner_api_retries": runner_api_retries(cluster),
        },
    }


def runner_api_retries(cluster: DevCluster) -> int:
    """API calls the pod runner had to repeat while the API server was away (its log says each one)."""
    log = cluster.dir / "logs" / "runner.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return text.count(API_RETRY)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lifecycles", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset of: " + ", ".join(FAULTS))
    ap.add_argument("--engine-mib", type=int, default=64, help="size of each test engine (LLMENGINE_TEST_ENGINE_BYTES)")
    ap.add_argument(
        "--parallel", type=int, default=1, help="lifecycles in flight at once (one fault at a time per component)"
    )
    ap.add_argument("--rebuild-every", type=int, default=2, help="every Nth lifecycle changes maxSeqLen (0: never)")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument(
        "--restarts",
        choices=("random", "hard", "graceful"),
        default="random",
        help="how kube-apiserver and etcd stop: SIGKILL, SIGTERM, or drawn per fault (S3 and the operator: SIGKILL)",
    )
    ap.add_argument("--keep-engines", action="store_true", help="leave each engine in place once Ready (no delete)")
    ap.add_argument(
        "--s3-down-max",
        type=float,
        default=0.0,
        help="S3 stays down a random 0..this many seconds before it starts again (0: restart at once)",
    )
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds each engine gets to become Ready")
    ap.add_argument(
        "--restart-backoff",
        type=float,
        default=10.0,
        help="the pod runner's first delay before a failed init container runs again (a kubelet's: 10 s)",
    )
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--keep", action="store_true", help="leave the cluster and its state directory for inspection")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.faults.split(",") if k)
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        ap.error(f"unknown fault(s): {', '.join(sorted(unknown))}")

    # A SIGTERM (Ctrl-C's sibling, `kill`) still stops the cluster: the finally below runs on SystemExit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    name = f"faults-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    state = Path(tempfile.mkdtemp(prefix=f"llmengine-{name}-"))
    cluster = DevCluster(name, state, restart_backoff_s=args.restart_backoff)
    t0 = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)
    summary: dict[str, Any] | None = None
    try:
        info = cluster.up()
        up_s = time.monotonic() - t0
        summary = run(
            cluster,
            info,
            schedule(args.lifecycles, random.Random(args.seed), kinds),
            seed=args.seed,
            engine_bytes=args.engine_mib * MiB,
            parallel=args.parallel,
            ready_timeout=args.ready_timeout,
            rebuild_every=args.rebuild_every,
            replicas=args.replicas,
            s3_down_max=args.s3_down_max,
            hard_restarts={"random": None, "hard": True, "graceful": False}[args.restarts],
            delete=not args.keep_engines,
        )
        summary["cluster_up_seconds"] = round(up_s, 1)
        summary["machine"] = bl.machine()
        summary["source"] = bl.source()
        # The machine may be shared: its load says how much the timings are worth.
        summary["load_average_1m"] = {"start": load_start, "end": round(os.getloadavg()[0], 2)}
        summary["command"] = " ".join(["scripts/bench_faults.py", *(argv if argv is not None else sys.argv[1:])])
    finally:
        failed = summary is None or any(summary["counts"].values())
        if args.keep:
            print(f"kept cluster {name} running, state in {state}", file=sys.stderr)
        else:
            # After a failure the state directory stays (logs, pod logs, S3 data) for a post-mortem, less the
            # pods' own copies of the engines (gigabytes, and the store keeps the originals).
            cluster.down(quiet=True, purge=not failed)
            if failed:
                for volumes in (state / "pods").glob("*/volumes"):
                    shutil.rmtree(volumes, ignore_errors=True)
                print(f"cluster stopped; its logs and data are kept in {state}", file=sys.stderr)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    bad = {k: v for k, v in summary["counts"].items() if v}
    if bad:
        print(f"FAIL: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
