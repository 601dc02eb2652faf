"""The row cache (policies/row_cache.py) answers exactly what scoring every row afresh does.

Random clusters go through random event sequences (telemetry, binds and deletions, health,
nodes replaced or removed, time passing so telemetry goes stale); after every event two pod
shapes are decided through the cache and without it, and every output of the decision must
be equal: feasibility masks, per-node best unit and score, the chosen unit, the answers."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.cluster_view import ClusterView
from policies.config import PolicyConfig
from policies.decision import Decision, decide
from policies.model import Demand
from tests.policies.conftest import mig_unit, whole_gpu
from tests.policies.test_properties import (
    DM,
    NOW,
    build,
    cluster_spec,
    config_spec,
    pod_spec,
    request,
)

frac = st.floats(0.0, 1.0, allow_nan=False)
event_spec = st.one_of(
    st.tuples(st.just("telemetry"), st.integers(0, 10**6), frac, frac, frac, st.floats(-30, 5)),
    st.tuples(st.just("place"), st.integers(0, 10**6), frac, frac, frac),
    st.tuples(st.just("unplace"), st.integers(0, 10**6)),
    st.tuples(st.just("health"), st.integers(0, 10**6), st.booleans()),
    st.tuples(st.just("time"), st.floats(0.0, 40.0)),
    st.tuples(st.just("renode"), st.integers(0, 10**6), st.integers(0, 6), st.booleans(),
              st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 10**6)),
)


def _units(v: ClusterView) -> list[str]:
    return [u for n in v.node_names for u in v.units_of(n)]


def _apply(v: ClusterView, ev: tuple, now: float, seq: int) -> float:
    kind = ev[0]
    units = _units(v)
    if kind == "time":
        return now + ev[1]
    if kind == "telemetry" and units:
        u = units[ev[1] % len(units)]
        cap = v.unit(u).memory_bytes
        v.record_telemetry(u, now + ev[5], sm=0.0, bw=ev[3], mem_used_bytes=ev[4] * cap,
                           tensor=ev[2])
    elif kind == "place" and units:
        u = units[ev[1] % len(units)]
        cap = v.unit(u).memory_bytes
        v.place(f"ns/p{seq}", u, Demand(ev[2] * 0.6, ev[3] * 0.6, int(ev[4] * 0.5 * cap)), now)
    elif kind == "unplace" and v.pod_keys:
        keys = sorted(v.pod_keys)
        v.unplace(keys[ev[1] % len(keys)])
    elif kind == "health" and units:
        v.set_unit_health(units[ev[1] % len(units)], ev[2])
    elif kind == "renode" and v.node_names:
        name = sorted(v.node_names)[ev[1] % len(v.node_names)]
        units = [whole_gpu(name, i) for i in range(ev[2])]
        if ev[4]:  # two MIG slices of one more GPU: siblings, maybe on two rows
            units += [mig_unit(name, ev[2], j, "3g.40gb") for j in range(2)]
        v.set_node(name, units, mps=ev[3])
    elif kind == "remove" and len(v.node_names) > 1:
        v.remove_node(sorted(v.node_names)[ev[1] % len(v.node_names)])
    return now


def _same(a: Decision, b: Decision) -> None:
    assert a.chosen == b.chosen and a.chosen_slot == b.chosen_slot
    assert a.chosen_load == b.chosen_load
    np.testing.assert_array_equal(a.node_best, b.node_best)
    fin = np.isfinite(a.node_best)
    np.testing.assert_array_equal(a.best_j[fin], b.best_j[fin])
    np.testing.assert_array_equal(a.best_row[fin], b.best_row[fin])
    assert a.feasible_nodes == b.feasible_nodes
    assert a.failed_nodes == b.failed_nodes
    assert a.scores == b.scores and a.best_unit == b.best_unit
    assert a.stale_nodes == b.stale_nodes
    for k, m in a.full_masks.items():
        other = b.full_masks[k]
        assert (m is None) == (other is None), k
        if m is not None:
            np.testing.assert_array_equal(m, other, err_msg=k)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cluster=cluster_spec,
    pods=st.lists(pod_spec, min_size=1, max_size=2),
    cfg=config_spec,
    events=st.lists(event_spec, min_size=1, max_size=12),
    subset=st.booleans(),
)
def test_cached_decisions_equal_fresh_ones(cluster, pods, cfg, events, subset) -> None:
    v = build(cluster)
    reqs = [request(p) for p in pods]
    now = NOW
    for seq, ev in enumerate([("time", 0.0), *events]):
        now = _apply(v, ev, now, seq)
        names = sorted(v.node_names)
        cands = names[::2] if subset and len(names) > 1 else names
        for r in reqs:
            cached = decide(v, r, cands, now, cfg, DM)
            fresh = decide(v, r, cands, now, cfg, DM, use_cache=False)
            _same(cached, fresh)


def test_few_candidates_read_the_cache_after_many_changes() -> None:
    """A wide cluster (rows > 8x the candidates) decides few candidates from the cache's
    columns once the cache holds the pod's shape, and stays exact as rows change."""
    v = ClusterView(capacity=8, units_per_row=2)
    for n in range(120):
        v.set_node(f"n{n:03d}", [whole_gpu(f"n{n:03d}", i) for i in range(2)])
    cfg = PolicyConfig(stale_after_s=15.0)
    r = request(("decode", 0.2, 0.3, 8 * 2**30))
    rng = np.random.default_rng(7)
    decide(v, r, None, NOW, cfg, DM)  # the shape enters the cache
    units = _units(v)
    for step in range(60):
        u = units[int(rng.integers(len(units)))]
        if step % 3:
            v.record_telemetry(u, NOW + step, sm=0.0, bw=float(rng.random()),
                               mem_used_bytes=float(rng.random()) * 40 * 2**30,
                               tensor=float(rng.random()))
        else:
            v.place(f"ns/p{step}", u, Demand(0.3, 0.3, 10 * 2**30), NOW + step)
        few = [f"n{int(i):03d}" for i in rng.choice(120, size=5, replace=False)]
        now = NOW + step + (20.0 if step % 10 == 9 else 0.0)  # now and then, telemetry ages
        cached = decide(v, r, few, now, cfg, DM)
        assert cached.cols is not None  # the sparse path, served from the cache's columns
        _same(cached, decide(v, r, few, now, cfg, DM, use_cache=False))


