"""ClusterView: incremental updates and load estimation exactly as DESIGN.md says."""

from __future__ import annotations

import json

import pytest

from policies.cluster_view import ClusterView, UnknownUnitError
from policies.model import Demand
from tests.policies.conftest import mig_unit, whole_gpu

GiB = 2**30


def view_with(units_per_node: int = 2, nodes: int = 1, **kw) -> ClusterView:
    v = ClusterView(**kw)
    for n in range(nodes):
        v.set_node(f"n{n}", [whole_gpu(f"n{n}", i) for i in range(units_per_node)])
    return v


def test_fresh_telemetry_plus_recently_placed_never_below_declared() -> None:
    v = view_with()
    u = "GPU-n0-0"
    v.place("ns/a", u, Demand(0.3, 0.2, 10 * GiB), t=100.0)
    v.record_telemetry(u, t=100.5, sm=0.9, bw=0.5, mem_used_bytes=12 * GiB, tensor=0.1)
    # pod placed 0.5 s before the sample: too recent to show in it -> added on top
    ld = v.unit_load(u, now=101.0, stale_after_s=15)
    assert ld["sm"] == pytest.approx(0.4) and ld["compute_source"] == "tensor"
    assert ld["bw"] == pytest.approx(0.7) and ld["mem_bytes"] == 22 * GiB
    assert not ld["stale"]
    # a sample well after the assumed window: the pod is in the measurement itself
    v.record_telemetry(u, t=130.0, sm=0.9, bw=0.5, mem_used_bytes=12 * GiB, tensor=0.35)
    ld = v.unit_load(u, now=131.0, stale_after_s=15)
    assert ld["sm"] == pytest.approx(0.35) and ld["bw"] == pytest.approx(0.5)
    assert ld["mem_bytes"] == 12 * GiB
    # measurement below what the pods declared: declared wins
    v.record_telemetry(u, t=140.0, sm=0.05, bw=0.05, mem_used_bytes=1 * GiB, tensor=0.01)
    ld = v.unit_load(u, now=141.0, stale_after_s=15)
    assert ld["sm"] == pytest.approx(0.3) and ld["bw"] == pytest.approx(0.2)
    assert ld["mem_bytes"] == 10 * GiB


def test_stale_telemetry_falls_back_to_declared_and_says_so() -> None:
    v = view_with()
    u = "GPU-n0-0"
    v.place("ns/a", u, Demand(0.3, 0.2, 10 * GiB), t=0.0)
    v.record_telemetry(u, t=50.0, sm=0.9, bw=0.9, mem_used_bytes=70 * GiB)
    ld = v.unit_load(u, now=50.0 + 16, stale_after_s=15)
    assert ld["stale"] and ld["sm"] == pytest.approx(0.3) and ld["mem_bytes"] == 10 * GiB
    sm, bw, _mem, stale = v.load_arrays(now=66.0, stale_after_s=15)
    slot = v.slot_of(u)
    assert stale[slot] and sm[slot] == pytest.approx(0.3) and bw[slot] == pytest.approx(0.2)
    # the other unit never reported: stale, declared (nothing)
    other = v.slot_of("GPU-n0-1")
    assert stale[other] and sm[other] == 0.0


def test_coarse_source_uses_sm_activity() -> None:
    v = view_with()
    v.record_telemetry("GPU-n0-0", t=1.0, sm=0.84, bw=0.3, mem_used_bytes=0)
    ld = v.unit_load("GPU-n0-0", now=1.0, stale_after_s=15)
    assert ld["sm"] == pytest.approx(0.84) and ld["compute_source"] == "sm_active"


def test_telemetry_is_sanitized_and_ordered() -> None:
    v = view_with()
    u = "GPU-n0-0"
    assert v.record_telemetry(u, t=10.0, sm=float("nan"), bw=1.7, mem_used_bytes=-5)
    ld = v.unit_load(u, now=10.0, stale_after_s=15)
    assert ld["sm"] == 0.0 and ld["bw"] == 1.0 and ld["mem_bytes"] == 0
    v.record_telemetry(u, t=5.0, sm=0.5, bw=0.5, mem_used_bytes=0)  # older: ignored
    assert v.unit_load(u, now=10.0, stale_after_s=15)["bw"] == 1.0
    assert not v.record_telemetry("GPU-nope", t=1.0, sm=0, bw=0, mem_used_bytes=0)


def test_place_unplace_and_move() -> None:
    v = view_with()
    d = Demand(0.2, 0.3, GiB)
    assert v.place("ns/a", "GPU-n0-0", d, t=1.0, role="decode", sm_share=30)
    assert v.unit_of("ns/a") == "GPU-n0-0" and [p.key for p in v.pods_on("GPU-n0-0")] == ["ns/a"]
    assert v.place("ns/a", "GPU-n0-1", d, t=2.0)  # re-place moves it
    assert v.pods_on("GPU-n0-0") == [] and v.unit_of("ns/a") == "GPU-n0-1"
    assert v.unit_load("GPU-n0-0", 2.0, 15)["declared"]["sm"] == 0.0
    assert v.unplace("ns/a") and not v.unplace("ns/a")
    assert v.unit_load("GPU-n0-1", 2.0, 15)["declared"]["bw"] == 0.0


