"""ClusterState driven directly (the simulator's seam), with a settable clock: assumptions and
their confirmation, relists, sweeps, pods arriving before their nodes, recreated pods."""

from __future__ import annotations

from extender.state import ClusterState, rfc3339
from policies.config import PolicyConfig
from policies.model import PodRequest
from tests.extender.conftest import Clock
from tests.fakes.kube_objects import copack_pod, gpu_node, gpu_units


def _state(clock: Clock, **kw) -> ClusterState:
    return ClusterState(PolicyConfig(), now=clock, bind_confirm_timeout_s=60.0, **kw)


def _bound(api, name: str, node: str, unit: str, at: float) -> dict:
    pod = api.pod(copack_pod(name, demand="sm=0.2,bw=0.2,mem=10Gi"))
    return api.bind(pod, node, {"copack.io/unit": unit, "copack.io/sm-share": "40",
                                "copack.io/assigned-at": rfc3339(at)})


def test_pods_arriving_before_their_node_are_placed_when_it_comes(api) -> None:
    clock = Clock()
    state = _state(clock)
    pod = _bound(api, "early", "n0", "GPU-n0-1", clock.t - 100)
    state.upsert_pod(pod)
    assert state.pods["default/early"].placed is False
    state.upsert_node(api.node(gpu_node("n0", gpu_units("n0", 2))))
    assert state.view.unit_of("default/early") == "GPU-n0-1"
    rec = state.view.pod("default/early")
    assert rec.t == clock.t - 100 and rec.sm_share == 40
    # the unit disappears from the inventory (re-partition): the pod is no longer placed
    state.upsert_node(api.annotate_node("n0", {
        "copack.io/inventory": '{"version": 1, "units": []}'}))
    assert state.view.unit_of("default/early") is None
    assert state.pods["default/early"].placed is False


def test_assumption_confirmed_by_watch_or_relist_and_swept_otherwise(api) -> None:
    clock = Clock()
    state = _state(clock)
    state.upsert_node(api.node(gpu_node("n0", gpu_units("n0", 2))))
    pending = api.pod(copack_pod("p", demand="sm=0.2,bw=0.2,mem=10Gi"))
    state.upsert_pod(pending)  # seen pending by the watch
    req = PodRequest("default", "p", pending["metadata"]["uid"])
    state.assume(req, "n0", "GPU-n0-0", 50, clock.t)
    # a stale watch event (the pod still pending) does not undo our own assumption
    state.upsert_pod(pending)
    assert state.view.unit_of("default/p") == "GPU-n0-0"
    # a relist that started before the bind cannot show it: kept
    state.replace_pods([], started=clock.t - 1)
    assert state.view.unit_of("default/p") == "GPU-n0-0"
    bound = api.bind(pending, "n0", {"copack.io/unit": "GPU-n0-0",
                                     "copack.io/assigned-at": rfc3339(clock.t)})
    # a relist showing the pod bound confirms the assumption
    state.replace_pods([bound], started=clock.t)
    assert state.pods["default/p"].source == "watch"
    # an assumption that is never confirmed is dropped by the sweep after the timeout
    other = api.pod(copack_pod("q", demand="sm=0.2,bw=0.2,mem=10Gi"))
    state.assume(PodRequest("default", "q", other["metadata"]["uid"]), "n0", "GPU-n0-1", 50,
                 clock.t)
    clock.t += 30
    state.sweep()
    assert state.view.unit_of("default/q") == "GPU-n0-1"
    clock.t += 31
    state.sweep()
    assert state.view.unit_of("default/q") is None
    assert state.view.unit_of("default/p") == "GPU-n0-0"  # confirmed ones stay
    assert state.counters[("assumed_expired", "bind")] == 1


def test_recreated_pod_and_deletions(api) -> None:
    clock = Clock()
    state = _state(clock)
    state.upsert_node(api.node(gpu_node("n0", gpu_units("n0", 1))))
    first = _bound(api, "p", "n0", "GPU-n0-0", clock.t)
    state.upsert_pod(first)
    assert state.view.unit_of("default/p") == "GPU-n0-0"
    # a DELETED event for an older incarnation (other uid) changes nothing
    state.delete_pod("default", "p", uid="some-older-uid")
    assert state.view.unit_of("default/p") == "GPU-n0-0"
    # the same name with a new uid (deleted and recreated, still pending): old placement gone
    api2 = type(api)()
    second = api2.pod(copack_pod("p", demand="sm=0.2,bw=0.2,mem=10Gi"))
    state.upsert_pod(second)
    assert state.view.unit_of("default/p") is None
    assert state.pods["default/p"].uid == second["metadata"]["uid"]
    state.delete_pod("default", "p", uid=second["metadata"]["uid"])
    assert "default/p" not in state.pods
    # a node deleted: its pods are no longer placed
    state.upsert_pod(first)
    state.delete_node("n0")
    assert state.view.unit_of("default/p") is None and not state.view.has_node("n0")


