"""`make demo`: the local simulated GPU cluster and S3, the chart installed, the operator running with the chart's
ServiceAccount, an example engine built (test compiler) and served to Ready, and one request answered through its
serving path: the real metering proxy in front of a local test stand-in (llmengine.dev.servingpath; simulated pods run
no containers, so no trtllm-serve runs). The operator reads that proxy's metrics, so traffic sent with
`llmengine dev traffic` drives the example's rebuildPolicy (Auto). The cluster is left up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from llmengine.clients.store import slimdata
from llmengine.dev import proc, tools
from llmengine.dev.cluster import ClusterInfo, DevCluster, wait_for
from llmengine.dev.harness import OPERATOR_IMAGE_MALLOC, operator_image_botocore_data
from llmengine.dev.seed import create_store_secret, upload_tiny_checkpoint
from llmengine.dev.servingpath import metrics_template

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


def start_serving_path(cluster: DevCluster, name: str, port: int) -> str:
    """The example engine's serving path (metering proxy + test stand-in) on `port`; returns its base URL."""
    component = f"serving-{DEMO_NS}-{name}"
    proc.stop_named(cluster.dir, component)
    argv = [sys.executable, "-m", "llmengine.dev.servingpath", "--cluster-dir", str(cluster.dir)]
    proc.start(component, [*argv, "--namespace", DEMO_NS, "--engine", name, "--port", str(port)], cluster.dir)
    return f"http://127.0.0.1:{port}"


def serving_path_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=3) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def one_request(url: str) -> str:
    body = json.dumps({"prompt": "Hello from the demo", "max_tokens": 16}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return str(r.read().decode())


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
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    meter_port = proc.free_port()
    say(
        f"starting {name}'s serving path on 127.0.0.1:{meter_port}: the real metering proxy in front of a local "
        "TEST SERVER stand-in (not trtllm-serve), answering for the engine's simulated serving pod"
    )
    url = start_serving_path(cluster, name, meter_port)
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
            # The chart's default store.access: builds here, the store's keys never in the engine's namespace.
            "LLMENGINE_STORE_ACCESS": "isolated",
            "LLMENGINE_BUILD_NAMESPACE": SYSTEM_NS,
            "AWS_ACCESS_KEY_ID": info.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": info.s3_secret_key,
            "LLMENGINE_JSON_LOGS": "false",
            # Traffic is read from the serving path's proxy. Scrapes happen on reconcile passes: a pass and a scrape
            # every 5 s (defaults 60 s and 15 s) make a verdict show within seconds of the traffic.
            "LLMENGINE_TRAFFIC_URL_TEMPLATE": metrics_template(meter_port),
            "LLMENGINE_TRAFFIC_SCRAPE_INTERVAL_SECONDS": "5",
            "LLMENGINE_RESYNC_SECONDS": "5",
            # As the operator image runs it: its malloc settings and its slim botocore data.
            **OPERATOR_IMAGE_MALLOC,
            slimdata.ENV: operator_image_botocore_data(),
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
    create_store_secret(api, info, SYSTEM_NS)  # the chart's store.credentialsSecret, in the release namespace
    kubectl(info, "apply", "-n", DEMO_NS, "-f", str(EXAMPLE))
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
    say(f"one request through {name}'s metering proxy ({url}); the TEST SERVER stand-in answers, no model runs")
    wait_for(f"{name}'s serving path", lambda: serving_path_answers(url), timeout=60, interval=0.5)
    print("    " + one_request(url))

    def envelope_observed() -> str | None:
        # The operator's first answered scrape is the baseline: traffic counts from there on.
        obj = co.get_namespaced_custom_object("llmengine.io", "v1alpha1", DEMO_NS, "llmengines", name)
        conds = (obj.get("status") or {}).get("conditions") or []
        c: dict[str, Any] = next((c for c in conds if c.get("type") == "EnvelopeExceeded"), {})
        seen = c.get("reason") not in (None, "NoMetrics")
        return f"EnvelopeExceeded={c.get('status')} ({c.get('reason')}: {c.get('message')})" if seen else None

    say("the operator reads that proxy's /llmengine/metrics for the engine's traffic")
    print("    " + wait_for("the operator's first traffic snapshot", envelope_observed, timeout=60, interval=0.5))
    say("the same engine quantized to FP8 on an A100 (SM 8.0, no FP8): the webhook refuses it")
    print("    " + refused_fp8_on_a100(info).replace("\n", "\n    "))
    say("kubectl get llme -A")
    print(kubectl(info, "get", "llme", "-A"))
    print(kubectl(info, "get", "deploy,job,pods", "-n", DEMO_NS))
    say(f"Ready in {time.monotonic() - t0:.0f}s. Try:")
    kc = f"kubectl --kubeconfig {info.kubeconfig} -n {DEMO_NS}"
    traffic = f".venv/bin/llmengine dev --name {NAME} traffic"
    envelope = (
        "PHASE:.status.phase,ENVELOPE:'.status.conditions[?(@.type==\"EnvelopeExceeded\")].reason',"
        "ENGINE:.status.servingEngine.short,MAX_INPUT:.status.envelope.maxInputLen,AUTO:.status.envelope.autoShapes"
    )
    print(f"  call it:       curl -s {url}/v1/completions -H 'content-type: application/json' \\")
    print('                   -d \'{"prompt": "Hello there", "max_tokens": 16}\'   # through the metering proxy')
    print(f"  metered:       curl -s {url}/llmengine/metrics | grep '^llmengine_requests_total'")
    print(f"  within:        {traffic} --tokens 200 --requests 30   # maxInputLen 512: answered")
    print(f"  beyond:        {traffic} --tokens 800 --requests 30   # refused as too long: EnvelopeExceeded, then")
    print(
        "                 AutoRebuild -> Building -> Deploying -> Ready with a larger maxInputLen (run it again after)"
    )
    print(f"  watch that:    {kc} get llme {name} -w -o custom-columns={envelope}")
    print(f"  explain it:    {kc} describe llme {name}   # conditions, events, status.envelope.autoShapes")
    print(f'  rebuild:       {kc} patch llme {name} --type merge -p \'{{"spec":{{"build":{{"maxSeqLen":2048}}}}}}\'')
    print(f'  rollout only:  {kc} patch llme {name} --type merge -p \'{{"spec":{{"serving":{{"replicas":3}}}}}}\'')
    print(f"  watch:         {kc} get llme -w")
    print(f'  shell env:     eval "$(.venv/bin/llmengine dev --name {NAME} env)"')
    print("  tear down:     make demo-down")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
