"""The rebalancer in a simulated run: it empties GPUs within its budget, every evicted pod
is replaced, and what the evictions cost shows in the SLO figures."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from sim.run import RunResult, run_policy
from sim.scenario import parse_scenario
from sim.workload import build_workload
from tests.sim.conftest import small_raw

# previous main's placement (no consolidation at bind time) leaves GPUs to empty
BUDGET = {"interval_s": 15, "min_age_s": 20, "pdb_min_available": 0, "evictions_per_minute": 2}


def _run(rebalance: bool) -> RunResult:
    raw = small_raw(
        duration_s=600,
        extender={"policy": {"stale_after_s": 20, "consolidate": False}},
        rebalancer={**BUDGET, "policies": ["complementary"] if rebalance else []},
    )
    scn = parse_scenario(raw)
    return run_policy(scn, "complementary", build_workload(scn))


@pytest.fixture(scope="module")
def pair() -> tuple[RunResult, RunResult]:
    return _run(False), _run(True)


def test_rebalancing_empties_gpus_and_saves_gpu_hours(pair):
    before, after = pair
    stats = after.extra["rebalancer"]
    assert "rebalancer" not in before.extra
    assert stats.evictions >= 1 and stats.gpus_emptied >= 1
    assert after.gpu_hours < before.gpu_hours
    assert after.series_gpus.min() < before.series_gpus.min()


def test_every_eviction_is_replaced_and_within_the_budget(pair):
    _, r = pair
    evicted = [p for p in r.pods if not math.isnan(p.evicted_t)]
    assert len(evicted) == r.extra["rebalancer"].evictions
    per_workload: dict[tuple[int, int], list[float]] = defaultdict(list)
    for p in evicted:
        assert "copack-rebalancer empties GPU" in p.last_reason
        assert p.state == "deleted" and p.deleted_t <= p.evicted_t + BUDGET["interval_s"] * 2
        assert p.evicted_t - p.bound_t >= BUDGET["min_age_s"]
        # its ReplicaSet's replacement: same workload, created at the eviction
        assert any(
            q.service == p.service and q.role == p.role and q.created_t == p.evicted_t
            for q in r.pods
            if q is not p
        )
        per_workload[(p.service, p.role)].append(p.evicted_t)
    for times in per_workload.values():
        times.sort()
        for a, b in zip(times, times[BUDGET["evictions_per_minute"] :], strict=False):
            assert b - a >= 60.0


def test_evictions_cost_is_in_the_slo_figures(pair):
    _, r = pair
    lost = r.extra["rebalancer"].requests_lost
    unfinished = int(np.isnan(r.requests.finish).sum())
    assert unfinished >= lost >= 0
    assert r.max_unit_mem_frac <= 1.0


def _run_handover(handover: bool) -> RunResult:
    raw = small_raw(
        duration_s=600,
        extender={"policy": {"stale_after_s": 20, "consolidate": False}},
        rebalancer={**BUDGET, "policies": ["complementary"], "grace_s": 120,
                    "handover": handover, "handover_idle_s": 1e6},
    )
    scn = parse_scenario(raw)
    return run_policy(scn, "complementary", build_workload(scn))


def test_an_evicted_prefill_pod_serves_until_its_replacement_is_ready():
    """Make-before-break: with handover the evicted prefill pod stays routed (and on its GPU)
    until its replacement has loaded its model; without, it stops taking requests at once and
    is gone once its queue is empty."""
    for handover in (True, False):
        r = _run_handover(handover)
        startup = parse_scenario(small_raw()).autoscaler.startup_s
        stats = r.extra["rebalancer"]
        moved = [p for p in r.pods if not math.isnan(p.evicted_t) and p.role == 0]
        assert moved, "the small scenario's rebalancer moves no prefill pod"
        assert stats.handovers == (len(moved) if handover else 0)
        for p in moved:
            rep = next(q for q in r.pods if q is not p and q.service == p.service
                       and q.role == p.role and q.created_t == p.evicted_t)
            if handover:
                assert p.deleted_t >= min(rep.bound_t + startup, p.evicted_t + 110) - 1e-9
            else:
                assert p.deleted_t < rep.bound_t + startup
        assert stats.requests_lost == 0