def test_bad_annotations_on_bound_pods_still_hold_their_unit(api) -> None:
    clock = Clock()
    state = _state(clock)
    state.upsert_node(api.node(gpu_node("n0", gpu_units("n0", 1))))
    pod = api.pod(copack_pod("odd", demand="sm=much"))
    pod = api.bind(pod, "n0", {"copack.io/unit": "GPU-n0-0"})
    state.upsert_pod(pod)
    info = state.pods["default/odd"]
    assert "copack.io/demand" in info.request_error
    assert state.view.unit_of("default/odd") == "GPU-n0-0"  # role-default demand
    assert state.view.pod("default/odd").demand.mem_bytes > 0


def test_draining_units_take_no_new_pod_until_the_note_expires_or_goes(api) -> None:
    from policies.decision import decide
    from policies.draining import DRAINING_ANNOTATION, format_draining

    clock = Clock()
    state = _state(clock)
    from policies.annotations import pod_request_from_k8s

    req = pod_request_from_k8s(copack_pod("new", demand="sm=0.2,bw=0.2,mem=10Gi"))

    def placeable() -> str | None:
        p = decide(state.view, req, None, clock.t, state.policy, state.demand_model).placement()
        return None if p is None else p.unit

    note = format_draining(["GPU-n0-0"], until=clock.t + 60)
    state.upsert_node(api.node(gpu_node("n0", gpu_units("n0", 1), extra_annotations={
        DRAINING_ANNOTATION: note})))
    assert state.nodes["n0"].draining == {"GPU-n0-0"} and placeable() is None
    # the rebalancer clears it: the unit is back
    state.upsert_node(api.annotate_node("n0", {DRAINING_ANNOTATION: None}))
    assert placeable() == "GPU-n0-0" and state.nodes["n0"].draining_error is None
    # a malformed note never takes the node out, and says what is wrong
    state.upsert_node(api.annotate_node("n0", {DRAINING_ANNOTATION: "[1]"}))
    assert placeable() == "GPU-n0-0"
    assert "must be a JSON object" in state.nodes["n0"].draining_error
    # a note whose time has passed holds nothing
    state.upsert_node(api.annotate_node("n0", {
        DRAINING_ANNOTATION: format_draining(["GPU-n0-0"], until=clock.t - 1)}))
    assert placeable() == "GPU-n0-0"


def test_pods_waiting_to_be_placed_tell_the_view_the_largest_memory_to_keep_room_for(api) -> None:
    """A pending pod's least memory (its `mem=`, else its model's weights and runtime) reaches
    the view until it is bound or deleted; a bound pod counts by what it declared."""
    clock = Clock()
    state = _state(clock)
    state.upsert_node(api.node(gpu_node("n0", gpu_units("n0", 1))))
    assert state.view.largest_pod_mem is None
    moe = api.pod(copack_pod("moe", model="mistralai/Mixtral-8x7B-Instruct-v0.1"))
    state.upsert_pod(moe)
    weights = state.view.largest_pod_mem
    assert weights is not None and 88 * 2**30 < weights < 90 * 2**30  # 46.7B x 2 bytes + 2 GiB
    small = api.pod(copack_pod("small", demand="mem=10Gi"))
    state.upsert_pod(small)
    assert state.view.largest_pod_mem == weights
    state.delete_pod("default", "moe")
    assert state.view.largest_pod_mem == 10 * 2**30
    bound = api.bind(small, "n0", {
        "copack.io/unit": "GPU-n0-0", "copack.io/sm-share": "40",
        "copack.io/assigned-at": rfc3339(clock.t)})
    state.upsert_pod(bound)  # placed: counted once, by its declared memory
    assert state.view.largest_pod_mem == 10 * 2**30
    state.delete_pod("default", "small")
    assert state.view.largest_pod_mem is None
    state.upsert_pod(api.pod(copack_pod("odd", demand="sm=much")))  # nothing known: ignored
    assert state.view.largest_pod_mem is None
