"""Packing rules beyond plain vector best-fit: fragmentation-aware residuals, multiplexed
(typical vs provisioned) prefill demand with one burst at a time per unit, and replicas of one
workload kept apart."""

from __future__ import annotations

from policies.annotations import pod_request_from_k8s, workload_group
from policies.cluster_view import ClusterView
from policies.config import PolicyConfig
from policies.decision import decide
from policies.model import Demand, DemandOverride, LoadSpec, PodRequest
from tests.policies.conftest import whole_gpu
from workloads.roofline import DemandModel

GiB = 2**30
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
H200 = "NVIDIA H200"
NOW = 1000.0
# the fragmentation term alone, between idle GPUs (consolidation would pick by size first)
BEST_FIT = PolicyConfig(consolidate=False)


def put(v: ClusterView, dm: DemandModel, r: PodRequest, uuid: str) -> None:
    ut = v.unit_type(uuid)
    assert ut is not None
    v.place(r.key, uuid, dm.demand(r, ut), NOW - 60, r.role, request=r, timing=dm.timing(r, ut))


def big(name: str, role: str = "prefill") -> PodRequest:
    """A pod that fills most of an H100's memory (a 32B model's weights and KV)."""
    return PodRequest("ns", name, role=role, demand=DemandOverride(0.3, 0.3, 70 * GiB))


