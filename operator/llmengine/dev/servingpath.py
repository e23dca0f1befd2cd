"""The serving path of one engine on the dev cluster: the real metering proxy in front of the test stand-in.

In a real serving pod the metering proxy (llmengine.server.meter) listens on the serving port and passes requests
to trtllm-serve on loopback. Simulated pods run no containers, so for one engine this process runs that path on this
machine: the stand-in (llmengine.dev.standin, TEST SERVER — not trtllm-serve) on a loopback port, and the metering
proxy, unchanged (`make_app`), in front of it on `--port`. Requests to that port are metered exactly as in a pod,
and `/llmengine/metrics` serves what the proxy counted.

The process stands in for one serving pod at a time: the engine's newest ready pod, kept while it stays ready and
runs the same engine. Its limits are that pod's engine's (`build_config` in the config.json the pod's init
container downloaded, under the pod runner's scratch directory), so after a rollout to a larger engine longer
prompts are answered. When it moves to another pod the proxy starts over with zero counts, as a new pod's proxy
does. The operator is pointed at it with `LLMENGINE_TRAFFIC_URL_TEMPLATE` = `metrics_template(port)`; a scrape that
names another pod (`?namespace=&pod=`) is answered 404, as from a pod where nothing listens.

Where to reach it is written to `<cluster state>/serving/<namespace>_<engine>.json` for `llmengine dev traffic`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from llmengine.clients.scrape import ready
from llmengine.dev import runner
from llmengine.dev.proc import free_port
from llmengine.dev.standin import Limits, make_standin
from llmengine.logging import configure_logging, get_logger
from llmengine.render import common, serving
from llmengine.server.meter import LOOPBACK, METRICS_PATH, Meter, make_app

STATE_SUBDIR = "serving"
log = get_logger(component="serving-path")


def metrics_template(port: int) -> str:
    """The operator's LLMENGINE_TRAFFIC_URL_TEMPLATE for a serving path on `port`."""
    return f"http://{LOOPBACK}:{port}{METRICS_PATH}?namespace={{namespace}}&pod={{pod}}"


@dataclass(frozen=True)
class ServingPathInfo:
    """Where one engine's serving path answers (written by the process, read by `llmengine dev traffic`)."""

    namespace: str
    engine: str
    url: str  # the metering proxy: OpenAI paths and /llmengine/metrics
    metrics_template: str


def state_file(cluster_dir: Path, namespace: str, engine: str) -> Path:
    return cluster_dir / STATE_SUBDIR / f"{namespace}_{engine}.json"


def serving_paths(cluster_dir: Path) -> list[ServingPathInfo]:
    """The serving paths that wrote where they answer, in the cluster whose state is in `cluster_dir`."""
    out = []
    for f in sorted((cluster_dir / STATE_SUBDIR).glob("*.json")):
        with contextlib.suppress(ValueError, TypeError, OSError):
            out.append(ServingPathInfo(**json.loads(f.read_text())))
    return out


def _digest(pod: Mapping[str, Any]) -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    value = labels.get(common.DIGEST_LABEL)
    return str(value) if value is not None else None


def stand_in_for(pods: Sequence[Mapping[str, Any]], current: str | None) -> Mapping[str, Any] | None:
    """The pod to answer for: the newest ready one (traffic moves to a new engine once its pods are ready), or the
    current one while it is ready and runs the same engine as the newest."""
    candidates = [p for p in pods if ready(p)]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: (str(p["metadata"].get("creationTimestamp") or ""), p["metadata"]["name"]))
    for p in candidates:
        if p["metadata"]["name"] == current and _digest(p) == _digest(newest):
            return p
    return newest


def engine_dir(work: Path, pod: Mapping[str, Any]) -> Path:
    """Where the runner put the engine the pod's init container downloaded: the volume mounted at the server's
    --engine-dir."""
    spec = pod.get("spec") or {}
    server: Mapping[str, Any] = next((c for c in spec.get("containers") or [] if c.get("name") == "server"), {})
    args = list(server.get("args") or [])
    target = args[args.index("--engine-dir") + 1] if "--engine-dir" in args[:-1] else serving.ENGINE_DIR
    volume = next((m["name"] for m in server.get("volumeMounts") or [] if m.get("mountPath") == target), "engine")
    return runner.pod_dir(work, dict(pod)) / "volumes" / volume


def engine_limits(work: Path, pod: Mapping[str, Any]) -> Limits:
    """The limits of the engine a pod downloaded, from its config.json (ValueError when absent or malformed)."""
    path = engine_dir(work, pod) / "config.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a JSON object")
    return Limits.from_engine_config(doc)


ListPods = Callable[[], Awaitable[list[dict[str, Any]]]]


