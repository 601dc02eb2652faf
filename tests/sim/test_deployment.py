"""What the simulated operator configures and declares for each pod."""

from __future__ import annotations

import numpy as np

from policies.annotations import pod_request_from_k8s
from policies.model import UnitType
from sim.autoscaler import Target
from sim.catalog import model, unit_type
from sim.deployment import DECODE, PREFILL, Deployments, service_references
from sim.perf import PerfTables
from sim.pods import make_pod
from sim.scenario import parse_scenario
from sim.workload import build_workload
from tests.sim.conftest import small_raw
from workloads.roofline import RUNTIME_OVERHEAD_BYTES, DemandModel


def _deploy():
    scn = parse_scenario(small_raw(), "small")
    wl = build_workload(scn)
    models = [model(s.model) for s in scn.services]
    ref = unit_type("H100-SXM", None)
    perf = PerfTables(models, ref)
    return scn, wl, models, Deployments(scn, models, perf, wl, DemandModel())


def _pod(scn, role, rps=2.0):
    return make_pod(scn.services[0], role, f"x-{role}", seed=1, rps=rps, prompt=1100, output=210,
                    cpu=8, memory_gib=64, created=0.0)


def test_max_model_len_covers_the_longest_request_and_bounds_memory():
    scn, wl, models, d = _deploy()
    longest = max(int((wl.prompt + wl.output)[wl.service == 0].max()), 1)
    assert longest <= d.max_len[0] < longest + 1024
    m = models[0]
    for role in (PREFILL, DECODE):
        mem = d.pod_memory(_pod(scn, ["prefill", "decode"][role]), 0, role)
        assert mem >= m.weight_bytes + RUNTIME_OVERHEAD_BYTES + d.max_len[0] * m.kv_bytes_per_token
        assert mem <= 0.9 * unit_type("H100-SXM", None).memory_bytes + 1


def test_elastic_decode_bandwidth_is_below_the_free_running_demand_and_meets_tpot():
    scn, _, models, d = _deploy()
    pod = _pod(scn, "decode")
    beta = d.elastic_bw(pod, 0)
    free = DemandModel().demand(pod_request_from_k8s(pod), UnitType("NVIDIA H100 80GB HBM3")).bw
    assert 0.05 <= beta < free
    req = pod_request_from_k8s(pod)
    load = req.load
    batch = load.rps * load.output_tokens * 0.05  # generous: TPOT-bound batch
    step = DemandModel().decode_step_time(models[0], batch, 1100 + 105, "NVIDIA H100 80GB HBM3",
                                          bw_share=beta)
    assert step <= scn.services[0].slo.tpot_s
    ann = d.demand_annotation(pod, 0, DECODE)
    assert ann.startswith(f"bw={beta:.3f},mem=")


def test_prefill_declares_its_share_of_the_burst():
    _scn, _, _, d = _deploy()
    quiet = Target(prefill=2, decode=1, rps=1.0, prompt_mean=1000, output_mean=200,
                   prefill_peak=0.0)
    bursty = Target(prefill=2, decode=1, rps=1.0, prompt_mean=1000, output_mean=200,
                    prefill_peak=1.6)
    assert d.declared_rps(0, PREFILL, quiet, 2) == 1.0 / 2 / 0.7
    per_req = float(d.perf.reference_prefill_work(np.array([0]), np.array([1000]))[0])
    assert d.declared_rps(0, PREFILL, bursty, 2) == 1.6 / 2 / per_req
    # silent services (no prompt seen yet) fall back to 1024 tokens, not to one token
    silent = Target(prefill=1, decode=1, rps=0.0, prompt_mean=0.0, output_mean=0.0,
                    prefill_peak=0.5)
    assert d.declared_rps(0, PREFILL, silent, 1) < 100


def test_decode_capacity_grows_with_the_tpot_target():
    _scn, _, _, d = _deploy()
    tight = d.decode_capacity(0, 1200.0)
    assert tight > 0
    loose_raw = small_raw()
    loose_raw["services"][0]["slo"]["tpot_s"] = 0.2
    scn2 = parse_scenario(loose_raw, "loose")
    d2 = Deployments(scn2, d.models, d.perf, build_workload(scn2), DemandModel())
    assert d2.decode_capacity(0, 1200.0) >= tight


