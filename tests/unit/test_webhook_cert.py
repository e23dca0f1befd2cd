"""The webhook certificate the operator keeps in a Secret: what it decides about a Secret's contents, what it issues,
and how replicas sharing the Secret and the webhook configuration converge on one certificate and one CA."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ssl
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509

from llmengine.clients.kube import ApiError, Kube
from llmengine.clock import utcnow
from llmengine.plan.webhook_cert import Bundle, Names, decide, issue, renew
from llmengine.reconcile import webhook_cert
from llmengine.reconcile.webhook_cert import CertSecret, ca_patch

T0 = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)
SVC = Names.of(service=("llmengine-system", "llmengine-operator-webhook"))


def _leaf(b: Bundle) -> x509.Certificate:
    return x509.load_pem_x509_certificate(b.tls_crt)


def _ca(b: Bundle) -> x509.Certificate:
    return x509.load_pem_x509_certificate(b.ca_crt)


def test_names_of_a_service_are_those_the_api_server_dials_and_a_host_is_added_as_ip_or_dns() -> None:
    assert SVC.dns == (
        "llmengine-operator-webhook",
        "llmengine-operator-webhook.llmengine-system",
        "llmengine-operator-webhook.llmengine-system.svc",
        "llmengine-operator-webhook.llmengine-system.svc.cluster.local",
    )
    assert SVC.common_name == "llmengine-operator-webhook.llmengine-system.svc"
    local = Names.of(host="127.0.0.1")
    assert local.ips == ("127.0.0.1",) and not local.dns and local.common_name == "127.0.0.1"
    assert Names.of(service=("ns", "svc"), host="hook.example.com").dns[-1] == "hook.example.com"


def test_issued_certificate_serves_the_names_under_its_ca_and_round_trips_through_secret_data(tmp_path: Path) -> None:
    names = Names.of(service=("ns", "svc"), host="127.0.0.1")
    b = issue(names, days=365, now=T0)
    leaf, ca = _leaf(b), _ca(b)
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == set(names.dns)
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.not_valid_after_utc == T0 + datetime.timedelta(days=365)
    assert Bundle.from_secret_data(b.secret_data()) == b
    assert base64.b64decode(b.ca_bundle) == b.ca_crt
    # What the webhook server loads: the key matches the certificate.
    (tmp_path / "c").write_bytes(b.tls_crt)
    (tmp_path / "k").write_bytes(b.tls_key)
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tmp_path / "c", tmp_path / "k")


def test_decide_keeps_a_good_certificate_and_says_why_it_would_not() -> None:
    b = issue(SVC, days=300, now=T0)
    assert decide(b.secret_data(), SVC, T0).action == "keep"
    assert decide(None, SVC, T0).action == "new-ca"
    assert decide({}, SVC, T0).action == "new-ca"
    assert decide({**b.secret_data(), "ca.key": "not base64!"}, SVC, T0).action == "new-ca"
    # Another CA's certificate, or another key: a new serving certificate under the Secret's CA.
    other = issue(SVC, days=300, now=T0)
    mixed = {**b.secret_data(), "tls.crt": other.secret_data()["tls.crt"]}
    assert decide(mixed, SVC, T0).action == "reissue"
    mixed = {**b.secret_data(), "tls.key": other.secret_data()["tls.key"]}
    assert decide(mixed, SVC, T0).action == "reissue"
    # A name the certificate lacks (webhook.url's host added): reissued under the same CA, named in the reason.
    d = decide(
        b.secret_data(), Names.of(service=("llmengine-system", "llmengine-operator-webhook"), host="10.0.0.1"), T0
    )
    assert d.action == "reissue" and "10.0.0.1" in d.reason
    # A ca.crt that is not the CA of ca.key.
    assert decide({**b.secret_data(), "ca.crt": other.secret_data()["ca.crt"]}, SVC, T0).action == "new-ca"


def test_renewal_comes_a_third_of_the_lifetime_before_expiry() -> None:
    b = issue(SVC, days=300, now=T0)
    assert decide(b.secret_data(), SVC, T0 + datetime.timedelta(days=195)).action == "keep"
    late = decide(b.secret_data(), SVC, T0 + datetime.timedelta(days=205))
    assert late.action == "new-ca" and "renewal" in late.reason  # the CA is as old as the serving certificate
    # A serving certificate under a younger CA is renewed alone: the CA (and the caBundle) stay.
    young_ca = issue(SVC, days=3000, now=T0)
    leaf = issue(SVC, days=300, now=T0, ca=(young_ca.ca_crt, young_ca.ca_key))
    d = decide(leaf.secret_data(), SVC, T0 + datetime.timedelta(days=205))
    assert d.action == "reissue"
    renewed = renew(d, leaf.secret_data(), SVC, 300, T0 + datetime.timedelta(days=205))
    assert renewed.ca_crt == young_ca.ca_crt and renewed.tls_crt != leaf.tls_crt
    assert decide(renewed.secret_data(), SVC, T0 + datetime.timedelta(days=205)).action == "keep"
    # Never past its CA's end.
    short_ca = issue(SVC, days=10, now=T0)
    long_leaf = issue(SVC, days=300, now=T0, ca=(short_ca.ca_crt, short_ca.ca_key))
    assert _leaf(long_leaf).not_valid_after_utc == _ca(short_ca).not_valid_after_utc


def test_webhook_configuration_patch_sets_the_ca_where_it_is_missing_or_stale_only() -> None:
    conf = {
        "webhooks": [
            {"name": "a.llmengine.io", "clientConfig": {"service": {"name": "x"}}},
            {"name": "b.llmengine.io", "clientConfig": {"caBundle": "Q0E="}},
        ]
    }
    assert ca_patch(conf, "Q0E=") == {"webhooks": [{"name": "a.llmengine.io", "clientConfig": {"caBundle": "Q0E="}}]}
    assert ca_patch(conf, "TkVX") == {
        "webhooks": [
            {"name": "a.llmengine.io", "clientConfig": {"caBundle": "TkVX"}},
            {"name": "b.llmengine.io", "clientConfig": {"caBundle": "TkVX"}},
        ]
    }
    done = {"webhooks": [{"name": "a", "clientConfig": {"caBundle": "Q0E="}}]}
    assert ca_patch(done, "Q0E=") is None


class FakeApi:
    """The two objects the certificate code touches, with the API server's resourceVersion checks."""

    def __init__(self, secret: dict[str, str] | None = None, configuration: bool = True) -> None:
        self.version = 1
        self.secret: dict[str, Any] | None = None
        if secret is not None:
            self.secret = {"metadata": {"resourceVersion": "1"}, "data": secret}
        self.configuration: dict[str, Any] | None = (
            {"webhooks": [{"name": "validate-llmengine.llmengine.io", "clientConfig": {}}]} if configuration else None
        )
        self.secret_writes = 0
        self.patches: list[dict[str, Any]] = []
        # Called before a write lands: another replica writing in between.
        self.before_write: Any = None

    async def get_secret(self, ns: str, name: str) -> dict[str, Any] | None:
        return None if self.secret is None else {**self.secret, "metadata": dict(self.secret["metadata"])}

    async def write_secret_data(self, ns: str, name: str, data: dict[str, str], version: str | None) -> None:
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None
            hook()
        current = None if self.secret is None else self.secret["metadata"]["resourceVersion"]
        if version != current:
            raise ApiError(409, "Conflict")
        self.version += 1
        self.secret = {"metadata": {"resourceVersion": str(self.version)}, "data": dict(data)}
        self.secret_writes += 1

    async def get_webhook_configuration(self, name: str) -> dict[str, Any] | None:
        return self.configuration

    async def patch_webhook_configuration(self, name: str, patch: dict[str, Any]) -> None:
        assert self.configuration is not None
        self.patches.append(patch)
        for w in patch["webhooks"]:
            hook = next(h for h in self.configuration["webhooks"] if h["name"] == w["name"])
            hook["clientConfig"].update(w["clientConfig"])


