"""What NVML does not say directly about a unit: its MIG profile name, its share of the parent's
memory bandwidth, and a whole GPU's SM count.

NVML has no "profile name" or "SM count of a whole GPU" query (nvmlDeviceGetAttributes only
supports MIG handles), so these follow the conventions of NVIDIA's own tooling: go-nvlib's
profile naming from the attributes' slice counts and memory size, and CUDA cores per SM by
compute capability."""

from __future__ import annotations

import math

MIB = 1024 * 1024
GIB = 1024 * MIB
MEMORY_SLICES = 8  # A100 / H100 / H200: 8 memory slices (each with its own memory controllers)

# CUDA cores per SM by compute capability (CUDA C programming guide, "Arithmetic Instructions").
_CORES_PER_SM = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128,
                 (9, 0): 128, (10, 0): 128, (12, 0): 128}

# Last resort when NVML cannot give the core count (older drivers): SMs by product name.
_SM_BY_PRODUCT = (("H200", 132), ("H100 PCIe", 114), ("H100", 132), ("A100", 108),
                  ("L40S", 142), ("L40", 142), ("L4", 58), ("A10", 72), ("A30", 56))


def memory_fraction_eighths(unit_memory_mb: int, parent_memory_bytes: int) -> int:
    """Memory slices (of 8) a MIG instance holds: its memory share rounded up to eighths."""
    if parent_memory_bytes <= 0:
        return 0
    frac = unit_memory_mb * MIB / parent_memory_bytes
    # A hair of tolerance so 4/8 reported as 0.5000001 does not become 5/8.
    return min(MEMORY_SLICES, max(1, math.ceil(frac * MEMORY_SLICES - 1e-6)))


def mig_profile_name(
    gi_slices: int, ci_slices: int, unit_memory_mb: int, parent_memory_bytes: int
) -> str:
    """The nvidia-smi profile name ("3g.40gb", or "1c.3g.40gb" for a partial compute instance).

    go-nvlib's rule: memory share rounded up to eighths, times the parent's memory in whole GB
    (rounded up), rounded half-up to whole GB."""
    eighths = memory_fraction_eighths(unit_memory_mb, parent_memory_bytes)
    parent_gb = (parent_memory_bytes + GIB - 1) // GIB
    gb = math.floor(eighths / MEMORY_SLICES * parent_gb + 0.5)
    name = f"{gi_slices}g.{gb}gb"
    if ci_slices and ci_slices != gi_slices:
        name = f"{ci_slices}c.{name}"
    return name


def bandwidth_share(unit_memory_mb: int, parent_memory_bytes: int) -> float:
    """Share of the parent's HBM bandwidth: memory slices own their controllers (DESIGN: m/8)."""
    return memory_fraction_eighths(unit_memory_mb, parent_memory_bytes) / MEMORY_SLICES


def sm_count_from_cores(cores: int, cc: tuple[int, int]) -> int | None:
    per_sm = _CORES_PER_SM.get(cc)
    if per_sm is None:
        per_sm = 64 if cc[0] < 8 or cc == (8, 0) else 128
    return cores // per_sm if cores > 0 else None


def sm_count_from_product(product: str) -> int | None:
    for name, sms in _SM_BY_PRODUCT:
        if name in product:
            return sms
    return None