class ServingPath:
    """The stand-in on a loopback port and the metering proxy on `port`, following one engine's serving pod."""

    def __init__(self, cluster_dir: Path, namespace: str, engine: str, port: int, list_pods: ListPods) -> None:
        self.work = runner.work_dir(cluster_dir)
        self.namespace, self.engine, self.port = namespace, engine, port
        self.list_pods = list_pods
        self.pod: str | None = None  # the pod answered for
        self.limits: Limits | None = None
        self._standin: web.AppRunner | None = None
        self._meter: web.AppRunner | None = None
        self._upstream = ""

    async def start(self) -> None:
        self._standin = web.AppRunner(make_standin(lambda: self.limits), access_log=None)
        await self._standin.setup()
        port = free_port()
        await web.TCPSite(self._standin, LOOPBACK, port).start()
        self._upstream = f"http://{LOOPBACK}:{port}"
        await self._start_meter()
        log.info(
            "serving path up: metering proxy in front of the TEST SERVER stand-in (not trtllm-serve)",
            engine=f"{self.namespace}/{self.engine}",
            listen=f"{LOOPBACK}:{self.port}",
            standin=self._upstream,
        )

    async def _start_meter(self) -> None:
        """A fresh proxy (zero counts, as a new pod's) on the serving port."""
        if self._meter is not None:
            await self._meter.cleanup()
        app = make_app(self._upstream, Meter())
        app.middlewares.append(self._only_this_pod)
        self._meter = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2)
        await self._meter.setup()
        await web.TCPSite(self._meter, LOOPBACK, self.port).start()

    @web.middleware
    async def _only_this_pod(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == METRICS_PATH:
            ns, pod = request.query.get("namespace"), request.query.get("pod")
            if (ns is not None and ns != self.namespace) or (pod is not None and pod != self.pod):
                raise web.HTTPNotFound(text=f"this serving path stands in for pod {self.pod}, not {pod}\n")
        return await handler(request)

    async def follow(self) -> None:
        """Move to the pod stand_in_for() picks; on a new pod, read its engine's limits and restart the proxy."""
        try:
            pods = await self.list_pods()
        except Exception as e:  # the API server restarting: keep answering as before
            log.warning("cannot list pods; keeping the current one", error=str(e), pod=self.pod)
            return
        chosen = stand_in_for(pods, self.pod)
        if chosen is None:
            if self.limits is not None:
                log.info("no ready serving pod: answering 503", engine=f"{self.namespace}/{self.engine}")
            self.limits = None
            return
        name = chosen["metadata"]["name"]
        if name == self.pod and self.limits is not None:
            return
        try:
            limits = engine_limits(self.work, chosen)
        except ValueError as e:
            log.warning("the pod's engine cannot be read yet", pod=name, error=str(e))
            return
        if name != self.pod:
            self.pod = name
            await self._start_meter()
        self.limits = limits
        log.info(
            "standing in for a serving pod (TEST SERVER, not trtllm-serve)",
            pod=name,
            engine_digest=_digest(chosen),
            max_input_len=limits.max_input_len,
            max_seq_len=limits.max_seq_len,
        )

    async def stop(self) -> None:
        for r in (self._meter, self._standin):
            if r is not None:
                await r.cleanup()


def kube_pod_lister(kubeconfig: str, namespace: str, engine: str) -> ListPods:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api)
    selector = common.label_selector(serving.instance_labels(engine))

    def list_now() -> list[dict[str, Any]]:
        pods = core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=10)
        return list(api.sanitize_for_serialization(pods).get("items") or [])

    async def list_pods() -> list[dict[str, Any]]:
        return await asyncio.to_thread(list_now)

    return list_pods


async def serve(args: argparse.Namespace) -> None:
    info = json.loads((args.cluster_dir / "cluster.json").read_text())
    lister = kube_pod_lister(info["kubeconfig"], args.namespace, args.engine)
    path = ServingPath(args.cluster_dir, args.namespace, args.engine, args.port, lister)
    await path.start()
    state = state_file(args.cluster_dir, args.namespace, args.engine)
    state.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{LOOPBACK}:{args.port}"
    state.write_text(json.dumps(asdict(ServingPathInfo(args.namespace, args.engine, url, metrics_template(args.port)))))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            await path.follow()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
    finally:
        state.unlink(missing_ok=True)
        await path.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmengine.dev.servingpath", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster-dir", required=True, type=Path, help="the dev cluster's state directory")
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--engine", required=True, help="the LLMEngine's name")
    ap.add_argument("--port", required=True, type=int, help="where the metering proxy listens (127.0.0.1)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between looks at the engine's pods")
    args = ap.parse_args(argv)
    configure_logging(json=False)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
