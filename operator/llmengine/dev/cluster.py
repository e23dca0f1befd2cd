"""A real Kubernetes control plane on loopback: etcd, kube-apiserver (TLS, RBAC), controller-manager, scheduler,
kwok for simulated GPU nodes, a real S3 server, and the pod runner that executes selected pods' commands.

Every port is free-picked at start, so several clusters (each in its own state directory) run side by side.
State (certificates, kubeconfigs, logs, PIDs, the S3 data) lives in the cluster's state directory;
etcd's data lives on tmpfs when available.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from llmengine.dev import certs, proc, tools
from llmengine.dev.s3 import S3Endpoint, start_s3

# Reverse of the start order; `down` stops in this order.
COMPONENTS = [
    "operator",  # only the demo starts one here
    "runner",
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "s3",
    "etcd",
]
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
DEFAULT_BUCKET = "llmengine"


def state_home() -> Path:
    env = os.environ.get("LLMENGINE_DEV_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "llmengine-dev"


@dataclass
class ClusterInfo:
    """What `up` wrote: enough for `env`, `status`, tests and the demo to talk to the cluster."""

    name: str
    state_dir: str
    kubeconfig: str
    apiserver: str
    etcd: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str
    s3_region: str
    ports: dict[str, int]
    s3_shared: bool = False  # the S3 server is another cluster's (DevCluster's s3 argument)

    def s3(self) -> S3Endpoint:
        return S3Endpoint(self.s3_endpoint, self.s3_access_key, self.s3_secret_key, self.s3_region)

    def env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": self.kubeconfig,
            "LLMENGINE_S3_ENDPOINT": self.s3_endpoint,
            "LLMENGINE_S3_BUCKET": self.s3_bucket,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_REGION": self.s3_region,
        }


class DevCluster:
    def __init__(
        self,
        name: str = "dev",
        state_dir: Path | None = None,
        fleet: Path | None = None,
        restart_backoff_s: float | None = None,
        s3: S3Endpoint | None = None,
    ) -> None:
        """restart_backoff_s: the pod runner's first back-off before a failed init container runs again (a
        kubelet's is 10 s); tests that crash things on purpose shorten it.
        s3: an S3 server that is already running (another cluster's) to use instead of starting one: clusters
        sharing one store. The bucket is created there when missing; `down` leaves that server alone."""
        self.name = name
        self.dir = (state_dir or state_home() / name).resolve()
        self.fleet = fleet or tools.DEVCLUSTER_DIR / "fleet.yaml"
        self.pki = certs.Pki(self.dir / "pki")
        self.restart_backoff_s = restart_backoff_s
        self.shared_s3 = s3

    # ---- info -------------------------------------------------------------------------------------------
    @property
    def info_file(self) -> Path:
        return self.dir / "cluster.json"

    def info(self) -> ClusterInfo | None:
        if not self.info_file.exists():
            return None
        return ClusterInfo(**json.loads(self.info_file.read_text()))

    def extras(self) -> list[str]:
        """Processes started next to the cluster that are none of its components (the demo's serving paths)."""
        pids = self.dir / "pids"
        return sorted(p.name for p in pids.iterdir() if p.name not in COMPONENTS) if pids.is_dir() else []

    def status(self) -> dict[str, int | None]:
        """PID of each component (and of each process started next to it), or None when it is not running. A
        shared S3 server is another cluster's: not listed."""
        started = self.components()
        own = [c for c in reversed(COMPONENTS) if c in started or c == "operator"]
        return {c: proc.running(self.dir, c) for c in [*own, *self.extras()]}

    def components(self) -> list[str]:
        """The processes `up` starts, in `down`'s order: all of COMPONENTS but the operator, and the S3 server
        only when the cluster has one of its own."""
        info = self.info()
        shared = self.shared_s3 is not None or (info is not None and info.s3_shared)
        return [c for c in COMPONENTS if c != "operator" and not (c == "s3" and shared)]

    def healthy(self) -> bool:
        return all(proc.running(self.dir, c) for c in self.components())

    def logs(self) -> dict[str, Path]:
        logs = self.dir / "logs"
        return {p.stem: p for p in sorted(logs.glob("*.log"))} if logs.exists() else {}

    # ---- up ---------------------------------------------------------------------------------------------
    def up(self, timeout: float = 180.0) -> ClusterInfo:
        current = self.info()
        if current and self.healthy():
            return current
        self.down(quiet=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        for c in ("kube-apiserver", "etcd", "kwok", *(("versitygw",) if self.shared_s3 is None else ())):
            tools.binary(c)  # a clear error now rather than a failed start later
        own = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
        ports = {k: proc.free_port() for k in (*own, *(("s3",) if self.shared_s3 is None else ()))}
        self._pki()
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        apiserver = f"https://127.0.0.1:{ports['apiserver']}"
        self._start_etcd(ports, timeout)
        s3 = self.shared_s3 or start_s3(self.dir, port=ports["s3"])[0]
        self._start_apiserver(ports, etcd_url, timeout)
        admin = self._kubeconfig("admin", apiserver)
        self._kubeconfig("controller-manager", apiserver)
        self._kubeconfig("scheduler", apiserver)
        self._start_controllers(ports, timeout)
        info = ClusterInfo(
            name=self.name,
            state_dir=str(self.dir),
            kubeconfig=str(admin),
            apiserver=apiserver,
            etcd=etcd_url,
            s3_endpoint=s3.endpoint,
            s3_access_key=s3.access_key,
            s3_secret_key=s3.secret_key,
            s3_bucket=DEFAULT_BUCKET,
            s3_region=s3.region,
            ports=ports,
            s3_shared=self.shared_s3 is not None,
        )
        self.info_file.write_text(json.dumps(asdict(info), indent=2))
        self.info_file.chmod(0o600)
        self._bootstrap(info)
        self._start_kwok(info, ports, timeout)
        self._start_runner(info)
        self._wait_nodes_ready(info, timeout)
        return info

    def _pki(self) -> None:
        if self.pki.ca_crt.exists():
            return
        certs.make_ca(self.pki.dir)
        certs.issue(
            self.pki,
            "apiserver",
            "kube-apiserver",
            dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
            ips=["127.0.0.1", "10.96.0.1"],
            server=True,
        )
        certs.issue(self.pki, "admin", "llmengine-dev-admin", ["system:masters"])
        # The controller manager runs every controller under its own identity, so it needs broad rights.
        certs.issue(self.pki, "controller-manager", "system:kube-controller-manager", ["system:masters"])
        certs.issue(self.pki, "scheduler", "system:kube-scheduler")

    def _kubeconfig(self, user: str, server: str) -> Path:
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": self.name,
                    "cluster": {"server": server, "certificate-authority-data": b64(self.pki.ca_crt)},
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(self.pki.crt(user)),
                        "client-key-data": b64(self.pki.key(user)),
                    },
                }
            ],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": user}}],
            "current-context": self.name,
        }
        path = self.dir / ("kubeconfig" if user == "admin" else f"{user}.kubeconfig")
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def _etcd_data_dir(self) -> Path:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.dir
        # Keyed by the state directory so two clusters never share a data dir.
        key = base64.urlsafe_b64encode(str(self.dir).encode()).decode()[-40:].strip("=")
        return base / f"llmengine-etcd-{key}"

    def _start_etcd(self, ports: dict[str, int], timeout: float) -> None:
        data = self._etcd_data_dir()
        shutil.rmtree(data, ignore_errors=True)
        client = f"http://127.0.0.1:{ports['etcd']}"
        peer = f"http://127.0.0.1:{ports['etcd-peer']}"
        p = proc.start(
            "etcd",
            [
                str(tools.binary("etcd")),
                "--name=dev",
                f"--data-dir={data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=dev={peer}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
            self.dir,
        )
        (self.dir / "etcd-data-dir").write_text(str(data))
        proc.wait_until("etcd", self._ready_check("etcd", ports), timeout, p)

    def _start_apiserver(self, ports: dict[str, int], etcd_url: str, timeout: float) -> None:
        pki = self.pki
        p = proc.start(
            "kube-apiserver",
            [
                str(tools.binary("kube-apiserver")),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports['apiserver']}",
                f"--tls-cert-file={pki.crt('apiserver')}",
                f"--tls-private-key-file={pki.key('apiserver')}",
                f"--client-ca-file={pki.ca_crt}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ],
            self.dir,
        )
        proc.wait_until("kube-apiserver", self._ready_check("kube-apiserver", ports), max(timeout, 120), p)

    def _start_controllers(self, ports: dict[str, int], timeout: float) -> None:
        cm_cfg = self.dir / "controller-manager.kubeconfig"
        sch_cfg = self.dir / "scheduler.kubeconfig"
        cm = proc.start(
            "kube-controller-manager",
            [
                str(tools.binary("kube-controller-manager")),
                f"--kubeconfig={cm_cfg}",
                f"--authentication-kubeconfig={cm_cfg}",
                f"--authorization-kubeconfig={cm_cfg}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['controller-manager']}",
                f"--root-ca-file={self.pki.ca_crt}",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Fast feedback on simulated nodes: short GC and node-monitor periods.
                "--concurrent-gc-syncs=5",
                "--profiling=false",
                "--v=1",
            ],
            self.dir,
        )
        sch = proc.start(
            "kube-scheduler",
            [
                str(tools.binary("kube-scheduler")),
                f"--kubeconfig={sch_cfg}",
                f"--authentication-kubeconfig={sch_cfg}",
                f"--authorization-kubeconfig={sch_cfg}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['scheduler']}",
                "--profiling=false",
                "--v=1",
            ],
            self.dir,
        )
        proc.wait_until("kube-controller-manager", self._ready_check("kube-controller-manager", ports), timeout, cm)
        proc.wait_until("kube-scheduler", self._ready_check("kube-scheduler", ports), timeout, sch)

    def _start_kwok(self, info: ClusterInfo, ports: dict[str, int], timeout: float) -> None:
        p = proc.start(
            "kwok",
            [
                str(tools.binary("kwok")),
                f"--kubeconfig={info.kubeconfig}",
                f"--config={tools.DEVCLUSTER_DIR / 'stages.yaml'}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--node-lease-duration-seconds=40",
                f"--cidr={POD_CIDR}",
                "--node-ip=10.240.0.1",
                f"--server-address=127.0.0.1:{ports['kwok']}",
            ],
            self.dir,
            # kwok reads ~/.kwok/kwok.yaml by default; keep each cluster's kwok to its own home.
            env={"HOME": str(self.dir)},
        )
        proc.wait_until("kwok", self._ready_check("kwok", ports), timeout, p)

    def _start_runner(self, info: ClusterInfo) -> None:
        proc.start(
            "runner",
            [
                sys.executable,
                *("-m", "llmengine.dev.runner", "--cluster-dir", str(self.dir)),
                *(("--restart-backoff", str(self.restart_backoff_s)) if self.restart_backoff_s is not None else ()),
            ],
            self.dir,
        )

    def _bootstrap(self, info: ClusterInfo) -> None:
        from llmengine.dev import nodes

        api = _api(info)
        nodes.apply_fleet(api, nodes.load_fleet(self.fleet))
        s3 = info.s3().client()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if info.s3_bucket not in existing:
            s3.create_bucket(Bucket=info.s3_bucket)

    def _wait_nodes_ready(self, info: ClusterInfo, timeout: float) -> None:
        from kubernetes import client

        core = client.CoreV1Api(_api(info))

        def all_ready() -> bool:
            items = core.list_node().items
            return bool(items) and all(
                any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or [])) for n in items
            )

        proc.wait_until("simulated nodes Ready", all_ready, timeout)

    # ---- restart (fault injection) ----------------------------------------------------------------------
    def restart(self, component: str, hard: bool = False, down_s: float = 0.0, timeout: float = 120.0) -> int:
        """Stop one component and start the very same command again: same ports, same data (etcd's included,
        which `up` would wipe). hard=True kills it with SIGKILL (a crash) instead of SIGTERM; down_s keeps it
        stopped that long (an outage). Returns the new PID once the component answers its health check.
        Linux only: the command is read back from /proc."""
        info = self.info()
        pid = proc.running(self.dir, component)
        if info is None or pid is None:
            raise ValueError(f"{component} is not running in cluster {self.name!r}")
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
        env = {k: v for k, sep, v in (e.partition("=") for e in environ) if sep}
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        if hard:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the whole process group, no time for a graceful stop
        proc.stop_named(self.dir, component)
        time.sleep(down_s)
        p = proc.start(component, argv, self.dir, env=env, cwd=cwd)
        proc.wait_until(component, self._ready_check(component, info.ports), timeout, p)
        return p.pid

    def _ready_check(self, component: str, ports: dict[str, int]) -> Callable[[], bool]:
        """How `up` and `restart` tell that a component answers: its health endpoint, or its port (S3, kwok)."""
        local = "https://127.0.0.1"
        checks: dict[str, Callable[[], bool]] = {
            "etcd": lambda: _http_ok(f"http://127.0.0.1:{ports['etcd']}/health"),
            "kube-apiserver": lambda: _https_ok(f"{local}:{ports['apiserver']}/readyz", self.pki),
            "kube-controller-manager": lambda: _https_ok(f"{local}:{ports['controller-manager']}/healthz", None),
            "kube-scheduler": lambda: _https_ok(f"{local}:{ports['scheduler']}/healthz", None),
            "s3": lambda: proc.tcp_open(ports["s3"]),
            "kwok": lambda: proc.tcp_open(ports["kwok"]),
        }
        return checks.get(component, lambda: True)

    # ---- down -------------------------------------------------------------------------------------------
    def down(self, quiet: bool = False, purge: bool = False) -> list[str]:
        stopped = [c for c in [*self.extras(), *COMPONENTS] if proc.stop_named(self.dir, c)]
        data = self.dir / "etcd-data-dir"
        if data.exists():
            shutil.rmtree(data.read_text().strip(), ignore_errors=True)
            data.unlink()
        self.info_file.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.dir, ignore_errors=True)
        if not quiet:
            for c in stopped:
                print(f"stopped {c}", file=sys.stderr)
        return stopped


def _ssl_ctx(pki: certs.Pki | None) -> ssl.SSLContext:
    if pki is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    ctx.load_cert_chain(str(pki.crt("admin")), str(pki.key("admin")))
    return ctx


def _https_ok(url: str, pki: certs.Pki | None) -> bool:
    with urllib.request.urlopen(url, context=_ssl_ctx(pki), timeout=3) as r:
        return int(r.status) == 200


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as r:
        return int(r.status) == 200


def _api(info: ClusterInfo) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=info.kubeconfig)


def wait_for(what: str, check: Any, timeout: float = 60, interval: float = 0.25) -> Any:
    """Poll check() until it returns a truthy value; raise TimeoutError naming what was awaited."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