def test_big_pod_goes_where_its_leftover_can_still_be_used(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("h100", [whole_gpu("h100", 0)])
    v.set_node("h200", [whole_gpu("h200", 0, product=H200)])
    r = big("p")  # nothing placed: only the pod itself says what is "small"
    # leftover on the H100 (~10 GiB) fits no pod the cluster runs (the smallest is 70 GiB):
    # its SMs and bandwidth would be stranded; on the H200 another such pod still fits
    d = decide(v, r, None, NOW, BEST_FIT, demand_model)
    assert d.chosen == ("h200", "GPU-h200-0"), d.explain()
    # plain best-fit (weight 0) takes the tighter H100
    plain = PolicyConfig(fragmentation_weight=0.0, consolidate=False)
    d0 = decide(v, r, None, NOW, plain, demand_model)
    assert d0.chosen == ("h100", "GPU-h100-0"), d0.explain()


def test_smallest_pod_in_the_cluster_decides_what_is_stranded(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("h100", [whole_gpu("h100", 0)])
    v.set_node("h200", [whole_gpu("h200", 0, product=H200)])
    v.set_node("other", [whole_gpu("other", 0)])
    tiny = PodRequest("ns", "tiny", role="decode", demand=DemandOverride(0.05, 0.05, 4 * GiB))
    put(v, demand_model, tiny, "GPU-other-0")
    assert v.min_pod_mem_bytes == 4 * GiB
    # a 4 GiB pod fits in the H100's leftover: nothing is stranded, best-fit picks the H100
    d = decide(v, big("p"), ["h100", "h200"], NOW, BEST_FIT, demand_model)
    assert d.chosen == ("h100", "GPU-h100-0"), d.explain()
    v.unplace("ns/tiny")
    assert v.min_pod_mem_bytes is None
    d = decide(v, big("p"), ["h100", "h200"], NOW, BEST_FIT, demand_model)
    assert d.chosen == ("h200", "GPU-h200-0"), d.explain()


def bursty(name: str, typical: float, rps: float, group: str = "") -> PodRequest:
    """A prefill pod provisioned for `rps` (its bursts) that declares `typical` SMs."""
    return PodRequest(
        "ns", name, role="prefill", model=LLAMA, load=LoadSpec(rps, 2048, 64),
        demand=DemandOverride(sm=typical), group=group,
    )  # fmt: skip


def test_typical_demands_share_a_unit_while_one_burst_fits(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("a", [whole_gpu("a", 0)], mps=True)
    ut = v.unit_type("GPU-a-0")
    assert ut is not None
    first = bursty("p0", 0.2, 10.0, group="ns/app=x")
    put(v, demand_model, first, "GPU-a-0")
    burst_sm = demand_model.timing(first, ut).sm_at_load  # type: ignore[union-attr]
    assert 0.3 < burst_sm < 0.8  # its provisioned load needs more than it declares
    assert abs(v.burst_sm[v.slot_of("GPU-a-0")] - (burst_sm - 0.2)) < 1e-9
    cfg = PolicyConfig()
    # another workload's pod: typical 0.2 + 0.2, plus the larger burst headroom, fits
    ok = decide(v, bursty("q0", 0.2, 10.0, group="ns/app=y"), None, NOW, cfg, demand_model)
    assert ok.chosen == ("a", "GPU-a-0"), ok.explain()
    # a pod whose own burst does not fit beside the other's typical load is refused
    heavy = bursty("q1", 0.2, 10.0 * 0.95 / burst_sm, group="ns/app=y")
    no = decide(v, heavy, None, NOW, cfg, demand_model)
    assert no.chosen is None and "no SM room left for a burst" in no.failed_nodes["a"]
    # the baselines do not read typical-vs-provisioned demand
    assert decide(v, heavy, None, NOW, PolicyConfig(policy="binpack"), demand_model).chosen
    # time-sliced, one burst at a time too: the burst fits beside the others' typical times
    # (0.2 + 0.2 + 0.55), not beside every burst at once (0.2 + 0.2 + 0.55 + ~0.3)
    v.set_node("ts", [whole_gpu("ts", 0)], mps=False)
    put(v, demand_model, bursty("p1", 0.2, 10.0, group="ns/app=z"), "GPU-ts-0")
    mid = bursty("q2", 0.2, 10.0 * 0.75 / burst_sm, group="ns/app=y")
    d = decide(v, mid, None, NOW, cfg, demand_model)
    assert d.scores.keys() == {"a", "ts"}, d.explain()
    # a decode pod there holds its bandwidth's time, which its few SMs do not show
    dec = PodRequest("ns", "d", role="decode", demand=DemandOverride(0.02, 0.3, 20 * GiB))
    v.place(dec.key, "GPU-ts-0", Demand(0.02, 0.3, 20 * GiB), NOW - 60, "decode", 20, dec)
    d = decide(v, mid, None, NOW, cfg, demand_model)
    assert d.scores.keys() == {"a"} and "over GPU time" in d.failed_nodes["ts"], d.explain()


def test_time_sliced_burst_waits_for_decode_kernels(demand_model: DemandModel) -> None:
    """Time-sliced, a decode pod holds the GPU for its bandwidth-bound kernels although it
    declares almost no SMs: a prefill burst must fit beside the decode pods' bandwidth there,
    while under MPS (kernels overlap) it fits beside their SMs."""
    dec = [
        PodRequest("ns", f"d{i}", role="decode", demand=DemandOverride(0.02, 0.35, 30 * GiB))
        for i in range(4)
    ]
    v = ClusterView()
    v.set_node("mps", [whole_gpu("mps", 0, product=H200)], mps=True)
    v.set_node("ts", [whole_gpu("ts", 0, product=H200)], mps=False)
    for r, uuid in zip(dec, ("GPU-mps-0", "GPU-mps-0", "GPU-ts-0", "GPU-ts-0"), strict=True):
        v.place(r.key, uuid, Demand(0.02, 0.35, 30 * GiB), NOW - 60, "decode", 20, r)
    p = bursty("p", 0.15, 10.0)
    ut = v.unit_type("GPU-ts-0")
    assert ut is not None
    burst = demand_model.timing(p, ut).sm_at_load  # type: ignore[union-attr]
    assert 0.15 + (burst - 0.15) + 0.70 > 1.0 > 0.15 + (burst - 0.15) + 0.04
    d = decide(v, p, None, NOW, PolicyConfig(consolidate=False), demand_model)
    assert d.chosen == ("mps", "GPU-mps-0"), d.explain()
    assert "over GPU time" in d.failed_nodes["ts"], d.failed_nodes
    # one decode pod's bandwidth leaves the burst room on the time-sliced GPU too
    v.unplace("ns/d3")
    d = decide(v, p, ["ts"], NOW, PolicyConfig(), demand_model)
    assert d.chosen == ("ts", "GPU-ts-0"), d.explain()


def test_time_sliced_pods_hold_the_sum_of_their_times(demand_model: DemandModel) -> None:
    """Time-sliced, kernels take turns: a steady prefill pod (0.6 of the SMs) and a decode pod
    (0.6 of the bandwidth) want 1.2 of the GPU's time, though neither sum (SMs 0.62,
    bandwidth 0.65) is over it. Under MPS their kernels overlap and they share."""
    v = ClusterView()
    v.set_node("mps", [whole_gpu("mps", 0, product=H200)], mps=True)
    v.set_node("ts", [whole_gpu("ts", 0, product=H200)], mps=False)
    for i, uuid in enumerate(("GPU-mps-0", "GPU-ts-0")):
        dec = PodRequest("ns", f"d{i}", role="decode", demand=DemandOverride(0.02, 0.6, 30 * GiB))
        v.place(dec.key, uuid, Demand(0.02, 0.6, 30 * GiB), NOW - 60, "decode", 20, dec)
    assert not v.has_burst_pods()  # the rule holds without any burst in the cluster
    steady = PodRequest("ns", "p", role="prefill", demand=DemandOverride(0.6, 0.05, 20 * GiB))
    d = decide(v, steady, None, NOW, BEST_FIT, demand_model)
    assert d.scores.keys() == {"mps"}, d.explain()
    assert "over GPU time" in d.failed_nodes["ts"], d.failed_nodes
    light = PodRequest("ns", "q", role="prefill", demand=DemandOverride(0.3, 0.05, 20 * GiB))
    assert decide(v, light, None, NOW, BEST_FIT, demand_model).scores.keys() == {"mps", "ts"}


def test_an_idle_time_sliced_gpu_opens_after_an_idle_mps_gpu(demand_model: DemandModel) -> None:
    """Time-sliced GPUs take fewer neighbours (their times add up): the pod that opens a GPU
    goes where the pods that follow can still join it, unless only a time-sliced one is left."""
    v = ClusterView()
    v.set_node("ts", [whole_gpu("ts", 0, product=H200)], mps=False)
    v.set_node("mps", [whole_gpu("mps", 0, product=H200)], mps=True)
    p = PodRequest("ns", "p", role="prefill", demand=DemandOverride(0.4, 0.05, 20 * GiB))
    d = decide(v, p, None, NOW, PolicyConfig(), demand_model)
    assert d.chosen == ("mps", "GPU-mps-0"), d.explain()
    assert d.scores["mps"] > d.scores["ts"]
    # a smaller MPS GPU (H100, 80 of 141 GiB) still opens first; a time-sliced one is chosen
    # when it is the only one left
    v.set_node("mps", [whole_gpu("mps", 0)], mps=True)
    assert decide(v, p, None, NOW, PolicyConfig(), demand_model).chosen == ("mps", "GPU-mps-0")
    v.set_unit_health("GPU-mps-0", False)
    assert decide(v, p, None, NOW, PolicyConfig(), demand_model).chosen == ("ts", "GPU-ts-0")


def test_replicas_of_one_workload_never_share_a_unit(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("a", [whole_gpu("a", 0), whole_gpu("a", 1)])
    put(v, demand_model, bursty("p0", 0.1, 10.0, group="ns/app=x"), "GPU-a-0")
    d = decide(v, bursty("p1", 0.1, 10.0, group="ns/app=x"), None, NOW, PolicyConfig(),
               demand_model)  # fmt: skip
    assert d.placement() is not None and d.placement().unit == "GPU-a-1", d.explain()  # type: ignore[union-attr]
    v.set_unit_health("GPU-a-1", False)
    d = decide(v, bursty("p1", 0.1, 10.0, group="ns/app=x"), None, NOW, PolicyConfig(),
               demand_model)  # fmt: skip
    assert d.chosen is None
    assert "replica of the same workload" in d.failed_nodes["a"], d.failed_nodes
    # another workload, or the rule switched off, may share it
    other = decide(v, bursty("q", 0.1, 10.0, group="ns/app=y"), None, NOW, PolicyConfig(),
                   demand_model)  # fmt: skip
    assert other.chosen == ("a", "GPU-a-0")
    off = PolicyConfig(separate_bursty_replicas=False)
    assert decide(v, bursty("p1", 0.1, 10.0, group="ns/app=x"), None, NOW, off,
                  demand_model).chosen == ("a", "GPU-a-0")  # fmt: skip
    # pods not provisioned above their declared demand are not separated
    steady = bursty("p2", 0.5, 10.0, group="ns/app=x")
    assert decide(v, steady, None, NOW, PolicyConfig(), demand_model).chosen == ("a", "GPU-a-0")
    # decode replicas of one workload are smooth: no rule
    dec = PodRequest("ns", "d", role="decode", model=LLAMA, load=LoadSpec(0.5, 2048, 64),
                     group="ns/app=x")  # fmt: skip
    assert decide(v, dec, None, NOW, PolicyConfig(), demand_model).chosen == ("a", "GPU-a-0")
    # forgetting the replica lifts the rule
    v.unplace("ns/p0")
    assert decide(v, bursty("p1", 0.1, 10.0, group="ns/app=x"), None, NOW, PolicyConfig(),
                  demand_model).chosen == ("a", "GPU-a-0")  # fmt: skip


def test_workload_group_is_the_controller_owner() -> None:
    meta = {
        "ownerReferences": [
            {"kind": "Node", "name": "x"},
            {"kind": "ReplicaSet", "name": "svc-prefill-5d4", "controller": True},
        ],
        "labels": {"app": "svc"},
    }
    assert workload_group(meta, "ns") == "ns/ReplicaSet/svc-prefill-5d4"
    # app labels are shared by unrelated deployments (`app: vllm`): not an identity
    assert workload_group({"labels": {"app": "svc"}}, "ns") == ""
    assert workload_group({"ownerReferences": "junk"}, "ns") == ""
    owner = [{"kind": "ReplicaSet", "name": "chat-prefill", "controller": True}]
    pod = {"metadata": {"name": "p", "namespace": "inf", "ownerReferences": owner}}
    assert pod_request_from_k8s(pod).group == "inf/ReplicaSet/chat-prefill"


def test_provisioned_load_must_fit_the_unit_alone(demand_model: DemandModel) -> None:
    from tests.policies.conftest import mig_unit

    v = ClusterView()
    v.set_node("m", [mig_unit("m", 0, 0, "1g.10gb")], mps=True)
    v.set_node("w", [whole_gpu("w", 0)], mps=True)
    r = PodRequest("ns", "p", role="prefill", model=LLAMA, load=LoadSpec(12.0, 512, 16),
                   demand=DemandOverride(sm=0.01, mem_bytes=8 * GiB))  # fmt: skip
    for policy in ("complementary", "spread", "dedicated"):
        d = decide(v, r, None, NOW, PolicyConfig(policy=policy), demand_model)
        assert d.scores.keys() == {"w"}, (policy, d.failed_nodes)
        assert "at its provisioned load" in d.failed_nodes["m"]


def test_typical_load_must_be_served_beside_decode_caps(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("a", [whole_gpu("a", 0)], mps=True)
    v.set_node("t", [whole_gpu("t", 0)], mps=False)
    for uuid in ("GPU-a-0", "GPU-t-0"):
        for k in range(2):  # two decode pods capped at 30 % of the SMs each
            dec = PodRequest("ns", f"d{k}-{uuid}", role="decode",
                             demand=DemandOverride(0.05, 0.2, 20 * GiB))  # fmt: skip
            ut = v.unit_type(uuid)
            assert ut is not None
            v.place(dec.key, uuid, demand_model.demand(dec, ut), NOW - 60, "decode", 30, dec)
    assert abs(v.decode_caps[v.slot_of("GPU-a-0")] - 0.6) < 1e-9
    cfg = PolicyConfig(separate_bursty_replicas=False)
    # a prefill pod typically busy 50 % of a GPU gets only the 40 % the caps leave: refused
    busy = bursty("p", 0.5, 10.0)
    d = decide(v, busy, ["a"], NOW, cfg, demand_model)
    assert d.chosen is None and "over SM capacity" in d.failed_nodes["a"], d.explain()
    # a lighter one fits
    assert decide(v, bursty("q", 0.3, 10.0), ["a"], NOW, cfg, demand_model).chosen
    # and a decode pod whose cap would starve a typical prefill already there is refused
    put(v, demand_model, bursty("q", 0.3, 10.0), "GPU-a-0")
    dec = PodRequest("ns", "d9", role="decode", demand=DemandOverride(0.05, 0.1, 10 * GiB))
    d = decide(v, dec, ["a"], NOW, cfg, demand_model)
    assert d.chosen is None, d.explain()


def test_consolidate_joins_a_gpu_in_use_before_opening_one(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("h100", [whole_gpu("h100", 0), whole_gpu("h100", 1)])
    v.set_node("h200", [whole_gpu("h200", 0, product=H200)])
    small = PodRequest("ns", "s", role="decode", demand=DemandOverride(0.1, 0.2, 20 * GiB))
    # nothing in use: the largest GPU opens first (best-fit alone takes an H100)
    d = decide(v, small, None, NOW, PolicyConfig(), demand_model)
    assert d.chosen == ("h200", "GPU-h200-0"), d.explain()
    assert decide(v, small, None, NOW, BEST_FIT, demand_model).chosen[0] == "h100"
    put(v, demand_model, PodRequest("ns", "a", role="prefill",
                                    demand=DemandOverride(0.3, 0.1, 50 * GiB)), "GPU-h100-1")
    # a GPU in use with room beats an idle one, even when best-fit prefers the idle GPU's
    # tighter residual
    d = decide(v, small, None, NOW, PolicyConfig(), demand_model)
    assert d.chosen == ("h100", "GPU-h100-1"), d.explain()
    assert d.scores["h100"] > d.scores["h200"] >= 1
    assert 0.5 <= d.unit_score_of_row(d.chosen_row) <= 1.0


def test_consolidate_counts_mig_siblings_as_one_gpu(demand_model: DemandModel) -> None:
    from tests.policies.conftest import mig_unit

    v = ClusterView()
    v.set_node("mig", [mig_unit("mig", 0, 0, "3g.40gb"), mig_unit("mig", 0, 1, "3g.40gb")])
    v.set_node("h100", [whole_gpu("h100", 0)])
    assert v.gpu_mem[v.slot_of("MIG-mig-0-0")] == v.gpu_mem[v.slot_of("MIG-mig-0-1")]
    pod = PodRequest("ns", "x", role="decode", demand=DemandOverride(0.1, 0.1, 35 * GiB))
    put(v, demand_model, pod, "MIG-mig-0-0")  # its own instance is then full
    assert v.gpu_pods[v.slot_of("MIG-mig-0-1")] == 1  # the sibling's GPU is in use
    d = decide(v, PodRequest("ns", "y", role="decode", demand=DemandOverride(0.1, 0.1, 10 * GiB)),
               None, NOW, PolicyConfig(), demand_model)
    assert d.chosen == ("mig", "MIG-mig-0-1"), d.explain()
    assert d.scores["mig"] >= 5 > d.scores["h100"]
    v.unplace("ns/x")
    assert v.gpu_pods[v.slot_of("MIG-mig-0-1")] == 0
