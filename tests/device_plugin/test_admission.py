"""Allocate gives each admitted pod its own assigned unit and share, identified by identity."""

from __future__ import annotations

import orjson

from node_agent.device_plugin.allocations import ALLOCATED_ANNOTATION, AllocationRecord
from node_agent.device_plugin.slots import slot_unit
from tests.device_plugin.conftest import at, gpu_uuid, wait_for


def test_two_pods_on_two_units_admitted_in_opposite_order_get_their_own_units(rig):
    rig.create_bound("prefill", gpu_uuid(0), share=70, assigned_at=at(0))
    rig.create_bound("decode", gpu_uuid(1), share=30, assigned_at=at(1))

    second = rig.kubelet.admit(rig.kubelet_pod("decode"))
    first = rig.kubelet.admit(rig.kubelet_pod("prefill"))

    assert second.admitted and first.admitted, (second.error, first.error)
    assert second.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(1)
    assert second.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert first.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(0)
    assert first.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "70"
    # GetPreferredAllocation steered the kubelet to the assigned unit's slots.
    assert {slot_unit(d) for d in second.containers["vllm"].devices} == {gpu_uuid(1)}
    assert {slot_unit(d) for d in first.containers["vllm"].devices} == {gpu_uuid(0)}
    rec = AllocationRecord.from_annotation(rig.annotation("decode", ALLOCATED_ANNOTATION))
    assert rec.unit == gpu_uuid(1) and rec.sm_share == 30 and not rec.mismatch
    assert rec.resolved_by == "pod-resources"


def test_copacked_pods_on_one_unit_admitted_in_opposite_order_keep_their_shares(rig):
    # Same unit, different shares: only identity (not the unit) tells them apart.
    rig.create_bound("prefill", gpu_uuid(2), share=70, assigned_at=at(0))
    rig.create_bound("decode", gpu_uuid(2), share=30, assigned_at=at(1))

    d = rig.kubelet.admit(rig.kubelet_pod("decode"))
    p = rig.kubelet.admit(rig.kubelet_pod("prefill"))

    assert d.env["NVIDIA_VISIBLE_DEVICES"] == p.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(2)
    assert d.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert p.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "70"
    assert set(d.containers["vllm"].devices).isdisjoint(p.containers["vllm"].devices)


def test_pod_with_sidecars_gets_the_unit_on_its_gpu_container_only(rig):
    rig.create_bound("meshed", gpu_uuid(3), share=50, sidecars=2, native_sidecar=True)
    res = rig.kubelet.admit(rig.kubelet_pod("meshed"))
    assert res.admitted, res.error
    assert set(res.containers) == {"vllm"}
    assert res.containers["vllm"].envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(3)
    assert res.containers["vllm"].annotations["copack.io/unit"] == gpu_uuid(3)


def test_sidecar_pod_waiting_does_not_confuse_the_next_admission(rig):
    # The GPU container listed after the sidecars, then a plain pod: neither steals the other.
    rig.create_bound("a", gpu_uuid(0), share=40, sidecars=1, assigned_at=at(0))
    rig.create_bound("b", gpu_uuid(1), share=60, gpu_first=True, sidecars=1, assigned_at=at(1))
    rb = rig.kubelet.admit(rig.kubelet_pod("b"))
    ra = rig.kubelet.admit(rig.kubelet_pod("a"))
    assert rb.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(1)
    assert ra.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(0)


def test_init_and_app_container_of_one_pod_both_get_its_unit(rig):
    rig.create_bound("warm", gpu_uuid(1), share=25, init_gpu=True)
    res = rig.kubelet.admit(rig.kubelet_pod("warm"))
    assert res.admitted, res.error
    assert res.containers["warmup"].envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(1)
    assert res.containers["vllm"].envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(1)
    rec = AllocationRecord.from_annotation(rig.annotation("warm", ALLOCATED_ANNOTATION))
    assert rec.containers == 2


def test_pod_without_assignment_fails_admission_with_a_clear_error(rig):
    rig.create_bound("stray", unit=None)
    res = rig.kubelet.admit(rig.kubelet_pod("stray"))
    assert not res.admitted
    assert "default/stray" in res.error and "copack.io/unit" in res.error
    assert "refusing" in res.error
    assert rig.kube.server.get("pods", "stray", "default")["status"]["phase"] == "Failed"
    # The next, properly placed pod is not blocked by the refused one.
    rig.create_bound("placed", gpu_uuid(0))
    assert rig.kubelet.admit(rig.kubelet_pod("placed")).env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(0)


