"""How sharing a unit slows a pod down: the SM-share curve and bandwidth/compute stretch.

Pure formulas that work on floats and numpy arrays alike, so the vectorized feasibility check
and the scalar demand model (workloads/roofline.py) use the very same math.

- SM share (MPS cap) s in (0, 1]: T(s)/T(1) = a/s + (1 - a), `a` being the SM-sensitive part of
  the pod's time (measured by MuxServe: a ~ 0.6-0.85 for prefill, ~0.1-0.2 for decode).
- Contention: when co-located pods want x > 1 of the unit's bandwidth, memory-bound time
  stretches by x; when they want y > 1 of its compute, compute-bound time stretches by y."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

F = TypeVar("F", float, np.ndarray)


def sm_share_slowdown(a: F, s: F) -> F:
    """T(s)/T(1) = a/s + 1 - a (s clipped to [0.01, 1])."""
    s_c = np.clip(s, 0.01, 1.0)
    out = a / s_c + (1.0 - a)
    return float(out) if np.ndim(out) == 0 else out  # type: ignore[return-value]


def slowdown_factor(a: F, mem_frac: F, s: F, bw_demand_total: F, sm_demand_total: F) -> F:
    """Predicted time multiplier for a pod with SM-sensitive share `a` and memory-bound share
    `mem_frac` of its time, running with SM share `s`, on a unit whose pods together want
    `bw_demand_total` of its bandwidth and `sm_demand_total` of its compute."""
    x = np.maximum(1.0, bw_demand_total)
    y = np.maximum(1.0, sm_demand_total)
    out = sm_share_slowdown(a, s) + mem_frac * (x - 1.0) + a * (y - 1.0)
    return float(out) if np.ndim(out) == 0 else out  # type: ignore[return-value]