def _wide_view() -> ClusterView:
    v = ClusterView(capacity=8, units_per_row=2)
    for n in range(120):
        v.set_node(f"n{n:03d}", [whole_gpu(f"n{n:03d}", i) for i in range(2)])
    return v


def test_rotating_windows_build_the_entry_on_the_second_question() -> None:
    """kube-scheduler's rotating windows never send the same list twice: the first window of
    a shape is scored on its own rows, the second builds the shape's entry for every row, and
    the windows after it are served from the entry, all equal to fresh decisions."""
    v = _wide_view()
    cfg = PolicyConfig(stale_after_s=15.0)
    r = request(("prefill", 0.3, 0.1, 8 * 2**30))
    names = sorted(v.node_names)
    for i in range(6):
        window = [names[(i * 37 + k) % len(names)] for k in range(10)]
        cached = decide(v, r, window, NOW, cfg, DM)
        assert cached.cols is not None
        entries = v.__dict__["_row_cache"].entries
        assert len(entries) == (0 if i == 0 else 1), i
        assert (cached.reason_memo is None) == (i == 0)
        _same(cached, decide(v, r, window, NOW, cfg, DM, use_cache=False))


def test_an_older_decision_keeps_its_own_failure_reasons() -> None:
    """A Decision read after the cache re-scored rows (and a newer Decision filled the memo
    with the rows' new reasons) still reports the reasons of its own moment."""
    v = _wide_view()
    cfg = PolicyConfig(stale_after_s=3600.0)
    r = request(("decode", 0.2, 0.3, 30 * 2**30))
    units = _units(v)
    for i, u in enumerate(units):  # every other node full, the rest nearly idle
        full = (i // 2) % 2 == 1
        v.record_telemetry(u, NOW, sm=0.0, bw=0.95 if full else 0.2, tensor=0.95 if full else 0.2,
                           mem_used_bytes=(0.97 if full else 0.1) * v.unit(u).memory_bytes)
    decide(v, r, None, NOW, cfg, DM)  # the shape enters the cache
    old = decide(v, r, None, NOW, cfg, DM)
    expected = decide(v, r, None, NOW, cfg, DM, use_cache=False).failed_nodes
    assert expected  # some nodes fail, so there are reasons to get wrong
    for u in units[:40]:  # the first 20 nodes fail another way (the full ones among them too)
        v.set_unit_health(u, False)
    new = decide(v, r, None, NOW + 1, cfg, DM)
    assert new.failed_nodes == decide(v, r, None, NOW + 1, cfg, DM, use_cache=False).failed_nodes
    assert new.failed_nodes != expected
    assert old.failed_nodes == expected


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster=cluster_spec, events=st.lists(event_spec, min_size=1, max_size=16))
def test_telemetrys_short_cut_leaves_the_loads_a_full_recompute_gives(cluster, events) -> None:
    """record_telemetry skips walking a unit's pods when none is recent: after any event
    sequence the effective loads equal recomputing every unit from its pods."""
    v = build(cluster)
    now = NOW
    for seq, ev in enumerate(events):
        now = _apply(v, ev, now, seq)
    got = [a.copy() for a in (v.eff_sm, v.eff_bw, v.eff_mem)]
    v.set_assumed_window(v.assumed_window_s)  # recomputes every unit
    for a, b in zip(got, (v.eff_sm, v.eff_bw, v.eff_mem), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_pod_on_a_mig_slice_re_scores_its_siblings_row() -> None:
    """Two MIG slices of one GPU on two rows (a row holds one unit here): a pod filling one
    slice makes the GPU busy, which changes how the other slice scores (consolidation
    prefers GPUs already in use), so the sibling's row must be re-scored too."""
    v = ClusterView(capacity=8, units_per_row=1)
    v.set_node("a", [mig_unit("a", 0, 0, "3g.40gb"), mig_unit("a", 0, 1, "3g.40gb")])
    v.set_node("b", [mig_unit("b", 0, 0, "3g.40gb"), mig_unit("b", 0, 1, "3g.40gb")])
    # a small pod on an unhealthy GPU elsewhere: the view-wide facts the entry depends on
    # (smallest pod placed) stay put when the big pod lands, so the entry is patched, not rebuilt
    v.set_node("c", [whole_gpu("c", 0)])
    v.place("ns/small", "GPU-c-0", Demand(0.1, 0.1, 2**30), NOW)
    v.set_unit_health("GPU-c-0", False)
    cfg = PolicyConfig(consolidate=True)
    r = request(("decode", 0.2, 0.2, 8 * 2**30))
    before = decide(v, r, None, NOW, cfg, DM)
    decide(v, r, None, NOW, cfg, DM)  # the shape's entry is built and used
    v.place("ns/p0", "MIG-b-0-1", Demand(0.2, 0.2, 38 * 2**30), NOW)  # no room left there
    cached = decide(v, r, None, NOW, cfg, DM)
    _same(cached, decide(v, r, None, NOW, cfg, DM, use_cache=False))
    assert before.chosen == ("a", "MIG-a-0-0")
    assert cached.chosen == ("b", "MIG-b-0-0")  # the busy GPU's other slice now wins
