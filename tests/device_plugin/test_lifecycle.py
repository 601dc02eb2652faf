"""Kubelet restarts, agent restarts, unit health and reconciliation."""

from __future__ import annotations

import os

from node_agent.device_plugin.allocations import ALLOCATED_ANNOTATION, AllocationRecord
from node_agent.device_plugin.slots import slot_unit
from tests.device_plugin.conftest import at, gpu_uuid, h100, wait_for


def test_kubelet_restart_makes_the_plugin_register_again(rig):
    rig.create_bound("before", gpu_uuid(0), share=40, assigned_at=at(0))
    assert rig.kubelet.admit(rig.kubelet_pod("before")).admitted
    plugin_sock = rig.service.endpoint.path

    rig.kubelet.restart()  # deletes kubelet.sock and the plugin's socket, new kubelet.sock
    assert rig.kubelet.wait_registered(10, count=2), "no re-registration after kubelet restart"
    assert os.path.exists(plugin_sock)
    assert len(rig.kubelet.devices()) == 4 * 4
    assert rig.service.registrar.registered

    rig.create_bound("after", gpu_uuid(1), share=60, assigned_at=at(1))
    res = rig.kubelet.admit(rig.kubelet_pod("after"))
    assert res.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(1)
    assert "default/before" in rig.service.allocator.allocations()


def test_kubelet_socket_recreated_alone_also_triggers_registration(rig):
    first = rig.kubelet.registrations
    rig.kubelet.stop()  # kubelet down: its socket is gone
    assert wait_for(lambda: not rig.service.registrar.registered)
    rig.kubelet.start()  # a new kubelet.sock, the plugin's socket untouched
    assert rig.kubelet.wait_registered(10, count=first + 1)


def test_agent_restart_rebuilds_allocations_from_annotations_and_pod_resources(rig):
    rig.create_bound("a", gpu_uuid(0), share=70, assigned_at=at(0))
    rig.create_bound("b", gpu_uuid(1), share=30, assigned_at=at(1))
    for n in ("a", "b"):
        assert rig.kubelet.admit(rig.kubelet_pod(n)).admitted
    rig.stop_service()
    # Pretend the agent died before recording b: only the kubelet knows b holds slots.
    rig.kube.server.patch("pods", "b", {"metadata": {"annotations": {ALLOCATED_ANNOTATION: None}}},
                          "default")
    assert rig.annotation("b", ALLOCATED_ANNOTATION) is None

    svc = rig.start_service()
    assert rig.kubelet.wait_registered(10, count=2)
    table = svc.allocator.allocations()
    assert table["default/a"].record.unit == gpu_uuid(0)
    assert table["default/b"].record.unit == gpu_uuid(1)
    assert table["default/b"].record.resolved_by == "rebuilt-from-pod-resources"
    assert wait_for(lambda: rig.annotation("b", ALLOCATED_ANNOTATION) is not None)
    rebuilt = AllocationRecord.from_annotation(rig.annotation("b", ALLOCATED_ANNOTATION))
    assert rebuilt.sm_share == 30

    rig.create_bound("c", gpu_uuid(0), share=30, assigned_at=at(2))
    res = rig.kubelet.admit(rig.kubelet_pod("c"))
    assert res.env.get("NVIDIA_VISIBLE_DEVICES") == gpu_uuid(0), res.error


def test_records_from_an_earlier_boot_are_stale(rig_factory):
    # Without pod-resources the plugin relies on its records: a node reboot must not leave
    # the re-admitted pod refused as "already allocated" (Pending forever in HAMi).
    rig = rig_factory(pod_resources=False)
    rig.create_bound("survivor", gpu_uuid(2), share=50)
    assert rig.kubelet.admit(rig.kubelet_pod("survivor")).admitted
    rig.stop_service()
    rig.kubelet.remove_pod("default", "survivor")  # the node rebooted: containers are gone
    (rig.root / "boot_id").write_text("boot-2\n")
    svc = rig.start_service()
    assert rig.kubelet.wait_registered(10, count=2)
    assert "default/survivor" not in svc.allocator.allocations()
    res = rig.kubelet.admit(rig.kubelet_pod("survivor"))
    assert res.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(2)
    rec = AllocationRecord.from_annotation(rig.annotation("survivor", ALLOCATED_ANNOTATION))
    assert rec.boot_id == "boot-2"


