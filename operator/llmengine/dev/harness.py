"""The operator as the tests and the benchmarks run it: a real subprocess with the test compiler, and reading back
the LLMEngines, Jobs and Deployments it makes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubernetes import client

from llmengine.clients.store import slimdata
from llmengine.dev import tools
from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.proc import free_port, stop_child
from llmengine.dev.servingpath import ServingPathInfo, serving_paths


class Engines:
    """The LLMEngines of one namespace: create, read, patch, delete, and wait for a phase."""

    def __init__(self, api: Any, ns: str) -> None:
        self.co = client.CustomObjectsApi(api)
        self.ns = ns

    def create(self, body: dict[str, Any]) -> None:
        self.co.create_namespaced_custom_object("llmengine.io", "v1alpha1", self.ns, "llmengines", body)

    def get(self, name: str) -> dict[str, Any]:
        return dict(self.co.get_namespaced_custom_object("llmengine.io", "v1alpha1", self.ns, "llmengines", name))

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.co.patch_namespaced_custom_object("llmengine.io", "v1alpha1", self.ns, "llmengines", name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.co.delete_namespaced_custom_object("llmengine.io", "v1alpha1", self.ns, "llmengines", name)

    def wait_phase(self, name: str, phase: str, timeout: float = 120) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = self.get(name)
            st = obj.get("status") or {}
            gen_ok = st.get("observedGeneration") == obj["metadata"]["generation"]
            return obj if st.get("phase") == phase and gen_ok else None

        try:
            return dict(wait_for(f"{name} phase {phase}", check, timeout=timeout, interval=0.5))
        except TimeoutError as e:
            raise AssertionError(f"{e}; status now: {json.dumps(self.get(name).get('status'), indent=1)}") from None


# The glibc malloc settings of operator-image/Dockerfile, so that the operator runs here as in its image.
OPERATOR_IMAGE_MALLOC = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}


@functools.cache
def operator_image_botocore_data(python: str = sys.executable) -> str:
    """The slim botocore data the operator image carries (LLMENGINE_BOTOCORE_DATA), written by `python`'s
    `llmengine slim-botocore-data` from its botocore into the tool cache, once per process."""
    dest = tools.cache_root() / "botocore-data" / hashlib.sha256(python.encode()).hexdigest()[:12]
    subprocess.run(
        [python, "-m", "llmengine.cli", "slim-botocore-data", str(dest)], check=True, stdout=subprocess.DEVNULL
    )
    return str(dest)


def operator_command(
    kubeconfig: str,
    namespaces: Sequence[str],
    metrics_port: int = 0,
    extra_env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `llmengine operator` as the tests and the benchmarks run it: the test
    compiler, small engines, dev images, a 5 s resync, no store credentials of its own (engines name a Secret); the
    malloc settings and the slim botocore data of the operator image."""
    # No store credentials of its own unless extra_env gives some (the operator of isolated store access).
    inherited = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env = {
        **inherited,
        "KUBECONFIG": kubeconfig,
        "LLMENGINE_COMPILER": "test",
        "LLMENGINE_TEST_ENGINE_BYTES": str(256 * 1024),
        "LLMENGINE_BUILDER_IMAGE": "llmengine-builder:dev",
        "LLMENGINE_SERVER_IMAGE": "llmengine-server:dev",
        "LLMENGINE_RESYNC_SECONDS": "5",
        "LLMENGINE_TRAFFIC_SCRAPE_INTERVAL_SECONDS": "2",
        "LLMENGINE_BUILD_BACKOFF_BASE_SECONDS": "1",
        "LLMENGINE_JSON_LOGS": "true",
        **OPERATOR_IMAGE_MALLOC,
        slimdata.ENV: operator_image_botocore_data(python),
        **(extra_env or {}),
    }
    cmd = [python, "-m", "llmengine.cli", "operator", "--metrics-port", str(metrics_port)]
    for ns in namespaces:
        cmd += ["--namespace", ns]
    # Kopf reads port 0 as "no port" (80): a free one, so that two operators can run side by side.
    cmd += ["--liveness", f"http://127.0.0.1:{free_port()}/healthz", *extra_args]
    return cmd, env