def _cs(**kw: Any) -> CertSecret:
    return CertSecret("llmengine-system", "llmengine-operator-webhook-cert", SVC, 3650, **kw)


def _kube(api: FakeApi) -> Kube:
    return cast(Kube, api)


async def test_first_start_issues_into_the_empty_secret_writes_files_and_injects_the_ca(tmp_path: Path) -> None:
    api = FakeApi(secret={})  # as the chart renders it: no data
    bundle, path = await webhook_cert.start(_kube(api), _cs(configuration="llmengine-operator"), str(tmp_path / "w"))
    assert api.secret_writes == 1 and Bundle.from_secret_data(api.secret["data"]) == bundle  # type: ignore[index]
    assert (Path(path) / "tls.crt").read_bytes() == bundle.tls_crt
    assert (Path(path) / "tls.key").stat().st_mode & 0o077 == 0
    assert api.configuration is not None
    assert api.configuration["webhooks"][0]["clientConfig"]["caBundle"] == bundle.ca_bundle
    # A second replica (or a restart) serves the same certificate and writes nothing.
    again, _ = await webhook_cert.start(_kube(api), _cs(configuration="llmengine-operator"), str(tmp_path / "x"))
    assert again == bundle and api.secret_writes == 1 and len(api.patches) == 1


async def test_replicas_starting_together_serve_the_certificate_of_the_one_that_wrote_first() -> None:
    api = FakeApi(secret={})
    first: list[Bundle] = []

    def another_replica_writes() -> None:
        first.append(issue(SVC, 3650, utcnow()))
        api.version += 1
        api.secret = {"metadata": {"resourceVersion": str(api.version)}, "data": first[0].secret_data()}

    api.before_write = another_replica_writes
    served = await webhook_cert.ensure(_kube(api), _cs())
    assert served == first[0] and api.secret_writes == 0


