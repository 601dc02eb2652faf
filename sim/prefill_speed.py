"""How fast each service's prefill pods ran while they had work, relative to running alone.

The planner's capacity profile is one pod alone on the reference GPU. A prefill pod packed
beside a decode pod runs its bursts slower (an MPS cap beside another's cap, or turns on a
time-sliced GPU), and a burst sized for the profile then queues past its TTFT target. In a
cluster the planner reads this from the prefill pods themselves (vLLM's
`vllm:request_prefill_time_seconds` against the profile's time for the same prompt tokens);
here it is the engine's own contention factor, weighted by the time each pod was busy.
"""

from __future__ import annotations

import numpy as np

from sim.engine import PREFILL, Engine


class PrefillSpeedMeter:
    """Busy-time-weighted mean of the prefill pods' speed (1 = as alone), per service, over
    the steps since the last `take()`."""

    def __init__(self, n_services: int) -> None:
        self._busy = np.zeros(n_services)
        self._fast = np.zeros(n_services)

    def sample(self, engine: Engine) -> None:
        """After `engine.step`: the step's busy fraction and speed of every prefill pod."""
        p = engine.p
        n = engine.n_pods
        busy = p.busy[:n]
        pf = np.nonzero((p.role[:n] == PREFILL) & (busy > 0.0))[0]
        if len(pf) == 0:
            return
        svc, w = p.service[pf], busy[pf]
        k = len(self._busy)
        self._busy += np.bincount(svc, weights=w, minlength=k)
        self._fast += np.bincount(svc, weights=w * p.speed[pf], minlength=k)

    def take(self) -> list[float | None]:
        """Per service: the interval's speed, None where its prefill pods had no work; resets."""
        out = [
            float(f / b) if b > 0.0 else None
            for b, f in zip(self._busy.tolist(), self._fast.tolist(), strict=True)
        ]
        self._busy[:] = 0.0
        self._fast[:] = 0.0
        return out
