"""The admission webhook's serving certificate when the operator keeps it itself (`--webhook-cert-secret`).

A CA and a serving certificate signed by it live in one Secret that every replica shares, so rendering the chart
twice (as Argo CD does on every refresh) changes nothing: the chart renders the Secret empty and no caBundle, the
operator fills both in. This module decides, from what the Secret holds and a clock, whether it can be served as
it is, needs a new serving certificate under the same CA (names changed, renewal due), or a new CA as well; and it
issues them. Nothing here reads or writes the cluster.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The Secret's keys: the CA (its key signs new serving certificates) and the serving pair.
KEYS = ("ca.crt", "ca.key", "tls.crt", "tls.key")
# A certificate is renewed once less than this part of its lifetime is left (cert-manager's default renewBefore).
RENEW_FRACTION = 1 / 3
# Clocks of the API server and the operator may differ a little: certificates start this much in the past.
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Names:
    """What the API server calls the webhook by: the Service's DNS names, or the host of webhook.url."""

    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()

    @classmethod
    def of(cls, service: tuple[str, str] | None = None, host: str | None = None) -> Names:
        """The names of Service (namespace, name) as the API server resolves them, and `host` (a DNS name or an
        IP address)."""
        dns: list[str] = []
        ips: list[str] = []
        if service is not None:
            ns, name = service
            dns += [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        if host:
            try:
                ips.append(str(ipaddress.ip_address(host)))
            except ValueError:
                dns.append(host)
        return cls(tuple(dict.fromkeys(dns)), tuple(dict.fromkeys(ips)))

    @property
    def common_name(self) -> str:
        """The Service's <name>.<namespace>.svc where there is one (what the API server dials), else the first name."""
        svc = [d for d in self.dns if d.endswith(".svc")]
        return (svc or list(self.dns) or list(self.ips))[0][:64]


@dataclass(frozen=True)
class Bundle:
    """PEM of the CA and of the serving certificate, as the Secret keeps them."""

    ca_crt: bytes
    ca_key: bytes
    tls_crt: bytes
    tls_key: bytes

    def secret_data(self) -> dict[str, str]:
        """The Secret's `data` (base64)."""
        raw = {"ca.crt": self.ca_crt, "ca.key": self.ca_key, "tls.crt": self.tls_crt, "tls.key": self.tls_key}
        return {k: base64.b64encode(v).decode() for k, v in raw.items()}

    @property
    def ca_bundle(self) -> str:
        """The webhook configuration's clientConfig.caBundle: base64 of the CA's PEM."""
        return base64.b64encode(self.ca_crt).decode()

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str] | None) -> Bundle | None:
        """What a Secret's `data` holds; None unless all four keys are there and decode."""
        try:
            raw = {k: base64.b64decode((data or {})[k], validate=True) for k in KEYS}
        except (KeyError, binascii.Error, ValueError):
            return None
        if not all(raw.values()):
            return None
        return cls(raw["ca.crt"], raw["ca.key"], raw["tls.crt"], raw["tls.key"])


Action = Literal["keep", "reissue", "new-ca"]


@dataclass(frozen=True)
class Decision:
    """keep: serve what the Secret holds. reissue: a new serving certificate under the same CA (the caBundle stays).
    new-ca: a new CA and serving certificate (the caBundle changes). `reason` says why, for the log."""

    action: Action
    reason: str


def _due(cert: x509.Certificate, now: datetime.datetime) -> str | None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return f"it is not valid before {start:%Y-%m-%dT%H:%M:%SZ}"
    if now >= end:
        return f"it expired at {end:%Y-%m-%dT%H:%M:%SZ}"
    if end - now < (end - start) * RENEW_FRACTION:
        return f"it expires at {end:%Y-%m-%dT%H:%M:%SZ}, less than a third of its lifetime away"
    return None


def _same_key(cert: x509.Certificate, key_pem: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt))


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _names_of(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def decide(data: Mapping[str, str] | None, names: Names, now: datetime.datetime) -> Decision:
    """What to do with a Secret's `data` (None: no Secret) for a webhook called by `names`, at `now`."""
    bundle = Bundle.from_secret_data(data)
    if bundle is None:
        return Decision("new-ca", "the Secret holds no certificate yet")
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_crt)
        leaf = x509.load_pem_x509_certificate(bundle.tls_crt)
    except ValueError:
        return Decision("new-ca", "the Secret's certificates do not parse")
    if not _is_ca(ca) or not _same_key(ca, bundle.ca_key):
        return Decision("new-ca", "the Secret's ca.crt is not a CA whose key is ca.key")
    if why := _due(ca, now):
        return Decision("new-ca", f"the CA is due for renewal: {why}")
    if not _signed_by(leaf, ca) or not _same_key(leaf, bundle.tls_key):
        return Decision("reissue", "tls.crt is not signed by the CA or does not match tls.key")
    dns, ips = _names_of(leaf)
    missing = sorted((set(names.dns) - dns) | (set(names.ips) - ips))
    if missing:
        return Decision("reissue", f"the serving certificate does not name {', '.join(missing)}")
    if why := _due(leaf, now):
        return Decision("reissue", f"the serving certificate is due for renewal: {why}")
    return Decision("keep", "the Secret's certificate is valid for these names")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """A CA's key usage (certificate and CRL signing) or a serving certificate's (signatures)."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _new_ca(common_name: str, days: int, now: datetime.datetime) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            key_usage(signs_certificates=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue(
    names: Names,
    days: int,
    now: datetime.datetime,
    ca: tuple[bytes, bytes] | None = None,
    ca_name: str = "llmengine-webhook-ca",
) -> Bundle:
    """A serving certificate for `names`, valid `days` from `now`, signed by `ca` (PEM certificate and key), or by a
    new CA of the same validity when `ca` is None."""
    if not names.dns and not names.ips:
        raise ValueError("a serving certificate needs at least one DNS name or IP address")
    ca_crt, ca_key_pem = ca if ca is not None else _new_ca(ca_name, days, now)
    ca_cert = x509.load_pem_x509_certificate(ca_crt)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an ECDSA key")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in names.dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in names.ips]
    # A serving certificate never outlives its CA.
    end = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names.common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            key_usage(signs_certificates=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Bundle(ca_crt, ca_key_pem, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def renew(
    decision: Decision, data: Mapping[str, str] | None, names: Names, days: int, now: datetime.datetime
) -> Bundle:
    """What to write into the Secret for a decision other than keep: a new serving certificate under the Secret's
    CA (reissue), or a new CA and certificate (new-ca)."""
    held = Bundle.from_secret_data(data)
    if decision.action == "reissue" and held is not None:
        return issue(names, days, now, ca=(held.ca_crt, held.ca_key))
    return issue(names, days, now)
