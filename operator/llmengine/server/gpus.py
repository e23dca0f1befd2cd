"""What GPUs this container sees, read through NVML (pynvml from nvidia-ml-py).

A GPU in MIG mode is represented by the MIG devices (slices) visible to us; a MIG device reports its parent's
compute capability. The NVML module is a parameter so tests can pass a fake one.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 1024 * 1024
_PROFILE = re.compile(r"\b(\d+g\.\d+gb(?:\+\w+)?)\b")


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int
    compute_capability: str
    mig_mode: str  # enabled | disabled | unsupported
    mig_device: bool = False
    mig_profile: str | None = None
    parent_index: int | None = None
    parent_uuid: str | None = None


@dataclass
class GpuReport:
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    devices: list[Device] = field(default_factory=list)
    # Set when NVML itself could not be used (no driver, no GPU mounted).
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _load_nvml() -> Any:
    import pynvml

    return pynvml


def cuda_version_string(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _mig_mode(nvml: Any, handle: Any) -> str:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:
        return "unsupported"
    return "enabled" if current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1) else "disabled"


def _visible_filter(devices: list[Device], visible: str | None) -> list[Device]:
    """Apply CUDA_VISIBLE_DEVICES (indexes or GPU-/MIG- UUIDs) the way CUDA would enumerate."""
    if visible is None:
        return devices
    wanted = [v.strip() for v in visible.split(",") if v.strip()]
    if not wanted or wanted[0] in ("-1", "NoDevFiles", "none", "void"):
        return []
    out: list[Device] = []
    for w in wanted:
        for d in devices:
            hit = d.uuid == w or (w.isdigit() and not d.mig_device and d.index == int(w))
            if hit and d not in out:
                out.append(d)
    return out


def probe(nvml: Any = None, visible: str | None = None, use_env: bool = True) -> GpuReport:
    """Read every visible compute device. Never raises: NVML failure is reported in `error`."""
    if visible is None and use_env:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        nvml = nvml or _load_nvml()
        nvml.nvmlInit()
    except Exception as exc:
        return GpuReport(error=f"NVML unavailable: {type(exc).__name__}: {exc}")
    try:
        report = GpuReport(driver_version=_s(nvml.nvmlSystemGetDriverVersion()))
        with contextlib.suppress(nvml.NVMLError):
            report.cuda_driver_version = cuda_version_string(int(nvml.nvmlSystemGetCudaDriverVersion()))
        devices: list[Device] = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(h)
            cc = f"{major}.{minor}"
            name, uuid, mode = _s(nvml.nvmlDeviceGetName(h)), _s(nvml.nvmlDeviceGetUUID(h)), _mig_mode(nvml, h)
            if mode == "enabled":
                devices += _mig_devices(nvml, h, i, uuid, cc)
                continue
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            devices.append(Device(i, name, uuid, int(mem.total), int(mem.free), cc, mode))
        report.devices = _visible_filter(devices, visible)
        return report
    except Exception as exc:
        return GpuReport(error=f"NVML query failed: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def _mig_devices(nvml: Any, parent: Any, index: int, parent_uuid: str, cc: str) -> list[Device]:
    out: list[Device] = []
    try:
        count = int(nvml.nvmlDeviceGetMaxMigDeviceCount(parent))
    except nvml.NVMLError:
        return out
    for j in range(count):
        try:
            h = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, j)
        except nvml.NVMLError:
            continue  # empty slot, or a slice given to another container
        name = _s(nvml.nvmlDeviceGetName(h))
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        m = _PROFILE.search(name)
        out.append(
            Device(
                index=index,
                name=name,
                uuid=_s(nvml.nvmlDeviceGetUUID(h)),
                memory_total_bytes=int(mem.total),
                memory_free_bytes=int(mem.free),
                compute_capability=cc,
                mig_mode="enabled",
                mig_device=True,
                mig_profile=m.group(1) if m else None,
                parent_index=index,
                parent_uuid=parent_uuid,
            )
        )
    return out
