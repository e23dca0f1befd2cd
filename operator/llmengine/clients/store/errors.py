"""What can go wrong talking to the store, as one-line errors that name the setting to fix, and which failures
another attempt may get past."""

from __future__ import annotations

import errno
import http.client
import ssl
from dataclasses import dataclass

from botocore import exceptions as bx
from urllib3 import exceptions as u3

from llmengine.text import one_line

# Settings the one-line errors point at (the LLMEngine fields a user edits).
SETTING_CREDENTIALS = "spec.store.credentialsSecretRef"
SETTING_BUCKET = "spec.store.bucket"
SETTING_ENDPOINT = "spec.store.endpoint"
SETTING_CA_BUNDLE = "spec.pods.caBundle"
# The build pods' environment variable that turns the uploads' CRC32C part checksums off (chart: enginePods.env).
SETTING_PART_CHECKSUM = "LLMENGINE_S3_PART_CHECKSUM"


@dataclass(frozen=True)
class StoreSettings:
    """How the errors of one store name what to fix: an engine's own spec.store fields, or the chart's values when
    the engine uses the operator's default store."""

    credentials: str = SETTING_CREDENTIALS
    bucket: str = SETTING_BUCKET
    endpoint: str = SETTING_ENDPOINT


SPEC_STORE = StoreSettings()
DEFAULT_STORE = StoreSettings(
    credentials=(
        "the operator's default store credentials (chart values store.credentialsSecret and store.engineSecret)"
    ),
    bucket="the operator's default store (chart value store.bucket)",
    endpoint="the operator's default store (chart value store.endpoint)",
)


class StoreError(Exception):
    """A store operation failed. The message is one line; ``setting`` names what the user should fix, if any."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class CredentialsError(StoreError):
    pass


class AccessDenied(StoreError):
    pass


class BucketNotFound(StoreError):
    pass


class EndpointUnreachable(StoreError):
    pass


class UntrustedCertificate(StoreError):
    """The endpoint's TLS certificate does not verify against the CA bundle in use (a private CA not given)."""


class ManifestInvalid(StoreError):
    """A manifest.json exists but does not parse as a Manifest: a broken commit, rebuilt over by the builder."""


class IntegrityError(StoreError):
    """The stored engine does not match its manifest (or has none). ``path`` names the file when one is at fault."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message, setting=None)
        self.path = path


# AWS codes, plus versitygw's answer for an unknown access key.
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "InvalidClientTokenId",
        "XAdminUserNotFound",
    }
)


def translate_error(exc: BaseException, endpoint: str, bucket: str, names: StoreSettings = SPEC_STORE) -> StoreError:
    """Map a botocore/s3transfer exception to a one-line StoreError naming the setting to fix, as `names` call it."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return CredentialsError(
            f"no S3 credentials found: set {names.credentials} or configure workload identity",
            names.credentials,
        )
    if isinstance(exc, bx.SSLError):
        # Pods trust spec.pods.caBundle (over the chart's enginePods.caBundle); the operator trusts the chart's.
        return UntrustedCertificate(
            f"the TLS certificate of S3 endpoint {endpoint} is not trusted ({one_line(str(exc), 160)}): give its CA "
            f"in {SETTING_CA_BUNDLE}, or for every engine and the operator itself in the chart value "
            "enginePods.caBundle",
            SETTING_CA_BUNDLE,
        )
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ConnectionClosedError):
        return EndpointUnreachable(f"cannot reach S3 endpoint {endpoint}: check {names.endpoint}", names.endpoint)
    if isinstance(exc, bx.ReadTimeoutError):
        return EndpointUnreachable(f"S3 endpoint {endpoint} timed out: check {names.endpoint}", names.endpoint)
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code in _CREDENTIAL_CODES:
            return CredentialsError(
                f"S3 rejected the credentials ({code}): check the secret named in {names.credentials}",
                names.credentials,
            )
        if code == "NoSuchBucket":
            return BucketNotFound(
                f"bucket '{bucket}' does not exist at {endpoint}: create it or fix {names.bucket}", names.bucket
            )
        if code in ("AccessDenied", "403", "Forbidden"):
            return AccessDenied(
                f"S3 denied access to bucket '{bucket}' ({code}): grant the credentials in "
                f"{names.credentials} read/write on it",
                names.credentials,
            )
        msg = str(err.get("Message", "")) or str(exc)
        return StoreError(f"S3 error {code or 'unknown'} at {endpoint}: {one_line(msg)}")
    if isinstance(exc, bx.BotoCoreError):
        return StoreError(f"S3 client error at {endpoint}: {one_line(str(exc))}")
    return StoreError(f"S3 operation failed at {endpoint}: {type(exc).__name__}: {one_line(str(exc))}")


