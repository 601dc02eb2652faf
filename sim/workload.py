"""The traffic of a scenario: every service's requests from its trace, merged and sorted.

Built once per scenario and shared by every policy's run, so all policies see the very same
requests (the comparison is paired, request by request).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.scenario import Scenario
from sim.traces import load_trace, replay


@dataclass(frozen=True)
class Workload:
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    service: np.ndarray  # index into scenario.services
    ttft_slo: np.ndarray  # per service
    tpot_slo: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival)


def build_workload(scenario: Scenario) -> Workload:
    rng = np.random.default_rng(scenario.seed)
    ts, ps, os_, ss = [], [], [], []
    for i, svc in enumerate(scenario.services):
        trace = load_trace(svc.trace)
        sub = np.random.default_rng([scenario.seed, i])
        t, p, o = replay(
            trace,
            duration_s=scenario.duration_s,
            rate=svc.rate,
            time_scale=svc.time_scale,
            offset_s=svc.offset_s,
            rng=sub,
        )
        p = np.maximum(1, np.rint(p * svc.prompt_scale)).astype(np.int64)
        o = np.maximum(1, np.rint(o * svc.output_scale)).astype(np.int64)
        if svc.max_prompt_tokens is not None:
            p = np.minimum(p, svc.max_prompt_tokens)
        if svc.start_s > 0.0:  # not deployed yet: nobody sends it anything
            keep = t >= svc.start_s
            t, p, o = t[keep], p[keep], o[keep]
        ts.append(t)
        ps.append(p)
        os_.append(o)
        ss.append(np.full(len(t), i, np.int32))
    del rng
    t = np.concatenate(ts)
    order = np.argsort(t, kind="stable")
    return Workload(
        arrival=t[order],
        prompt=np.concatenate(ps)[order],
        output=np.concatenate(os_)[order],
        service=np.concatenate(ss)[order],
        ttft_slo=np.array([s.slo.ttft_s for s in scenario.services]),
        tpot_slo=np.array([s.slo.tpot_s for s in scenario.services]),
    )
