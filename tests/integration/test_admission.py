"""The validating webhook on the real API server: `kubectl apply` of an engine the planner rejects is refused."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from llmengine.dev import certs, proc, tools
from llmengine.dev.cluster import ClusterInfo, wait_for
from llmengine.dev.harness import run_operator
from llmengine.dev.seed import engine

pytestmark = pytest.mark.usefixtures("crd")


def _kubectl(info: ClusterInfo, ns: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tools.binary("kubectl")), "--kubeconfig", info.kubeconfig, "-n", ns, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _serving_certs(tmp: Path) -> Path:
    pki = certs.make_ca(tmp / "pki", common_name="webhook-test-ca")
    crt, key = certs.issue(pki, "webhook", "127.0.0.1", dns=["localhost"], ips=["127.0.0.1"], server=True)
    out = tmp / "webhook-certs"
    out.mkdir()
    shutil.copy(crt, out / "tls.crt")
    shutil.copy(key, out / "tls.key")
    shutil.copy(pki.ca_crt, out / "ca.crt")
    return out


def test_kubectl_apply_of_fp8_on_a100_is_refused_by_the_webhook(
    dev_cluster: ClusterInfo, api: Any, namespace: str, tmp_path: Path
) -> None:
    name = f"{namespace}.webhook.llmengine.io"
    port = proc.free_port()
    args = ["--webhook-port", str(port), "--webhook-addr", "127.0.0.1", "--webhook-host", "127.0.0.1"]
    args += ["--webhook-cert-dir", str(_serving_certs(tmp_path)), "--webhook-manage", name]
    adm = client.AdmissionregistrationV1Api(api)
    good = engine("good", dev_cluster, "s3://unused/ckpt/", "engines")
    bad = engine("fp8-a100", dev_cluster, "s3://unused/ckpt/", "engines")
    bad["spec"]["precision"] = {"dtype": "bfloat16", "quantization": "fp8"}
    bad["spec"]["target"] = {"gpu": "A100-80GB"}
    try:
        with run_operator(dev_cluster, namespace, tmp_path, extra_args=args) as op:
            # Kopf creates the configuration, then fills in its webhooks: wait for both.
            conf = wait_for("webhook configuration", lambda: _with_webhooks(adm, name), timeout=60, interval=0.5)
            hook = conf.webhooks[0]
            assert hook.failure_policy == "Fail"
            assert hook.client_config.url.startswith(f"https://127.0.0.1:{port}/")
            assert sorted(hook.rules[0].operations) == ["CREATE", "UPDATE"]

            refused = _kubectl(dev_cluster, namespace, "apply", "-f", "-", stdin=yaml.safe_dump(bad))
            assert refused.returncode != 0, refused.stdout
            assert "denied the request" in refused.stderr, refused.stderr
            assert "spec.precision.quantization" in refused.stderr and "8.9" in refused.stderr, refused.stderr
            assert f"LLMEngine {namespace}/fp8-a100 is invalid" in refused.stderr

            created = _kubectl(dev_cluster, namespace, "apply", "-f", "-", stdin=yaml.safe_dump(good))
            assert created.returncode == 0, created.stderr

            # An update that would make the stored engine invalid is refused too; the object keeps its spec.
            broken = _kubectl(
                dev_cluster,
                namespace,
                "patch",
                "llmengine",
                "good",
                "--type=merge",
                "-p",
                '{"spec":{"target":{"gpu":"A100-80GB"},"precision":{"quantization":"fp8"}}}',
            )
            assert broken.returncode != 0 and "denied the request" in broken.stderr, broken.stderr
            # A change that moves the identity is allowed, with a warning kubectl prints.
            grown = _kubectl(
                dev_cluster,
                namespace,
                "patch",
                "llmengine",
                "good",
                "--type=merge",
                "-p",
                '{"spec":{"build":{"maxSeqLen":2048}}}',
            )
            assert grown.returncode == 0, grown.stderr
            assert "Warning:" in grown.stderr and "builds a new engine" in grown.stderr, grown.stderr
            got = client.CustomObjectsApi(api).get_namespaced_custom_object(
                "llmengine.io", "v1alpha1", namespace, "llmengines", "good"
            )
            assert got["spec"]["target"]["gpu"] == "H100-80GB"
            assert "Traceback" not in op.logs()
        # A clean stop empties the configuration it managed, so a stopped operator blocks nobody.
        wait_for("webhook configuration emptied", lambda: not _config(adm, name).webhooks, timeout=30, interval=0.5)
    finally:
        try:
            adm.delete_validating_webhook_configuration(name)
        except client.ApiException as e:
            if e.status != 404:
                raise


def _with_webhooks(adm: Any, name: str) -> Any:
    conf = _config(adm, name)
    return conf if conf is not None and conf.webhooks else None


def _config(adm: Any, name: str) -> Any:
    try:
        return adm.read_validating_webhook_configuration(name)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise
