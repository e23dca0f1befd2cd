"""The webhook's serving certificate kept in a Secret, and its CA kept in the webhook configuration
(`llmengine operator --webhook-cert-secret ... --webhook-configuration ...`): gather the Secret, decide with
plan.webhook_cert, write what the decision says.

Replicas share the Secret. Every write is conditional on the resourceVersion read (a create on there being none),
so when replicas start together one issues and the others, refused with 409, read and serve what it wrote. The CA
goes into every webhook of the configuration, which the chart renders without a caBundle so that rendering it twice
gives the same bytes; it is put back whenever something takes it out (a re-created configuration, a replace).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from llmengine.clients.kube import ApiError, Kube
from llmengine.clock import utcnow
from llmengine.plan.webhook_cert import Bundle, Names, decide, renew

log = logging.getLogger("llmengine.webhook")

# Conditional writes lost to other replicas before giving up (each loss means another replica wrote a good one).
ATTEMPTS = 5
# How long start-up waits for the webhook configuration to exist before serving anyway (Helm and GitOps tools apply
# it together with the Deployment, so it is there within seconds); the keeper puts the CA in when it appears.
CONFIGURATION_WAIT_SECONDS = 60.0
# How often the keeper compares the Secret and the configuration with what this replica serves.
KEEP_INTERVAL_SECONDS = 30.0


@dataclass(frozen=True)
class CertSecret:
    """Where the certificate is kept and what it must name."""

    namespace: str
    name: str
    names: Names
    days: int
    # The ValidatingWebhookConfiguration whose webhooks get the CA as caBundle; None leaves it to someone else.
    configuration: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


async def ensure(kube: Kube, cs: CertSecret, now: Callable[[], datetime] = utcnow) -> Bundle:
    """The certificate to serve: the Secret's when it is good for these names, else a new one written into it."""
    for _ in range(ATTEMPTS):
        secret = await kube.get_secret(cs.namespace, cs.name)
        data: Mapping[str, str] | None = (secret or {}).get("data")
        decision = decide(data, cs.names, now())
        if decision.action == "keep":
            held = Bundle.from_secret_data(data)
            assert held is not None  # decide keeps only a complete bundle
            return held
        bundle = renew(decision, data, cs.names, cs.days, now())
        version = secret["metadata"].get("resourceVersion") if secret is not None else None
        try:
            await kube.write_secret_data(cs.namespace, cs.name, bundle.secret_data(), version)
        except ApiError as e:
            if e.status == 409:
                continue  # another replica wrote first: serve what it wrote
            raise
        log.info("webhook certificate written to Secret %s (%s): %s", cs.ref, decision.action, decision.reason)
        return bundle
    raise RuntimeError(f"Secret {cs.ref} changed under each of {ATTEMPTS} writes of the webhook certificate")


def ca_patch(configuration: Mapping[str, Any], ca_bundle: str) -> dict[str, Any] | None:
    """The strategic merge patch that sets caBundle on every webhook of the configuration that lacks it (webhooks
    merge by name); None when all have it."""
    stale = [
        w["name"]
        for w in configuration.get("webhooks") or []
        if (w.get("clientConfig") or {}).get("caBundle") != ca_bundle
    ]
    if not stale:
        return None
    return {"webhooks": [{"name": n, "clientConfig": {"caBundle": ca_bundle}} for n in stale]}


async def inject(kube: Kube, configuration: str, ca_bundle: str) -> bool:
    """Put the CA into the configuration's webhooks; False while the configuration does not exist."""
    current = await kube.get_webhook_configuration(configuration)
    if current is None:
        return False
    patch = ca_patch(current, ca_bundle)
    if patch is not None:
        await kube.patch_webhook_configuration(configuration, patch)
        log.info("CA of the webhook certificate written to ValidatingWebhookConfiguration %s", configuration)
    return True


def write_files(bundle: Bundle, directory: str | None = None) -> str:
    """tls.crt, tls.key and ca.crt where the webhook server reads them: `directory`, or a new private one under
    $TMPDIR (in the chart's pod, the /tmp emptyDir: the root file system is read-only)."""
    path = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="llmengine-webhook-"))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, content in (("tls.crt", bundle.tls_crt), ("tls.key", bundle.tls_key), ("ca.crt", bundle.ca_crt)):
        target = path / name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
    return str(path)


async def start(kube: Kube, cs: CertSecret, directory: str | None = None) -> tuple[Bundle, str]:
    """Start-up: the certificate ensured and written to files, and its CA in the configuration (waiting a while for
    the configuration to appear), so that once the webhook listens the API server trusts it."""
    bundle = await ensure(kube, cs)
    path = write_files(bundle, directory)
    if cs.configuration is not None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONFIGURATION_WAIT_SECONDS
        while not await inject(kube, cs.configuration, bundle.ca_bundle):
            if loop.time() >= deadline:
                log.warning(
                    "ValidatingWebhookConfiguration %s not found after %.0fs: serving the webhook now, its CA goes in "
                    "once the configuration exists",
                    cs.configuration,
                    CONFIGURATION_WAIT_SECONDS,
                )
                break
            await asyncio.sleep(2.0)
    return bundle, path


async def keep(
    kube: Kube,
    cs: CertSecret,
    served: Bundle,
    restart: Callable[[str], None],
    interval: float = KEEP_INTERVAL_SECONDS,
) -> None:
    """Runs while the operator does: renews the certificate when it is due, keeps the CA in the configuration, and
    asks for a `restart` once the Secret holds a certificate other than the one this replica serves (renewed here
    or by another replica, or replaced by someone): the webhook server reads its certificate only at start."""
    while True:
        await asyncio.sleep(interval)
        try:
            current = await ensure(kube, cs)
            if current.tls_crt != served.tls_crt:
                restart(f"the webhook certificate in Secret {cs.ref} changed: restarting to serve the new one")
                return
            if cs.configuration is not None:
                await inject(kube, cs.configuration, current.ca_bundle)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the API server away for a while: try again next time
            log.warning("webhook certificate check failed (%s: %s); retrying in %.0fs", type(e).__name__, e, interval)
