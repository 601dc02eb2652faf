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


def _prefill_counts(spec: AutoscalerSpec, speeds: list[float | None]) -> list[int]:
    planner = Planner(spec, [SVC], lambda i, ctx: 100.0)
    got, cur = [], (1, 1)
    for sp in speeds:
        obs = Observed(
            rps=1.0, prompt_mean=2000, output_mean=50, prefill_load=1.4, prefill_speed=sp
        )
        t = planner.plan([obs], [cur])[0]
        got.append(t.prefill)
        cur = (t.prefill, t.decode)
    return got


def test_prefill_is_sized_for_the_speed_its_pods_ran_at():
    # 1.4 reference-GPU s/s at 70 %: 2 pods at the profile; at half speed the same work is 4
    assert _prefill_counts(AutoscalerSpec(), [1.0]) == [2]
    assert _prefill_counts(AutoscalerSpec(), [0.5]) == [4]
    assert _prefill_counts(AutoscalerSpec(prefill_speed="profile"), [0.5]) == [2]


def test_the_slowest_speed_is_remembered_and_a_faster_one_never_sizes_below_the_profile():
    spec = AutoscalerSpec(peak_memory=2, scale_down_after=1)
    # 0.5 holds while it is in the last two measured intervals; an interval without prefill
    # work measures nothing and forgets nothing; a pod faster than the profile counts as 1
    got = _prefill_counts(spec, [0.5, None, 1.0, 1.0, 2.0, 0.7])
    assert got == [4, 4, 4, 2, 2, 3]
