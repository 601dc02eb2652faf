"""The planner: sizes each service's prefill and decode pod counts from observed load.

Like NVIDIA Dynamo's SLA planner, every interval it predicts the next interval's load from the
last ones and divides it by what one pod sustains within the TTFT/TPOT targets, as found by
profiling (here: the roofline on a reference GPU). Prefill pods are sized on queued work (GPU
seconds of prefill per second, both the interval's mean at the target utilization and its
busiest ten seconds, since the Azure code trace bursts to 6x its minute average within
seconds), decode pods on output tokens per second at the largest batch
whose step time meets the TPOT target. Scale-up is immediate; scale-down waits for several
intervals in a row to agree, so a burst gap does not tear pods down and build them again.
It sees the arrivals and one thing of the placement: how fast the prefill pods ran while
busy (`prefill_speed: measured`, sim/prefill_speed.py). A pod packed beside others runs its
bursts slower than the profile, so the planner divides the prefill work by the slowest speed of
the last `peak_memory` intervals; pods that run alone, as under dedicated, get the same pods
as with `prefill_speed: profile`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sim.scenario import AutoscalerSpec, ServiceSpec


@dataclass(frozen=True)
class Observed:
    """One service's arrivals over the last interval."""

    rps: float
    prompt_mean: float
    output_mean: float
    prefill_load: float  # reference-GPU seconds of prefill work per second
    prefill_peak: float = 0.0  # the same over the interval's busiest TTFT-long window
    # output tokens per second over the interval's busiest window of one decode lifetime
    decode_peak: float = 0.0
    # the prefill pods' busy-weighted speed relative to running alone; None = they had no work
    prefill_speed: float | None = None


@dataclass(frozen=True)
class Target:
    prefill: int
    decode: int
    rps: float  # predicted, for the pods' `copack.io/load`
    prompt_mean: float
    output_mean: float
    prefill_peak: float = 0.0  # remembered burst of prefill work (reference GPU-s per s)


class Planner:
    def __init__(
        self,
        spec: AutoscalerSpec,
        services: Sequence[ServiceSpec],
        decode_tokens_per_s: Callable[[int, float], float],
        bursts: Sequence[float] | None = None,
    ) -> None:
        """`decode_tokens_per_s(service, mean_context)`: what one decode pod sustains on the
        reference GPU while meeting the service's TPOT target. `bursts[i]`: the service's
        burst prefill work known from its traffic history (the floor of what the planner
        remembers)."""
        self.spec = spec
        self.services = list(services)
        self._decode_cap = decode_tokens_per_s
        self._pred: list[Observed | None] = [None] * len(services)
        self._lower_streak = [[0, 0] for _ in services]
        self._peaks: list[deque[float]] = [deque(maxlen=spec.peak_memory) for _ in services]
        self._dpeaks: list[deque[float]] = [deque(maxlen=spec.peak_memory) for _ in services]
        self._bursts = list(bursts) if bursts is not None else [0.0] * len(services)
        self._speeds: list[deque[float]] = [deque(maxlen=spec.peak_memory) for _ in services]

    def _predict(self, i: int, obs: Observed) -> Observed:
        self._peaks[i].append(obs.prefill_peak)
        self._dpeaks[i].append(obs.decode_peak)
        if obs.prefill_speed is not None:
            self._speeds[i].append(min(1.0, max(obs.prefill_speed, 1e-3)))
        prev = self._pred[i]
        if prev is None:
            pred = Observed(
                obs.rps,
                obs.prompt_mean,
                obs.output_mean,
                obs.prefill_load,
                max(obs.prefill_peak, self._bursts[i]),
                obs.decode_peak,
            )
        else:
            a = self.spec.smoothing
            ew = Observed(
                rps=a * obs.rps + (1 - a) * prev.rps,
                prompt_mean=a * obs.prompt_mean + (1 - a) * prev.prompt_mean,
                output_mean=a * obs.output_mean + (1 - a) * prev.output_mean,
                prefill_load=a * obs.prefill_load + (1 - a) * prev.prefill_load,
                prefill_peak=a * obs.prefill_peak + (1 - a) * prev.prefill_peak,
            )
            # Never predict below what just happened: a rising load must be met at once.
            pred = Observed(
                rps=max(ew.rps, obs.rps),
                prompt_mean=ew.prompt_mean if obs.rps == 0 else max(ew.prompt_mean, 1.0),
                output_mean=ew.output_mean if obs.rps == 0 else max(ew.output_mean, 1.0),
                prefill_load=max(ew.prefill_load, obs.prefill_load),
                # Bursts recur: remember the worst of the last few intervals.
                prefill_peak=max(max(self._peaks[i]), self._bursts[i]),
                decode_peak=max(self._dpeaks[i]),
            )
        self._pred[i] = pred
        return pred

    def plan(
        self, observed: Sequence[Observed], current: Sequence[tuple[int, int]]
    ) -> list[Target]:
        out: list[Target] = []
        u = self.spec.target_utilization
        for i, (svc, obs) in enumerate(zip(self.services, observed, strict=True)):
            pred = self._predict(i, obs)
            # Mean load at the target utilization, and the bursts: a prefill queue that grows
            # for ten seconds breaks every TTFT in it, so the busiest window must fit too.
            want_pf = math.ceil(
                max(pred.prefill_load / u, pred.prefill_peak / self.spec.peak_utilization)
                / self._prefill_speed(i)
                - 1e-9
            )
            ctx = max(pred.prompt_mean, 1.0) + max(pred.output_mean, 1.0) / 2
            cap = max(self._decode_cap(i, ctx), 1e-9)
            # Decode the same way: the mean at the target utilization, and the busiest
            # decode lifetime's tokens, which are in flight together.
            want_dc = math.ceil(
                max(
                    pred.rps * pred.output_mean / (cap * u),
                    pred.decode_peak / (cap * self.spec.peak_utilization),
                )
                - 1e-9
            )
            want_pf = min(max(want_pf, svc.min_prefill), svc.max_pods)
            want_dc = min(max(want_dc, svc.min_decode), svc.max_pods)
            cur_pf, cur_dc = current[i]
            new_pf = self._hysteresis(i, 0, cur_pf, want_pf)
            new_dc = self._hysteresis(i, 1, cur_dc, want_dc)
            out.append(
                Target(
                    new_pf,
                    new_dc,
                    pred.rps,
                    pred.prompt_mean,
                    pred.output_mean,
                    max(pred.prefill_peak, obs.prefill_peak),
                )
            )
        return out

    def _prefill_speed(self, i: int) -> float:
        """The slowest speed the service's prefill pods ran at over the last `peak_memory`
        intervals they had work in (kept by `_predict`, at most 1: a pod faster than the
        profile is not counted on). Slowdowns recur with the bursts that meet them, so they
        are remembered like the bursts."""
        mem = self._speeds[i]
        if self.spec.prefill_speed != "measured" or not mem:
            return 1.0
        return min(mem)

    def _hysteresis(self, i: int, role: int, current: int, want: int) -> int:
        if want >= current:
            self._lower_streak[i][role] = 0
            return want
        self._lower_streak[i][role] += 1
        if self._lower_streak[i][role] >= self.spec.scale_down_after:
            self._lower_streak[i][role] = 0
            return want
        return current
