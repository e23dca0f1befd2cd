"""GPU classes the operator builds for: compute capability, memory, MIG profiles and node labels.

Memory is what the driver reports as memory.total (the `nvidia.com/gpu.memory` label, MiB). H100-80GB values,
full GPU and MIG slices, were measured on a real H100 80GB HBM3 (driver 580). For the other classes, slice
memory is derived from NVIDIA's MIG user guide: the profile's fraction of memory slices (1/8, 2/8, 4/8, 8/8)
times the GPU memory, less the 2.5% reserve measured on the H100 (eight 1g slices: 78.0 of 79.65 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1 << 20
GIB = 1 << 30

# Share of GPU memory a MIG slice actually exposes, relative to its nominal fraction (measured on H100).
MIG_MEMORY_EFFICIENCY = 0.975
DEFAULT_GPUS_PER_NODE = 8


@dataclass(frozen=True)
class MigProfile:
    name: str
    memory_bytes: int
    max_instances: int


@dataclass(frozen=True)
class GpuClass:
    name: str
    sm: str
    memory_bytes: int
    product_labels: list[str] = field(default_factory=list)
    mig_profiles: dict[str, MigProfile] = field(default_factory=dict)
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE

    @property
    def sm_tuple(self) -> tuple[int, int]:
        return parse_sm(self.sm)

    @property
    def mig_capable(self) -> bool:
        return bool(self.mig_profiles)

    def mig_product_labels(self, profile: str) -> list[str]:
        """`nvidia.com/gpu.product` values under the MIG single strategy, where the label gets a suffix."""
        return [f"{label}-MIG-{profile}" for label in self.product_labels]


def parse_sm(sm: str) -> tuple[int, int]:
    major, _, minor = sm.partition(".")
    return int(major), int(minor or 0)


def _gib(value: float) -> int:
    return round(value * GIB)


def _derived(memory_mib: int, profiles: list[tuple[str, int, int]]) -> dict[str, MigProfile]:
    """Profiles from (name, memory slices out of 8, max instances)."""
    total = memory_mib * MIB
    return {
        name: MigProfile(name, int(total * slices / 8 * MIG_MEMORY_EFFICIENCY), count)
        for name, slices, count in profiles
    }


def _measured(profiles: list[tuple[str, float, int]]) -> dict[str, MigProfile]:
    return {name: MigProfile(name, _gib(gib), count) for name, gib, count in profiles}


_A100_40_MIB = 40960
_A100_80_MIB = 81920
_L40S_MIB = 46068
_H100_80_MIB = 81559
_H100_NVL_MIB = 95830
_H200_MIB = 143771
_B200_MIB = 183359


GPU_CLASSES: dict[str, GpuClass] = {
    g.name: g
    for g in [
        GpuClass(
            "A100-40GB",
            "8.0",
            _A100_40_MIB * MIB,
            ["NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"],
            _derived(
                _A100_40_MIB,
                [
                    ("1g.5gb", 1, 7),
                    ("1g.5gb+me", 1, 1),
                    ("1g.10gb", 2, 4),
                    ("2g.10gb", 2, 3),
                    ("3g.20gb", 4, 2),
                    ("4g.20gb", 4, 1),
                    ("7g.40gb", 8, 1),
                ],
            ),
        ),
        GpuClass(
            "A100-80GB",
            "8.0",
            _A100_80_MIB * MIB,
            ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"],
            _derived(
                _A100_80_MIB,
                [
                    ("1g.10gb", 1, 7),
                    ("1g.10gb+me", 1, 1),
                    ("1g.20gb", 2, 4),
                    ("2g.20gb", 2, 3),
                    ("3g.40gb", 4, 2),
                    ("4g.40gb", 4, 1),
                    ("7g.80gb", 8, 1),
                ],
            ),
        ),
        GpuClass("L40S", "8.9", _L40S_MIB * MIB, ["NVIDIA-L40S"], {}, gpus_per_node=4),
        GpuClass(
            "H100-80GB",
            "9.0",
            _H100_80_MIB * MIB,
            ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"],
            _measured(
                [
                    ("1g.10gb", 9.75, 7),
                    ("1g.10gb+me", 9.75, 1),
                    ("1g.20gb", 19.62, 4),
                    ("2g.20gb", 19.62, 3),
                    ("3g.40gb", 39.50, 2),
                    ("4g.40gb", 39.50, 1),
                    ("7g.80gb", 79.25, 1),
                ]
            ),
        ),
        GpuClass(
            "H100-NVL",
            "9.0",
            _H100_NVL_MIB * MIB,
            ["NVIDIA-H100-NVL"],
            _derived(
                _H100_NVL_MIB,
                [
                    ("1g.12gb", 1, 7),
                    ("1g.12gb+me", 1, 1),
                    ("1g.24gb", 2, 4),
                    ("2g.24gb", 2, 3),
                    ("3g.47gb", 4, 2),
                    ("4g.47gb", 4, 1),
                    ("7g.94gb", 8, 1),
                ],
            ),
        ),
        GpuClass(
            "H200",
            "9.0",
            _H200_MIB * MIB,
            ["NVIDIA-H200"],
            _derived(
                _H200_MIB,
                [
                    ("1g.18gb", 1, 7),
                    ("1g.18gb+me", 1, 1),
                    ("1g.35gb", 2, 4),
                    ("2g.35gb", 2, 3),
                    ("3g.71gb", 4, 2),
                    ("4g.71gb", 4, 1),
                    ("7g.141gb", 8, 1),
                ],
            ),
        ),
        GpuClass(
            "B200",
            "10.0",
            _B200_MIB * MIB,
            ["NVIDIA-B200"],
            _derived(
                _B200_MIB,
                [
                    ("1g.23gb", 1, 7),
                    ("1g.23gb+me", 1, 1),
                    ("1g.45gb", 2, 4),
                    ("2g.45gb", 2, 3),
                    ("3g.90gb", 4, 2),
                    ("4g.90gb", 4, 1),
                    ("7g.180gb", 8, 1),
                ],
            ),
        ),
    ]
}

# Placeholder for plans whose GPU class could not be read; never valid.
UNKNOWN_GPU = GpuClass("unknown", "0.0", 0)


def gpu_class(name: str) -> GpuClass | None:
    return GPU_CLASSES.get(name)


def gpu_resource(mig_profile: str | None) -> str:
    """The extended resource to request: a whole GPU, or one slice under the MIG mixed strategy."""
    return f"nvidia.com/mig-{mig_profile}" if mig_profile else "nvidia.com/gpu"
