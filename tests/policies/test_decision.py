"""decide() / choose_unit(): placements, reasons, baselines, SLOs, explanations."""

from __future__ import annotations

import json

import pytest

from policies.cluster_view import ClusterView
from policies.config import PolicyConfig, PolicyConfigError
from policies.decision import Placement, Rejection, choose_unit, decide
from policies.model import Demand, DemandOverride, LoadSpec, PodRequest, Slo, Timing, UnitType
from policies.share import sm_share
from tests.policies.conftest import H100, mig_unit, whole_gpu
from workloads.roofline import DemandModel

GiB = 2**30
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
NOW = 1000.0


def req(name: str, role: str, rps: float = 2.0, **kw) -> PodRequest:
    kw.setdefault("model", LLAMA)
    kw.setdefault("load", LoadSpec(rps, 2048, 256))
    return PodRequest("ns", name, role=role, **kw)


def put(v: ClusterView, dm: DemandModel, r: PodRequest, uuid: str, t: float = NOW - 60) -> None:
    ut = v.unit_type(uuid)
    assert ut is not None
    d = dm.demand(r, ut)
    v.place(r.key, uuid, d, t, role=r.role, request=r, timing=dm.timing(r, ut))


def three_gpus(dm: DemandModel) -> ClusterView:
    """a: decode load, b: prefill load, c: empty (one H100 each)."""
    v = ClusterView()
    for n in ("a", "b", "c"):
        v.set_node(n, [whole_gpu(n, 0)])
    put(v, dm, req("dec0", "decode", rps=1.0), "GPU-a-0")
    put(v, dm, req("pre0", "prefill", rps=3.0), "GPU-b-0")
    return v


def test_prefill_goes_next_to_decode_and_decode_next_to_prefill(demand_model: DemandModel) -> None:
    v = three_gpus(demand_model)
    cfg = PolicyConfig()
    d = decide(v, req("pre1", "prefill", rps=3.0), ["a", "b", "c"], NOW, cfg, demand_model)
    assert d.chosen == ("a", "GPU-a-0"), d.explain()
    assert d.scores["a"] >= d.scores["c"] and d.scores["a"] >= d.scores["b"]
    d = decide(v, req("dec1", "decode", rps=1.0), ["c", "b", "a"], NOW, cfg, demand_model)
    assert d.chosen == ("b", "GPU-b-0"), d.explain()


