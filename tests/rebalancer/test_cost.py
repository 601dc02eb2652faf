"""The move cost prefers decode pods with small KV and prefill pods between bursts."""

from __future__ import annotations

from policies.cluster_view import PodRecord
from policies.model import Demand, LoadSpec, PodRequest, Timing
from rebalancer.cost import in_flight, move_cost

TIMING = Timing(ttft_s=0.2, tpot_s=0.02, a_prefill=0.9, a_decode=0.2, mem_frac_prefill=0.1,
                mem_frac_decode=0.9)


def _rec(role: str, prompt: int, rps: float = 4.0, sm: float = 0.5) -> PodRecord:
    req = PodRequest("default", f"{role}-{prompt}", role=role,
                     load=LoadSpec(rps=rps, prompt_tokens=prompt, output_tokens=128))
    return PodRecord(req.key, "GPU-x-0", Demand(sm, 0.3, 20 << 30), 0.0, role, 100, req, TIMING)


def test_in_flight_is_littles_law() -> None:
    assert in_flight(_rec("decode", 512)) == 4.0 * (0.2 + 128 * 0.02)
    bare = PodRecord("default/x", "GPU-x-0", Demand(0.1, 0.1, 1), 0.0, "decode")
    assert in_flight(bare) == 1.0


def test_decode_with_small_kv_is_cheaper() -> None:
    assert move_cost(_rec("decode", 256), None) < move_cost(_rec("decode", 8192), None)


def test_prefill_between_bursts_is_cheaper() -> None:
    rec = _rec("prefill", 2048)
    idle, bursting, unknown = move_cost(rec, 0.02), move_cost(rec, 0.6), move_cost(rec, None)
    assert idle < bursting == unknown == in_flight(rec)
