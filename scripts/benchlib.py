"""Shared pieces of the operator benchmarks (bench_scale.py, bench_latency.py, bench_continuity.py).

A fresh dev cluster with a fleet sized for the run, the CRD, a tiny checkpoint and the store Secret, and
`llmengine operator` as a subprocess configured like llmengine.dev.harness.run_operator (test compiler,
short resync) but under its own client certificate. The API server classifies that user's requests into a FlowSchema
of their own, so `apiserver_flowcontrol_dispatched_requests_total{flow_schema="llmengine-bench-operator"}` counts
exactly the operator's requests, apart from every other client of the dev cluster (controllers, kwok, the pod runner,
the benchmark itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from llmengine import GROUP, PLURAL, VERSION
from llmengine.dev import certs, proc, tools
from llmengine.dev.cluster import ClusterInfo, DevCluster, state_home
from llmengine.dev.harness import operator_command
from llmengine.dev.seed import (
    apply_crd,
    create_store_secret,
    engine,
    upload_tiny_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
OPERATOR_USER = "llmengine-bench-operator"
FLOW_SCHEMA = "llmengine-bench-operator"

__all__ = ["GROUP", "PLURAL", "VERSION", "engine"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def summary_stats(xs: list[float]) -> dict[str, float | int]:
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "p50": round(percentile(xs, 50), 3),
        "p99": round(percentile(xs, 99), 3),
        "mean": round(statistics.fmean(xs), 3),
        "min": round(min(xs), 3),
        "max": round(max(xs), 3),
    }


def source() -> dict[str, Any]:
    """The commit the operator ran from, and the package's files that differed from it (others edit concurrently)."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False).stdout

    changed = [ln[3:] for ln in git("status", "--porcelain", "operator/llmengine").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted_in_operator_package": changed}


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    mem = {ln.split(":")[0]: ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()[:3]}
    return {
        "cpus": os.cpu_count(),
        "mem_total_gib": round(int(mem["MemTotal"]) / 2**20, 1),
        "loadavg_at_end": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
        "kubernetes": tools.versions().get("KUBERNETES_VERSION"),
    }


# ---- cluster ------------------------------------------------------------------------------------------------
def fleet(pools: dict[str, int], gpus_per_node: int = 64) -> dict[str, Any]:
    """Simulated GPU pools sized for a run: pool name -> GPUs needed. Nodes are wide (64 GPUs) so a thousand
    single-GPU replicas fit on a handful of kwok Nodes (the operator never looks at nodes)."""
    shapes = {
        "h100-80gb": {"product": "NVIDIA-H100-80GB-HBM3", "family": "hopper", "compute": "9.0", "memoryMiB": 81559},
        "a100-80gb": {"product": "NVIDIA-A100-SXM4-80GB", "family": "ampere", "compute": "8.0", "memoryMiB": 81920},
    }
    out = []
    for name, need in pools.items():
        count = max(1, -(-need // gpus_per_node))
        out.append({"name": name, "count": count, "gpus": gpus_per_node, **shapes[name]})
    out.append({"name": "cpu", "count": 1, "gpus": 0})
    return {"gpuTaint": {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}, "pools": out}


def runtime_python() -> str:
    """A Python with this package and its runtime dependencies only, as the operator image installs it (no dev
    extras, so none of the libraries that only the dev tools and the benchmarks use are there for Kopf to import):
    a venv under the tool cache, made once per pyproject.toml, the package installed editable from this checkout."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = tools.cache_root() / f"operator-runtime-venv-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        log(f"making the operator's runtime venv {venv} (pip install -e {REPO}, no extras)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(REPO)], check=True)
        (venv / ".installed").touch()
    return str(python)


def add_operator_env_arg(ap: Any) -> None:
    ap.add_argument(
        "--operator-env",
        choices=["runtime", "dev"],
        default="runtime",
        help="the operator's Python: 'runtime' (the package and its dependencies only, as in the operator image; "
        "the default) or 'dev' (this venv, dev extras and all)",
    )


class Bench:
    """A dev cluster of its own for one benchmark run, torn down on exit unless keep."""

    def __init__(
        self,
        name: str,
        gpus: dict[str, int],
        keep: bool = False,
        runner_args: list[str] | None = None,
        operator_env: str = "dev",
    ) -> None:
        self.name = name
        # The Python the operator runs on: this one ("dev": the dev extras installed too), or "runtime".
        self.operator_python = runtime_python() if operator_env == "runtime" else sys.executable
        self.keep = keep
        self.runner_args = runner_args
        self.dir = state_home() / name
        self.dir.mkdir(parents=True, exist_ok=True)
        fleet_file = self.dir / "bench-fleet.yaml"
        fleet_file.write_text(yaml.safe_dump(fleet(gpus)))
        self.cluster = DevCluster(name, fleet=fleet_file)
        self.info: ClusterInfo
        self.api: Any
        self.operator_kubeconfig: Path

    def __enter__(self) -> Bench:
        log(f"starting dev cluster {self.name} ({self.dir})")
        t0 = time.monotonic()
        try:
            self.info = self.cluster.up()
            log(f"cluster up in {time.monotonic() - t0:.1f}s")
            if self.runner_args is not None:
                # The benchmark's runner (scripts/bench_runner.py) replaces the stock one under the same PID file,
                # so `down` stops it like any component.
                proc.stop_named(self.dir, "runner")
                script = Path(__file__).with_name("bench_runner.py")
                argv = [sys.executable, str(script), "--cluster-dir", str(self.dir), *self.runner_args]
                proc.start("runner", argv, self.dir)
            self.api = self.new_api()
            apply_crd(self.api)
            self._operator_identity()
        except BaseException:
            self.__exit__()  # a cluster that did not come up whole is not left running
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.keep:
            log(f"kept cluster {self.name}: llmengine dev --name {self.name} down --purge")
            return
        self.cluster.down(quiet=True, purge=True)

    def new_api(self, pool: int = 32) -> Any:
        cfg = client.Configuration()
        config.load_kube_config(config_file=self.info.kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = pool
        return client.ApiClient(cfg)

    def _operator_identity(self) -> None:
        """A client certificate for the operator (cluster-admin through RBAC, not system:masters) and a FlowSchema
        that puts its requests, and only its, into their own flow of the exempt priority level."""
        certs.issue(self.cluster.pki, "bench-operator", OPERATOR_USER)
        self.operator_kubeconfig = self.cluster._kubeconfig("bench-operator", self.info.apiserver)
        rbac = client.RbacAuthorizationV1Api(self.api)
        try:
            rbac.create_cluster_role_binding(
                {
                    "metadata": {"name": OPERATOR_USER},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": "cluster-admin",
                    },
                    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}],
                }
            )
        except ApiException as e:
            if e.status != 409:
                raise
        everything = {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": True, "namespaces": ["*"]}
        fs = {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "FlowSchema",
            "metadata": {"name": FLOW_SCHEMA},
            "spec": {
                "matchingPrecedence": 2,
                "priorityLevelConfiguration": {"name": "exempt"},
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [
                    {
                        "subjects": [{"kind": "User", "user": {"name": OPERATOR_USER}}],
                        "resourceRules": [everything],
                        "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                    }
                ],
            },
        }
        co = client.CustomObjectsApi(self.api)
        try:
            co.create_cluster_custom_object("flowcontrol.apiserver.k8s.io", "v1", "flowschemas", fs)
        except ApiException as e:
            if e.status != 409:
                raise

    def namespace(self, name: str, with_store: bool = True) -> str:
        client.CoreV1Api(self.api).create_namespace({"metadata": {"name": name}})
        if with_store:
            create_store_secret(self.api, self.info, name)
        return name

    def checkpoint(self, prefix: str = "models/tiny") -> str:
        return upload_tiny_checkpoint(self.info, prefix)

    # ---- API server metrics -------------------------------------------------------------------------------
    def apiserver_metrics(self) -> str:
        pki = self.cluster.pki
        ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
        ctx.load_cert_chain(str(pki.crt("admin")), str(pki.key("admin")))
        with urllib.request.urlopen(f"{self.info.apiserver}/metrics", context=ctx, timeout=30) as r:
            return str(r.read().decode())

    def request_counts(self) -> dict[str, Any]:
        """Requests the API server has dispatched: the operator's (its FlowSchema) and everyone's, by verb."""
        from prometheus_client.parser import text_string_to_metric_families

        operator = 0.0
        everyone = 0.0
        by_verb: dict[str, float] = {}
        for fam in text_string_to_metric_families(self.apiserver_metrics()):
            for s in fam.samples:
                if s.name == "apiserver_flowcontrol_dispatched_requests_total":
                    if s.labels.get("flow_schema") == FLOW_SCHEMA:
                        operator += s.value
                elif s.name == "apiserver_request_total":
                    everyone += s.value
                    by_verb[s.labels.get("verb", "")] = by_verb.get(s.labels.get("verb", ""), 0.0) + s.value
        return {"operator": operator, "all": everyone, "all_by_verb": by_verb}


def counts_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    verbs = set(before["all_by_verb"]) | set(after["all_by_verb"])
    return {
        "operator": int(after["operator"] - before["operator"]),
        "all": int(after["all"] - before["all"]),
        "all_by_verb": {
            v: int(after["all_by_verb"].get(v, 0) - before["all_by_verb"].get(v, 0))
            for v in sorted(verbs)
            if after["all_by_verb"].get(v, 0) != before["all_by_verb"].get(v, 0)
        },
    }


# ---- the operator -------------------------------------------------------------------------------------------
class Operator:
    """`llmengine operator` as a subprocess watching the given namespaces: the environment of
    llmengine.dev.harness.run_operator, with known metrics and liveness ports and its own kubeconfig."""

    def __init__(self, bench: Bench, namespaces: list[str], extra_env: dict[str, str] | None = None) -> None:
        self.bench = bench
        self.metrics_port = proc.free_port()
        self.log_path = bench.dir / "logs" / f"operator-bench-{int(time.time())}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cmd, self.env = operator_command(
            str(bench.operator_kubeconfig),
            namespaces,
            self.metrics_port,
            extra_env=extra_env,
            python=bench.operator_python,
        )
        self.p: subprocess.Popen[bytes] | None = None
        self.rss_peak_kib = 0

    def __enter__(self) -> Operator:
        f = open(self.log_path, "ab")
        self.p = subprocess.Popen(self.cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait(lambda: proc.tcp_open(self.metrics_port), 60, "operator metrics port")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.p is not None:
            proc.stop_child(self.p, 15)

    @property
    def pid(self) -> int:
        assert self.p is not None
        return self.p.pid

    def status_kib(self, field: str) -> int:
        for ln in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if ln.startswith(field + ":"):
                return int(ln.split()[1])
        return 0

    def peak_rss_mib(self) -> float:
        """VmHWM: the kernel's own high-water mark of the resident set (the last one read, once the process is
        gone)."""
        with suppress(FileNotFoundError):
            self.rss_peak_kib = max(self.rss_peak_kib, self.status_kib("VmHWM"))
        return round(self.rss_peak_kib / 1024, 1)

    def rss_mib(self) -> float:
        return round(self.status_kib("VmRSS") / 1024, 1)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    def metric(self, name: str) -> float:
        """Sum of every sample of one metric (all label sets)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for fam in text_string_to_metric_families(self.metrics()):
            for s in fam.samples:
                if s.name == name:
                    total += s.value
        return total

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None


# ---- small helpers ------------------------------------------------------------------------------------------
def wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except Exception:
            got = None
        if got:
            return got
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def is_ready(obj: dict[str, Any]) -> bool:
    st = obj.get("status") or {}
    return bool(st.get("phase") == "Ready" and st.get("observedGeneration") == obj["metadata"].get("generation"))


@contextmanager
def watch_stream(list_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Iterator[dict[str, Any]]]:
    """Events of one watch (raw dicts), restarted transparently when the server closes it."""
    from kubernetes import watch as kwatch

    w = kwatch.Watch()
    stop = threading.Event()

    def events() -> Iterator[dict[str, Any]]:
        rv = None
        while not stop.is_set():
            try:
                for ev in w.stream(list_fn, *args, resource_version=rv, timeout_seconds=120, **kwargs):
                    obj = ev["raw_object"]
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    yield {"type": ev["type"], "object": obj}
            except ApiException as e:
                if e.status != 410:
                    raise
                rv = None  # too old: list again (the caller treats repeated objects as updates)
            except Exception:
                if stop.is_set():
                    return
                time.sleep(0.5)  # the server closed the stream early; resume from the last version seen

    try:
        yield events()
    finally:
        stop.set()
        w.stop()


def dump_json(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2, sort_keys=False))


def finish(summary: dict[str, Any], src: dict[str, Any], t_start: float, failures: list[str]) -> int:
    """Close a benchmark's summary (machine, the source the operator ran from, total time, failures), print it,
    and return the exit status: 1 when a correctness check failed."""
    summary.update(machine=machine(), source=src, total_seconds=round(time.monotonic() - t_start, 1), failures=failures)
    dump_json(summary)
    return 1 if failures else 0
