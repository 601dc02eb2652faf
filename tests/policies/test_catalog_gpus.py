"""GPU catalog entries against datasheet figures, and name resolution."""

from __future__ import annotations

import pytest

from workloads.gpu_catalog import GPUS, GiB, UnknownGpuError, find_gpu, gpu_spec

# key: (dense bf16 TFLOP/s, sparse TFLOP/s as the datasheet headline, TB/s, SMs, memory GB nominal)
DATASHEET = {
    "H100-SXM": (989.4, 1979, 3.35, 132, 80),
    "H100-PCIe": (756.5, 1513, 2.0, 114, 80),
    "H200": (989.4, 1979, 4.8, 132, 141),
    "A100-80GB": (312, 624, 2.039, 108, 80),
    "A100-40GB": (312, 624, 1.555, 108, 40),
    "L40S": (362.05, 733, 0.864, 142, 48),
    "L4": (121, 242, 0.300, 58, 24),
    "B200": (2250, 4500, 8.0, 148, 180),
}


def test_every_required_gpu_is_in_the_catalog() -> None:
    assert set(DATASHEET) == set(GPUS)


@pytest.mark.parametrize("key", sorted(DATASHEET))
def test_figures_match_the_datasheet(key: str) -> None:
    dense, sparse, tbs, sms, gb = DATASHEET[key]
    g = gpu_spec(key)
    assert g.bf16_flops == pytest.approx(dense * 1e12, rel=1e-3)
    # The catalog holds dense FLOP/s: half the 2:4-sparsity headline (L40S: 362 vs 733/2).
    assert g.bf16_flops == pytest.approx(sparse * 1e12 / 2, rel=0.015)
    assert g.hbm_bw == pytest.approx(tbs * 1e12, rel=1e-3)
    assert g.sm_count == sms
    # NVML reports the nominal size in GiB (A100) or a little less (reserved): never more.
    assert 0.90 * gb * 1e9 <= g.memory_bytes <= gb * GiB, g.memory_bytes / GiB


def test_h100_ridge_point_matches_design() -> None:
    # DESIGN.md: compute-bound above ~295 FLOP/byte on an H100 (989 TFLOP/s / 3.35 TB/s).
    assert gpu_spec("H100-SXM").ridge_flop_per_byte == pytest.approx(295, rel=0.01)


def test_gpm_support_follows_the_architecture() -> None:
    # FACTS.md: GPM reports isSupportedDevice=0 on A100 and L40S; Hopper and newer support it.
    for key, spec in GPUS.items():
        assert spec.gpm_supported == (spec.architecture in ("hopper", "blackwell")), key
    assert not gpu_spec("A100-80GB").gpm_supported
    assert not gpu_spec("L40S").gpm_supported


def test_mig_capability() -> None:
    assert {k for k, g in GPUS.items() if not g.mig_capable} == {"L40S", "L4"}


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("nvidia h100 80gb hbm3", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA B200", "B200"),
        ("H100-SXM", "H100-SXM"),
    ],
)
def test_resolves_nvml_product_names_and_keys(name: str, key: str) -> None:
    assert gpu_spec(name).key == key


def test_nvml_names_are_unique_across_models() -> None:
    seen: dict[str, str] = {}
    for spec in GPUS.values():
        for n in spec.nvml_names:
            assert n.lower() not in seen, (n, seen.get(n.lower()))
            seen[n.lower()] = spec.key


def test_unknown_product_error_names_it_and_lists_known() -> None:
    with pytest.raises(UnknownGpuError) as e:
        gpu_spec("NVIDIA GeForce RTX 4090")
    msg = str(e.value)
    assert "NVIDIA GeForce RTX 4090" in msg and "H100-SXM" in msg
    assert find_gpu("NVIDIA GeForce RTX 4090") is None
