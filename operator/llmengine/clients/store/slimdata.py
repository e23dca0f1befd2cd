"""botocore's data cut down to the S3 calls this package makes, for the operator's long-lived process.

An S3 client built on botocore's full data holds 15 MiB of decoded JSON for as long as the process lives: the table
of every AWS service's endpoints (6.7 MiB, all 400 services) and the S3 model with its 116 operations and their
documentation (3 MiB more than the operations the store calls). The operator keeps one client for its whole life, so
at a 150 MiB budget that is a tenth of it.

`write(dest)` (the command `llmengine slim-botocore-data DIR`, run when the operator image is built) writes, from
the botocore installed next to it:

- the S3 model with the operations in OPERATIONS and the shapes they reach, without documentation strings;
- its paginators, for those operations;
- the endpoints table with the services in ENDPOINT_SERVICES, every partition and region of each kept as it is;
- the botocore version it was cut from.

`apply(session, path)` makes a botocore session read them; the store's sessions do when LLMENGINE_BOTOCORE_DATA
names such a directory (`usable`). The
endpoint table counts as botocore's own (its entries are botocore's, unchanged), so endpoint resolution, which
treats a user-supplied table differently, is exactly as with the full data. Everything else (the endpoint rule set,
the STS model for web-identity credentials, waiters) still comes from botocore's own data. A directory from another
botocore version is ignored with a warning: the full data is used, nothing fails.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import botocore
import botocore.loaders
import botocore.regions
import botocore.session

from llmengine.logging import get_logger

ENV = "LLMENGINE_BOTOCORE_DATA"
STAMP = "botocore-version"
SERVICE = "s3"

# Every S3 operation the package calls (tests/unit/test_store_slimdata.py finds the calls in the source and checks).
OPERATIONS = (
    "AbortMultipartUpload",
    "CompleteMultipartUpload",
    "CreateMultipartUpload",
    "DeleteObject",
    "DeleteObjects",
    "GetObject",
    "HeadObject",
    "ListObjectsV2",
    "PutObject",
    "UploadPart",
)
# Keyed by endpoint prefix: S3 itself, and what botocore's default credential chain calls: STS (web identity, assumed
# roles) and SSO ("portal.sso" for role credentials, "oidc" for refreshing the token of an SSO profile).
ENDPOINT_SERVICES = ("s3", "sts", "portal.sso", "oidc")

_DOC_KEYS = ("documentation", "documentationUrl")


def _undocumented(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _undocumented(v) for k, v in node.items() if k not in _DOC_KEYS}
    if isinstance(node, list):
        return [_undocumented(v) for v in node]
    return node


def _reached(shapes: Mapping[str, Any], roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        shape = shapes[name]
        for ref in ("member", "key", "value"):
            if ref in shape:
                todo.append(shape[ref]["shape"])
        todo += [m["shape"] for m in shape.get("members", {}).values()]
    return seen


def slim_model(model: Mapping[str, Any], operations: tuple[str, ...] = OPERATIONS) -> dict[str, Any]:
    """The service model with only `operations` and the shapes they reach; documentation dropped from both (the
    metadata, client context parameters included, is kept whole)."""
    missing = [op for op in operations if op not in model["operations"]]
    if missing:
        raise ValueError(f"botocore {botocore.__version__} has no S3 operation {', '.join(missing)}")
    ops = {op: model["operations"][op] for op in operations}
    roots = [o[k]["shape"] for o in ops.values() for k in ("input", "output") if k in o]
    roots += [e["shape"] for o in ops.values() for e in o.get("errors", [])]
    shapes = {name: model["shapes"][name] for name in sorted(_reached(model["shapes"], roots))}
    return {**model, "operations": _undocumented(ops), "shapes": _undocumented(shapes)}


def slim_endpoints(endpoints: Mapping[str, Any], services: tuple[str, ...] = ENDPOINT_SERVICES) -> dict[str, Any]:
    partitions = [
        {**p, "services": {k: v for k, v in p.get("services", {}).items() if k in services}}
        for p in endpoints["partitions"]
    ]
    return {**endpoints, "partitions": partitions}


def write(dest: Path) -> Path:
    """Write the slim data for the installed botocore into dest (created; files replaced). Returns dest."""
    loader = botocore.loaders.create_loader()
    api = loader.determine_latest_version(SERVICE, "service-2")
    model = loader.load_data(f"{SERVICE}/{api}/service-2")
    paginators = loader.load_data(f"{SERVICE}/{api}/paginators-1")
    endpoints = loader.load_data("endpoints")
    out = dest / SERVICE / api
    out.mkdir(parents=True, exist_ok=True)
    pages = {k: v for k, v in paginators.get("pagination", {}).items() if k in OPERATIONS}
    files = {
        out / "service-2.json": slim_model(model),
        out / "paginators-1.json": {**paginators, "pagination": pages},
        dest / "endpoints.json": slim_endpoints(endpoints),
    }
    for path, doc in files.items():
        _replace(path, json.dumps(doc, separators=(",", ":"), sort_keys=True))
    _replace(dest / STAMP, botocore.__version__ + "\n")  # last: the data is whole once it names a version
    return dest


def _replace(path: Path, text: str) -> None:
    """Write path whole or not at all (a process reading the directory never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def usable(env: Mapping[str, str] | None = None) -> Path | None:
    """The directory LLMENGINE_BOTOCORE_DATA names, if it holds slim data of the installed botocore."""
    env = os.environ if env is None else env
    where = env.get(ENV)
    if not where:
        return None
    path = Path(where)
    try:
        version = (path / STAMP).read_text().strip()
    except OSError:
        version = ""
    if version != botocore.__version__:
        get_logger().warning(
            f"{ENV} does not hold data of botocore {botocore.__version__}: using botocore's full data "
            f"(run `llmengine slim-botocore-data {where}` with the installed botocore)",
            directory=where,
            found=version or None,
        )
        return None
    return path


def apply(session: botocore.session.Session, path: Path) -> None:
    """Make `session` read the slim data in `path` (a directory `usable` accepted), before any client is made from
    it."""
    session.get_component("data_loader").search_paths.insert(0, str(path))
    table = json.loads((path / "endpoints.json").read_text())
    session.register_component("endpoint_resolver", botocore.regions.EndpointResolver(table, uses_builtin_data=True))


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: llmengine slim-botocore-data DIR", flush=True)
        return 2
    dest = write(Path(argv[0]))
    print(f"wrote botocore {botocore.__version__}'s S3 data for {len(OPERATIONS)} operations to {dest}")
    return 0