def error_code(exc: BaseException) -> str:
    if isinstance(exc, bx.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def error_message(exc: bx.ClientError) -> str:
    return " ".join(str(exc.response.get("Error", {}).get("Message", "")).split())


# The store's answer when the bytes it received do not match the checksum sent with them (AWS: BadDigest; some
# S3-compatible stores: InvalidDigest, XAmzContentChecksumMismatch).
CHECKSUM_MISMATCH = frozenset({"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch"})


def refuses_checksums(exc: bx.ClientError) -> bool:
    """Whether the store refused a request for naming a checksum it does not implement: NotImplemented (AWS's code
    for a header it does not implement; StorageGRID says XNotImplemented) unless the header it names is another
    one, or an InvalidArgument/InvalidRequest calling the checksum unsupported. A checksum the store does implement
    but finds malformed or of the wrong type is not a refusal: turning checksums off would hide that."""
    error = exc.response.get("Error", {})
    code, message = error_code(exc), error_message(exc).lower()
    if code in ("NotImplemented", "XNotImplemented"):
        header = str(error.get("Header", "")).lower()
        return not header or "checksum" in header
    unsupported = any(w in message for w in ("unsupported", "not supported", "not implemented"))
    return code in ("InvalidArgument", "InvalidRequest") and "checksum" in message and unsupported


# Worth waiting out: the server is restarting or overloaded, a connection was refused or cut mid-body.
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException", "Throttling"}
)
_TRANSIENT_EXCEPTIONS = (
    bx.ConnectionError,  # refused, reset, closed, connect timeout
    bx.HTTPClientError,  # read timeout, protocol errors
    bx.ResponseStreamingError,  # the body was cut
    bx.IncompleteReadError,
    u3.ProtocolError,
    u3.ReadTimeoutError,
    u3.NewConnectionError,  # a presigned URL's GET (clients/store/urls.py) without botocore's wrapping
    u3.ConnectTimeoutError,
    ConnectionError,
    # A body read straight from http.client (receive.body_reader) fails without urllib3's wrapping: cut, timed out,
    # or a TLS stream that ended mid-record.
    http.client.IncompleteRead,
    TimeoutError,
    ssl.SSLEOFError,
)


# A route or network that went away under an open connection: the socket calls of a body read straight from
# http.client (receive.py) raise these as plain OSError, without urllib3's or botocore's wrapping. The usual errors of
# a local file (ENOSPC, EDQUOT, EIO, EROFS) are not among them: another attempt would fail the same way. (A file on a
# soft-mounted SMB share whose server is away answers EHOSTDOWN too; that is retried, within the budget.)
_NETWORK_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.ENETRESET})


def is_transient(exc: BaseException) -> bool:
    """True for failures that another attempt may get past: not credentials, not a missing bucket or object."""
    if isinstance(exc, bx.SSLError):
        return False  # a certificate problem stays one
    if isinstance(exc, (EndpointUnreachable, *_TRANSIENT_EXCEPTIONS)):
        return True
    if type(exc) is OSError and exc.errno in _NETWORK_ERRNOS:
        return True
    if isinstance(exc, bx.ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return error_code(exc) in _TRANSIENT_CODES or status >= 500
    return False