def test_failed_nodes_say_why(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("sick", [whole_gpu("sick", 0, healthy=False), whole_gpu("sick", 1)])
    v.place("ns/hog", "GPU-sick-1", Demand(0.1, 0.1, 79 * GiB), NOW)
    v.set_node("empty", [])
    d = decide(
        v, req("p", "prefill"), ["sick", "ghost", "empty"], NOW, PolicyConfig(), demand_model
    )
    assert d.chosen is None and d.feasible_nodes == [] and d.scores == {}
    assert d.failed_nodes["sick"] == "no unit fits: 1 unhealthy, 1 over memory"
    assert "unknown node" in d.failed_nodes["ghost"]
    assert d.failed_nodes["empty"] == "node has no units"
    assert choose_unit(
        v, req("p", "prefill"), "sick", NOW, PolicyConfig(), demand_model
    ) == Rejection("sick", "no unit fits: 1 unhealthy, 1 over memory")


def test_pod_too_big_for_a_slice_is_explained(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("m", [mig_unit("m", 0, j, "1g.10gb") for j in range(7)])
    d = decide(v, req("p", "prefill", rps=8.0), ["m"], NOW, PolicyConfig(), demand_model)
    msg = d.failed_nodes["m"]
    assert msg.startswith("no unit fits: 7 unit type cannot host the pod")
    assert "1g.10gb" in msg and "needs" in msg
    e = d.explain()
    assert e["rejected_units_total"] == 7
    assert e["demand_by_type"][f"{H100} 1g.10gb"]["cannot_host"].startswith("needs")


def test_refuses_other_gpu_counts(demand_model: DemandModel) -> None:
    v = three_gpus(demand_model)
    two = PodRequest("ns", "two", role="decode", gpus=2)
    d = decide(v, two, ["a", "c"], NOW, PolicyConfig(), demand_model)
    assert d.chosen is None and "asks for 2 copack.io/gpu" in d.failed_nodes["a"]
    zero = PodRequest("ns", "zero", gpus=0)
    assert (
        "does not request"
        in decide(v, zero, None, NOW, PolicyConfig(), demand_model).failed_nodes["c"]
    )
    assert isinstance(choose_unit(v, two, "c", NOW, PolicyConfig(), demand_model), Rejection)


def test_spread_and_dedicated_one_pod_per_unit(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("x", [whole_gpu("x", i) for i in range(4)])
    v.set_node("y", [whole_gpu("y", i) for i in range(4)])
    small = Demand(0.05, 0.05, GiB)
    for i in range(3):
        v.place(f"ns/x{i}", f"GPU-x-{i}", small, NOW)
    r = req("p", "decode")
    spread = decide(v, r, ["x", "y"], NOW, PolicyConfig(policy="spread"), demand_model)
    assert spread.scores == {"x": 0, "y": 8}  # LeastAllocated: (free-1)/total * 10
    assert spread.chosen == ("y", "GPU-y-0")
    ded = decide(v, r, ["x", "y"], NOW, PolicyConfig(policy="dedicated"), demand_model)
    assert ded.scores == {"x": 10, "y": 2}  # MostAllocated: fills x first
    assert ded.chosen == ("x", "GPU-x-3")
    v.place("ns/x3", "GPU-x-3", small, NOW)
    ded = decide(v, r, ["x"], NOW, PolicyConfig(policy="dedicated"), demand_model)
    assert ded.failed_nodes["x"] == "no unit fits: 4 already in use (policy gives one pod per unit)"


def test_binpack_shares_by_memory_only(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("x", [whole_gpu("x", 0), whole_gpu("x", 1)])
    v.place("ns/busy", "GPU-x-1", Demand(0.95, 0.95, 40 * GiB), NOW)
    r = PodRequest("ns", "p", role="prefill", demand=DemandOverride(0.5, 0.5, 20 * GiB))
    d = decide(v, r, None, NOW, PolicyConfig(policy="binpack"), demand_model)
    assert d.chosen == ("x", "GPU-x-1")  # fullest memory first, SMs ignored
    assert d.scores["x"] == round(10 * 60 / 79.647, 0)
    comp = decide(v, r, None, NOW, PolicyConfig(), demand_model)
    assert comp.chosen == ("x", "GPU-x-0")  # complementary refuses the SM/bandwidth overload
    big = PodRequest("ns", "q", demand=DemandOverride(0.1, 0.1, 50 * GiB))
    assert decide(v, big, None, NOW, PolicyConfig(policy="binpack"), demand_model).chosen == (
        "x",
        "GPU-x-0",
    )


def test_overcommit_bound(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("x", [whole_gpu("x", 0)])
    v.place("ns/a", "GPU-x-0", Demand(0.7, 0.2, GiB), NOW)
    r = PodRequest("ns", "p", demand=DemandOverride(0.5, 0.1, GiB))
    d = decide(v, r, None, NOW, PolicyConfig(), demand_model)
    assert d.chosen is None and d.failed_nodes["x"] == "no unit fits: 1 over SM capacity"
    assert decide(v, r, None, NOW, PolicyConfig(overcommit=0.25), demand_model).chosen is not None
    assert decide(v, r, None, NOW, PolicyConfig(overcommit=0.15), demand_model).chosen is None


def test_own_slo_filters_slow_units(demand_model: DemandModel) -> None:
    v = ClusterView()
    v.set_node("small", [mig_unit("small", 0, 0, "3g.40gb")])
    v.set_node("big", [whole_gpu("big", 0)])
    r = req("p", "prefill", rps=0.5, slo=Slo(ttft_s=0.08))
    # predicted TTFT of a 2,048-token prefill: ~53 ms on a whole H100, ~113 ms on a 3g.40gb
    d = decide(v, r, ["small", "big"], NOW, PolicyConfig(), demand_model)
    assert d.chosen == ("big", "GPU-big-0")
    assert "predicted TTFT 113 ms alone > SLO 80 ms" in d.failed_nodes["small"]
    off = decide(v, r, ["small", "big"], NOW, PolicyConfig(slo_check=False), demand_model)
    assert set(off.feasible_nodes) == {"small", "big"}


def test_neighbour_slo_is_protected_under_overcommit(demand_model: DemandModel) -> None:
    dm = demand_model
    v = ClusterView()
    v.set_node("x", [whole_gpu("x", 0)])
    ut = UnitType(H100)
    dec = req("dec", "decode", rps=1.0, slo=Slo(tpot_s=0.0125))
    t = dm.timing(dec, ut)
    assert t is not None and t.tpot_s < 0.0125
    v.place(
        dec.key,
        "GPU-x-0",
        dm.demand(dec, ut),
        NOW - 60,
        role="decode",
        sm_share=100,
        request=dec,
        timing=t,
    )
    # decode: bw 0.80, TPOT 9.0 ms alone; 12.5 ms allows a bandwidth excess of ~0.48
    hungry = PodRequest("ns", "bw", demand=DemandOverride(0.1, 0.75, GiB))
    cfg = PolicyConfig(overcommit=1.0)
    d = decide(v, hungry, None, NOW, cfg, dm)
    assert d.chosen is None and d.failed_nodes["x"] == "no unit fits: 1 would break an SLO"
    polite = PodRequest("ns", "sm", demand=DemandOverride(0.3, 0.6, GiB))
    assert decide(v, polite, None, NOW, cfg, dm).chosen == ("x", "GPU-x-0")


def test_choose_unit_and_sm_share(demand_model: DemandModel) -> None:
    v = three_gpus(demand_model)
    cfg = PolicyConfig()
    p = choose_unit(v, req("pre1", "prefill", rps=1.0), "a", NOW, cfg, demand_model)
    assert isinstance(p, Placement) and p.unit == "GPU-a-0"
    load = v.unit_load("GPU-a-0", NOW, cfg.stale_after_s)["sm"]
    assert p.sm_share == sm_share("prefill", p.demand.sm, load, cfg) >= 90
    q = choose_unit(v, req("dec1", "decode", rps=1.0), "b", NOW, cfg, demand_model)
    assert isinstance(q, Placement) and q.sm_share == 30  # decode: floor share
    assert q.timing is not None and q.timing.tpot_s > 0
    assert 0 <= q.score <= 10


def test_sm_share_rules() -> None:
    cfg = PolicyConfig()
    assert sm_share("decode", 0.05, 0.0, cfg) == 30
    assert sm_share("decode", 0.4, 0.0, cfg) == 60
    assert sm_share("prefill", 0.3, 0.2, cfg) == 80
    assert sm_share("prefill", 0.9, 0.5, cfg) == 90
    assert sm_share("mixed", 0.0, 1.0, cfg) == 10
    assert sm_share("prefill", 2.0, 0.0, cfg) == 100


def test_decode_alone_on_a_unit_its_memory_closes_runs_uncapped(
    demand_model: DemandModel,
) -> None:
    """A decode pod that leaves an empty MPS unit with less memory than any pod the cluster
    runs is alone there for as long as it stays: its cap would protect no neighbour."""
    cfg, dm = PolicyConfig(), demand_model
    v = ClusterView()
    for n in ("a", "b"):
        v.set_node(n, [whole_gpu(n, 0)], mps=True)
    v.set_node("ts", [whole_gpu("ts", 0)])  # time-slicing: shares mean nothing there
    cap = v.unit("GPU-a-0").memory_bytes
    v.place("ns/small", "GPU-b-0", Demand(0.1, 0.1, 10 * GiB), NOW - 60)  # smallest pod: 10 GiB

    def dec(name: str, mem: int) -> PodRequest:
        return req(name, "decode", rps=1.0, demand=DemandOverride(mem_bytes=mem))

    big = cap - 8 * GiB  # leaves 8 GiB: too little for the 10 GiB pod
    p = choose_unit(v, dec("big", big), "a", NOW, cfg, dm)
    assert isinstance(p, Placement) and p.sm_share == 100
    roomy = choose_unit(v, dec("roomy", cap - 20 * GiB), "a", NOW, cfg, dm)
    assert isinstance(roomy, Placement) and roomy.sm_share == 30  # a 10 GiB pod still fits
    shared = choose_unit(v, dec("shared", cap - 12 * GiB), "b", NOW, cfg, dm)
    assert isinstance(shared, Placement) and shared.sm_share == 30  # its neighbour keeps the cap
    ts = choose_unit(v, dec("ts", big), "ts", NOW, cfg, dm)
    assert isinstance(ts, Placement) and ts.sm_share == 30


def test_gpus_only_the_largest_pod_fits_open_last_for_smaller_pods(
    demand_model: DemandModel,
) -> None:
    """Idle GPUs open largest first, unless a pod the cluster runs or waits to place fits no
    whole GPU of some product: then the GPUs that hold it open last for smaller pods, so an
    H100 cluster's few H200s stay free for a 93 GB Mixtral. MIG slices too small for a pod do
    not make it one (the operator cut them small)."""
    cfg, dm = PolicyConfig(), demand_model
    h200 = "NVIDIA H200"
    v = ClusterView()
    v.set_node("big", [whole_gpu("big", 0, h200)], mps=True)
    v.set_node("small", [whole_gpu("small", 0)], mps=True)
    v.set_node("mig", [mig_unit("mig", 0, j, "3g.40gb") for j in (0, 1)], mps=True)
    nodes = ["big", "small", "mig"]
    small_pod = req("pre", "prefill")
    assert decide(v, small_pod, nodes, NOW, cfg, dm).chosen[0] == "big"  # largest first
    v.note_waiting("ns/moe", 96 * GiB)  # a Mixtral pod not placed yet: no H100 holds it
    d = decide(v, small_pod, nodes, NOW, cfg, dm)
    assert d.chosen[0] in ("small", "mig"), d.explain()  # an H100, whole or in slices
    moe = req("moe", "decode", model="mistralai/Mixtral-8x7B-Instruct-v0.1",
              demand=DemandOverride(mem_bytes=96 * GiB))
    assert decide(v, moe, nodes, NOW, cfg, dm).chosen[0] == "big"  # the big pod itself
    v.note_waiting("ns/moe", None)
    assert decide(v, small_pod, nodes, NOW, cfg, dm).chosen[0] == "big"
    # a placed pod counts too, and joining a GPU in use still beats opening one
    v.place("ns/moe", "GPU-big-0", Demand(0.1, 0.5, 96 * GiB), NOW - 60, role="decode")
    assert v.largest_pod_mem == 96 * GiB
    v.unplace("ns/moe")
    # a 70 GiB pod fits the whole H100: too big for a 3g.40gb slice, no reserve for it
    v.note_waiting("ns/wide", 70 * GiB)
    assert decide(v, small_pod, nodes, NOW, cfg, dm).chosen[0] == "big"
    # nor for a GPU carved into one small slice (found by tests/policies/test_properties.py)
    v.set_node("one", [mig_unit("one", 0, 0, "1g.10gb")], mps=True)
    assert decide(v, small_pod, [*nodes, "one"], NOW, cfg, dm).chosen[0] == "big"


def test_explain_is_json_and_complete(demand_model: DemandModel) -> None:
    v = three_gpus(demand_model)
    v.set_node("d", [whole_gpu("d", 0, healthy=False)])
    v.record_telemetry("GPU-a-0", t=NOW - 1, sm=0.5, bw=0.6, mem_used_bytes=30 * GiB, tensor=0.1)
    d = decide(
        v,
        req("pre1", "prefill", rps=3.0),
        ["a", "b", "c", "d", "zz"],
        NOW,
        PolicyConfig(),
        demand_model,
    )
    e = json.loads(json.dumps(d.explain()))
    ch = e["chosen"]
    assert ch["node"] == "a" and ch["unit"] == "GPU-a-0"
    assert set(ch["load"]) >= {"sm", "bw", "mem_bytes", "stale"} and not ch["load"]["stale"]
    assert ch["after"]["sm"] == pytest.approx(ch["load"]["sm"] + ch["demand"]["sm"], abs=1e-3)
    assert ch["pods_there"] == ["ns/dec0"]
    assert e["nodes"]["d"]["reason"] == "no unit fits: 1 unhealthy"
    assert "unknown node" in e["nodes"]["zz"]["reason"]
    assert e["nodes"]["b"]["stale_telemetry"] and "stale_telemetry" not in e["nodes"]["a"]
    assert d.stale_nodes == ["b", "c", "d"]
    assert e["rejected_units"] == [
        {
            "node": "d",
            "unit": "GPU-d-0",
            "reason": "unhealthy",
            "load": e["rejected_units"][0]["load"],
        }
    ]
    assert e["demand_by_type"][H100]["source"] == "roofline"


def test_candidates_none_means_all_and_order_does_not_matter(demand_model: DemandModel) -> None:
    v = ClusterView()
    for n in ("n3", "n1", "n2"):
        v.set_node(n, [whole_gpu(n, 0)])
    r = PodRequest("ns", "p", demand=DemandOverride(0.2, 0.2, GiB))
    d_all = decide(v, r, None, NOW, PolicyConfig(), demand_model)
    assert sorted(d_all.feasible_nodes) == ["n1", "n2", "n3"]
    assert d_all.chosen == ("n1", "GPU-n1-0")  # tie -> smallest name
    d_rev = decide(v, r, ["n2", "n3", "n1"], NOW, PolicyConfig(), demand_model)
    assert d_rev.chosen == d_all.chosen and d_rev.scores == d_all.scores
    assert d_rev.feasible_nodes == ["n2", "n3", "n1"]  # candidate order kept


def test_wide_node_spanning_rows(demand_model: DemandModel) -> None:
    v = ClusterView(units_per_row=4)
    units = [mig_unit("w", i, j, "1g.10gb") for i in range(2) for j in range(7)]
    v.set_node("w", units)
    for u in units[:-1]:
        v.place(f"ns/{u.uuid}", u.uuid, Demand(0.9, 0.9, GiB), NOW)
    r = PodRequest("ns", "p", demand=DemandOverride(0.05, 0.05, GiB))
    d = decide(v, r, ["w"], NOW, PolicyConfig(), demand_model)
    assert d.chosen == ("w", "MIG-w-1-6") and d.best_unit == {"w": "MIG-w-1-6"}
    v.place("ns/last", "MIG-w-1-6", Demand(0.9, 0.9, GiB), NOW)
    d = decide(v, r, ["w"], NOW, PolicyConfig(), demand_model)
    assert d.failed_nodes["w"] == "no unit fits: 14 over SM capacity"


def test_config_validation() -> None:
    with pytest.raises(PolicyConfigError, match="policy: unknown 'bestfit'"):
        PolicyConfig(policy="bestfit")
    with pytest.raises(PolicyConfigError, match="overcommit"):
        PolicyConfig(overcommit=-0.1)
    with pytest.raises(PolicyConfigError, match="unknown policy config key"):
        PolicyConfig.from_dict({"polcy": "spread"})
    with pytest.raises(PolicyConfigError, match="max_pods_per_unit"):
        PolicyConfig.from_dict({"max_pods_per_unit": "2.5"})
    c = PolicyConfig.from_dict({"policy": "spread", "overcommit": "0.5", "slo_check": False})
    assert c.policy == "spread" and c.overcommit == 0.5 and not c.slo_check
    assert PolicyConfig.from_dict(c.to_dict()) == c


def test_old_decision_survives_a_changed_view(demand_model: DemandModel) -> None:
    """The extender keeps recent decisions (prioritize reuses filter's); a re-partition in
    between must not turn their lazy answers into crashes."""
    v = three_gpus(demand_model)
    d = decide(
        v, req("pre1", "prefill", rps=3.0), ["a", "b", "c"], NOW, PolicyConfig(), demand_model
    )
    v.set_node("a", [mig_unit("a", 0, 0, "3g.40gb"), mig_unit("a", 0, 1, "3g.40gb")])
    v.remove_node("b")
    assert d.chosen == ("a", "GPU-a-0")  # resolved when decided
    assert set(d.scores) == {"a", "b", "c"}
    assert d.best_unit == {}  # slots no longer mean the same units: nothing rather than wrong
    assert d.placement() is None
    e = json.loads(json.dumps(d.explain()))
    assert e["chosen"]["note"].startswith("the cluster's units changed")


def test_empty_cluster(demand_model: DemandModel) -> None:
    v = ClusterView()
    r = PodRequest("ns", "p", role="decode")
    d = decide(v, r, ["nowhere"], NOW, PolicyConfig(), demand_model)
    assert d.chosen is None and d.scores == {} and "unknown node" in d.failed_nodes["nowhere"]
    assert decide(v, r, None, NOW, PolicyConfig(), demand_model).failed_nodes == {}
    assert json.loads(json.dumps(d.explain()))["nodes"]["nowhere"]["reason"]


def test_explain_of_a_big_cluster_is_bounded(demand_model: DemandModel) -> None:
    v = ClusterView()
    for i in range(30):
        v.set_node(f"n{i:02d}", [whole_gpu(f"n{i:02d}", 0, healthy=i % 3 != 0)])
    r = PodRequest("ns", "p", demand=DemandOverride(0.2, 0.2, GiB))
    e = decide(v, r, None, NOW, PolicyConfig(), demand_model).explain(limit=5)
    assert e["feasible_nodes_total"] == 20 and e["failed_nodes_total"] == 10
    assert len(e["nodes"]) == 10 and e["nodes_omitted"] == 20
    assert sum("score" in n for n in e["nodes"].values()) == 5
    assert len(e["rejected_units"]) == 5 and e["rejected_units_total"] == 10


def test_type_table_is_built_once_per_pod_and_config(demand_model: DemandModel) -> None:
    """kube-scheduler asks about one pod several times; its table is cached on (pod, config,
    unit types), and a change to any of them gives a fresh, different one."""
    from policies.decision import type_table

    v = three_gpus(demand_model)
    v.set_node("m", [mig_unit("m", 0, 0, "1g.10gb")])
    pod = req("big", "prefill", rps=3.0, slo=Slo(ttft_s=0.001))
    plain, slo = PolicyConfig(slo_check=False), PolicyConfig(slo_check=True)
    first = type_table(v.types, pod, demand_model, plain)
    assert type_table(list(v.types), pod, demand_model, plain) is first
    checked = type_table(v.types, pod, demand_model, slo)
    assert checked is not first
    assert checked.bad.all() and not first.bad.all()  # a 1 ms TTFT fits no unit
    other = type_table(v.types, req("big", "prefill", rps=0.1), demand_model, plain)
    assert other.sm[0] < first.sm[0]
    v.set_node("h", [whole_gpu("h", 0, product="NVIDIA H200")])
    grown = type_table(v.types, pod, demand_model, plain)
    assert len(grown.sm) == len(first.sm) + 1
    assert decide(v, pod, None, NOW, slo, demand_model).chosen is None


class _SlotsModel:
    """A demand model that takes no weak reference (the table is then not cached)."""

    __slots__ = ("inner",)

    def __init__(self, inner: DemandModel) -> None:
        self.inner = inner

    def demand(self, request: PodRequest, unit_type: UnitType) -> Demand:
        return self.inner.demand(request, unit_type)

    def timing(self, request: PodRequest, unit_type: UnitType) -> Timing | None:
        return self.inner.timing(request, unit_type)

    def explain(self, request: PodRequest, unit_type: UnitType) -> dict:
        return self.inner.explain(request, unit_type)


def test_decide_works_with_a_model_that_takes_no_weak_reference(
    demand_model: DemandModel,
) -> None:
    v = three_gpus(demand_model)
    model = _SlotsModel(demand_model)
    d = decide(v, req("pre1", "prefill", rps=3.0), None, NOW, PolicyConfig(), model)
    assert d.chosen == ("a", "GPU-a-0")
