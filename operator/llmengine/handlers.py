"""Kopf wiring only: one daemon per LLMEngine runs level-based reconcile passes; events on the engine and on the
Jobs and Deployments it owns wake it early. `llmengine operator` starts it all."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import kopf

from llmengine import GROUP, KIND, PLURAL, PREFIX, VERSION
from llmengine.api.config import OperatorConfig
from llmengine.plan.admission import review
from llmengine.plan.webhook_cert import Names
from llmengine.reconcile import peering, webhook_cert
from llmengine.reconcile.engine import Reconciler
from llmengine.reconcile.views import deployment_essentials
from llmengine.reconcile.webhook_cert import CertSecret
from llmengine.render.common import MANAGED_BY, POOL_LABEL, job_ended

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


@dataclass(frozen=True)
class WebhookOptions:
    """Where the validating webhook listens and which certificate it serves (tls.crt, tls.key, optional ca.crt)."""

    port: int
    addr: str = "0.0.0.0"
    cert_dir: str | None = None
    # Only for --webhook-manage: the host in the webhook URL Kopf writes into the configuration.
    host: str | None = None
    # Name of a ValidatingWebhookConfiguration the operator writes itself (clusters without the chart's);
    # None when the chart owns the configuration.
    manage: str | None = None
    # The certificate kept in a Secret by the operator itself (the chart's default): issued when missing or due,
    # written to files for the server, its CA put into the configuration named there.
    cert_secret: CertSecret | None = None


WEBHOOK_ID = "validate-llmengine"
IDLE_WORKER_SECONDS = 0.5


def _post_event(body: Any, type_: str, reason: str, message: str) -> None:
    kopf.event(body, type=type_, reason=reason, message=message)


# Operator state lives in Kopf's memo (the root one, which every object's memo copies): cfg (OperatorConfig),
# reconciler (Reconciler), wakeups (Wakeups), webhook (WebhookOptions | None), stop (the event that stops the
# operator), watched_namespaces (empty: all) and cert_keeper (the task keeping the webhook certificate), set in
# main() and startup().


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    from llmengine.clients.kube import Kube, connection

    settings.networking.request_timeout = 60
    kube = memo.kube = Kube(lambda: connection(settings), timeout_s=settings.networking.request_timeout)
    memo.cfg = OperatorConfig.from_env()
    memo.reconciler = Reconciler(kube, memo.cfg, events=_post_event)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX)
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.posting.level = logging.INFO
    # Events name the operator as their source ("From" in kubectl describe), not the framework.
    settings.posting.reporting_component = "llmengine-operator"
    settings.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
    settings.posting.event_name_prefix = "llmengine-"
    settings.watching.server_timeout = 300
    # Kopf's per-object worker keeps the last watch event it processed (the whole object) while it waits for the next;
    # 5 s by default. In a rollout of many engines every Deployment sends events for minutes, so the default kept a
    # whole Deployment per engine in memory throughout; a worker that exits sooner lets it go.
    settings.queueing.idle_timeout = IDLE_WORKER_SECONDS
    # A replica that dies without a goodbye is forgotten after this; the standby then takes over.
    settings.peering.lifetime = memo.cfg.peering_lifetime_seconds
    if settings.peering.mandatory:
        # Before Kopf's orchestration starts (after the start-up handlers): the replicas meet there, not paused.
        await peering.ensure(kube, settings.peering.name, memo.watched_namespaces)
    webhook: WebhookOptions | None = memo.get("webhook")
    if webhook is not None and (cs := webhook.cert_secret) is not None:
        # Before the webhook listens (Kopf starts it after the start-up handlers): served and trusted at once.
        bundle, cert_dir = await webhook_cert.start(kube, cs, webhook.cert_dir)
        webhook = memo.webhook = replace(webhook, cert_dir=cert_dir)
        memo.cert_keeper = asyncio.create_task(
            webhook_cert.keep(kube, cs, bundle, restart=lambda why: _restart(memo, why))
        )
    if webhook is not None:
        settings.admission.server = _webhook_server(webhook)
        settings.admission.managed = webhook.manage


def _restart(memo: kopf.Memo, why: str) -> None:
    """Stop the operator (its pod's container is started again) so that it starts over with what changed."""
    log.warning("%s", why)
    memo.stop.set()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    keeper: asyncio.Task[None] | None = memo.get("cert_keeper")
    if keeper is not None:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
    kube = memo.get("kube")
    if kube is not None:
        await kube.close()


def _webhook_server(w: WebhookOptions) -> kopf.WebhookServer:
    def cert(name: str) -> str | None:
        path = os.path.join(w.cert_dir, name) if w.cert_dir else None
        return path if path and os.path.exists(path) else None

    return kopf.WebhookServer(
        addr=w.addr,
        port=w.port,
        host=w.host,
        certfile=cert("tls.crt"),
        pkeyfile=cert("tls.key"),
        cafile=cert("ca.crt"),
    )


def validate_engine(body: kopf.Body, warnings: list[str], memo: kopf.Memo, **kwargs: Any) -> None:
    """Admission: refuse what the planner would fail, with its message; warn when a change rebuilds."""
    old, new, operation = kwargs.get("old"), kwargs.get("new"), kwargs.get("operation")
    cfg: OperatorConfig = memo.cfg
    verdict = review(
        dict(new if new is not None else body),
        dict(old) if old is not None else None,
        operation or "CREATE",
        compiler=cfg.compiler,
        default_store=cfg.default_store,
        test_engine_bytes=cfg.test_engine_bytes,
        images=cfg.images,
        isolated_builds=cfg.isolated,
    )
    warnings.extend(verdict.warnings)
    if not verdict.allowed:
        raise kopf.AdmissionError(verdict.message, code=422)


def enable_webhook(memo: kopf.Memo, options: WebhookOptions) -> None:
    memo.webhook = options
    kopf.on.validate(GROUP, VERSION, PLURAL, id=WEBHOOK_ID, operations=["CREATE", "UPDATE"], persistent=False)(
        validate_engine
    )


@kopf.on.login()
async def login(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> kopf.AiohttpSession:
    """Kopf's session, with the operator's credentials and a bounded connection pool (Kopf's own has no limit)."""
    from llmengine.clients.kube import api_session, connection, kopf_connections

    info = connection(settings)
    limit = kopf_connections(len(memo.get("watched_namespaces") or []))
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        aiohttp_session=api_session(info, limit),
    )


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0, initial_delay=0)
async def engine_daemon(
    body: kopf.Body,
    name: str,
    namespace: str | None,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    reconciler: Reconciler = memo.reconciler
    serving_deployments: kopf.Index[Any, Any] = kwargs["serving_deployments"]  # Kopf passes indices by name
    cfg: OperatorConfig = memo.cfg
    wake = memo.wakeups.get(namespace or "", name)
    try:
        await _passes(reconciler, cfg, body, namespace or "", name, wake, stopped, _lookup(serving_deployments))
    finally:
        # Deleted, or this replica paused by a peer of higher priority (Kopf stops its daemons) or stopping: what it
        # exports about the engine goes, so that summing over replicas counts each engine once.
        reconciler.forget(namespace or "", name)


async def _passes(
    reconciler: Reconciler,
    cfg: OperatorConfig,
    body: kopf.Body,
    namespace: str,
    name: str,
    wake: asyncio.Event,
    stopped: kopf.DaemonStopped,
    deployments: Callable[[str, str], dict[str, Any] | None],
) -> None:
    failures = 0
    while not stopped:
        wake.clear()
        try:
            delay = await reconciler.reconcile(body, deployments)
            failures = 0
        except Exception as e:
            # Anything unexpected: log it with its traceback, keep serving what runs, retry with backoff. Never crash.
            failures += 1
            delay = min(300.0, 2.0**failures)
            log.exception(
                "reconcile %s/%s failed (%s: %s); retrying in %.0fs", namespace, name, type(e).__name__, e, delay
            )
        timeout = min(delay, cfg.resync_seconds) if delay else cfg.resync_seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=timeout)


