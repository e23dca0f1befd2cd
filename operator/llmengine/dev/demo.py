"""`make demo`: the local simulated GPU cluster and S3, the chart installed, the operator running with the chart's
ServiceAccount, an example engine built (test compiler) and served to Ready. The cluster is left up."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from llmengine.dev import proc, tools
from llmengine.dev.cluster import ClusterInfo, DevCluster, wait_for
from llmengine.dev.seed import create_store_secret, upload_tiny_checkpoint

NAME = "demo"
SYSTEM_NS = "llmengine-system"
DEMO_NS = "demo"
EXAMPLE = tools.REPO_ROOT / "examples" / "tiny-demo.yaml"
MODEL_PREFIX = "models/tiny-llama"


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def helm(info: ClusterInfo, *args: str) -> None:
    subprocess.run(
        [str(tools.binary("helm")), "--kubeconfig", info.kubeconfig, *args], check=True, stdout=subprocess.DEVNULL
    )


def kubectl(info: ClusterInfo, *args: str) -> str:
    out = subprocess.run(
        [str(tools.binary("kubectl")), "--kubeconfig", info.kubeconfig, *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


def refused_fp8_on_a100(info: ClusterInfo) -> str:
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["metadata"]["name"] = "tiny-demo-fp8-a100"
    calibration = {"dataset": {"s3": {"uri": f"s3://{info.s3_bucket}/calibration/demo/"}}}
    obj["spec"]["precision"] = {"quantization": "fp8", "calibration": calibration}
    obj["spec"]["target"] = {"gpu": "A100-80GB"}
    res = subprocess.run(
        [str(tools.binary("kubectl")), "--kubeconfig", info.kubeconfig, "-n", DEMO_NS, "apply", "-f", "-"],
        input=yaml.safe_dump(obj),
        capture_output=True,
        text=True,
    )
    if res.returncode == 0:
        raise RuntimeError("the webhook admitted an FP8 engine on an A100")
    return res.stderr.strip()


def operator_kubeconfig(info: ClusterInfo, api: Any, cluster: DevCluster) -> Path:
    """A kubeconfig whose only credential is a token of the chart's ServiceAccount: the operator gets exactly the
    chart's RBAC."""
    from kubernetes import client

    token = (
        client.CoreV1Api(api)
        .create_namespaced_service_account_token(
            "llmengine-operator", SYSTEM_NS, {"spec": {"expirationSeconds": 7 * 24 * 3600}}
        )
        .status.token
    )
    cfg = yaml.safe_load(Path(info.kubeconfig).read_text())
    cfg["users"] = [{"name": "operator", "user": {"token": token}}]
    cfg["contexts"][0]["context"]["user"] = "operator"
    path = cluster.dir / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


