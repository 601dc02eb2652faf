"""GPU datasheet figures the roofline model and the MIG catalog build on.

Every number carries its source. FLOP/s are *dense* bf16 tensor-core peaks (NVIDIA quotes the
2:4-sparse figure, twice as large, in the headline: we halve it). Memory bytes are what NVML
reports as total for the whole GPU (what the agent publishes), not the marketing "80 GB"."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
MiB = 1024**2


class UnknownGpuError(KeyError):
    """A product name or key that is not in the catalog; the message lists the known keys."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a readable sentence
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU model: peak dense bf16 FLOP/s, HBM bandwidth (bytes/s), SMs, memory, GPM support."""

    key: str
    nvml_names: tuple[str, ...]
    bf16_flops: float
    hbm_bw: float
    sm_count: int
    memory_bytes: int
    gpm_supported: bool
    mig_capable: bool
    architecture: str

    @property
    def ridge_flop_per_byte(self) -> float:
        """Arithmetic intensity above which a kernel is compute-bound on this GPU."""
        return self.bf16_flops / self.hbm_bw


GPUS: dict[str, GpuSpec] = {
    spec.key: spec
    for spec in (
        # H100 SXM5 80GB: NVIDIA H100 Tensor Core GPU datasheet (2023): BF16 1,979 TFLOPS with
        # sparsity -> 989.4 dense; 3.35 TB/s HBM3; 132 SMs (Hopper whitepaper, table 3).
        # NVML total: 81559 MiB (nvidia-smi on H100 80GB HBM3). GPM: Hopper and newer (NVML API
        # reference, nvmlGpmQueryDeviceSupport).
        GpuSpec(
            key="H100-SXM",
            nvml_names=("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"),
            bf16_flops=989.4e12,
            hbm_bw=3.35e12,
            sm_count=132,
            memory_bytes=81559 * MiB,
            gpm_supported=True,
            mig_capable=True,
            architecture="hopper",
        ),
        # H100 PCIe 80GB: same datasheet, PCIe column: BF16 1,513 TFLOPS sparse -> 756 dense;
        # 2.0 TB/s HBM2e; 114 SMs (Hopper whitepaper, table 3). NVML total 81559 MiB.
        GpuSpec(
            key="H100-PCIe",
            nvml_names=("NVIDIA H100 PCIe",),
            bf16_flops=756.5e12,
            hbm_bw=2.0e12,
            sm_count=114,
            memory_bytes=81559 * MiB,
            gpm_supported=True,
            mig_capable=True,
            architecture="hopper",
        ),
        # H200 SXM 141GB: NVIDIA H200 datasheet: BF16 1,979 TFLOPS sparse -> 989.4 dense (same
        # GH100 die as H100 SXM, 132 SMs); 4.8 TB/s HBM3e; NVML total 143771 MiB.
        GpuSpec(
            key="H200",
            nvml_names=("NVIDIA H200", "NVIDIA H200 141GB HBM3e"),
            bf16_flops=989.4e12,
            hbm_bw=4.8e12,
            sm_count=132,
            memory_bytes=143771 * MiB,
            gpm_supported=True,
            mig_capable=True,
            architecture="hopper",
        ),
        # A100 SXM4 80GB: NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 sparse); 2,039 GB/s
        # HBM2e; 108 SMs (Ampere whitepaper). NVML total 81920 MiB. GPM: not supported
        # (nvmlGpmQueryDeviceSupport reports isSupportedDevice=0 on A100, FACTS.md).
        GpuSpec(
            key="A100-80GB",
            nvml_names=("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
            bf16_flops=312e12,
            hbm_bw=2.039e12,
            sm_count=108,
            memory_bytes=81920 * MiB,
            gpm_supported=False,
            mig_capable=True,
            architecture="ampere",
        ),
        # A100 SXM4 40GB: same datasheet: 312 TFLOPS dense bf16; 1,555 GB/s HBM2; 108 SMs;
        # NVML total 40960 MiB.
        GpuSpec(
            key="A100-40GB",
            nvml_names=("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"),
            bf16_flops=312e12,
            hbm_bw=1.555e12,
            sm_count=108,
            memory_bytes=40960 * MiB,
            gpm_supported=False,
            mig_capable=True,
            architecture="ampere",
        ),
        # L40S: NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity); 864 GB/s GDDR6;
        # 142 SMs (Ada whitepaper, AD102 with 142 SMs enabled); 48 GB, NVML total 46068 MiB.
        # No MIG; GPM not supported (isSupportedDevice=0, FACTS.md).
        GpuSpec(
            key="L40S",
            nvml_names=("NVIDIA L40S",),
            bf16_flops=362.05e12,
            hbm_bw=0.864e12,
            sm_count=142,
            memory_bytes=46068 * MiB,
            gpm_supported=False,
            mig_capable=False,
            architecture="ada",
        ),
        # L4: NVIDIA L4 datasheet: BF16 242 TFLOPS sparse -> 121 dense; 300 GB/s GDDR6; 58 SMs
        # (AD104); 24 GB, NVML total 23034 MiB. No MIG, no GPM (pre-Hopper generation feature).
        GpuSpec(
            key="L4",
            nvml_names=("NVIDIA L4",),
            bf16_flops=121e12,
            hbm_bw=0.300e12,
            sm_count=58,
            memory_bytes=23034 * MiB,
            gpm_supported=False,
            mig_capable=False,
            architecture="ada",
        ),
        # B200 (HGX B200): NVIDIA HGX B200 spec (per GPU, 1,000 W): FP16/BF16 tensor 4.5 PFLOPS
        # sparse -> 2.25 dense; 8 TB/s HBM3e (64 TB/s per 8-GPU board); 148 SMs (2 dies x 74);
        # 180 GB (MIG user guide lists B200 180GB); NVML total 183359 MiB ("179 GB" in nvidia-smi).
        GpuSpec(
            key="B200",
            nvml_names=("NVIDIA B200",),
            bf16_flops=2.25e15,
            hbm_bw=8.0e12,
            sm_count=148,
            memory_bytes=183359 * MiB,
            gpm_supported=True,
            mig_capable=True,
            architecture="blackwell",
        ),
    )
}

_BY_NAME: dict[str, GpuSpec] = {}
for _spec in GPUS.values():
    _BY_NAME[_spec.key.lower()] = _spec
    for _name in _spec.nvml_names:
        _BY_NAME[_name.lower()] = _spec


def gpu_spec(product_or_key: str) -> GpuSpec:
    """Resolve an NVML product name ("NVIDIA H100 80GB HBM3") or a short key ("H100-SXM").

    Case-insensitive; raises UnknownGpuError naming the input and the known keys."""
    spec = _BY_NAME.get(product_or_key.strip().lower())
    if spec is None:
        known = ", ".join(sorted(GPUS))
        raise UnknownGpuError(f"unknown GPU product {product_or_key!r} (known: {known})")
    return spec


def find_gpu(product_or_key: str) -> GpuSpec | None:
    """Like gpu_spec, but None for an unknown product (the caller picks a fallback)."""
    return _BY_NAME.get(product_or_key.strip().lower())
