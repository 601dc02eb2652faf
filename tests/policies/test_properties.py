"""Property tests (hypothesis) of the decision core over random clusters.

A small pure-Python reference scores the same units one by one; the vectorized decide() must
agree with it exactly on feasibility, and on the node scores and the chosen node."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from policies.cluster_view import ClusterView
from policies.config import PolicyConfig
from policies.decision import decide
from policies.model import Demand, DemandOverride, LoadSpec, PodRequest, Slo, UnitType
from tests.policies.conftest import H100, mig_unit, whole_gpu
from workloads.mig_catalog import mig_profile
from workloads.roofline import DemandModel, unit_shape

GiB = 2**30
NOW = 1000.0
DM = DemandModel()
PROFILES = ("1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb")

frac = st.floats(0.0, 1.0, allow_nan=False)


@dataclass
class UnitSpec:
    profile: str | None
    healthy: bool
    pods: list[tuple[float, float, float]]  # (sm, bw, mem fraction of the unit)
    telemetry: tuple[float, float, float, bool] | None  # sm, bw, mem frac, fresh


unit_spec = st.builds(
    UnitSpec,
    profile=st.sampled_from((None, None, *PROFILES)),
    healthy=st.booleans() | st.just(True),
    pods=st.lists(
        st.tuples(
            frac.map(lambda x: x * 0.6), frac.map(lambda x: x * 0.6), frac.map(lambda x: x * 0.5)
        ),
        max_size=3,
    ),
    telemetry=st.none() | st.tuples(frac, frac, frac, st.booleans()),
)
cluster_spec = st.lists(st.lists(unit_spec, min_size=0, max_size=9), min_size=1, max_size=6)
pod_spec = st.tuples(
    st.sampled_from(("prefill", "decode", "mixed")),
    frac.map(lambda x: x * 0.8),
    frac.map(lambda x: x * 0.8),
    st.integers(1, 60).map(lambda g: g * GiB // 2),
)
config_spec = st.builds(
    PolicyConfig,
    policy=st.sampled_from(("complementary", "spread", "binpack", "dedicated")),
    overcommit=st.sampled_from((0.0, 0.0, 0.1, 0.5)),
    max_pods_per_unit=st.integers(1, 4),
    fragmentation_weight=st.sampled_from((0.0, 1.0, 1.0, 3.0)),
    consolidate=st.booleans(),
)


def build(
    cluster: list[list[UnitSpec]], units_per_row: int = 4, mps: frozenset[int] = frozenset()
) -> ClusterView:
    """The nodes numbered in `mps` run MPS, the others are time-sliced (no MPS label)."""
    v = ClusterView(capacity=8, units_per_row=units_per_row)
    for n, units in enumerate(cluster):
        name = f"node-{n}"
        inv = []
        for i, u in enumerate(units):
            if u.profile is None:
                inv.append(whole_gpu(name, i, healthy=u.healthy))
            else:
                mu = mig_unit(name, i, 0, u.profile)
                inv.append(mu.model_copy(update={"healthy": u.healthy}))
        v.set_node(name, inv, mps=n in mps)
        for iu, u in zip(inv, units, strict=True):
            for k, (sm, bw, mf) in enumerate(u.pods):
                v.place(
                    f"ns/{iu.uuid}-{k}",
                    iu.uuid,
                    Demand(sm, bw, int(mf * iu.memory_bytes)),
                    NOW - 100,
                )
            if u.telemetry is not None:
                sm, bw, mf, fresh = u.telemetry
                t = NOW - 1 if fresh else NOW - 100
                v.record_telemetry(
                    iu.uuid, t, sm=0.0, bw=bw, mem_used_bytes=mf * iu.memory_bytes, tensor=sm
                )
    return v


def request(pod: tuple[str, float, float, int]) -> PodRequest:
    role, sm, bw, mem = pod
    return PodRequest("ns", "incoming", role=role, demand=DemandOverride(sm, bw, mem))


def reference(v: ClusterView, r: PodRequest, cfg: PolicyConfig) -> dict[str, tuple[float, str]]:
    """node -> (continuous score, best unit), one unit at a time in plain Python."""
    out: dict[str, tuple[float, str]] = {}
    # fragmentation: the smallest pod the cluster runs, the incoming one included
    sizes = [p.demand.mem_bytes for p in v.iter_pods()]
    for name in v.node_names:
        for uuid in v.units_of(name):
            ut = v.unit_type(uuid)
            assert ut is not None
            d = DM.demand(r, ut)
            bound = 1 + cfg.overcommit + 1e-9
            if d.mem_bytes > 0 and (cfg.policy == "binpack" or max(d.sm, d.bw) <= bound):
                sizes.append(d.mem_bytes)
    small = min(sizes) if sizes else math.inf
    # physical GPUs (MIG siblings share the inventory index): pods on each, its memory
    gpu_pods: dict[tuple[str, int], int] = {}
    gpu_mem: dict[tuple[str, int], float] = {}
    for name in v.node_names:
        for uuid in v.units_of(name):
            g = (name, v.unit(uuid).index)
            gpu_pods[g] = gpu_pods.get(g, 0) + v.unit_load(uuid, NOW, cfg.stale_after_s)["pods"]
            gpu_mem[g] = gpu_mem.get(g, 0.0) + float(v.unit(uuid).memory_bytes)
    largest = max(gpu_mem.values(), default=1.0)
    # idle time-sliced GPUs open after idle MPS ones where the cluster has both
    mixed = len({v.node_mps(n) for n in v.node_names if v.units_of(n)}) == 2
    for name in v.node_names:
        uuids = v.units_of(name)
        free = total = 0
        cands: list[tuple[float, str]] = []
        for uuid in uuids:
            ld = v.unit_load(uuid, NOW, cfg.stale_after_s)
            ut = v.unit_type(uuid)
            assert ut is not None
            d = DM.demand(r, ut)
            total += 1
            if ld["pods"] == 0 and ld["healthy"]:
                free += 1
            if not ld["healthy"] or ld["pods"] >= cfg.max_pods_per_unit:
                continue
            if cfg.exclusive and ld["pods"] > 0:
                continue
            cap = ld["mem_capacity_bytes"]
            lsm = v.eff_sm[v.slot_of(uuid)] if not ld["stale"] else v.decl_sm[v.slot_of(uuid)]
            lbw = v.eff_bw[v.slot_of(uuid)] if not ld["stale"] else v.decl_bw[v.slot_of(uuid)]
            lmem = v.eff_mem[v.slot_of(uuid)] if not ld["stale"] else v.decl_mem[v.slot_of(uuid)]
            if lmem + d.mem_bytes > cap:
                continue
            bound = 1 + cfg.overcommit + 1e-9
            over = d.sm > bound or d.bw > bound or lsm + d.sm > bound or lbw + d.bw > bound
            if cfg.policy != "binpack" and over:
                continue
            ts = not v.node_mps(name)
            if cfg.policy == "complementary" and ts:  # kernels take turns: times add up
                held = sum(max(p.demand.sm, p.demand.bw) for p in v.iter_pods() if p.uuid == uuid)
                if held + max(d.sm, d.bw) > bound:
                    continue
            if cfg.policy == "complementary":
                r1, r2, r3 = 1 - (lsm + d.sm), 1 - (lbw + d.bw), 1 - (lmem + d.mem_bytes) / cap
                stranded = r1 * r1 + r2 * r2
                closed = ld["pods"] + 1 >= cfg.max_pods_per_unit or cap - lmem - d.mem_bytes < small
                if closed:
                    stranded *= 1 + cfg.fragmentation_weight
                h2 = stranded + r3 * r3
                g = (name, v.unit(uuid).index)
                if cfg.consolidate and gpu_pods[g] == 0:  # after every GPU in use; largest first
                    s = -(32.0 + 1.0 - gpu_mem[g] / largest + 0.1 * h2 + 0.5 * (ts and mixed))
                else:
                    s = -h2
            elif cfg.policy == "binpack":
                s = (lmem + d.mem_bytes) / cap
            else:
                s = 0.0
            cands.append((s, uuid))
        if not cands:
            continue
        best = max(s for s, _ in cands)
        unit = next(u for s, u in cands if s >= best - 1e-12)
        if cfg.policy == "spread":
            best = (free - 1) / total
        elif cfg.policy == "dedicated":
            best = (total - free + 1) / total
        out[name] = (best, unit)
    return out


def shown(score: float, cfg: PolicyConfig) -> float:
    """The 0..1 unit score behind kube-scheduler's 0..10, from the reference's ordering key."""
    if cfg.policy != "complementary":
        return score
    if not cfg.consolidate:
        return 1 - math.sqrt(-score) / math.sqrt(3)
    if score > -32.0:  # a GPU in use: 0.5..1 by best fit
        return 0.5 + 0.5 * min(1.0, max(0.0, 1 - math.sqrt(-score) / math.sqrt(3)))
    return 0.45 * min(1.0, max(0.0, 1 - (-score - 32.0) / 1.5))  # an idle GPU, by size


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(cluster=cluster_spec, pod=pod_spec, cfg=config_spec, mps=st.frozensets(st.integers(0, 5)))
def test_matches_reference_and_respects_bounds(cluster, pod, cfg, mps) -> None:
    v = build(cluster, mps=mps)
    r = request(pod)
    d = decide(v, r, v.node_names, NOW, cfg, DM)
    ref = reference(v, r, cfg)
    event(f"{cfg.policy}: {'placed' if d.chosen else 'nowhere'}")
    assert set(d.feasible_nodes) == set(ref)
    assert set(d.failed_nodes) == set(v.node_names) - set(ref)
    for node, score in d.scores.items():
        assert isinstance(score, int) and 0 <= score <= 10
        assert score == min(10, max(0, round(10 * shown(ref[node][0], cfg))))
        assert d.best_unit[node] == ref[node][1]
    if d.chosen is None:
        assert not ref
        return
    node, uuid = d.chosen
    assert ref[node][0] >= max(s for s, _ in ref.values()) - 1e-9
    assert v.node_of_unit(uuid) == node
    # the placement never exceeds memory nor (except binpack) the overcommit bound
    ld = v.unit_load(uuid, NOW, cfg.stale_after_s)
    p = d.placement()
    assert p is not None and p.unit == uuid and 1 <= p.sm_share <= 100
    assert ld["mem_bytes"] + p.demand.mem_bytes <= ld["mem_capacity_bytes"]
    assert ld["healthy"] and ld["pods"] < cfg.max_pods_per_unit
    if cfg.policy != "binpack":
        assert ld["sm"] + p.demand.sm <= 1 + cfg.overcommit + 1e-9
        assert ld["bw"] + p.demand.bw <= 1 + cfg.overcommit + 1e-9
    if cfg.exclusive:
        assert ld["pods"] == 0


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(cluster=cluster_spec, pod=pod_spec, cfg=config_spec, seed=st.randoms())
def test_same_input_same_answer(cluster, pod, cfg, seed) -> None:
    r = request(pod)
    v1, v2 = build(cluster), build(cluster, units_per_row=8)
    names = v1.node_names
    shuffled = list(names)
    seed.shuffle(shuffled)
    a = decide(v1, r, names, NOW, cfg, DM)
    b = decide(v1, r, shuffled, NOW, cfg, DM)
    c = decide(v2, r, names, NOW, cfg, DM)
    assert a.chosen == b.chosen == c.chosen
    assert a.scores == b.scores == c.scores
    assert a.failed_nodes == b.failed_nodes == c.failed_nodes
    assert a.explain() == decide(v1, r, names, NOW, cfg, DM).explain()


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.lists(st.sampled_from((None, *PROFILES)), min_size=1, max_size=8),
    pods=st.lists(pod_spec, min_size=1, max_size=25),
    overcommit=st.sampled_from((0.0, 0.2)),
)
def test_sequential_placement_never_overfills(layout, pods, overcommit) -> None:
    """Place pod after pod (declared demand only): no unit ever exceeds its memory or the
    overcommit bound, and a MIG unit never holds more than its profile's share of the GPU."""
    v = ClusterView(units_per_row=4)
    inv = [whole_gpu("n", i) if p is None else mig_unit("n", i, 0, p) for i, p in enumerate(layout)]
    v.set_node("n", inv)
    cfg = PolicyConfig(overcommit=overcommit)
    for k, pod in enumerate(pods):
        r = request(pod)
        d = decide(v, r, None, NOW, cfg, DM)
        p = d.placement()
        if p is None:
            continue
        v.place(f"ns/p{k}", p.unit, p.demand, NOW, role=r.role, sm_share=p.sm_share)
    for u in inv:
        ld = v.unit_load(u.uuid, NOW, cfg.stale_after_s)
        assert ld["mem_bytes"] <= u.memory_bytes
        assert ld["sm"] <= 1 + overcommit + 1e-9 and ld["bw"] <= 1 + overcommit + 1e-9
        if u.mig_profile is not None:
            prof = mig_profile(H100, u.mig_profile)
            pods_there = v.pods_on(u.uuid)
            # in whole-GPU terms: sum of shares <= the profile's share (x overcommit)
            gpu_sm = sum(p.demand.sm for p in pods_there) * prof.sm_fraction
            gpu_bw = sum(p.demand.bw for p in pods_there) * prof.bw_fraction
            assert gpu_sm <= prof.sm_fraction * (1 + overcommit) + 1e-9
            assert gpu_bw <= prof.bw_fraction * (1 + overcommit) + 1e-9
            assert sum(p.demand.mem_bytes for p in pods_there) <= prof.memory_bytes


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    lo=st.floats(0.0, 0.4),
    gap=st.floats(0.05, 0.5),
    big=st.floats(0.1, 0.6),
    small_ratio=st.floats(0.0, 0.9),
    mem=st.floats(0.05, 0.4),
)
def test_complementary_prefers_the_opposite_load(lo, gap, big, small_ratio, mem) -> None:
    """A prefill pod (more SM than bw) goes next to decode load (more bw than SM) before an
    empty GPU and before the mirrored prefill load; a decode pod the other way round."""
    hi = lo + gap
    small = big * small_ratio
    assume(big > small + 1e-6)
    v = ClusterView()
    for name in ("decode-loaded", "prefill-loaded", "empty"):
        v.set_node(name, [whole_gpu(name, 0)])
    cap = whole_gpu("x", 0).memory_bytes
    v.place("ns/d", "GPU-decode-loaded-0", Demand(lo, hi, int(mem * cap)), NOW)
    v.place("ns/p", "GPU-prefill-loaded-0", Demand(hi, lo, int(mem * cap)), NOW)
    pod_mem = int(0.1 * cap)
    prefill = PodRequest("ns", "pf", role="prefill", demand=DemandOverride(big, small, pod_mem))
    decode = PodRequest("ns", "dc", role="decode", demand=DemandOverride(small, big, pod_mem))
    cfg = PolicyConfig()
    for r, home in ((prefill, "decode-loaded"), (decode, "prefill-loaded")):
        d = decide(v, r, None, NOW, cfg, DM)
        assert "empty" in d.feasible_nodes
        event(f"{r.role}: home feasible={home in d.feasible_nodes}")
        if home in d.feasible_nodes:
            assert d.chosen == (home, f"GPU-{home}-0"), d.explain()
            assert d.scores[home] >= d.scores["empty"]


