"""Where the dev cluster's binaries live: a cache outside the repository, one directory per component+version."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
DEVCLUSTER_DIR = REPO_ROOT / "devcluster"


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (DEVCLUSTER_DIR / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def cache_root() -> Path:
    env = os.environ.get("LLMENGINE_TOOLS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llmengine-devcluster"


_COMPONENT_OF = {
    "etcd": ("etcd", "ETCD_VERSION"),
    "kwok": ("kwok", "KWOK_VERSION"),
    "helm": ("helm", "HELM_VERSION"),
    "versitygw": ("versitygw", "VERSITYGW_VERSION"),
    "kube-apiserver": ("kubernetes", "KUBERNETES_VERSION"),
    "kube-controller-manager": ("kubernetes", "KUBERNETES_VERSION"),
    "kube-scheduler": ("kubernetes", "KUBERNETES_VERSION"),
    "kubectl": ("kubernetes", "KUBERNETES_VERSION"),
    "promtool": ("promtool", "PROMETHEUS_VERSION"),
    "prometheus": ("prometheus", "PROMETHEUS_VERSION"),
    "s5cmd": ("s5cmd", "S5CMD_VERSION"),
}


class ToolMissing(RuntimeError):
    pass


def binary(name: str) -> Path:
    component, key = _COMPONENT_OF[name]
    path = cache_root() / f"{component}-{versions()[key]}" / "bin" / name
    if not path.exists():
        raise ToolMissing(f"{name} is not built yet: run `devcluster/build-tools.sh {component}` (or `make tools`)")
    return path


def monitoring_crds() -> list[Path]:
    """The prometheus-operator CRDs of the kinds the chart can create (ServiceMonitor, PodMonitor, PrometheusRule)."""
    d = cache_root() / f"monitoring-crds-{versions()['PROMETHEUS_OPERATOR_VERSION']}" / "crds"
    files = sorted(d.glob("monitoring.coreos.com_*.yaml"))
    if not files:
        raise ToolMissing("the monitoring CRDs are not fetched yet: run `devcluster/build-tools.sh monitoring-crds`")
    return files


def ensure_built(*components: str) -> None:
    """Build missing components (no-op when the cache has them)."""
    subprocess.run([str(DEVCLUSTER_DIR / "build-tools.sh"), *components], check=True, stdout=subprocess.DEVNULL)
