"""What moving a running pod loses, in requests' worth of work, from what the view knows.

The simulator counts the exact requests an evicted pod still holds (sim/rebalance.py); a live
cluster has only the pod's declared load, the demand model's timing and its unit's telemetry:

- in flight, by Little's law: rps x (TTFT + output tokens x TPOT); one request when undeclared;
- decode: each in-flight request weighs its KV (context tokens / 2,048): a decode pod with a
  small KV is cheap to move, one holding long contexts is not;
- prefill (and mixed): weighed by how busy the pod is now, the unit's measured compute load over
  the pod's own SM demand: between bursts that is near 0, so such a pod moves almost for free;
  without fresh telemetry it counts fully.
"""

from __future__ import annotations

from policies.cluster_view import ClusterView, PodRecord

REFERENCE_CONTEXT_TOKENS = 2048


def in_flight(rec: PodRecord) -> float:
    req, timing = rec.request, rec.timing
    if req is None or req.load is None or timing is None:
        return 1.0
    out = req.load.output_tokens or 0
    return max(0.0, req.load.rps * (timing.ttft_s + out * timing.tpot_s))


def move_cost(rec: PodRecord, busy: float | None) -> float:
    """`busy`: the unit's compute load now (fraction), None when not fresh."""
    n = in_flight(rec)
    if rec.role == "decode":
        load = rec.request.load if rec.request is not None else None
        ctx = (load.prompt_tokens + (load.output_tokens or 0) / 2) if load else (
            REFERENCE_CONTEXT_TOKENS)
        return n * ctx / REFERENCE_CONTEXT_TOKENS
    if busy is None:
        return n
    return n * min(1.0, max(0.0, busy / max(rec.demand.sm, 0.05)))


def live_cost(view: ClusterView, rec: PodRecord, now: float, stale_after_s: float) -> float:
    """move_cost with the unit's telemetry as the view holds it."""
    load = view.unit_load(rec.uuid, now, stale_after_s)
    return move_cost(rec, None if load["stale"] else float(load["sm"]))
