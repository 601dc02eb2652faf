"""The planner's sizing rules on hand-made observations."""

from __future__ import annotations

from sim.autoscaler import Observed, Planner
from sim.scenario import AutoscalerSpec, ServiceSpec, Slo

SVC = ServiceSpec(name="s", model="m", trace="conv", slo=Slo(ttft_s=1.0, tpot_s=0.05))


def _plan(obs: Observed, cap: float = 100.0) -> tuple[int, int]:
    planner = Planner(AutoscalerSpec(), [SVC], lambda i, ctx: cap)
    t = planner.plan([obs], [(1, 1)])[0]
    return t.prefill, t.decode


def test_decode_is_sized_for_the_busiest_decode_lifetime_not_only_the_mean():
    # 2 req/s x 100 tokens = 200 tokens/s: 3 pods of 100 tokens/s at 70 %
    quiet = Observed(rps=2.0, prompt_mean=1000, output_mean=100, prefill_load=0.1)
    assert _plan(quiet)[1] == 3
    # the same mean, but a burst puts 950 tokens/s in flight together: 10 pods
    bursty = Observed(
        rps=2.0, prompt_mean=1000, output_mean=100, prefill_load=0.1, decode_peak=950.0
    )
    assert _plan(bursty)[1] == 10


def test_a_decode_burst_is_remembered_for_peak_memory_intervals():
    spec = AutoscalerSpec(peak_memory=2, scale_down_after=1)
    planner = Planner(spec, [SVC], lambda i, ctx: 100.0)
    burst = Observed(rps=1.0, prompt_mean=500, output_mean=50, prefill_load=0.1, decode_peak=900)
    calm = Observed(rps=1.0, prompt_mean=500, output_mean=50, prefill_load=0.1, decode_peak=10)
    got = [planner.plan([o], [(1, 1)])[0].decode for o in (burst, calm, calm, calm)]
    assert got == [9, 9, 1, 1]