def test_stale_unit_and_bad_share_are_refused_visibly(rig):
    rig.create_bound("ghost", "GPU-not-on-this-node", share=50)
    res = rig.kubelet.admit(rig.kubelet_pod("ghost"))
    assert not res.admitted and "GPU-not-on-this-node" in res.error and "stale" in res.error

    rig.create_bound("greedy", gpu_uuid(0), share=150)
    res = rig.kubelet.admit(rig.kubelet_pod("greedy"))
    assert not res.admitted and "copack.io/sm-share" in res.error and "150" in res.error


def test_kubelet_picking_other_slots_still_gives_the_assigned_unit(rig_factory):
    rig = rig_factory(use_preferred=False)  # kubelet ignores preferences: arbitrary slots
    placed = {f"p{i}": gpu_uuid(i % 4) for i in range(8)}
    for i, (name, unit) in enumerate(placed.items()):
        rig.create_bound(name, unit, share=10 + i, assigned_at=at(i))
    results = {n: rig.kubelet.admit(rig.kubelet_pod(n)) for n in placed}
    for name, unit in placed.items():
        assert results[name].env["NVIDIA_VISIBLE_DEVICES"] == unit
    recs = [AllocationRecord.from_annotation(rig.annotation(n, ALLOCATED_ANNOTATION))
            for n in placed]
    mismatched = [r for r in recs if r.mismatch]
    assert mismatched, "seeded arbitrary picks should include slots of other units"
    for r in mismatched:
        assert {slot_unit(s) for s in r.slots} != {r.unit}


def test_allocation_record_is_json_on_the_pod(rig):
    rig.create_bound("rec", gpu_uuid(0), share=20)
    rig.kubelet.admit(rig.kubelet_pod("rec"))
    raw = orjson.loads(rig.annotation("rec", ALLOCATED_ANNOTATION))
    assert raw["unit"] == gpu_uuid(0) and raw["sm_share"] == 20 and raw["containers"] == 1
    assert raw["boot_id"] == "boot-1" and raw["at"].endswith("Z")


def test_cdi_mode_names_the_cdi_device_instead_of_the_env(rig_factory):
    rig = rig_factory(cdi=True)
    rig.create_bound("cdi", gpu_uuid(1), share=45)
    c = rig.kubelet.admit(rig.kubelet_pod("cdi")).containers["vllm"]
    assert c.cdi_devices == [f"nvidia.com/gpu={gpu_uuid(1)}"]
    assert "NVIDIA_VISIBLE_DEVICES" not in c.envs
    assert c.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "45"


def test_without_pod_resources_admissions_in_assignment_order_still_work(rig_factory):
    rig = rig_factory(pod_resources=False)
    rig.create_bound("first", gpu_uuid(0), share=60, assigned_at=at(0))
    rig.create_bound("second", gpu_uuid(1), share=40, assigned_at=at(1))
    r1 = rig.kubelet.admit(rig.kubelet_pod("first"))
    r2 = rig.kubelet.admit(rig.kubelet_pod("second"))
    assert r1.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(0)
    assert r2.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(1)
    rec = AllocationRecord.from_annotation(rig.annotation("second", ALLOCATED_ANNOTATION))
    assert rec.resolved_by == "assigned-at"


def test_pod_refused_by_the_kubelet_earlier_is_not_mistaken_for_the_admitted_one(rig_factory):
    # An older kubelet keeps refused pods in pod-resources; our watch has not seen the refusal.
    rig = rig_factory(list_inactive=True)
    rig.create_bound("refused", gpu_uuid(0), share=80, assigned_at=at(0))
    rig.create_bound("next", gpu_uuid(1), share=20, assigned_at=at(1))
    assert wait_for(lambda: all(rig.service.cache.get(f"default/{n}") for n in ("refused", "next")))
    rig.kube.server.fail_next("list", count=1000, status=500, resource="pods")
    rig.kube.server.drop_watches()  # the plugin's pod cache is frozen from here on
    rig.kubelet.reject(rig.kubelet_pod("refused"), "OutOfcpu")
    assert rig.service.cache.get("default/refused").phase != "Failed"
    res = rig.kubelet.admit(rig.kubelet_pod("next"))
    assert res.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(1)
    assert res.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "20"


def test_container_asking_for_two_slots_gets_two_of_its_units_slots(rig):
    rig.create_bound("wide", gpu_uuid(3), share=90, gpus=2)
    c = rig.kubelet.admit(rig.kubelet_pod("wide")).containers["vllm"]
    assert len(c.devices) == 2 and {slot_unit(d) for d in c.devices} == {gpu_uuid(3)}
    assert c.envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(3)
