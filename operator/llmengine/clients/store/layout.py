"""Where an engine's files lie: the store's own documents next to them, and which paths may be engine files.

An engine directory <prefix>/<digest>/ holds ``manifest.json`` (the commit: written once, by the first build to
finish), ``build-progress.json`` (where a running build is), a failed build's ``build-result.json``, and one
directory per build, ``builds/<build id>/``, with that build's files and its ``build-result.json``. The manifest
names the build directory it commits; engines committed before builds had directories hold their files at the top.
``quarantine/`` keeps the manifests of engines taken out of service because their files failed verification.
A download in progress writes ``<file>.llmengine-partial``. None of the store's documents is ever an engine file.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path, PurePosixPath

from llmengine.api.artifacts import ManifestFile
from llmengine.clients.store.errors import IntegrityError

MANIFEST_NAME = "manifest.json"
RESULT_NAME = "build-result.json"
PROGRESS_NAME = "build-progress.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME, RESULT_NAME, PROGRESS_NAME})
PARTIAL_SUFFIX = ".llmengine-partial"
# Each build uploads under <engine>/builds/<build id>/; the manifest names the one that committed.
BUILDS_DIR = "builds/"
# Manifests of engines taken out of service because their files failed verification, with the reason.
QUARANTINE_DIR = "quarantine/"
_BUILD_PREFIX = re.compile(r"^builds/[0-9a-z-]{8,64}/$")
MiB = 1024 * 1024
# SHA-256 hashes 64-byte blocks: a chaining value (a part boundary of `partStates`) lies at a multiple of it.
SHA256_BLOCK = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")


def local_files(root: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel in RESERVED_NAMES or rel.endswith(PARTIAL_SUFFIX):
                continue
            out.append((rel, p))
    return out


def check_manifest_paths(files: list[ManifestFile]) -> None:
    """Every entry must be a unique, relative, normalised path that is not one of the store's own documents."""
    seen: set[str] = set()
    for f in files:
        p = PurePosixPath(f.path)
        if (
            not f.path
            or p.is_absolute()
            or ".." in p.parts
            or str(p) != f.path
            or f.path in RESERVED_NAMES
            or f.path.endswith(PARTIAL_SUFFIX)
        ):
            raise IntegrityError(
                f"manifest lists an unexpected entry '{f.path}' (not a plain relative file path)", f.path
            )
        if f.path in seen:
            raise IntegrityError(f"manifest lists '{f.path}' twice", f.path)
        if f.size < 0 or not _hex64(f.sha256):
            raise IntegrityError(f"manifest entry '{f.path}' has an invalid size or sha256", f.path)
        if not _parts_cover(f):
            raise IntegrityError(
                f"manifest entry '{f.path}' has part checks that do not cover its {f.size} bytes "
                "(one kind of check, one per part)",
                f.path,
            )
        seen.add(f.path)


def new_build_id() -> str:
    return uuid.uuid4().hex


def build_prefix(build_id: str) -> str:
    return f"{BUILDS_DIR}{build_id}/"


def check_files_prefix(prefix: str) -> None:
    """A manifest's files prefix is empty (engines committed before builds had a place of their own) or one build's
    directory: never a path that leaves the engine's directory."""
    if prefix and not _BUILD_PREFIX.match(prefix):
        raise IntegrityError(f"manifest names an unexpected files prefix '{prefix}'", prefix)


def _parts_cover(f: ManifestFile) -> bool:
    """No part checks at all, or exactly one kind of them with one per part: `partSha256` a digest for each part,
    `partStates` a chaining value at the end of each part but the last (so parts are whole SHA-256 blocks)."""
    if f.part_size is None:
        return f.part_sha256 is None and f.part_states is None
    if (f.part_sha256 is None) == (f.part_states is None) or f.part_size <= 0:
        return False
    parts = -(-f.size // f.part_size)
    if f.part_sha256 is not None:
        return len(f.part_sha256) == parts and all(_hex64(d) for d in f.part_sha256)
    states = f.part_states or []
    return f.part_size % SHA256_BLOCK == 0 and len(states) == max(parts - 1, 0) and all(_hex64(d) for d in states)


def _hex64(d: str) -> bool:
    return _HEX64.fullmatch(d) is not None
