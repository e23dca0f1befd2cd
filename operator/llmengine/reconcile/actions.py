"""What a decision asks the act step to do. Each is idempotent: doing it twice leaves what doing it once does."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StartBuild:
    """Create the build Job of the desired engine (and its request ConfigMap)."""

    attempt: int


@dataclass(frozen=True)
class DeleteBuildJob:
    """Remove the failed build Job, so that the retry can take its name."""


@dataclass(frozen=True)
class AdoptBuildJob:
    """Another engine of the same identity made the build Job: join its owners (and its ConfigMap's)."""

    job: str


@dataclass(frozen=True)
class Serve:
    """The serving Deployment serves engine `digest` with server `image` on `replicas` pods (None: the spec's);
    its Service exists."""

    digest: str
    image: str
    replicas: int | None = None


@dataclass(frozen=True)
class Attach:
    """The object of `kind` the spec asks for next to the Deployment (an HPA, an Ingress, an HTTPRoute) is as
    rendered."""

    kind: str


@dataclass(frozen=True)
class Detach:
    """The spec no longer asks for the object of `kind`: delete it."""

    kind: str


@dataclass(frozen=True)
class Quarantine:
    """The committed desired engine fails verification: uncommit it in the store (kept for inspection)."""

    digest: str
    reason: str


@dataclass(frozen=True)
class StartBenchmark:
    """Create the benchmark Job of the desired engine (and its request ConfigMap)."""


@dataclass(frozen=True)
class Grant:
    """The engine's grant Secret holds fresh presigned URLs for exactly these committed engines (the desired one and
    the one the Deployment serves), for its benchmark and serving pods."""

    digests: tuple[str, ...]


Action = Grant | StartBuild | DeleteBuildJob | AdoptBuildJob | Serve | Attach | Detach | Quarantine | StartBenchmark
