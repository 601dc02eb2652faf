"""The sampler's configuration and the mutable per-unit state its sampling thread keeps.

Split out of sampler.py: these records are shared by its parts (nvml_session.py,
unit_enumeration.py, unit_reading.py, gpm_metrics.py), which must not import sampler.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from node_agent.metric_stats import MetricStats

MIN_INTERVAL_S = 0.1


@dataclass
class SamplerConfig:
    node: str = "localhost"
    interval_s: float = 1.0
    ewma_halflife_s: float = 10.0
    window_s: float = 60.0
    rescan_interval_s: float = 30.0  # safety net; layout changes are caught per tick
    nvml_retry_s: float = 5.0
    # Load this file as libnvidia-ml instead of the system's (tests, non-standard installs).
    nvml_library: str | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.interval_s) or self.interval_s < MIN_INTERVAL_S:
            raise ValueError(
                f"sampling interval must be at least {MIN_INTERVAL_S} s, got {self.interval_s}"
            )
        if self.window_s <= 0 or self.ewma_halflife_s <= 0:
            raise ValueError("window_s and ewma_halflife_s must be positive")
        if self.rescan_interval_s < 0 or self.nvml_retry_s < 0:
            raise ValueError("rescan_interval_s and nvml_retry_s must not be negative")


@dataclass
class _Unit:
    """Mutable per-unit state owned by the sampler thread."""

    uuid: str
    parent_uuid: str | None
    gpu_index: int
    gi_id: int | None
    mig_profile: str | None
    product: str
    sm_count: int
    sm_share: float
    bw_share: float
    memory_total: int
    handle: Any
    parent_handle: Any
    gpm: bool
    coarse: bool
    healthy: bool = True
    gpm_broken: bool = False  # GPM advertised but its calls are not supported: stay off it
    error: str = ""
    source: str = ""
    memory_used: int = 0
    timestamp: float = 0.0
    prev_sample: Any = None
    prev_after: float = 0.0  # monotonic time just after the previous sample returned
    spare_sample: Any = None
    values: dict[str, float | None] = field(default_factory=dict)
    stats: dict[str, MetricStats] = field(default_factory=dict)

    def static_key(self) -> tuple:
        return (self.uuid, self.parent_uuid, self.gpu_index, self.gi_id, self.mig_profile,
                self.product, self.sm_count, self.memory_total)