# Async on purpose: Kopf runs sync handlers in a thread pool, and asyncio.Event.set() is only safe on the loop.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def engine_changed(
    name: str, namespace: str | None, meta: kopf.Meta, event: kopf.RawEvent, memo: kopf.Memo, **_: Any
) -> None:
    drop_managed_fields(event)
    reconciler: Reconciler | None = memo.get("reconciler")
    if reconciler is not None and reconciler.wrote(namespace or "", name, meta.get("resourceVersion")):
        return  # the echo of our own status write: nothing new to look at
    memo.wakeups.wake(namespace or "", name)


def drop_managed_fields(event: kopf.RawEvent) -> None:
    """Drop the API server's field ownership records from an engine as the watch delivered it. Kopf keeps that very
    object for the engine's daemon until the next event: with three writers (the user's, the operator's status, Kopf's
    metadata) they are more than half of it in memory (22 of 39 KiB), and nothing here or in Kopf reads them."""
    obj: Any = event.get("object")
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)


def _wake_owners(memo: kopf.Memo, meta: kopf.Meta, namespace: str | None) -> None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(GROUP + "/"):
            memo.wakeups.wake(namespace or "", ref["name"])


@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
async def job_changed(
    meta: kopf.Meta, namespace: str | None, body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any
) -> None:
    _wake_owners(memo, meta, namespace)
    reconciler: Reconciler | None = memo.get("reconciler")
    if reconciler is not None and not meta.get("ownerReferences"):
        # A build in the operator's namespace, owned by none: the engines of every namespace that want it.
        for ns, name in reconciler.queue.wanting(f"{namespace}/{meta.get('name')}"):
            memo.wakeups.wake(ns, name)
    # A build that ends frees a slot in its pool: the builds next in line start now, not at their next poll.
    pool = (meta.get("labels") or {}).get(POOL_LABEL)
    if pool and (type == "DELETED" or job_ended(body)) and reconciler is not None:
        for ns, name in reconciler.queue.next_in_line(pool):
            memo.wakeups.wake(ns, name)


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
async def deployment_changed(meta: kopf.Meta, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    _wake_owners(memo, meta, namespace)


# The serving Deployments as the watch sees them: a reconcile pass reads its engine's from here, not from the API.
# Async, as every handler here: Kopf runs a sync handler in a worker thread, a thread hop per watch event.
@kopf.index("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
async def serving_deployments(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace or "", name): deployment_essentials(body)}


def _lookup(index: kopf.Index[Any, Any]) -> Callable[[str, str], dict[str, Any] | None]:
    def lookup(namespace: str, name: str) -> dict[str, Any] | None:
        for obj in index.get((namespace, name), []):
            return dict(obj)
        return None

    return lookup


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def engine_deleted(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    namespace = namespace or ""
    # Never touches the store (engines stay there) and never fails: deletion can not wedge on this finalizer.
    memo.wakeups.drop(namespace, name)
    reconciler: Reconciler | None = memo.get("reconciler")
    if reconciler is not None:
        reconciler.forget(namespace, name)


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
    hook = ap.add_argument_group("validating admission webhook (off unless --webhook-port is given)")
    hook.add_argument("--webhook-port", type=int, default=None, help="serve the webhook (HTTPS) on this port")
    hook.add_argument("--webhook-addr", default="0.0.0.0", help="listen address of the webhook (default 0.0.0.0)")
    hook.add_argument(
        "--webhook-cert-dir",
        default=None,
        help="directory with tls.crt and tls.key (and ca.crt for --webhook-manage); with --webhook-cert-secret, where "
        "the certificate is written (default: a new private directory under $TMPDIR)",
    )
    hook.add_argument(
        "--webhook-manage",
        metavar="NAME",
        default=None,
        help="write and own the ValidatingWebhookConfiguration NAME (when the chart does not install one)",
    )
    hook.add_argument(
        "--webhook-host",
        default=None,
        help="host the API server calls (an address outside the cluster): in the URL --webhook-manage writes, and "
        "named by the certificate --webhook-cert-secret issues",
    )
    hook.add_argument(
        "--webhook-cert-secret",
        metavar="NAMESPACE/NAME",
        default=None,
        help="keep the serving certificate and its CA in this Secret: issued when missing, invalid or due for "
        "renewal, shared by all replicas (instead of --webhook-cert-dir files made by someone else)",
    )
    hook.add_argument(
        "--webhook-service",
        metavar="NAMESPACE/NAME",
        default=None,
        help="with --webhook-cert-secret: the Service the API server calls the webhook through (its DNS names go "
        "into the certificate)",
    )
    hook.add_argument(
        "--webhook-configuration",
        metavar="NAME",
        default=None,
        help="with --webhook-cert-secret: put the CA into this ValidatingWebhookConfiguration's webhooks (caBundle) "
        "and keep it there",
    )
    hook.add_argument(
        "--webhook-cert-days",
        type=int,
        default=3650,
        help="with --webhook-cert-secret: validity of issued certificates, in days (default 3650)",
    )
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    memo = kopf.Memo(wakeups=Wakeups(), webhook=None, stop=asyncio.Event(), watched_namespaces=args.namespace or [])
    if args.webhook_port is not None:
        enable_webhook(memo, _webhook_options(ap, args))

    from prometheus_client import start_http_server

    from llmengine.logging import configure_logging, mask_stdlib_handlers

    cfg = OperatorConfig.from_env()
    configure_logging(json=cfg.json_logs)
    start_http_server(args.metrics_port if args.metrics_port is not None else cfg.metrics_port)
    liveness = args.liveness or f"http://0.0.0.0:{cfg.health_port}/healthz"
    # Kopf's own lines in the same format as ours: JSON with the object (namespace, name, uid) on per-object lines.
    log_format = kopf.LogFormat.JSON if cfg.json_logs else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=log_format, log_refkey="object")
    # Kopf installs its own root handler: keep that one only (no line twice) and mask secrets in it.
    root = logging.getLogger()
    if len(root.handlers) > 1:
        root.handlers[:] = root.handlers[-1:]
    mask_stdlib_handlers()
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace or [],
            standalone=not args.peering,
            peering_name=args.peering,
            priority=args.priority if args.priority is not None else random.randint(1, 1_000_000),
            liveness_endpoint=liveness,
            memo=memo,
            stop_flag=memo.stop,
        )
    )
    return 0


