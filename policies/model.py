"""The decision core's value types: what a pod asks for and what a unit is.

Plain frozen dataclasses (hashable, cheap): the demand model caches on them and the cluster
view stores them per pod. Fractions are of *one unit* unless a name says otherwise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["prefill", "decode", "mixed"]
ROLES: tuple[str, ...] = ("prefill", "decode", "mixed")


@dataclass(frozen=True, slots=True)
class Demand:
    """What a pod takes from one unit: SM and bandwidth as fractions of that unit, memory bytes."""

    sm: float
    bw: float
    mem_bytes: int

    def as_dict(self) -> dict[str, float | int]:
        return {"sm": round(self.sm, 4), "bw": round(self.bw, 4), "mem_bytes": int(self.mem_bytes)}


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Expected traffic of a serving pod (`copack.io/load`): requests/s, mean prompt and output."""

    rps: float
    prompt_tokens: int
    output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class DemandOverride:
    """`copack.io/demand`: sm and bw as fractions of a *full GPU* of the unit's type; memory
    absolute. Any field may be missing (then the model or the role default supplies it)."""

    sm: float | None = None
    bw: float | None = None
    mem_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Slo:
    """`copack.io/slo`: time to first token and time per output token, seconds."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None


@dataclass(frozen=True, slots=True)
class PodRequest:
    """Everything the decision needs from a pod, parsed once (see annotations.py)."""

    namespace: str
    name: str
    uid: str = ""
    role: str = "mixed"
    model: str | None = None
    load: LoadSpec | None = None
    demand: DemandOverride | None = None
    slo: Slo = field(default_factory=Slo)
    gpus: int = 1
    role_source: str = "default"  # "annotation", "inferred" or "default": for explanations
    # The workload the pod is a replica of ("" = unknown): its controller owner. Replicas of
    # one workload see the same traffic, so their bursts coincide.
    group: str = ""

    @property
    def key(self) -> str:
        """`namespace/name`, the pod key every component uses."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class UnitType:
    """What kind of unit: the GPU product (NVML name) and the MIG profile (None = whole GPU).

    The demand model turns a request into a Demand per UnitType, which the cluster view then
    broadcasts over every unit of that type."""

    product: str
    mig_profile: str | None = None

    def __str__(self) -> str:
        return f"{self.product} {self.mig_profile}" if self.mig_profile else self.product


@dataclass(frozen=True, slots=True)
class Timing:
    """The demand model's per-type prediction for one request, used by the SLO check.

    base_*: predicted TTFT / TPOT alone on a unit of this type with all its SMs. a_*: the
    SM-sensitive fraction (slowdown at SM share s is a/s + 1 - a). mem_frac_*: the share of the
    time that is memory-bound (stretched by bandwidth contention)."""

    ttft_s: float
    tpot_s: float
    a_prefill: float
    a_decode: float
    mem_frac_prefill: float
    mem_frac_decode: float
    # SMs (fraction of the unit) the roofline gives the pod's declared copack.io/load, before
    # any copack.io/demand override: what a burst-provisioned pod takes during its bursts
    sm_at_load: float = 0.0