def test_unhealthy_unit_turns_its_slots_unhealthy_and_back(rig):
    bad = gpu_uuid(2)

    def health_of(devs, unit):
        return {h for d, h in devs.items() if slot_unit(d) == unit}

    rig.units.set_healthy(bad, False)
    assert rig.kubelet.wait_devices(lambda d: health_of(d, bad) == {"Unhealthy"})
    assert health_of(rig.kubelet.devices(), gpu_uuid(0)) == {"Healthy"}

    rig.create_bound("unlucky", bad, share=50)
    res = rig.kubelet.admit(rig.kubelet_pod("unlucky"))
    assert not res.admitted and "unhealthy" in res.error and bad in res.error

    rig.units.set_healthy(bad, True)
    assert rig.kubelet.wait_devices(lambda d: health_of(d, bad) == {"Healthy"})


def test_allocations_of_deleted_pods_are_reconciled(rig):
    rig.create_bound("gone", gpu_uuid(0), share=50)
    rig.create_bound("stays", gpu_uuid(1), share=50)
    for n in ("gone", "stays"):
        assert rig.kubelet.admit(rig.kubelet_pod(n)).admitted
    alloc = rig.service.allocator
    assert set(alloc.allocations()) == {"default/gone", "default/stays"}
    rig.kube.server.delete("pods", "gone", "default")
    rig.kubelet.remove_pod("default", "gone")
    assert wait_for(lambda: set(alloc.allocations()) == {"default/stays"})


def test_finished_pods_are_reconciled(rig):
    rig.create_bound("job", gpu_uuid(0), share=50)
    assert rig.kubelet.admit(rig.kubelet_pod("job")).admitted
    rig.kube.server.set_pod_phase("default", "job", "Succeeded")
    assert wait_for(lambda: "default/job" not in rig.service.allocator.allocations())


def test_dropped_watch_is_recovered(rig):
    rig.kube.server.drop_watches()
    rig.create_bound("late", gpu_uuid(3), share=35)
    # Either the watch came back or the plugin read the pod directly: the pod gets its unit.
    res = rig.kubelet.admit(rig.kubelet_pod("late"))
    assert res.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(3)
    assert wait_for(lambda: rig.service.cache.get("default/late") is not None)


def test_failed_record_write_does_not_fail_admission_and_is_retried(rig):
    rig.create_bound("flaky", gpu_uuid(1), share=25)
    rig.kube.server.fail_next("patch", count=1, status=500, resource="pods")
    res = rig.kubelet.admit(rig.kubelet_pod("flaky"))
    assert res.env["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(1)
    assert wait_for(lambda: rig.annotation("flaky", ALLOCATED_ANNOTATION) is not None)
    assert rig.service.allocator.allocations()["default/flaky"].persisted


def test_rebuild_waits_for_the_api_when_it_is_down_at_start(rig):
    rig.create_bound("early", gpu_uuid(0), share=50)
    assert rig.kubelet.admit(rig.kubelet_pod("early")).admitted
    rig.stop_service()
    rig.kube.server.fail_next("list", count=3, status=503, resource="pods")
    svc = rig.start_service(api_sync_timeout_s=0.05)  # gives up waiting for the first list
    assert rig.kubelet.wait_registered(10, count=2)
    assert wait_for(lambda: "default/early" in svc.allocator.allocations())


def test_registration_waits_until_the_sampler_reports_units(rig_factory):
    rig = rig_factory(start=False)
    rig.units.set_units([])  # the sampler has not enumerated the GPUs yet
    svc = rig.start_service()
    assert not rig.kubelet.wait_registered(0.3)
    assert not svc.registrar.registered and rig.kubelet.register_requests == []
    rig.units.set_units([h100(0)])
    assert wait_for(lambda: svc.registrar.registered)
    assert rig.kubelet.wait_devices(lambda d: len(d) == 4)


def test_outcomes_are_counted_in_metrics(rig):
    from prometheus_client import REGISTRY

    def count(result):
        return REGISTRY.get_sample_value("copack_device_plugin_allocations_total",
                                         {"result": result}) or 0.0

    ok, err = count("ok"), count("error")
    rig.create_bound("good", gpu_uuid(0), share=50)
    rig.create_bound("bad", None)
    rig.kubelet.admit(rig.kubelet_pod("good"))
    rig.kubelet.admit(rig.kubelet_pod("bad"))
    assert (count("ok"), count("error")) == (ok + 1, err + 1)
    assert REGISTRY.get_sample_value("copack_device_plugin_registered") == 1