def _object_ref(ap: argparse.ArgumentParser, flag: str, value: str) -> tuple[str, str]:
    ns, _, name = value.partition("/")
    if not ns or not name or "/" in name:
        ap.error(f"{flag} takes NAMESPACE/NAME, not {value!r}")
    return ns, name


def _webhook_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> WebhookOptions:
    cert_secret = None
    if args.webhook_cert_secret:
        ns, name = _object_ref(ap, "--webhook-cert-secret", args.webhook_cert_secret)
        service = _object_ref(ap, "--webhook-service", args.webhook_service) if args.webhook_service else None
        if service is None and not args.webhook_host:
            ap.error(
                "--webhook-cert-secret needs --webhook-service or --webhook-host: the names the certificate is for"
            )
        if args.webhook_cert_days < 1:
            ap.error("--webhook-cert-days must be at least 1")
        names = Names.of(service=service, host=args.webhook_host)
        cert_secret = CertSecret(ns, name, names, args.webhook_cert_days, args.webhook_configuration)
    else:
        if args.webhook_configuration or args.webhook_service:
            ap.error("--webhook-configuration and --webhook-service go with --webhook-cert-secret")
        certs = [os.path.join(args.webhook_cert_dir or "", f) for f in ("tls.crt", "tls.key")]
        if not args.webhook_cert_dir or not all(os.path.isfile(c) for c in certs):
            ap.error(
                "--webhook-port needs --webhook-cert-secret, or --webhook-cert-dir with tls.crt and tls.key "
                "(the API server calls HTTPS)"
            )
    return WebhookOptions(
        port=args.webhook_port,
        addr=args.webhook_addr,
        cert_dir=args.webhook_cert_dir,
        host=args.webhook_host,
        manage=args.webhook_manage,
        cert_secret=cert_secret,
    )
