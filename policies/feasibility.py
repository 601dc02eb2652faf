"""Why a unit cannot take a pod: one reason code per unit, computed for all units at once.

Codes are ordered by precedence (the first that applies is reported) so the explanation names
the most fundamental obstacle ("unhealthy" before "over memory")."""

from __future__ import annotations

import numpy as np

OK = 0
UNHEALTHY = 1
UNIT_TYPE = 2  # the pod cannot run on this kind of unit at all (too big, own SLO, bad profile)
EXCLUSIVE = 3  # the policy gives each pod a unit of its own and this one is taken
POD_LIMIT = 4
MEMORY = 5
SM = 6
BW = 7
SLO_NEIGHBOURS = 8  # co-location would break the SLO of the pod or of pods already there
CORRELATED = 9  # a bursty replica of the same workload is there: their bursts coincide
TIME = 10  # time-sliced: the pods' summed kernel time (and the largest burst) over the unit
BURST = 11  # MPS: the largest burst no longer fits beside the others' load

REASONS: dict[int, str] = {
    UNHEALTHY: "unhealthy",
    UNIT_TYPE: "unit type cannot host the pod",
    EXCLUSIVE: "already in use (policy gives one pod per unit)",
    POD_LIMIT: "at max pods per unit",
    MEMORY: "over memory",
    SM: "over SM capacity",
    BW: "over bandwidth capacity",
    SLO_NEIGHBOURS: "would break an SLO",
    CORRELATED: "holds a replica of the same workload (bursts coincide)",
    TIME: "over GPU time (time-sliced: pods take turns)",
    BURST: "no SM room left for a burst",
}
N_REASONS = 12


def reason_codes(
    healthy: np.ndarray,
    type_bad: np.ndarray,
    exclusive_taken: np.ndarray | None,
    pods_full: np.ndarray,
    mem_over: np.ndarray,
    sm_over: np.ndarray | None,
    bw_over: np.ndarray | None,
    slo_bad: np.ndarray | None,
    correlated: np.ndarray | None = None,
    time_bad: np.ndarray | None = None,
    burst_bad: np.ndarray | None = None,
) -> np.ndarray:
    """Per-unit reason code (0 = feasible), highest-precedence reason wins."""
    code = np.zeros(healthy.shape, dtype=np.int8)
    for mask, value in (
        (correlated, CORRELATED),
        (slo_bad, SLO_NEIGHBOURS),
        (burst_bad, BURST),
        (time_bad, TIME),
        (bw_over, BW),
        (sm_over, SM),
        (mem_over, MEMORY),
        (pods_full, POD_LIMIT),
        (exclusive_taken, EXCLUSIVE),
        (type_bad, UNIT_TYPE),
        (~healthy, UNHEALTHY),
    ):
        if mask is not None:
            np.copyto(code, value, where=mask)
    return code


def summarize(counts: np.ndarray) -> str:
    """'no unit fits: 3 over memory, 1 unhealthy' from a per-reason count row."""
    parts = [f"{int(counts[c])} {REASONS[c]}" for c in range(1, N_REASONS) if counts[c]]
    return "no unit fits: " + ", ".join(parts) if parts else "node has no units"
