"""The pod runner: makes selected pods on simulated nodes do their real work.

kwok nodes run no containers. The runner watches pods bound to them and, for those it should execute,
runs the container's command as a local process with the pod's environment (values, Secret and ConfigMap
references, field references) and its ConfigMap, Secret and emptyDir volumes materialised in a scratch
directory (mount paths in arguments and environment values are rewritten to it). A hostPath volume is a directory
of the pod's node (`node_dir`): pods on one simulated node share it, pods on others do not, and it outlives pods and
runner restarts as a node's disk does. A deleted pod's emptyDirs are removed, as a kubelet removes them. It then
reports the result through annotations that the kwok stages turn into pod status:

- Job pods (restartPolicy Never/OnFailure): the main container runs; exit 0 -> Succeeded, else Failed, with the
  exit code and the termination message the process wrote.
- Long-running pods: runnable init containers run in order; then the pod is marked Ready. A failing init
  container leaves the pod Pending and unready, with the error and a restart count in annotations, and is run
  again after a back-off (10 s doubling to 5 min by default, as a kubelet's crash loop), until it succeeds or the
  pod is deleted.

Like a kubelet, the runner outlives a restarting API server: reads of Secrets and ConfigMaps and status reports are
retried until they go through (or the pod is gone).

A pod is runnable when its command starts with `llmengine` (the product's own entrypoints) or when it carries
the annotation `devcluster.llmengine.io/run: "true"` (test pods). Other Job pods wait for a test to finish them;
other long-running pods become Ready at once.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ANN = "devcluster.llmengine.io"
OUTCOME, EXIT_CODE, MESSAGE, RUN, STATE, RESTARTS = (
    f"{ANN}/outcome",
    f"{ANN}/exit-code",
    f"{ANN}/message",
    f"{ANN}/run",
    f"{ANN}/runner",
    f"{ANN}/restarts",
)
MAX_MESSAGE = 4096
RESTART_BACKOFF_S = 10.0
RESTART_BACKOFF_MAX_S = 300.0
API_PATIENCE_S = 300.0
API_RETRY = "API call retried"  # in the runner's log once per repeated call (scripts/bench_faults.py counts them)
POD_FILE = "pod.json"  # in each pod's directory: its namespace, name, UID, labels and owners
log = logging.getLogger("llmengine.dev.runner")


def work_dir(cluster_dir: Path) -> Path:
    """Where the runner materialises the pods of the cluster in `cluster_dir`."""
    return cluster_dir / "pods"


def node_dir(cluster_dir: Path, node: str) -> Path:
    """The root file system of simulated node `node`, as far as hostPath volumes see it."""
    return cluster_dir / "nodes" / node


def pod_dir(work: Path, pod: dict[str, Any]) -> Path:
    """One pod's scratch directory under `work`: its volumes (volumes/<name>), container logs and termination
    messages."""
    md = pod["metadata"]
    return work / f"{md['namespace']}_{md['name']}_{md['uid'][:8]}"


def is_runnable(pod: dict[str, Any], container: dict[str, Any]) -> bool:
    cmd = list(container.get("command") or [])
    if cmd and os.path.basename(cmd[0]) == "llmengine":
        return True
    annotations: dict[str, str] = pod["metadata"].get("annotations") or {}
    return annotations.get(RUN) == "true"


def is_job_pod(pod: dict[str, Any]) -> bool:
    policy: str = pod["spec"].get("restartPolicy", "Always")
    return policy != "Always"


class PodGone(Exception):
    """The pod was deleted (or the runner is stopping) while the runner worked on it."""


def is_transient(e: BaseException) -> bool:
    """An API call worth repeating: the API server is away, restarting or overloaded."""
    from kubernetes.client.exceptions import ApiException
    from urllib3 import exceptions as u3

    if isinstance(e, ApiException):
        status = e.status or 0  # 0 / None: no HTTP response at all
        return bool(status == 429 or status >= 500 or status == 0)
    return isinstance(e, u3.HTTPError | ConnectionError | TimeoutError)


class Runner:
    def __init__(
        self,
        api: Any,
        work_dir: Path,
        llmengine_bin: str,
        restart_backoff_s: float = RESTART_BACKOFF_S,
        restart_backoff_max_s: float = RESTART_BACKOFF_MAX_S,
    ) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api)
        self.api = api
        self.work = work_dir
        self.llmengine_bin = llmengine_bin
        self.restart_backoff_s = restart_backoff_s
        self.restart_backoff_max_s = max(restart_backoff_s, restart_backoff_max_s)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.handled: set[str] = set()
        self.gone: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def _pause(self, key: str, seconds: float) -> None:
        """Sleep, unless the pod goes away (PodGone) first."""
        deadline = time.monotonic() + seconds
        while True:
            with self.lock:
                if key in self.gone:
                    raise PodGone(key)
            if self.stopping.is_set():
                raise PodGone(key)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.5, left))

    def _call(self, key: str, what: str, fn: Any, *args: Any) -> Any:
        """fn(*args), repeated while the API server is away (as a kubelet does), for up to API_PATIENCE_S."""
        deadline = time.monotonic() + API_PATIENCE_S
        delay = 0.5
        while True:
            try:
                return fn(*args)
            except Exception as e:
                if not is_transient(e) or time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: %s for %s failed (%s), next in %.1fs", API_RETRY, what, key, type(e).__name__, delay)
            self._pause(key, delay)
            delay = min(delay * 2, 5.0)

    # ---- reporting --------------------------------------------------------------------------------------
    def _patch(self, pod: dict[str, Any], fn: Any, body: dict[str, Any]) -> None:
        """A status report (fn: patch the pod or its status subresource), retried while the API server is away;
        a pod deleted meanwhile needs no report, any other failure is logged (the runner outlives it)."""
        from kubernetes.client.exceptions import ApiException

        md = pod["metadata"]
        with self.lock:
            if _key(pod) in self.gone:
                return
        try:
            self._call(_key(pod), "status report", fn, md["name"], md["namespace"], body)
        except PodGone:
            pass
        except ApiException as e:
            if e.status != 404:
                log.warning("report on %s/%s failed: %s", md["namespace"], md["name"], e.reason)
        except Exception as e:
            log.warning("report on %s/%s failed: %s", md["namespace"], md["name"], e)

    def annotate(self, pod: dict[str, Any], values: dict[str, str | None]) -> None:
        self._patch(pod, self.core.patch_namespaced_pod, {"metadata": {"annotations": values}})

    def report_crash_loop(
        self, pod: dict[str, Any], ic: dict[str, Any], code: int, msg: str, started: str, restarts: int, backoff: float
    ) -> None:
        """The pod status a kubelet shows for an init container in a crash loop: waiting in CrashLoopBackOff, the
        last run terminated with its exit code and termination message, the pod not Initialized."""

        md, now = pod["metadata"], _now()
        waiting = f"back-off {backoff:.0f}s restarting failed container={ic['name']} pod={md['name']}"
        status = {
            "initContainerStatuses": [
                {
                    "name": ic["name"],
                    "image": ic.get("image", ""),
                    "imageID": "",
                    "ready": False,
                    "restartCount": restarts,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": waiting}},
                    "lastState": {
                        "terminated": {
                            "exitCode": code,
                            "reason": "Error",
                            "message": msg,
                            "startedAt": started,
                            "finishedAt": now,
                        }
                    },
                }
            ],
            "conditions": [
                {
                    "type": "Initialized",
                    "status": "False",
                    "reason": "ContainersNotInitialized",
                    "message": f"containers with incomplete status: [{ic['name']}]",
                    "lastTransitionTime": now,
                }
            ],
        }
        self._patch(pod, self.core.patch_namespaced_pod_status, {"status": status})

    # ---- materialising a pod ----------------------------------------------------------------------------
    def _secret(self, pod: dict[str, Any], name: str) -> dict[str, bytes]:
        ns = pod["metadata"]["namespace"]
        s = self._call(_key(pod), f"reading Secret {name}", self.core.read_namespaced_secret, name, ns)
        return {k: base64.b64decode(v) for k, v in (s.data or {}).items()}

    def _configmap(self, pod: dict[str, Any], name: str) -> dict[str, bytes]:
        ns = pod["metadata"]["namespace"]
        cm = self._call(_key(pod), f"reading ConfigMap {name}", self.core.read_namespaced_config_map, name, ns)
        return {k: v.encode() for k, v in (cm.data or {}).items()}

    def _volumes(self, pod: dict[str, Any], root: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for v in pod["spec"].get("volumes") or []:
            if "hostPath" in v:
                out[v["name"]] = self._host_path(pod, v["hostPath"])
                continue
            path = root / "volumes" / v["name"]
            path.mkdir(parents=True, exist_ok=True)
            files: dict[str, bytes] = {}
            if "configMap" in v:
                files = self._configmap(pod, v["configMap"]["name"])
                items = v["configMap"].get("items")
            elif "secret" in v:
                files = self._secret(pod, v["secret"]["secretName"])
                items = v["secret"].get("items")
            else:
                items = None  # emptyDir and anything else: an empty directory
            if items:
                files = {i.get("path", i["key"]): files[i["key"]] for i in items if i["key"] in files}
            for fname, data in files.items():
                (path / fname).parent.mkdir(parents=True, exist_ok=True)
                (path / fname).write_bytes(data)
            out[v["name"]] = path
        return out

    def _host_path(self, pod: dict[str, Any], source: dict[str, Any]) -> Path:
        """A hostPath on the pod's node (created, whatever the type asks: the runner has no node to refuse on)."""
        path = node_dir(self.work.parent, pod["spec"]["nodeName"]) / str(source["path"]).lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _env(self, pod: dict[str, Any], c: dict[str, Any], root: Path) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), "PYTHONUNBUFFERED": "1"}
        for ef in c.get("envFrom") or []:
            if "secretRef" in ef:
                env.update({k: v.decode() for k, v in self._secret(pod, ef["secretRef"]["name"]).items()})
            if "configMapRef" in ef:
                env.update({k: v.decode() for k, v in self._configmap(pod, ef["configMapRef"]["name"]).items()})
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = e["value"]
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                if "secretKeyRef" in vf:
                    ref = vf["secretKeyRef"]
                    data = self._secret(pod, ref["name"])
                    if ref["key"] in data:
                        env[e["name"]] = data[ref["key"]].decode()
                elif "configMapKeyRef" in vf:
                    ref = vf["configMapKeyRef"]
                    env[e["name"]] = self._configmap(pod, ref["name"]).get(ref["key"], b"").decode()
                elif "fieldRef" in vf:
                    env[e["name"]] = _field(pod, vf["fieldRef"]["fieldPath"])
        return env

    def run_container(self, pod: dict[str, Any], c: dict[str, Any], root: Path) -> tuple[int, str]:
        """Run one container to completion; returns (exit code, termination message)."""
        vols = self._volumes(pod, root)
        mounts = sorted(
            ((m["mountPath"], vols[m["name"]]) for m in c.get("volumeMounts") or [] if m["name"] in vols),
            key=lambda m: -len(m[0]),
        )
        term_path = c.get("terminationMessagePath") or "/dev/termination-log"
        term_local = root / f"termination-{c['name']}"
        term_local.unlink(missing_ok=True)
        rewrites = [(term_path, str(term_local)), *[(mp, str(lp)) for mp, lp in mounts]]

        def rw_mounts(s: str) -> str:
            for src, dst in rewrites[1:]:
                if s == src or s.startswith(src.rstrip("/") + "/"):
                    return dst + s[len(src) :]
                if "=" in s and s.split("=", 1)[1].startswith(src):  # --flag=/mount/path
                    k, v = s.split("=", 1)
                    return f"{k}={rw_mounts(v)}"
            return s

        def rw(s: str) -> str:
            # The termination message path is specific enough to rewrite anywhere, e.g. inside `sh -c` scripts;
            # done after the mount rewrites so the local path is not rewritten again.
            return rw_mounts(s).replace(term_path, str(term_local))

        argv = [rw(a) for a in list(c.get("command") or []) + list(c.get("args") or [])]
        if not argv:
            return 127, "container has no command: the runner cannot execute image entrypoints"
        if os.path.basename(argv[0]) == "llmengine":
            argv[0] = self.llmengine_bin
        env = {k: rw(v) for k, v in self._env(pod, c, root).items()}
        key = _key(pod)
        out = root / f"{c['name']}.log"
        workdir = rw(c["workingDir"]) if c.get("workingDir") else str(root)
        Path(workdir).mkdir(parents=True, exist_ok=True)
        with open(out, "ab") as f:
            try:
                p = subprocess.Popen(
                    argv, env=env, cwd=workdir, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as e:
                return 127, f"cannot start {argv[0]}: {e.strerror}"
            with self.lock:
                self.procs[key] = p
            code = p.wait()
            with self.lock:
                self.procs.pop(key, None)
        msg = term_local.read_text(errors="replace")[:MAX_MESSAGE] if term_local.exists() else ""
        if not msg and code != 0:
            # Like terminationMessagePolicy FallbackToLogsOnError: the log's tail explains the failure.
            msg = "\n".join(out.read_text(errors="replace").splitlines()[-20:])[-MAX_MESSAGE:]
        return (code if code >= 0 else 128 - code), msg

    # ---- per pod ----------------------------------------------------------------------------------------
    def handle(self, pod: dict[str, Any]) -> None:
        md = pod["metadata"]
        root = pod_dir(self.work, pod)
        root.mkdir(parents=True, exist_ok=True)
        # Who made the pod (its Job's UID is in the labels), for the tests and benchmarks that read the logs beside it;
        # only a record, so a failure to write it does not stop the pod.
        identity = {k: md.get(k) for k in ("namespace", "name", "uid", "labels", "ownerReferences")}
        with contextlib.suppress(OSError):
            (root / POD_FILE).write_text(json.dumps(identity, indent=1) + "\n")
        try:
            if is_job_pod(pod):
                main = pod["spec"]["containers"][0]
                for ic in pod["spec"].get("initContainers") or []:
                    if is_runnable(pod, ic):
                        code, msg = self.run_container(pod, ic, root)
                        if code != 0:
                            self.annotate(pod, {OUTCOME: "fail", EXIT_CODE: str(code), MESSAGE: msg})
                            return
                self.annotate(pod, {STATE: "running"})
                code, msg = self.run_container(pod, main, root)
                if self.stopping.is_set():
                    return
                outcome = "succeed" if code == 0 else "fail"
                self.annotate(pod, {OUTCOME: outcome, EXIT_CODE: str(code), MESSAGE: msg, STATE: "done"})
            else:
                self.serve(pod, root)
        except PodGone:
            return
        except Exception as e:  # the runner must outlive any one pod
            log.exception("pod %s/%s", md["namespace"], md["name"])
            if is_job_pod(pod):
                self.annotate(pod, {OUTCOME: "fail", EXIT_CODE: "128", MESSAGE: f"runner error: {e}"})

    def serve(self, pod: dict[str, Any], root: Path) -> None:
        """A long-running pod: its init containers in order, all again after a back-off when one fails (a
        kubelet's crash loop: restartPolicy Always restarts init containers), then Ready."""
        # A runner restarted mid crash loop goes on counting where the last one stopped.
        key, backoff = _key(pod), self.restart_backoff_s
        restarts = int((pod["metadata"].get("annotations") or {}).get(RESTARTS) or 0)
        while True:
            failed: tuple[dict[str, Any], int, str, str] | None = None
            for ic in pod["spec"].get("initContainers") or []:
                if not is_runnable(pod, ic):
                    continue
                started = _now()
                try:
                    code, msg = self.run_container(pod, ic, root)
                except PodGone:
                    raise
                except Exception as e:  # e.g. a Secret that does not exist (yet): a kubelet waits for it too
                    log.warning("pod %s cannot start: %s", key, e)
                    code, msg = 128, f"runner error: {e}"
                if code != 0:
                    failed = (ic, code, msg, started)
                    break
            if failed is None:
                self.annotate(pod, {OUTCOME: "ready", STATE: "done"})
                return
            restarts += 1
            ic, code, msg, started = failed
            self.annotate(pod, {STATE: "init-failed", EXIT_CODE: str(code), MESSAGE: msg, RESTARTS: str(restarts)})
            self.report_crash_loop(pod, ic, code, msg, started, restarts, backoff)
            log.info("pod %s: init container failed (exit %d); restart %d in %.0fs", key, code, restarts, backoff)
            self._pause(key, backoff)
            backoff = min(backoff * 2, self.restart_backoff_max_s)

    def consider(self, pod: dict[str, Any]) -> None:
        md, spec = pod["metadata"], pod["spec"]
        ann = md.get("annotations") or {}
        key = _key(pod)
        if md.get("deletionTimestamp"):
            self.kill(key)
            return
        if not spec.get("nodeName") or (pod.get("status") or {}).get("phase") != "Pending":
            return
        if OUTCOME in ann or ann.get(STATE) == "done":  # init-failed: its crash loop goes on
            return
        with self.lock:
            if key in self.handled:
                return
            self.handled.add(key)
        if ann.get(STATE) == "running":
            # Its process died with a previous runner: report it as a killed container.
            self.annotate(pod, {OUTCOME: "fail", EXIT_CODE: "137", MESSAGE: "container killed (runner restart)"})
            return
        containers = spec["containers"]
        inits = spec.get("initContainers") or []
        if is_job_pod(pod):
            if not is_runnable(pod, containers[0]):
                return  # a test decides how it ends
        elif not any(is_runnable(pod, c) for c in inits):
            self.annotate(pod, {OUTCOME: "ready", STATE: "done"})
            return
        threading.Thread(target=self.handle, args=(pod,), daemon=True, name=key).start()

    def kill(self, key: str) -> None:
        with self.lock:
            self.gone.add(key)
            p = self.procs.pop(key, None)
        if p is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)

    # ---- watch loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        while not self.stopping.is_set():
            try:
                lst = self.api.sanitize_for_serialization(self.core.list_pod_for_all_namespaces())
                for pod in lst.get("items") or []:
                    self.consider(pod)
                w = watch.Watch()
                for ev in w.stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=lst["metadata"]["resourceVersion"],
                    timeout_seconds=300,
                    _request_timeout=330,
                ):
                    if self.stopping.is_set():
                        break
                    pod = self.api.sanitize_for_serialization(ev["object"])
                    if ev["type"] == "DELETED":
                        self.kill(_key(pod))
                        # A kubelet removes a deleted pod's emptyDirs (what links into a node cache goes with them);
                        # its logs stay for the tests.
                        shutil.rmtree(pod_dir(self.work, pod) / "volumes", ignore_errors=True)
                    else:
                        self.consider(pod)
            except ApiException as e:
                if e.status != 410:
                    log.warning("watch failed: %s; retrying", e.reason)
                    time.sleep(1)
            except Exception as e:
                log.warning("watch failed: %s; retrying", e)
                time.sleep(1)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _key(pod: dict[str, Any]) -> str:
    md = pod["metadata"]
    return f"{md['namespace']}/{md['name']}/{md.get('uid', '')}"


