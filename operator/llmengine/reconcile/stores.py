"""The engine stores the operator talks to: one client per location and credentials, what is known committed, and
the few writes the operator makes to a store (quarantining an engine that fails verification)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from llmengine.api.artifacts import BuildProgress, EngineGrant, GrantedEngine, StoreLocation
from llmengine.clients.kube import Kube
from llmengine.clients.store import (
    DEFAULT_STORE,
    SPEC_STORE,
    AccessDenied,
    CredentialsError,
    EngineStore,
    IntegrityError,
    S3Config,
    StoreError,
    make_s3_client,
)
from llmengine.clock import iso, utcnow
from llmengine.logging import register_secret
from llmengine.reconcile import metrics
from llmengine.reconcile.snapshot import StoreView

COMMITTED_TTL_SECONDS = 300.0
# A spec's credentials Secret is read again after this long (a rotation is picked up within it), at once after the
# store refused the credentials read from it, and on every look-up while it is missing.
SECRET_TTL_SECONDS = 60.0


@dataclass(frozen=True)
class StoreAccess:
    location: StoreLocation
    pod_secret: str | None  # Secret the build and serving pods read credentials from
    explicit: bool  # the spec names its own credentials Secret
    default: bool  # the engine has no spec.store: the operator's default store (the chart's values)
    # Builds run in this namespace (the operator's) with pod_secret there; the other pods read through grants.
    build_namespace: str | None = None

    @property
    def isolated(self) -> bool:
        return self.build_namespace is not None


class Stores:
    def __init__(self, kube: Kube, ca_bundle: str | None = None) -> None:
        self.kube = kube
        self.ca_bundle = ca_bundle  # the chart's CA bundle for store endpoints (a private CA)
        # When each engine was last seen committed: a commit is never modified, but a person (or a lifecycle rule)
        # may delete it, so it is asked again after COMMITTED_TTL_SECONDS.
        self._committed: dict[tuple[str, str, str, str], float] = {}
        self._clients: dict[tuple[Any, ...], EngineStore] = {}
        # (namespace, Secret) -> when read, the credentials in it
        self._secrets: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}

    @staticmethod
    def _commit_key(access: StoreAccess, digest: str) -> tuple[str, str, str, str]:
        loc = access.location
        return (loc.endpoint or "", loc.bucket, loc.prefix, digest)

    def remembers(self, access: StoreAccess, digest: str) -> bool:
        """Whether view() will answer committed from memory, without asking the store."""
        seen = self._committed.get(self._commit_key(access, digest))
        return seen is not None and time.monotonic() - seen < COMMITTED_TTL_SECONDS

    async def view(self, ns: str, access: StoreAccess, digest: str) -> StoreView:
        """Whether the engine is committed (remembered for COMMITTED_TTL_SECONDS once seen)."""
        uri = access.location.engine_uri(digest)
        ck = self._commit_key(access, digest)
        if self.remembers(access, digest):
            return StoreView(True, None, uri)
        try:
            store = await self.client(ns, access)
            ok = await asyncio.to_thread(store.is_committed, digest)
        except StoreError as e:
            metrics.STORE_ERRORS.inc()
            if isinstance(e, CredentialsError | AccessDenied) and access.pod_secret:
                self._secrets.pop((ns, access.pod_secret), None)  # perhaps rotated since: read it again next time
            return StoreView(None, str(e), uri)  # the store's errors name the settings this engine uses
        except Exception as e:  # a store outage must never crash the operator
            metrics.STORE_ERRORS.inc()
            return StoreView(None, f"{type(e).__name__}: {e}"[:300], uri)
        if ok:
            self._committed[ck] = time.monotonic()
        else:
            self._committed.pop(ck, None)
        return StoreView(ok, None, uri)

    async def progress(self, ns: str, access: StoreAccess, digest: str) -> BuildProgress | None:
        """Where the running build is, as its builder last wrote; None when it can not be read (it is only a note)."""
        try:
            store = await self.client(ns, access)
            return await asyncio.to_thread(store.get_progress, digest)
        except Exception:  # the commit look-up reports outages; a missing note changes no decision
            return None

    async def quarantine(self, ns: str, access: StoreAccess, digest: str, reason: str) -> str:
        """Uncommit an engine that fails verification, keeping it for inspection; where its record went."""
        self._committed.pop(self._commit_key(access, digest), None)
        store = await self.client(ns, access)
        return await asyncio.to_thread(store.quarantine_engine, digest, reason)

    async def grant(self, ns: str, access: StoreAccess, digests: tuple[str, ...], seconds: int) -> EngineGrant:
        """Presigned read URLs, valid `seconds`, for those of `digests` that are committed (signed here: one manifest
        read per engine)."""
        store = await self.client(ns, access)
        expires = utcnow() + datetime.timedelta(seconds=seconds)

        def sign() -> dict[str, GrantedEngine]:
            found: dict[str, GrantedEngine] = {}
            for digest in digests:
                # One no longer committed (quarantined, deleted) has nothing to read.
                with contextlib.suppress(IntegrityError):
                    found[digest] = store.grant(digest, seconds)
            return found

        engines = await asyncio.to_thread(sign)
        return EngineGrant(location=access.location, expires_at=iso(expires), engines=engines)

    async def client(self, ns: str, access: StoreAccess) -> EngineStore:
        # One client per location and the credentials it signs with (a boto3 client holds several MiB), shared by
        # the engines of every namespace that use them; the namespace only says where a credentials Secret is read.
        key: tuple[Any, ...] = (access.location, access.default)
        creds: dict[str, str] = {}
        if access.explicit and access.pod_secret:
            creds = await self._credentials(ns, access.pod_secret)
            key = (*key, hashlib.sha256(json.dumps(creds, sort_keys=True).encode()).hexdigest())
        if key not in self._clients:
            cfg = S3Config.for_location(access.location, ca_bundle=self.ca_bundle, **creds)
            names = DEFAULT_STORE if access.default else SPEC_STORE
            self._clients[key] = EngineStore(make_s3_client(cfg), access.location, names=names)
        return self._clients[key]

    async def _credentials(self, ns: str, name: str) -> dict[str, str]:
        """The keys of a spec's credentials Secret, read at most once per SECRET_TTL_SECONDS (an engine waiting on
        its build asks the store on every pass)."""
        seen = self._secrets.get((ns, name))
        if seen is not None and time.monotonic() - seen[0] < SECRET_TTL_SECONDS:
            return seen[1]
        data = await self.kube.get_secret_data(ns, name)
        if data is None:
            self._secrets.pop((ns, name), None)
            raise StoreError(
                f"Secret {name!r} not found in namespace {ns!r}", setting="spec.store.credentialsSecretRef"
            )
        creds = {
            "access_key_id": data.get("AWS_ACCESS_KEY_ID", ""),
            "secret_access_key": data.get("AWS_SECRET_ACCESS_KEY", ""),
        }
        for value in creds.values():
            register_secret(value)  # masked in every log line from now on
        self._secrets[(ns, name)] = (time.monotonic(), creds)
        return creds