def main() -> int:
    from kubernetes import client, config

    t0 = time.monotonic()
    cluster = DevCluster(NAME)
    say("starting the local GPU cluster (etcd, kube-apiserver, controller-manager, scheduler, kwok nodes, S3)")
    info = cluster.up()
    api = config.new_client_from_config(config_file=info.kubeconfig)
    core = client.CoreV1Api(api)
    say(f"cluster up: {info.apiserver}; nodes:")
    print(kubectl(info, "get", "nodes", "-L", "nvidia.com/gpu.product", "-L", "nvidia.com/mig.strategy"))

    say("installing the chart (CRDs, RBAC, operator Deployment, validating webhook)")
    chart = tools.REPO_ROOT / "charts" / "llmengine-operator"
    # The operator runs on this machine (simulated nodes run no containers): the API server calls its webhook here.
    webhook_port = proc.free_port()
    helm(
        info,
        "upgrade",
        "--install",
        "llmengine-operator",
        str(chart),
        "--namespace",
        SYSTEM_NS,
        "--create-namespace",
        "--set",
        "operator.compiler=test",
        "--set",
        f"store.bucket={info.s3_bucket}",
        "--set",
        f"store.endpoint={info.s3_endpoint}",
        "--set",
        "store.credentialsSecret=s3-creds",
        "--set",
        f"webhook.url=https://127.0.0.1:{webhook_port}",
        "--wait=false",
    )
    say("running the operator locally with the chart's ServiceAccount token (simulated nodes run no containers)")
    kcfg = operator_kubeconfig(info, api, cluster)
    proc.stop_named(cluster.dir, "operator")
    proc.start(
        "operator",
        [
            sys.executable,
            "-m",
            "llmengine.cli",
            "operator",
            "--all-namespaces",
            "--metrics-port",
            "0",
            "--liveness",
            f"http://127.0.0.1:{proc.free_port()}/healthz",  # port 0 would mean 80 to Kopf: root only, and taken
            f"--webhook-port={webhook_port}",
            "--webhook-addr=127.0.0.1",
            # As the chart's Deployment runs it: the certificate kept in the chart's Secret, its CA put into the
            # chart's webhook configuration; named for the address the API server calls (webhook.url).
            f"--webhook-cert-secret={SYSTEM_NS}/llmengine-operator-webhook-cert",
            f"--webhook-service={SYSTEM_NS}/llmengine-operator-webhook",
            "--webhook-configuration=llmengine-operator",
            "--webhook-host=127.0.0.1",
        ],
        cluster.dir,
        env={
            "KUBECONFIG": str(kcfg),
            "LLMENGINE_COMPILER": "test",
            "LLMENGINE_TEST_ENGINE_BYTES": str(8 * 1024 * 1024),
            "LLMENGINE_BUILDER_IMAGE": "llmengine-builder:dev",
            "LLMENGINE_SERVER_IMAGE": "llmengine-server:dev",
            "LLMENGINE_STORE_BUCKET": info.s3_bucket,
            "LLMENGINE_STORE_ENDPOINT": info.s3_endpoint,
            "LLMENGINE_STORE_SECRET": "s3-creds",
            "AWS_ACCESS_KEY_ID": info.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": info.s3_secret_key,
            "LLMENGINE_JSON_LOGS": "false",
        },
    )

    wait_for("the operator's webhook", lambda: proc.port_open(webhook_port), timeout=120, interval=0.3)
    say(f"applying {EXAMPLE.relative_to(tools.REPO_ROOT)} in namespace {DEMO_NS}")
    upload_tiny_checkpoint(info, MODEL_PREFIX, num_layers=12, weight_bytes=256 * 1024)
    try:
        core.create_namespace({"metadata": {"name": DEMO_NS}})
    except client.exceptions.ApiException as e:
        if e.status != 409:
            raise
    create_store_secret(api, info, DEMO_NS)
    kubectl(info, "apply", "-n", DEMO_NS, "-f", str(EXAMPLE))
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    co = client.CustomObjectsApi(api)
    last = ""

    def ready() -> bool:
        nonlocal last
        obj = co.get_namespaced_custom_object("llmengine.io", "v1alpha1", DEMO_NS, "llmengines", name)
        st = obj.get("status") or {}
        line = f"phase={st.get('phase', '-')}: {st.get('message', '')}"
        if line != last:
            print(f"    {time.monotonic() - t0:6.1f}s  {line}", flush=True)
            last = line
        return st.get("phase") == "Ready"

    wait_for(f"{name} Ready", ready, timeout=600, interval=0.5)
    say("the same engine quantized to FP8 on an A100 (SM 8.0, no FP8): the webhook refuses it")
    print("    " + refused_fp8_on_a100(info).replace("\n", "\n    "))
    say("kubectl get llme -A")
    print(kubectl(info, "get", "llme", "-A"))
    print(kubectl(info, "get", "deploy,job,pods", "-n", DEMO_NS))
    say(f"Ready in {time.monotonic() - t0:.0f}s. Try:")
    kc = f"kubectl --kubeconfig {info.kubeconfig} -n {DEMO_NS}"
    print(f'  rebuild:       {kc} patch llme {name} --type merge -p \'{{"spec":{{"build":{{"maxSeqLen":2048}}}}}}\'')
    print(f'  rollout only:  {kc} patch llme {name} --type merge -p \'{{"spec":{{"serving":{{"replicas":3}}}}}}\'')
    print(f"  watch:         {kc} get llme -w")
    print(f'  shell env:     eval "$(.venv/bin/llmengine dev --name {NAME} env)"')
    print("  tear down:     make demo-down")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