async def test_without_a_configuration_start_up_serves_after_waiting_and_the_keeper_injects_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(webhook_cert, "CONFIGURATION_WAIT_SECONDS", 0.0)
    api = FakeApi(secret={}, configuration=False)
    bundle, _ = await webhook_cert.start(_kube(api), _cs(configuration="llmengine-operator"))
    api.configuration = {"webhooks": [{"name": "validate-llmengine.llmengine.io", "clientConfig": {}}]}
    restarts: list[str] = []
    keeper = asyncio.create_task(
        webhook_cert.keep(_kube(api), _cs(configuration="llmengine-operator"), bundle, restarts.append, interval=0.01)
    )
    try:
        for _ in range(200):
            if api.patches:
                break
            await asyncio.sleep(0.01)
        assert api.configuration["webhooks"][0]["clientConfig"]["caBundle"] == bundle.ca_bundle
        # Someone takes the CA out again (a re-created configuration): it is put back.
        api.configuration["webhooks"][0]["clientConfig"] = {}
        for _ in range(200):
            if len(api.patches) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(api.patches) == 2 and not restarts
    finally:
        keeper.cancel()


async def test_keeper_asks_for_a_restart_once_the_secret_holds_another_certificate() -> None:
    api = FakeApi(secret={})
    bundle = await webhook_cert.ensure(_kube(api), _cs())
    replaced = issue(SVC, 3650, utcnow())
    api.secret = {"metadata": {"resourceVersion": "99"}, "data": replaced.secret_data()}
    restarts: list[str] = []
    await asyncio.wait_for(webhook_cert.keep(_kube(api), _cs(), bundle, restarts.append, interval=0.01), timeout=5)
    assert len(restarts) == 1 and "llmengine-system/llmengine-operator-webhook-cert" in restarts[0]
