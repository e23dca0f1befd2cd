"""`llmengine operator` with two probes for scripts/profile_operator.py; the operator itself is unchanged.

- Memory: with PROFILE_TRACE_FRAMES > 0, tracemalloc runs from the start; SIGUSR1 writes a snapshot to
  $PROFILE_DIR/snapshot-<n>.bin (n counts from 0).
- Timeline: every watch event Kopf processes, every wake-up, reconcile pass and Kubernetes call (queued on the
  session's pool, ended), and every store look-up, with wall-clock times (time.time(), comparable across processes
  of one machine); SIGUSR2 writes them to $PROFILE_DIR/timeline.jsonl.

    PROFILE_DIR=/tmp/p python scripts/traced_operator.py operator --namespace x ...
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

OUT = Path(os.environ["PROFILE_DIR"])
FRAMES = int(os.environ.get("PROFILE_TRACE_FRAMES", "0"))
if FRAMES:
    # Imported before tracing starts: the generated Kubernetes API classes take minutes to import under tracemalloc,
    # and what an import allocates is in the idle snapshot anyway (only what engines add is reported).
    import boto3  # noqa: F401
    from kubernetes import client

    for api in ("CoreV1Api", "BatchV1Api", "AppsV1Api", "CustomObjectsApi", "AdmissionregistrationV1Api"):
        getattr(client, api)
    import llmengine.handlers  # noqa: F401

    tracemalloc.start(FRAMES)

EVENTS: list[tuple[Any, ...]] = []  # list.append is atomic: safe from the worker threads
_snapshots = iter(range(1_000_000))


def _snapshot(signum: int, frame: Any) -> None:
    path = OUT / f"snapshot-{next(_snapshots)}.bin"
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    else:
        path.write_bytes(b"")


def _timeline(signum: int, frame: Any) -> None:
    tmp = OUT / "timeline.jsonl.tmp"
    with tmp.open("w") as f:
        for ev in list(EVENTS):
            f.write(json.dumps(ev) + "\n")
    os.replace(tmp, OUT / "timeline.jsonl")


def _install() -> None:
    import kopf._core.reactor.processing as processing

    from llmengine import handlers
    from llmengine.clients.kube import Kube
    from llmengine.reconcile.engine import Reconciler
    from llmengine.reconcile.stores import Stores

    process = processing.process_resource_event

    @functools.wraps(process)
    async def traced_process(*args: Any, **kwargs: Any) -> Any:
        raw = kwargs.get("raw_event") or {}
        md = (raw.get("object") or {}).get("metadata") or {}
        resource = kwargs.get("resource")
        EVENTS.append((time.time(), "watch", str(getattr(resource, "plural", "")), md.get("name"), raw.get("type")))
        return await process(*args, **kwargs)

    processing.process_resource_event = traced_process

    wake = handlers.Wakeups.wake

    def traced_wake(self: Any, ns: str, name: str) -> None:
        EVENTS.append((time.time(), "wake", name))
        wake(self, ns, name)

    handlers.Wakeups.wake = traced_wake  # type: ignore[method-assign]

    reconcile = Reconciler.reconcile

    async def traced_reconcile(self: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        md = body["metadata"]
        EVENTS.append((time.time(), "pass-start", md["name"], md.get("generation")))
        try:
            return await reconcile(self, body, *args, **kwargs)
        finally:
            EVENTS.append((time.time(), "pass-end", md["name"], md.get("generation")))

    Reconciler.reconcile = traced_reconcile  # type: ignore[method-assign]

    call = Kube._call

    async def traced_call(self: Any, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        EVENTS.append((time.time(), "call-queued", method, path))
        try:
            return await call(self, method, path, *args, **kwargs)
        finally:
            EVENTS.append((time.time(), "call-ended", method, path))

    Kube._call = traced_call  # type: ignore[method-assign]

    view = Stores.view

    async def traced_view(self: Any, ns: str, access: Any, digest: str) -> Any:
        EVENTS.append((time.time(), "store-view-start", digest[:12]))
        try:
            return await view(self, ns, access, digest)
        finally:
            EVENTS.append((time.time(), "store-view-end", digest[:12]))

    Stores.view = traced_view  # type: ignore[method-assign]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    import faulthandler

    faulthandler.register(signal.SIGWINCH, all_threads=True)  # where it is, on demand
    signal.signal(signal.SIGUSR1, _snapshot)
    signal.signal(signal.SIGUSR2, _timeline)
    _install()
    from llmengine.cli import main as cli_main

    sys.argv = ["llmengine", *sys.argv[1:]]
    return int(cli_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