@contextmanager
def run_operator(
    info: ClusterInfo,
    ns: str,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    also_watch: Sequence[str] = (),
) -> Iterator[Any]:
    """`llmengine operator` as a subprocess watching one namespace (and `also_watch`), with the test compiler."""
    log = log_dir / f"operator-{ns}-{uuid.uuid4().hex[:6]}.log"
    cmd, env = operator_command(info.kubeconfig, [ns, *also_watch], extra_env=extra_env, extra_args=extra_args or ())
    holder: dict[str, Any] = {}

    def start() -> subprocess.Popen[bytes]:
        f = open(log, "ab")  # noqa: SIM115 - closed when the process ends
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        holder["p"] = p
        return p

    start()

    class Handle:
        log_path = log

        def kill9(self) -> None:
            holder["p"].kill()
            holder["p"].wait()

        def restart(self) -> None:
            start()

        def logs(self) -> str:
            return log.read_text(errors="replace")

    try:
        yield Handle()
    finally:
        stop_child(holder["p"])


def jobs(api: Any, ns: str) -> list[Any]:
    return list(client.BatchV1Api(api).list_namespaced_job(ns).items)


def deployment(api: Any, ns: str, name: str) -> Any:
    return client.AppsV1Api(api).read_namespaced_deployment(f"llme-{name}", ns)


def served_digest(api: Any, ns: str, name: str) -> str:
    return str(deployment(api, ns, name).spec.template.metadata.annotations["llmengine.io/engine-digest"])


@contextmanager
def run_serving_path(info: ClusterInfo, ns: str, engine: str, log_dir: Path) -> Iterator[ServingPathInfo]:
    """The serving path of one engine (llmengine.dev.servingpath: the metering proxy in front of the test stand-in)
    as a subprocess, as the demo runs it; yields where it answers once it does."""
    log = log_dir / f"serving-path-{ns}-{engine}.log"
    cmd = [sys.executable, "-m", "llmengine.dev.servingpath", "--cluster-dir", info.state_dir]
    cmd += ["--namespace", ns, "--engine", engine, "--port", str(free_port()), "--interval", "0.5"]
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> ServingPathInfo | None:
        if p.poll() is not None:
            raise RuntimeError(f"the serving path exited ({p.returncode}): {log.read_text(errors='replace')}")
        return next((s for s in serving_paths(Path(info.state_dir)) if (s.namespace, s.engine) == (ns, engine)), None)

    try:
        yield wait_for(f"the serving path of {ns}/{engine}", up, timeout=30, interval=0.2)
    finally:
        stop_child(p)


@contextmanager
def run_prometheus(
    info: ClusterInfo, namespaces: Sequence[str], log_dir: Path, port: int | None = None, scrape_interval: float = 0.5
) -> Iterator[str]:
    """A real Prometheus (llmengine.dev.prometheus) scraping the serving paths of these namespaces' serving pods, with
    the labels the chart's serving PodMonitor gives them; yields its URL once it is ready."""
    work = log_dir / f"prometheus-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    log = work / "runner.log"
    cmd = [sys.executable, "-m", "llmengine.dev.prometheus", "--cluster-dir", info.state_dir, "--work-dir", str(work)]
    cmd += ["--port", str(port or free_port()), "--scrape-interval", str(scrape_interval), "--interval", "0.5"]
    for ns in namespaces:
        cmd += ["--namespace", ns]
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> str | None:
        if p.poll() is not None:
            raise RuntimeError(f"the Prometheus runner exited ({p.returncode}): {log.read_text(errors='replace')}")
        state = work / "prometheus.json"
        if not state.exists():
            return None
        url = str(json.loads(state.read_text())["url"])
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                return url if r.status == 200 else None
        except OSError:  # still starting: refused, or 503 while the TSDB opens
            return None

    try:
        yield wait_for("Prometheus ready", ready, timeout=60, interval=0.2)
    finally:
        stop_child(p, 15)