def test_pod_on_unknown_unit_waits_for_its_node() -> None:
    v = ClusterView()
    assert not v.place("ns/early", "GPU-late-0", Demand(0.1, 0.1, GiB), t=1.0)
    assert v.unit_of("ns/early") == "GPU-late-0"
    v.set_node("late", [whole_gpu("late", 0)])
    assert [p.key for p in v.pods_on("GPU-late-0")] == ["ns/early"]
    assert v.unit_load("GPU-late-0", 1.0, 15)["declared"]["mem_bytes"] == GiB


def test_repartition_keeps_surviving_units_and_drops_vanished_ones() -> None:
    v = ClusterView()
    v.set_node(
        "n", [whole_gpu("n", 0), mig_unit("n", 1, 0, "3g.40gb"), mig_unit("n", 1, 1, "3g.40gb")]
    )
    v.place("ns/keep", "GPU-n-0", Demand(0.1, 0.1, GiB), t=1.0)
    v.place("ns/gone", "MIG-n-1-1", Demand(0.1, 0.1, GiB), t=1.0)
    v.record_telemetry("GPU-n-0", t=20.0, sm=0.5, bw=0.4, mem_used_bytes=GiB, tensor=0.3)
    dropped = v.set_node("n", [mig_unit("n", 1, 2, "7g.80gb"), whole_gpu("n", 0)])
    assert dropped == ["ns/gone"] and v.unit_of("ns/gone") is None
    assert v.units_of("n") == ["MIG-n-1-2", "GPU-n-0"]
    ld = v.unit_load("GPU-n-0", 21.0, 15)
    assert ld["sm"] == pytest.approx(0.3) and ld["pods"] == 1  # telemetry and pod survived
    assert str(v.unit_type("MIG-n-1-2")) == "NVIDIA H100 80GB HBM3 7g.80gb"


def test_uuid_moving_between_nodes_follows_the_newest_inventory() -> None:
    v = ClusterView()
    v.set_node("a", [whole_gpu("x", 0), whole_gpu("x", 1)])
    v.set_node("b", [whole_gpu("x", 1)])
    assert v.units_of("a") == ["GPU-x-0"] and v.node_of_unit("GPU-x-1") == "b"


def test_growth_many_nodes_and_wide_nodes() -> None:
    v = ClusterView(capacity=16, units_per_row=4)
    for n in range(100):
        units = [mig_unit(f"w{n}", i, j, "1g.10gb") for i in range(2) for j in range(7)]
        v.set_node(f"w{n}", units if n % 10 == 0 else units[:3])
    assert v.unit_count == 10 * 14 + 90 * 3
    assert v.units_of("w0")[-1] == "MIG-w0-1-6" and v.node_of_unit("MIG-w0-1-6") == "w0"
    v.place("ns/p", "MIG-w50-0-2", Demand(0.1, 0.1, GiB), t=0.0)
    for n in range(0, 100, 3):
        assert v.remove_node(f"w{n}") == []
    v.set_node("fresh", [whole_gpu("fresh", 0)])
    assert v.unit_of("ns/p") == "MIG-w50-0-2" and v.node_of_unit("MIG-w50-0-2") == "w50"
    assert v.remove_node("w50") == ["ns/p"] and v.unit_of("ns/p") is None
    assert not v.has_node("w50") and v.remove_node("w50") == []


def test_health_and_duplicates() -> None:
    v = view_with()
    assert v.set_unit_health("GPU-n0-1", False) and not v.unit_load("GPU-n0-1", 0, 15)["healthy"]
    assert not v.set_unit_health("GPU-zzz", False)
    with pytest.raises(ValueError, match="duplicate"):
        v.set_node("d", [whole_gpu("d", 0), whole_gpu("d", 0)])
    with pytest.raises(UnknownUnitError, match="GPU-zzz"):
        v.unit_load("GPU-zzz", 0, 15)


def test_to_dict_is_json() -> None:
    v = view_with(nodes=2)
    v.place("ns/a", "GPU-n1-0", Demand(0.2, 0.3, GiB), t=1.0, role="decode", sm_share=30)
    v.place("ns/b", "GPU-elsewhere", Demand(0.2, 0.3, GiB), t=1.0)
    v.record_telemetry("GPU-n1-0", t=20.0, sm=0.3, bw=0.3, mem_used_bytes=GiB)
    for d in (v.to_dict(), v.to_dict(now=21.0)):
        text = json.dumps(d)
        assert "ns/a" in text and "pending_pods" in d and "ns/b" in d["pending_pods"]
    assert v.to_dict(now=21.0)["nodes"]["n1"]["units"][0]["load"]["sm"] == pytest.approx(0.3)


def test_assumed_window_change_recomputes() -> None:
    v = view_with()
    v.place("ns/a", "GPU-n0-0", Demand(0.3, 0.0, 0), t=100.0)
    v.record_telemetry("GPU-n0-0", t=105.0, sm=0.5, bw=0, mem_used_bytes=0, tensor=0.5)
    assert v.unit_load("GPU-n0-0", 105, 15)["sm"] == pytest.approx(0.8)  # within 10 s window
    v.set_assumed_window(2.0)
    assert v.unit_load("GPU-n0-0", 105, 15)["sm"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        v.set_assumed_window(-1)
