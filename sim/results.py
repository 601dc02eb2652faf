"""What a simulated run hands back: its pods and its result (GPU time, latencies, bounds).

Kept apart from the loop in `sim.run` so the report, the benchmarks and the tests can read a
result without pulling in the orchestration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sim.engine import Requests
from sim.gap import GapAttribution


@dataclass
class PodRecord:
    name: str
    service: int
    role: int
    obj: dict[str, Any]
    created_t: float
    next_try_t: float
    state: str = "pending"  # pending | bound | draining | deleted
    pid: int = -1
    node: str = ""
    unit: int = -1
    sm_share: float = 1.0
    mem_bytes: int = 0
    bound_t: float = float("nan")
    deleted_t: float = float("nan")
    last_reason: str = ""
    evicted_t: float = float("nan")  # by the rebalancer (last_reason says why)


@dataclass
class RunResult:
    policy: str
    scenario: str
    duration_s: float
    step_s: float
    requests: Requests
    ttft_slo: np.ndarray
    tpot_slo: np.ndarray
    gpu_seconds: float
    peak_gpus: int
    mean_sm: float
    mean_bw: float
    gpu_sm: np.ndarray  # per physical GPU, mean over its in-use time (NaN if never used)
    gpu_bw: np.ndarray
    series_t: np.ndarray
    series_gpus: np.ndarray
    series_lb: np.ndarray
    lb_gpu_seconds: float
    pods: list[PodRecord]
    max_pods_per_unit: int
    max_unit_mem_frac: float
    unschedulable_attempts: int
    extender_calls: dict[str, int]
    wall_s: float
    gpu_count: int
    extra: dict[str, Any] = field(default_factory=dict)
    # whole pods on whole GPUs (lower_bound.packing_lower_bound): >= the fluid bound
    packing_lb_gpu_seconds: float = 0.0
    # where the GPU time above this run's own fluid bound goes (sim/gap.py)
    gap: GapAttribution | None = None

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600.0

    @property
    def lb_gpu_hours(self) -> float:
        return self.lb_gpu_seconds / 3600.0

    @property
    def packing_lb_gpu_hours(self) -> float:
        return self.packing_lb_gpu_seconds / 3600.0

    def slo_met(self) -> np.ndarray:
        r = self.requests
        svc = r.service
        ok = (r.ttft <= self.ttft_slo[svc]) & (r.tpot <= self.tpot_slo[svc] + 1e-12)
        return ok & np.isfinite(r.finish)
