"""The identity rules on their own: snapshots in, the admitted pod (or a clear refusal) out."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from node_agent.device_plugin.allocations import (
    Allocation,
    AllocationRecord,
    AllocationRecordError,
)
from node_agent.device_plugin.allocator import preferred_slots
from node_agent.device_plugin.config import DevicePluginConfig, DevicePluginConfigError
from node_agent.device_plugin.kubelet_view import KubeletView
from node_agent.device_plugin.pods import PodView
from node_agent.device_plugin.resolver import (
    AllocationError,
    assigned_unit,
    resolve,
    sm_share,
)
from node_agent.device_plugin.slots import slot_devices, slot_id, slot_unit, units_of
from tests.device_plugin.conftest import gpu_uuid, h100

U0, U1 = gpu_uuid(0), gpu_uuid(1)


def pod(name: str, unit: str | None = U0, minute: int = 0, share: str | None = "50",
        containers: tuple[str, ...] = ("vllm",), inits: tuple[str, ...] = (),
        phase: str = "Pending", uid: str | None = None) -> PodView:
    ann = {}
    if unit:
        ann["copack.io/unit"] = unit
        ann["copack.io/assigned-at"] = f"2026-11-27T09:{minute:02d}:00Z"
    if share is not None:
        ann["copack.io/sm-share"] = share
    return PodView("default", name, uid or f"uid-{name}", "n1", phase, ann,
                   datetime(2026, 11, 27, tzinfo=UTC), False, containers, inits)


def view(**pods: dict[str, tuple[str, ...]]) -> KubeletView:
    return KubeletView({f"default/{k}": v for k, v in pods.items()})


def run(pods, kview, requested=(), allocations=None, rejected=None):
    return resolve(pods, kview, allocations or {}, rejected or {}, set(requested), "n1")


def test_the_pod_the_kubelet_lists_without_slots_is_the_one_admitted():
    a, b = pod("a", U0, minute=0), pod("b", U1, minute=5)
    kv = view(a={"vllm": (slot_id(U0, 0),)}, b={"vllm": ()})
    assert run([a, b], kv).pod.name == "b"
    # even when the kubelet picked slots of a's unit
    assert run([a, b], kv, requested={U0}).pod.name == "b"


def test_pods_the_kubelet_has_not_seen_are_not_candidates():
    a, b = pod("a", U0, minute=0), pod("b", U1, minute=5)
    res = run([a, b], view(b={"vllm": ()}))
    assert res.pod.name == "b" and res.candidates == 1 and res.resolved_by == "pod-resources"


def test_ambiguity_prefers_partial_then_unit_match_then_oldest_assignment():
    a, b, c = pod("a", U0, 0), pod("b", U1, 1), pod("c", U1, 2, containers=("x", "y"))
    kv = view(a={"vllm": ()}, b={"vllm": ()}, c={"x": (slot_id(U1, 0),), "y": ()})
    assert run([a, b, c], kv).pod.name == "c"  # part-way through its containers
    kv = view(a={"vllm": ()}, b={"vllm": ()})
    assert run([a, b], kv, requested={U1}).pod.name == "b"
    res = run([a, b], kv)
    assert res.pod.name == "a" and res.resolved_by == "pod-resources+assigned-at"


def test_refusals_name_the_pod_and_the_reason():
    stray = pod("stray", unit=None)
    with pytest.raises(AllocationError, match=r"default/stray.*no copack\.io/unit"):
        run([stray], view(stray={"vllm": ()}))
    with pytest.raises(AllocationError, match="no pod on node n1 is waiting"):
        run([pod("a")], view(a={"vllm": (slot_id(U0, 1),)}))
    with pytest.raises(AllocationError, match="pod-resources API unavailable"):
        run([pod("a", unit=None)], None)


def test_finished_and_refused_pods_are_skipped():
    done, refused, fresh = pod("done", phase="Failed"), pod("refused"), pod("fresh", minute=9)
    kv = view(done={"vllm": ()}, refused={"vllm": ()}, fresh={"vllm": ()})
    res = run([done, refused, fresh], kv, rejected={"default/refused": "uid-refused"})
    assert res.pod.name == "fresh"
    # a new pod reusing the refused one's name (other UID) is a candidate again
    again = pod("refused", uid="uid-2")
    assert run([again], view(refused={"vllm": ()}),
               rejected={"default/refused": "uid-refused"}).pod.uid == "uid-2"


def test_without_pod_resources_served_pods_drop_out_in_assignment_order():
    a, b = pod("a", U0, 0), pod("b", U1, 1)
    rec = AllocationRecord(U0, (slot_id(U0, 0),), 1, 50, False, "assigned-at", "boot")
    table = {"default/a": Allocation("uid-a", rec, True)}
    res = run([a, b], None, allocations=table)
    assert res.pod.name == "b" and res.resolved_by == "assigned-at"
    # a table entry for an older pod of the same name (other UID) does not count
    assert run([pod("a", uid="uid-new"), b], None, allocations=table).pod.name == "a"


def test_init_container_only_pods_are_judged_by_the_plugins_count():
    p = pod("warm", containers=(), inits=("warmup",))
    kv = view(warm={})
    assert run([p], kv).pod.name == "warm"
    rec = AllocationRecord(U0, (slot_id(U0, 0),), 1, 50, False, "pod-resources", "boot")
    with pytest.raises(AllocationError):
        run([p], kv, allocations={"default/warm": Allocation("uid-warm", rec, True)})


def test_unit_and_share_checks():
    units = {U0: h100(0), U1: h100(1, healthy=False)}
    assert assigned_unit(pod("a", U0), units, "n1").uuid == U0
    with pytest.raises(AllocationError, match="unhealthy"):
        assigned_unit(pod("a", U1), units, "n1")
    with pytest.raises(AllocationError, match="does not have"):
        assigned_unit(pod("a", "MIG-gone"), units, "n1")
    assert sm_share(pod("a", share=" 30 ")) == 30
    assert sm_share(pod("a", share=None)) is None
    for bad in ("0", "101", "half", "30%"):
        with pytest.raises(AllocationError, match=r"copack\.io/sm-share"):
            sm_share(pod("a", share=bad))


def test_preferred_slots_put_the_assigned_unit_first():
    avail = [slot_id(U1, 3), slot_id(U0, 1), slot_id(U1, 0), slot_id(U0, 0)]
    assert preferred_slots(avail, [], 1, U1) == [slot_id(U1, 0)]
    assert preferred_slots(avail, [], 3, U0) == [slot_id(U0, 0), slot_id(U0, 1), slot_id(U1, 0)]
    assert preferred_slots(avail, [slot_id(U1, 3)], 2, U0) == [slot_id(U1, 3), slot_id(U0, 0)]
    assert preferred_slots(avail, [], 2, None) == [slot_id(U0, 0), slot_id(U0, 1)]


def test_slot_ids_and_health():
    assert slot_unit("MIG-abc::12") == "MIG-abc"
    for bad in ("GPU-x", "GPU-x::", "::3", "GPU-x::a"):
        with pytest.raises(ValueError, match="not a copack slot"):
            slot_unit(bad)
    assert units_of(["GPU-a::0", "junk", "GPU-b::1"]) == {"GPU-a", "GPU-b"}
    devs = slot_devices([h100(1, healthy=False), h100(0)], 2)
    assert [(d.ID, d.health) for d in devs] == [
        (slot_id(U0, 0), "Healthy"), (slot_id(U0, 1), "Healthy"),
        (slot_id(U1, 0), "Unhealthy"), (slot_id(U1, 1), "Unhealthy"),
    ]


def test_allocation_record_round_trip_and_bad_input():
    rec = AllocationRecord(U0, (slot_id(U0, 0),), 1, 30, False, "pod-resources", "b1")
    assert AllocationRecord.from_annotation(rec.to_annotation()) == rec
    more = rec.plus_container((slot_id(U1, 2),), mismatch=True)
    assert more.containers == 2 and more.mismatch and more.slots[-1] == slot_id(U1, 2)
    for text, msg in [("{", "not JSON"), ("[]", "not a JSON object"),
                      ('{"slots": []}', "'unit'"), ('{"unit": "u", "containers": 0}', "containers"),
                      ('{"unit": "u", "sm_share": "x"}', "sm_share")]:
        with pytest.raises(AllocationRecordError, match=msg):
            AllocationRecord.from_annotation(text)


def test_config_errors_name_the_setting():
    for kwargs, msg in [({"node_name": ""}, "node_name"),
                        ({"slots_per_unit": 0}, "slots_per_unit"),
                        ({"plugin_socket_name": "a/b.sock"}, "plugin_socket_name"),
                        ({"plugin_socket_name": "kubelet.sock"}, "must differ"),
                        ({"cdi_kind": "gpu"}, "cdi_kind"),
                        ({"health_poll_s": 0}, "health_poll_s")]:
        with pytest.raises(DevicePluginConfigError, match=msg):
            DevicePluginConfig(**{"node_name": "n1", **kwargs})
