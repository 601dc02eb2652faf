"""The simulator's view of the core's catalogs: what a unit is (its share of its parent GPU's
SMs, bandwidth and memory) and what a model is. One place, so scenario validation, the cluster
builder and the performance model resolve names the same way."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from workloads.gpu_catalog import GpuSpec, gpu_spec
from workloads.mig_catalog import is_valid_layout, mig_profile
from workloads.model_catalog import ModelSpec, model_spec


@dataclass(frozen=True)
class UnitType:
    """A whole GPU (profile None) or one MIG profile of a GPU model."""

    gpu: str  # GpuSpec.key
    profile: str | None

    @property
    def spec(self) -> GpuSpec:
        return gpu_spec(self.gpu)

    @property
    def product(self) -> str:
        return self.spec.nvml_names[0]

    @property
    def sm_fraction(self) -> float:
        return 1.0 if self.profile is None else mig_profile(self.gpu, self.profile).sm_fraction

    @property
    def bw_fraction(self) -> float:
        return 1.0 if self.profile is None else mig_profile(self.gpu, self.profile).bw_fraction

    @property
    def sm_count(self) -> int:
        if self.profile is None:
            return self.spec.sm_count
        return mig_profile(self.gpu, self.profile).sm_count

    @property
    def memory_bytes(self) -> int:
        if self.profile is None:
            return self.spec.memory_bytes
        return mig_profile(self.gpu, self.profile).memory_bytes

    @property
    def flops(self) -> float:
        return self.spec.bf16_flops * self.sm_fraction

    @property
    def bandwidth(self) -> float:
        return self.spec.hbm_bw * self.bw_fraction

    @property
    def label(self) -> str:
        return self.gpu if self.profile is None else f"{self.gpu}/{self.profile}"


@cache
def gpu(product: str) -> GpuSpec:
    return gpu_spec(product)


@cache
def model(model_id: str) -> ModelSpec:
    return model_spec(model_id)


def unit_type(product: str, profile: str | None) -> UnitType:
    key = gpu_spec(product).key
    if profile is not None:
        profile = mig_profile(key, profile).name
    return UnitType(key, profile)


def layout_problem(product: str, layout: list[str]) -> str | None:
    """Why a MIG layout cannot be carved on this GPU, or None when it can."""
    spec = gpu_spec(product)
    if not layout:
        return None  # this GPU stays whole (MIG off)
    if not spec.mig_capable:
        return f"{spec.key} does not support MIG"
    for name in layout:
        try:
            mig_profile(spec.key, name)
        except KeyError as e:
            return str(e)
    if not is_valid_layout(spec.key, layout):
        return (
            f"{'+'.join(layout)} does not fit one {spec.key} "
            "(at most 7 compute and 8 memory slices, at valid placements)"
        )
    return None
