"""Whole runs of the small scenario through the real extender: invariants, determinism, the
baselines' defining properties, and the same answers over loopback HTTP as in-process."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from policies.inventory import ASSIGNED_AT_ANNOTATION, SM_SHARE_ANNOTATION, UNIT_ANNOTATION
from sim.run import RunResult, run_policy
from sim.scenario import POLICIES, parse_scenario
from sim.workload import build_workload
from tests.sim.conftest import small_raw


@pytest.fixture(scope="module")
def runs(small) -> dict[str, RunResult]:
    wl = build_workload(small)
    return {p: run_policy(small, p, wl) for p in POLICIES}


def test_every_request_is_served_or_counted_as_a_miss(runs):
    for r in runs.values():
        req = r.requests
        met = r.slo_met()
        assert len(met) == len(req) > 100
        unfinished = np.isnan(req.finish)
        assert not met[unfinished].any()
        done = ~unfinished
        assert np.all(req.ttft[done] > 0) and np.all(req.tpot[done] >= 0)
        assert np.all(req.finish[done] >= req.first_token[done])
        # met means both targets were met
        svc = req.service[met]
        assert np.all(req.ttft[met] <= r.ttft_slo[svc]) and np.all(req.tpot[met] <= r.tpot_slo[svc])


def test_no_unit_over_memory_and_bound_above_lower_bound(runs):
    for r in runs.values():
        assert 0 < r.max_unit_mem_frac <= 1.0, r.policy
        assert r.gpu_hours >= r.lb_gpu_hours > 0, r.policy
        assert r.peak_gpus <= r.gpu_count
        assert 0 <= r.mean_sm <= 1 and 0 <= r.mean_bw <= 1


def test_dedicated_gives_every_pod_its_own_unit(runs):
    r = runs["dedicated"]
    assert r.max_pods_per_unit == 1
    live = Counter(p.unit for p in r.pods if p.state != "deleted" and p.unit >= 0)
    assert live and max(live.values()) == 1


def test_placements_come_from_the_extender(runs):
    for r in runs.values():
        bound = [p for p in r.pods if p.unit >= 0]
        assert bound
        for p in bound:
            ann = p.obj["metadata"]["annotations"]
            assert ann[UNIT_ANNOTATION] and ASSIGNED_AT_ANNOTATION in ann
            assert 1 <= int(ann[SM_SHARE_ANNOTATION]) <= 100
            assert p.obj["spec"]["nodeName"] == p.node
        assert r.extender_calls["bind"] >= len(bound)
        assert r.extender_calls["filter"] >= r.extender_calls["bind"]


def test_sharing_policies_share(runs):
    """complementary runs every pod on no more GPU time than dedicated, which cannot place
    them all (the time-sliced H200s share little: their pods' times add up)."""
    com, ded = runs["complementary"], runs["dedicated"]
    assert com.max_pods_per_unit >= 2
    assert com.gpu_hours <= ded.gpu_hours
    assert all(p.state == "bound" for p in com.pods)
    assert any(p.state == "pending" for p in ded.pods)


def test_deterministic_for_a_seed(small, runs):
    again = run_policy(small, "complementary", build_workload(small))
    first = runs["complementary"]
    assert np.array_equal(again.requests.ttft, first.requests.ttft, equal_nan=True)
    assert np.array_equal(again.requests.tpot, first.requests.tpot, equal_nan=True)
    assert [(p.name, p.unit) for p in again.pods] == [(p.name, p.unit) for p in first.pods]
    assert again.gpu_seconds == first.gpu_seconds


def test_another_seed_changes_the_traffic(small):
    other = parse_scenario(small_raw(seed=4), "small")
    a, b = build_workload(small), build_workload(other)
    assert len(a) != len(b) or not np.array_equal(a.arrival, b.arrival)


def test_loopback_http_gives_the_same_run(small, runs):
    raw = small_raw()
    raw["scheduler"] = {"extender_transport": "http", "node_cache_capable": False}
    over_http = parse_scenario(raw, "small-http")
    r = run_policy(over_http, "complementary", build_workload(over_http))
    first = runs["complementary"]
    assert [(p.name, p.unit, p.sm_share) for p in r.pods] == [
        (p.name, p.unit, p.sm_share) for p in first.pods
    ]
    assert np.array_equal(r.requests.ttft, first.requests.ttft, equal_nan=True)


def test_packing_bound_between_fluid_bound_and_every_run(runs):
    for r in runs.values():
        assert r.lb_gpu_hours <= r.packing_lb_gpu_hours <= r.gpu_hours + 1e-9, r.policy


def _scarce_h200():
    """Two H100 nodes and one H200 node; Mixtral-8x7B fits only the H200s (93 GB of weights)."""
    raw = small_raw(duration_s=600)
    raw["cluster"]["pools"] = [
        {"name": "h100", "count": 2, "gpus_per_node": 4, "product": "H100-SXM", "sharing": "mps"},
        {"name": "h200", "count": 1, "gpus_per_node": 2, "product": "H200", "sharing": "mps"},
    ]
    raw["services"] = [
        {"name": "chat", "model": "meta-llama/Llama-3.1-8B-Instruct", "trace": "conv",
         "rate": 0.6, "slo": {"ttft_s": 1.0, "tpot_s": 0.05}},
        {"name": "moe", "model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "trace": "conv",
         "rate": 0.1, "slo": {"ttft_s": 1.5, "tpot_s": 0.07}},
    ]
    return parse_scenario(raw, "scarce-h200")


def test_smaller_pods_leave_the_gpus_only_a_big_model_fits_to_it():
    """Idle GPUs open largest first; with Mixtral waiting, the 8B pods open the H100s instead,
    and every Mixtral pod finds an H200 (before, the 8B pods took them and Mixtral waited)."""
    scn = _scarce_h200()
    r = run_policy(scn, "complementary", build_workload(scn))
    moe = [p for p in r.pods if p.service == 1]
    assert moe and all(p.unit >= 0 for p in moe), [(p.name, p.last_reason) for p in moe]
    assert {p.node for p in moe} == {"h200-000"}
    assert all(p.node.startswith("h100") for p in r.pods if p.service == 0 and p.unit >= 0)
    served = r.slo_met()[r.requests.service == 1]
    assert served.mean() > 0.95


def test_a_service_deployed_late_has_no_pods_and_no_traffic_before_it():
    scn = _scarce_h200()
    late = [s.model_copy(update={"start_s": 300.0}) if s.name == "moe" else s
            for s in scn.services]
    scn = scn.model_copy(update={"services": late})
    wl = build_workload(scn)
    moe_arrivals = wl.arrival[wl.service == 1]
    assert len(moe_arrivals) and moe_arrivals.min() >= 300.0
    assert (wl.arrival[wl.service == 0] < 300.0).any()
    r = run_policy(scn, "complementary", wl)
    moe = [p for p in r.pods if p.service == 1]
    assert moe and min(p.created_t for p in moe) >= 300.0
    assert min(p.created_t for p in r.pods if p.service == 0) == 0.0
