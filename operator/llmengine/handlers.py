"""Kopf wiring only: one daemon per LLMEngine runs level-based reconcile passes; events on the engine and on the
Jobs and Deployments it owns wake it early. `llmengine operator` starts it all."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
from typing import Any

import kopf

from llmengine import GROUP, KIND, PLURAL, PREFIX, VERSION
from llmengine.api.config import OperatorConfig
from llmengine.reconcile.engine import Reconciler
from llmengine.render.common import MANAGED_BY

log = logging.getLogger("llmengine.operator")


class Wakeups:
    """One asyncio.Event per engine: set when something it depends on changed."""

    def __init__(self) -> None:
        self.events: dict[tuple[str, str], asyncio.Event] = {}

    def get(self, ns: str, name: str) -> asyncio.Event:
        return self.events.setdefault((ns, name), asyncio.Event())

    def wake(self, ns: str, name: str) -> None:
        ev = self.events.get((ns, name))
        if ev is not None:
            ev.set()

    def drop(self, ns: str, name: str) -> None:
        ev = self.events.pop((ns, name), None)
        if ev is not None:
            ev.set()


class State:
    cfg: OperatorConfig
    reconciler: Reconciler
    wakeups = Wakeups()


STATE = State()


def _post_event(body: Any, type_: str, reason: str, message: str) -> None:
    kopf.event(body, type=type_, reason=reason, message=message)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    from kubernetes import client, config

    from llmengine.clients.kube import Kube

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.ApiClient()
    STATE.cfg = OperatorConfig.from_env()
    STATE.reconciler = Reconciler(Kube(api), STATE.cfg, events=_post_event)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX)
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    return kopf.login_via_client(**kwargs)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0, initial_delay=0)
async def engine_daemon(
    body: kopf.Body, name: str, namespace: str | None, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    namespace = namespace or ""
    wake = STATE.wakeups.get(namespace, name)
    failures = 0
    while not stopped:
        wake.clear()
        try:
            delay = await STATE.reconciler.reconcile(body)
            failures = 0
        except Exception as e:
            # Anything unexpected: log it, keep serving what runs, try again with backoff. Never crash.
            failures += 1
            delay = min(300.0, 2.0**failures)
            log.warning(
                "reconcile %s/%s failed (%s: %s); retrying in %.0fs", namespace, name, type(e).__name__, e, delay
            )
        timeout = min(delay, STATE.cfg.resync_seconds) if delay else STATE.cfg.resync_seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=timeout)


@kopf.on.event(GROUP, VERSION, PLURAL)
def engine_changed(name: str, namespace: str | None, **_: Any) -> None:
    STATE.wakeups.wake(namespace or "", name)


def _wake_owners(meta: kopf.Meta, namespace: str | None) -> None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(GROUP + "/"):
            STATE.wakeups.wake(namespace or "", ref["name"])


@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
def job_changed(meta: kopf.Meta, namespace: str | None, **_: Any) -> None:
    _wake_owners(meta, namespace)


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
def deployment_changed(meta: kopf.Meta, namespace: str | None, **_: Any) -> None:
    _wake_owners(meta, namespace)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def engine_deleted(name: str, namespace: str | None, **_: Any) -> None:
    namespace = namespace or ""
    # Never touches the store (engines stay there) and never fails: deletion can not wedge on this finalizer.
    STATE.wakeups.drop(namespace, name)
    if hasattr(STATE, "reconciler"):
        STATE.reconciler.forget(namespace, name)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmengine operator")
    scope = ap.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", help="watch only these namespaces (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    ap.add_argument("--peering", help="Kopf peering name: with several replicas, one acts at a time")
    ap.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority; by default a random one, so that exactly one replica (the highest) acts",
    )
    ap.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    ap.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (default from config)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    from prometheus_client import start_http_server

    from llmengine.logging import configure_logging

    cfg = OperatorConfig.from_env()
    configure_logging(json=cfg.json_logs)
    start_http_server(args.metrics_port if args.metrics_port is not None else cfg.metrics_port)
    liveness = args.liveness or f"http://0.0.0.0:{cfg.health_port}/healthz"
    kopf.configure(verbose=args.verbose)
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace or [],
            standalone=not args.peering,
            peering_name=args.peering,
            priority=args.priority if args.priority is not None else random.randint(1, 1_000_000),
            liveness_endpoint=liveness,
        )
    )
    return 0