def test_multiplexed_prefill_declares_its_typical_sms_below_its_provisioned_load():
    scn, wl, _, d = _deploy()
    ref_work = d.perf.reference_prefill_work(wl.service, wl.prompt)
    d.mux_load = d.bursts(wl, ref_work, scn.autoscaler.multiplex_quantile)
    burst = d.bursts(wl, ref_work)
    assert 0 < d.mux_load[0] <= burst[0]
    # one pod provisioned for the whole burst: rps = burst work / work per request
    per_req = float(d.perf.reference_prefill_work(np.array([0]), np.array([1100]))[0])
    target = Target(prefill=1, decode=1, rps=0.5, prompt_mean=1100, output_mean=210,
                    prefill_peak=burst[0])
    pod = _pod(scn, "prefill", rps=burst[0] / per_req)
    typical = d.multiplexed_sm(pod, 0, target, 1)
    h100 = UnitType("NVIDIA H100 80GB HBM3")
    provisioned = DemandModel().demand(pod_request_from_k8s(pod), h100)
    assert 0.01 <= typical <= provisioned.sm + 1e-9
    ann = d.demand_annotation(pod, 0, PREFILL, target, 1)
    assert ann.startswith(f"sm={typical:.3f},mem=")
    # the pod says which workload it is a replica of
    assert pod_request_from_k8s(pod).group == f"inference/ReplicaSet/{scn.services[0].name}-prefill"
    # `burst` declares no sm=: the roofline at the provisioned load stands
    burst_scn = scn.model_copy(
        update={"autoscaler": scn.autoscaler.model_copy(update={"prefill_demand": "burst"})}
    )
    d.scenario = burst_scn
    assert d.demand_annotation(pod, 0, PREFILL, target, 1).startswith("mem=")


def _with_mixtral():
    raw = small_raw()
    raw["services"].append(
        {"name": "moe", "model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "trace": "conv",
         "rate": 0.2, "offset_s": 300, "slo": {"ttft_s": 1.5, "tpot_s": 0.07}})
    scn = parse_scenario(raw, "moe")
    return scn, build_workload(scn), [model(s.model) for s in scn.services]


def test_a_model_the_reference_gpu_cannot_hold_is_sized_on_the_smallest_gpu_that_can():
    """Mixtral-8x7B (93 GB of weights) does not fit an 80 GB H100: it is configured and
    profiled on the cluster's H200, the other services on the reference H100."""
    scn, wl, models = _with_mixtral()
    refs = service_references(scn, models, wl)
    h100, h200 = unit_type("H100-SXM", None), unit_type("H200", None)
    assert refs == [h100, h100, h100, h200]
    # without a GPU that holds it, the reference stays (its pods then fit nowhere, as before)
    no_h200 = {**small_raw(), "services": [s.model_dump() for s in scn.services]}
    no_h200["cluster"]["pools"] = no_h200["cluster"]["pools"][:1]
    scn2 = parse_scenario(no_h200, "no-h200")
    assert service_references(scn2, models, build_workload(scn2))[3] == h100


def test_a_decode_pod_of_a_model_bigger_than_the_reference_gets_a_real_kv_budget():
    """Sized on the H100 it cannot run on, a Mixtral decode pod got KV for one max-length
    sequence; on the H200 it runs on it gets vLLM's share of that GPU."""
    scn, wl, models = _with_mixtral()
    refs = service_references(scn, models, wl)
    perf = PerfTables(models, refs)
    d = Deployments(scn, models, perf, wl, DemandModel())
    pod = make_pod(scn.services[3], "decode", "moe-decode", seed=1, rps=1.0, prompt=1100,
                   output=210, cpu=8, memory_gib=64, created=0.0)
    mem = d.pod_memory(pod, 3, DECODE)
    assert d.kv_tokens(3, mem) >= 50 * d.max_len[3]
    assert mem <= 0.9 * unit_type("H200", None).memory_bytes
    one = Deployments(scn, models, PerfTables(models, unit_type("H100-SXM", None)), wl,
                      DemandModel())
    assert one.kv_tokens(3, one.pod_memory(pod, 3, DECODE)) <= d.max_len[3] + 1
    # and the planner's per-pod capacity follows: more tokens/s per pod on its real GPU
    assert d.decode_capacity(3, 1200.0) > 2 * one.decode_capacity(3, 1200.0)