@settings(max_examples=40)
@given(pod=pod_spec, profile=st.sampled_from(PROFILES))
def test_mig_demand_is_the_full_gpu_demand_over_the_profile_share(pod, profile) -> None:
    r = request(pod)
    whole = DM.demand(r, UnitType(H100))
    part = DM.demand(r, UnitType(H100, profile))
    shape = unit_shape(UnitType(H100, profile))
    assert abs(part.sm * shape.sm_fraction - whole.sm) < 1e-12
    assert abs(part.bw * shape.bw_fraction - whole.bw) < 1e-12
    assert part.mem_bytes == whole.mem_bytes


slo_pod = st.tuples(
    st.sampled_from(("prefill", "decode", "mixed")),
    st.sampled_from((0.2, 0.5, 1.0, 2.0, 4.0)),  # rps
    st.sampled_from((512, 1024, 2048)),  # prompt
    st.none() | st.floats(1.05, 3.0),  # SLO as a multiple of the predicted time alone
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(pods=st.lists(slo_pod, min_size=2, max_size=14), gpus=st.integers(1, 3))
def test_slos_hold_after_every_placement(pods, gpus) -> None:
    """Under overcommit, place SLO-carrying model pods one after another; at the end every
    pod's predicted time, with the contention of everything placed after it, keeps its SLO."""
    from policies.contention import slowdown_factor

    v = ClusterView()
    v.set_node("n", [whole_gpu("n", i) for i in range(gpus)])
    cfg = PolicyConfig(overcommit=1.0, max_pods_per_unit=8)
    ut = UnitType(H100)
    placed: list[tuple[PodRequest, str, int]] = []
    for k, (role, rps, prompt, mult) in enumerate(pods):
        probe = PodRequest(
            "ns",
            f"p{k}",
            role=role,
            model="meta-llama/Llama-3.1-8B-Instruct",
            load=LoadSpec(rps, prompt, 128),
        )
        t = DM.timing(probe, ut)
        assert t is not None
        slo = Slo()
        if mult is not None:
            slo = Slo(ttft_s=t.ttft_s * mult) if role != "decode" else Slo(tpot_s=t.tpot_s * mult)
        r = PodRequest("ns", f"p{k}", role=role, model=probe.model, load=probe.load, slo=slo)
        d = decide(v, r, None, NOW, cfg, DM)
        p = d.placement()
        if p is None:
            continue
        v.place(
            r.key, p.unit, p.demand, NOW, role=role, sm_share=p.sm_share, request=r, timing=p.timing
        )
        placed.append((r, p.unit, p.sm_share))
    for r, unit, share in placed:
        if r.slo.empty:
            continue
        ld = v.unit_load(unit, NOW, cfg.stale_after_s)
        event(f"SLO pod on a unit over 1.0: {max(ld['bw'], ld['sm']) > 1.0}")
        t = DM.timing(r, ut)
        assert t is not None
        if r.slo.ttft_s is not None:
            f = slowdown_factor(t.a_prefill, t.mem_frac_prefill, share / 100, ld["bw"], ld["sm"])
            assert t.ttft_s * f <= r.slo.ttft_s * (1 + 1e-6)
        if r.slo.tpot_s is not None:
            f = slowdown_factor(t.a_decode, t.mem_frac_decode, share / 100, ld["bw"], ld["sm"])
            assert t.tpot_s * f <= r.slo.tpot_s * (1 + 1e-6)


FILLER = [[UnitSpec(None, True, [(0.1, 0.1, 0.1)], None)] for _ in range(66)]


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(
    cluster=cluster_spec,
    pod=pod_spec,
    cfg=config_spec,
    picks=st.lists(st.integers(0, 71), min_size=1, max_size=8),
    wide=st.booleans(),
)
def test_few_candidates_path_agrees_with_the_full_pass(cluster, pod, cfg, picks, wide) -> None:
    """decide() scores only the candidates' rows when they are few (bind, small filters): the
    answers must be those of the pass over every row."""
    cluster = FILLER[:33] + cluster + FILLER[33:]
    v = build(cluster, units_per_row=2 if wide else 8)
    r = request(pod)
    subset = [f"node-{i}" for i in dict.fromkeys(picks) if i < len(cluster)] + ["ghost"]
    few = decide(v, r, subset, NOW, cfg, DM)
    assert few.cols is not None  # the sparse path ran
    full = decide(v, r, None, NOW, cfg, DM)
    assert full.cols is None
    assert few.scores == {n: s for n, s in full.scores.items() if n in subset}
    assert few.best_unit == {n: u for n, u in full.best_unit.items() if n in subset}
    for n, why in few.failed_nodes.items():
        assert why == full.failed_nodes.get(n, why) and (n in full.failed_nodes or n == "ghost")
    assert set(few.stale_nodes) == set(full.stale_nodes) & set(subset)
    if few.chosen is None:
        assert not few.scores
    else:
        p_few, p_full = few.placement(), full.placement(few.chosen[0])
        assert p_few == p_full
        best = max(full.unit_score_of_row(v.primary_row(n)) for n in few.scores)
        assert full.unit_score_of_row(v.primary_row(few.chosen[0])) >= best - 1e-9
    e = few.explain()
    assert set(e["nodes"]) == set(subset)
