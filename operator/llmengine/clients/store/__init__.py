"""The engine store: content-addressed engine directories in S3, committed by a manifest written last.

Layout: ``s3://<bucket>/<prefix>/<digest>/<files...>`` plus ``build-result.json`` and, last, ``manifest.json``.
An engine is committed exactly when its manifest is present and parses. Readers never trust anything else: the
download checks every file's size and SHA-256 against the manifest before the engine may be served.

Used by the operator (from asyncio through ``asyncio.to_thread``), the builder and the server. ``EngineStore``
holds nothing but the (thread-safe) boto3 client and the location, so one instance may be shared by threads.

The modules: ``errors`` (one-line errors naming the setting to fix), ``retry`` (waiting out an outage), ``client``
(boto3 and transfer tuning), ``progress``, ``layout`` (the store's own documents, which paths are engine files),
``files`` (a download's local files) and ``engine_store`` (the store itself). Callers import from here.
"""

from llmengine.clients.store.client import (
    DEFAULT_RETRY_SECONDS,
    S3Client,
    S3Config,
    TransferTuning,
    make_s3_client,
)
from llmengine.clients.store.engine_store import EngineStore, load_grant, store_for
from llmengine.clients.store.errors import (
    DEFAULT_STORE,
    SETTING_BUCKET,
    SETTING_CREDENTIALS,
    SETTING_ENDPOINT,
    SPEC_STORE,
    AccessDenied,
    BucketNotFound,
    CredentialsError,
    EndpointUnreachable,
    IntegrityError,
    ManifestInvalid,
    StoreError,
    StoreSettings,
    UntrustedCertificate,
    is_transient,
    translate_error,
)
from llmengine.clients.store.files import byte_ranges, file_sha256
from llmengine.clients.store.layout import (
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    RESERVED_NAMES,
    RESULT_NAME,
    MiB,
    check_manifest_paths,
    new_build_id,
)

# The name the byte-range split had when it was private to this module; tests still import it.
_ranges = byte_ranges

__all__ = [
    "DEFAULT_RETRY_SECONDS",
    "DEFAULT_STORE",
    "MANIFEST_NAME",
    "PARTIAL_SUFFIX",
    "RESERVED_NAMES",
    "RESULT_NAME",
    "SETTING_BUCKET",
    "SETTING_CREDENTIALS",
    "SETTING_ENDPOINT",
    "SPEC_STORE",
    "AccessDenied",
    "BucketNotFound",
    "CredentialsError",
    "EndpointUnreachable",
    "EngineStore",
    "IntegrityError",
    "ManifestInvalid",
    "MiB",
    "S3Client",
    "S3Config",
    "StoreError",
    "StoreSettings",
    "TransferTuning",
    "UntrustedCertificate",
    "byte_ranges",
    "check_manifest_paths",
    "file_sha256",
    "is_transient",
    "load_grant",
    "make_s3_client",
    "new_build_id",
    "store_for",
    "translate_error",
]
