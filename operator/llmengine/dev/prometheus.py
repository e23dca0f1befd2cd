"""A real Prometheus server for the dev cluster, scraping the serving pods as the chart's serving PodMonitor has one
scrape them, for the operator's `traffic.source: prometheus`.

The dev cluster has no kubelets, so Prometheus's Kubernetes service discovery would find pods whose addresses lead
nowhere (and the dev build leaves that discovery out). Instead this process plays the discovery: every `--interval`
it lists the serving pods of the watched namespaces (the PodMonitor's selector), and writes one file_sd target per
pod with the meta labels Kubernetes discovery would give it (`__meta_kubernetes_namespace`,
`__meta_kubernetes_pod_name`, `__meta_kubernetes_pod_label_*`). The scrape job relabels them exactly as the
prometheus-operator does for the PodMonitor (namespace, pod) plus the PodMonitor's own relabelings (engine,
engine_digest), so the series carry the labels a production Prometheus gives them.

Where a pod's metering proxy answers: at the engine's serving path (llmengine.dev.servingpath), which stands in for
one pod at a time and answers 404 for the others (`?namespace=&pod=`), as a pod where nothing listens. A pod whose
engine has no serving path gets no target.

Where Prometheus answers is written to `<work dir>/prometheus.json` (`url`, `config`, `pid`) once it is started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from llmengine.dev import tools
from llmengine.dev.proc import free_port, stop_child
from llmengine.dev.servingpath import ServingPathInfo, serving_paths
from llmengine.logging import configure_logging, get_logger
from llmengine.render import common
from llmengine.server.meter import METRICS_PATH

STATE_FILE = "prometheus.json"
JOB = "llmengine-serving"
log = get_logger(component="dev-prometheus")


def meta_label(pod_label: str) -> str:
    """A pod label as Kubernetes service discovery names it."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", pod_label)


# What the prometheus-operator generates for every PodMonitor endpoint, then the chart's PodMonitor's relabelings
# (templates/servingpodmonitor.yaml; tests/e2e/test_chart_monitoring.py holds the two together).
OPERATOR_RELABELINGS: list[dict[str, Any]] = [
    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
]
POD_MONITOR_RELABELINGS: list[dict[str, Any]] = [
    {"source_labels": [meta_label(common.ENGINE_LABEL)], "target_label": "engine"},
    {"source_labels": [meta_label(common.DIGEST_LABEL)], "target_label": "engine_digest"},
]
# The PodMonitor's selector: the serving pods (render/serving.py base_labels("server")).
SELECTOR = common.base_labels("server")


def config(targets_dir: Path, scrape_interval: float) -> dict[str, Any]:
    """prometheus.yml: one job over the file_sd targets, relabeled as the PodMonitor's."""
    every = f"{max(1, round(scrape_interval * 1000))}ms"
    return {
        "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": METRICS_PATH,
                "file_sd_configs": [{"files": [str(targets_dir / "*.json")], "refresh_interval": every}],
                "relabel_configs": OPERATOR_RELABELINGS + POD_MONITOR_RELABELINGS,
            }
        ],
    }


def targets(pods: Sequence[Mapping[str, Any]], paths: Sequence[ServingPathInfo]) -> list[dict[str, Any]]:
    """file_sd targets of the serving pods whose engine has a serving path: where each is scraped, and the meta
    labels Kubernetes discovery would give it."""
    where = {(p.namespace, p.engine): urlsplit(p.url).netloc for p in paths}
    out = []
    for pod in pods:
        md, phase = pod.get("metadata") or {}, (pod.get("status") or {}).get("phase")
        labels: Mapping[str, str] = md.get("labels") or {}
        ns, name = md.get("namespace", ""), md.get("name", "")
        address = where.get((ns, labels.get(common.ENGINE_LABEL, "")))
        # The prometheus-operator drops finished pods; a pod that is not running has nothing listening.
        if address is None or phase != "Running" or md.get("deletionTimestamp"):
            continue
        meta = {"__meta_kubernetes_namespace": ns, "__meta_kubernetes_pod_name": name}
        meta.update({meta_label(k): v for k, v in labels.items()})
        # The serving path answers for one pod; naming the pod makes it answer 404 for the others.
        params = {"__param_namespace": ns, "__param_pod": name}
        out.append({"targets": [address], "labels": {**meta, **params}})
    return sorted(out, key=lambda t: (t["labels"]["__meta_kubernetes_namespace"], t["labels"]["__param_pod"]))


def _write(path: Path, doc: Any) -> None:
    """Atomically: Prometheus re-reads file_sd files when they change and must never see half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def _lister(kubeconfig: str, namespaces: Sequence[str]) -> Any:
    from kubernetes import client
    from kubernetes import config as kconfig

    api = kconfig.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api)
    selector = common.label_selector(SELECTOR)

    def list_now() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for ns in namespaces:
            pods = core.list_namespaced_pod(ns, label_selector=selector, _request_timeout=10)
            out.extend(api.sanitize_for_serialization(pods).get("items") or [])
        return out

    return list_now


async def serve(args: argparse.Namespace) -> None:
    cluster_dir: Path = args.cluster_dir
    info = json.loads((cluster_dir / "cluster.json").read_text())
    work = args.work_dir or cluster_dir / "prometheus"
    targets_dir = work / "targets"
    targets_dir.mkdir(parents=True, exist_ok=True)
    conf = work / "prometheus.yml"
    conf.write_text(yaml.safe_dump(config(targets_dir, args.scrape_interval), sort_keys=False))
    port = args.port or free_port()
    argv = [
        str(tools.binary("prometheus")),
        f"--config.file={conf}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    with open(work / "prometheus.log", "ab") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    state = work / STATE_FILE
    state.write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "config": str(conf), "pid": child.pid}))
    log.info("prometheus started", url=f"http://127.0.0.1:{port}", namespaces=args.namespace, config=str(conf))
    list_pods = _lister(info["kubeconfig"], args.namespace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    last: Any = None
    try:
        while not stop.is_set() and child.poll() is None:
            try:
                found = targets(await asyncio.to_thread(list_pods), serving_paths(cluster_dir))
            except Exception as e:  # the API server restarting: keep the targets as they are
                log.warning("cannot list the serving pods; keeping the targets", error=str(e))
            else:
                if found != last:
                    _write(targets_dir / "serving.json", found)
                    log.info("targets", pods=[t["labels"]["__param_pod"] for t in found])
                    last = found
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
    finally:
        state.unlink(missing_ok=True)
        stop_child(child)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmengine.dev.prometheus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster-dir", required=True, type=Path, help="the dev cluster's state directory")
    ap.add_argument("--namespace", required=True, action="append", help="a namespace whose serving pods to scrape")
    ap.add_argument("--work-dir", type=Path, help="config, targets and TSDB (default: <cluster dir>/prometheus)")
    ap.add_argument("--port", type=int, help="where Prometheus listens on 127.0.0.1 (default: a free port)")
    ap.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between two scrapes of a pod")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between looks at the serving pods")
    args = ap.parse_args(argv)
    configure_logging(json=False)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