def _field(pod: dict[str, Any], path: str) -> str:
    md = pod["metadata"]
    simple = {
        "metadata.name": md.get("name"),
        "metadata.namespace": md.get("namespace"),
        "metadata.uid": md.get("uid"),
        "spec.nodeName": pod["spec"].get("nodeName"),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName"),
        "status.podIP": (pod.get("status") or {}).get("podIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    for prefix, src in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
        if path.startswith(prefix + "['") and path.endswith("']"):
            return str((md.get(src) or {}).get(path[len(prefix) + 2 : -2], ""))
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmengine-dev-runner")
    ap.add_argument("--cluster-dir", required=True, type=Path)
    ap.add_argument(
        "--restart-backoff",
        type=float,
        default=RESTART_BACKOFF_S,
        help="seconds before a failed init container runs again; doubles up to --restart-backoff-max",
    )
    ap.add_argument("--restart-backoff-max", type=float, default=RESTART_BACKOFF_MAX_S)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from kubernetes import config

    info = json.loads((args.cluster_dir / "cluster.json").read_text())
    api = config.new_client_from_config(config_file=info["kubeconfig"])
    work = work_dir(args.cluster_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    exe = Path(sys.executable).parent / "llmengine"
    runner = Runner(
        api, work, str(exe) if exe.exists() else "llmengine", args.restart_backoff, args.restart_backoff_max
    )

    def stop(*_: Any) -> None:
        runner.stopping.set()
        for k in list(runner.procs):
            runner.kill(k)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    log.info("pod runner watching pods (work dir %s)", work)
    runner.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
