"""The MPS SM share (`copack.io/sm-share`, percent 1-100) a pod gets on its unit.

Shares are caps (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), not reservations: their sum may exceed
100. Compute-bound pods (prefill, mixed) may take every SM the unit's current load leaves free,
and never less than their own demand; bandwidth-bound decode needs few SMs (MuxServe: batch-32
decode is only 1.13x slower at half the SMs), so it is capped low to leave the rest to a
prefill neighbour, but never below config.decode_min_share (the SM-share curve rises steeply
under ~30 %)."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from policies.config import PolicyConfig

F = TypeVar("F", float, np.ndarray)


def sm_share_fraction(role: str, demand_sm: F, unit_sm_load: F, config: PolicyConfig) -> F:
    """Share as a fraction (0..1] of the unit; vectorizes over numpy arrays."""
    if role == "decode":
        s = np.maximum(config.decode_min_share, 1.5 * demand_sm)
    else:
        s = np.maximum(np.maximum(demand_sm, 1.0 - unit_sm_load), config.prefill_min_share)
    out = np.clip(s, 0.01, 1.0)
    return float(out) if np.ndim(out) == 0 else out  # type: ignore[return-value]


def sm_share(role: str, demand_sm: float, unit_sm_load: float, config: PolicyConfig) -> int:
    """The percentage written to copack.io/sm-share."""
    frac = sm_share_fraction(role, float(demand_sm), float(unit_sm_load), config)
    return int(min(100, max(1, int(np.ceil(round(frac * 100.0, 6))))))
