"""The three verbs over real HTTP (uvicorn on loopback), with requests shaped exactly as
kube-scheduler sends them, against a cluster state fed directly (the simulator's seam)."""

from __future__ import annotations

from datetime import datetime

import pytest

from extender.binder import AlreadyBound, BindError
from extender.config import ExtenderConfig
from policies.config import PolicyConfig
from tests.fakes.kube_objects import (
    binding_args,
    copack_pod,
    extender_args,
    gpu_node,
    gpu_units,
    mig_units,
)

GI = 1024**3


def _bound(api, state, name: str, node: str, unit: str, **kw) -> dict:
    """A pod already bound to `unit`, fed to the state as the watch would."""
    pod = api.pod(copack_pod(name, **kw))
    pod = api.bind(pod, node, {"copack.io/unit": unit, "copack.io/sm-share": "30",
                               "copack.io/assigned-at": "2027-01-15T08:00:00Z"})
    state.upsert_pod(pod)
    return pod


@pytest.fixture
def cluster(make_served, api):
    state, srv = make_served()
    nodes = {
        "n0": api.node(gpu_node("n0", gpu_units("n0", 2))),
        "n1": api.node(gpu_node("n1", gpu_units("n1", 2))),
        "plain": api.node(gpu_node("plain")),
        "broken": api.node(gpu_node("broken", extra_annotations={
            "copack.io/inventory": '{"version": 1, "units": [{"uuid": ""}]}'})),
    }
    for n in nodes.values():
        state.upsert_node(n)
    # n1's two GPUs each hold two 30 GiB pods: a third does not fit in 79.6 GiB
    for i, unit in enumerate(["GPU-n1-0", "GPU-n1-0", "GPU-n1-1", "GPU-n1-1"]):
        _bound(api, state, f"big-{i}", "n1", unit, demand="sm=0.1,bw=0.1,mem=30Gi")
    return state, srv, nodes


def test_filter_node_names_mode(cluster, api) -> None:
    _state, srv, _ = cluster
    pod = api.pod(copack_pod("p", role="decode", demand="sm=0.2,bw=0.4,mem=30Gi"))
    r = srv.post("filter", extender_args(pod, ["n0", "n1", "plain", "broken", "ghost"]))
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"Nodes", "NodeNames", "FailedNodes", "FailedAndUnresolvableNodes",
                         "Error"}
    assert body["Nodes"] is None
    assert body["NodeNames"] == ["n0"]
    assert body["Error"] == ""
    assert "over memory" in body["FailedNodes"]["n1"]
    assert "unknown node" in body["FailedNodes"]["ghost"]
    unresolvable = body["FailedAndUnresolvableNodes"]
    assert "no copack.io/inventory" in unresolvable["plain"]
    assert "invalid inventory" in unresolvable["broken"] and "uuid" in unresolvable["broken"]
    # no telemetry at all: the answer says the node was judged on declared demand
    assert "telemetry stale" in body["FailedNodes"]["n1"]


def test_filter_full_nodes_mode_echoes_node_objects(cluster, api) -> None:
    _, srv, nodes = cluster
    pod = api.pod(copack_pod("p", role="decode", demand="sm=0.2,bw=0.4,mem=30Gi"))
    r = srv.post("filter", extender_args(pod, [nodes["n0"], nodes["n1"], nodes["plain"]],
                                         cache_capable=False))
    body = r.json()
    assert r.status_code == 200
    assert body["NodeNames"] is None
    assert body["Nodes"]["items"] == [nodes["n0"]]
    assert set(body["FailedNodes"]) == {"n1"}
    assert set(body["FailedAndUnresolvableNodes"]) == {"plain"}


def test_full_nodes_mode_takes_nodes_the_watch_has_not_delivered(make_served, api) -> None:
    state, srv = make_served()
    fresh = api.node(gpu_node("late", gpu_units("late", 1)))
    pod = api.pod(copack_pod("p", role="decode", demand="sm=0.2,bw=0.4,mem=30Gi"))
    body = srv.post("filter", extender_args(pod, [fresh], cache_capable=False)).json()
    assert body["Nodes"]["items"] == [fresh]
    assert state.view.units_of("late") == ["GPU-late-0"]
    # in NodeNames mode a name alone is not enough: unknown
    body = srv.post("filter", extender_args(pod, ["later"])).json()
    assert "unknown node" in body["FailedNodes"]["later"]


def test_pod_without_copack_gpu_passes_through(cluster, api) -> None:
    _, srv, nodes = cluster
    pod = api.pod(copack_pod("web", gpu=None))
    names = ["n0", "n1", "plain", "ghost"]
    body = srv.post("filter", extender_args(pod, names)).json()
    assert body["NodeNames"] == names and body["FailedNodes"] == {}
    full = srv.post("filter", extender_args(pod, list(nodes.values()), False)).json()
    assert full["Nodes"]["items"] == list(nodes.values())
    scores = srv.post("prioritize", extender_args(pod, names)).json()
    assert scores == [{"Host": n, "Score": 0} for n in names]


def _decode_and_prefill_neighbours(make_served, api, sharing: str = "mps"):
    """Three one-GPU nodes: `dec` holds a decode pod, `pre` a prefill pod, `empty` nothing."""
    state, srv = make_served(PolicyConfig(policy="complementary"))
    for n in ("dec", "empty", "pre"):
        labels = {"copack.io/sharing": sharing}
        state.upsert_node(api.node(gpu_node(n, gpu_units(n, 1), labels=labels)))
    _bound(api, state, "decode-0", "dec", "GPU-dec-0", role="decode",
           demand="sm=0.2,bw=0.6,mem=20Gi")
    _bound(api, state, "prefill-0", "pre", "GPU-pre-0", role="prefill",
           demand="sm=0.6,bw=0.2,mem=20Gi")
    return state, srv


def test_time_sliced_neighbours_take_turns(make_served, api) -> None:
    """Without MPS the decode pod holds 0.6 of the GPU's time for its bandwidth-bound kernels:
    a prefill pod wanting 0.6 of its SMs does not fit beside it (1.2 of the time)."""
    _, srv = _decode_and_prefill_neighbours(make_served, api, sharing="time-slicing")
    pod = api.pod(copack_pod("prefill-1", role="prefill", demand="sm=0.6,bw=0.2,mem=20Gi"))
    f = srv.post("filter", extender_args(pod, ["dec", "empty", "pre"])).json()
    assert f["NodeNames"] == ["empty"]
    assert "over GPU time" in f["FailedNodes"]["dec"]
    light = api.pod(copack_pod("prefill-2", role="prefill", demand="sm=0.3,bw=0.1,mem=20Gi"))
    f = srv.post("filter", extender_args(light, ["dec", "empty", "pre"])).json()
    assert f["NodeNames"] == ["dec", "empty", "pre"]  # 0.6 + 0.3 of the time on `dec`


def test_prioritize_prefers_complementary_neighbour(make_served, api) -> None:
    _, srv = _decode_and_prefill_neighbours(make_served, api)
    pod = api.pod(copack_pod("prefill-1", role="prefill", demand="sm=0.6,bw=0.2,mem=20Gi"))
    f = srv.post("filter", extender_args(pod, ["dec", "empty", "pre"])).json()
    assert f["NodeNames"] == ["dec", "empty"]
    assert "over SM capacity" in f["FailedNodes"]["pre"]
    r = srv.post("prioritize", extender_args(pod, ["dec", "empty"]))
    scores = r.json()
    assert isinstance(scores, list)  # HostPriorityList: a bare array
    assert [s["Host"] for s in scores] == ["dec", "empty"]
    by = {s["Host"]: s["Score"] for s in scores}
    assert all(0 <= v <= 10 and isinstance(v, int) for v in by.values())
    assert by["dec"] > by["empty"]
    # a fresh decide (nothing cached for this pod) gives the same ranking
    other = api.pod(copack_pod("prefill-2", role="prefill", demand="sm=0.6,bw=0.2,mem=20Gi"))
    again = {s["Host"]: s["Score"] for s in
             srv.post("prioritize", extender_args(other, ["dec", "empty"])).json()}
    assert again == by


def test_prioritize_answer_same_for_feasible_list_and_other_names(make_served, api) -> None:
    """Prioritize joins pre-encoded entries when the names are filter's feasible list and
    looks each name up otherwise: both must give the same scores, in the request's order, and
    0 for a name filter rejected or does not know."""
    _, srv = _decode_and_prefill_neighbours(make_served, api)
    pod = api.pod(copack_pod("prefill-1", role="prefill", demand="sm=0.6,bw=0.2,mem=20Gi"))
    assert srv.post("filter", extender_args(pod, ["dec", "empty", "pre"])).json()[
        "NodeNames"] == ["dec", "empty"]
    r = srv.post("prioritize", extender_args(pod, ["dec", "empty"]))
    assert r.headers["content-type"] == "application/json"
    fast = r.json()
    other = srv.post("prioritize", extender_args(pod, ["pre", "ghost", "empty", "dec"])).json()
    assert [s["Host"] for s in other] == ["pre", "ghost", "empty", "dec"]
    by = {s["Host"]: s["Score"] for s in other}
    assert by["pre"] == 0 and by["ghost"] == 0
    assert fast == [{"Host": "dec", "Score": by["dec"]}, {"Host": "empty", "Score": by["empty"]}]
    assert by["dec"] > by["empty"]


def test_prioritize_after_the_layout_changed_names_the_right_hosts(make_served, api) -> None:
    """The fast answer indexes pre-encoded entries by view row: once nodes come and go the
    rows move, and every entry must still carry the name it is scored for."""
    state, srv = _decode_and_prefill_neighbours(make_served, api)
    names = ["dec", "empty", "pre"]
    first = api.pod(copack_pod("prefill-1", role="prefill", demand="sm=0.6,bw=0.2,mem=20Gi"))
    feasible = srv.post("filter", extender_args(first, names)).json()["NodeNames"]
    before = srv.post("prioritize", extender_args(first, feasible)).json()
    state.delete_node("dec")  # frees its row; the new node may take it
    state.upsert_node(api.node(gpu_node("late", gpu_units("late", 1))))
    # the reused decision predates the layout: its scores, each under its own name
    stale = srv.post("prioritize", extender_args(first, feasible)).json()
    assert feasible == ["dec", "empty"] and stale == before
    second = api.pod(copack_pod("prefill-2", role="prefill", demand="sm=0.6,bw=0.2,mem=20Gi"))
    kept = srv.post("filter", extender_args(second, ["empty", "late", "pre"])).json()["NodeNames"]
    assert sorted(kept) == ["empty", "late"]
    scores = srv.post("prioritize", extender_args(second, kept)).json()
    assert [s["Host"] for s in scores] == kept
    assert {s["Host"]: s["Score"] for s in scores}["empty"] == before[1]["Score"]


@pytest.mark.parametrize("verb", ["filter", "prioritize", "bind"])
def test_verbs_answer_405_to_other_methods(cluster, verb) -> None:
    _, srv, _ = cluster
    r = srv.client.get(f"/{verb}")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert "only POST" in r.json()["Error"]


def test_mig_slices_are_units(make_served, api) -> None:
    state, srv = make_served()
    state.upsert_node(api.node(gpu_node("mig", mig_units("mig", 0, ("3g.40gb", "3g.40gb")))))
    small = api.pod(copack_pod("small", role="decode", demand="sm=0.1,bw=0.1,mem=10Gi"))
    big = api.pod(copack_pod("big", role="decode", demand="sm=0.1,bw=0.1,mem=50Gi"))
    assert srv.post("filter", extender_args(small, ["mig"])).json()["NodeNames"] == ["mig"]
    body = srv.post("filter", extender_args(big, ["mig"])).json()
    assert body["NodeNames"] == [] and "2 over memory" in body["FailedNodes"]["mig"]


def test_invalid_pod_annotation_is_unresolvable_everywhere(cluster, api) -> None:
    _, srv, _ = cluster
    pod = api.pod(copack_pod("bad", demand="sm=lots"))
    r = srv.post("filter", extender_args(pod, ["n0", "n1"]))
    assert r.status_code == 200
    body = r.json()
    assert body["NodeNames"] == []
    reasons = body["FailedAndUnresolvableNodes"]
    assert set(reasons) == {"n0", "n1"}
    assert "copack.io/demand" in reasons["n0"] and "sm" in reasons["n0"]


def test_not_ready_until_synced(make_served, api) -> None:
    state, srv = make_served(synced=False)
    pod = api.pod(copack_pod("p"))
    assert srv.client.get("/healthz").status_code == 200
    assert srv.client.get("/readyz").status_code == 503
    r = srv.post("filter", extender_args(pod, ["n0"]))
    assert r.status_code == 503 and "not synced" in r.json()["Error"]
    state.mark_synced()
    assert srv.client.get("/readyz").status_code == 200
    assert srv.post("filter", extender_args(pod, ["n0"])).status_code == 200


BAD_REQUESTS = [
    ("filter", b"{not json", "not valid JSON"),
    ("filter", b"", "empty request body"),
    ("filter", b"[1, 2]", "must be a JSON object"),
    ("filter", b'{"NodeNames": ["a"]}', "missing Pod"),
    ("filter", b'{"Pod": "x", "NodeNames": ["a"]}', "Pod must be an object"),
    ("filter", b'{"Pod": {"metadata": {}}, "NodeNames": ["a"]}', "Pod.metadata.name"),
    ("filter", b'{"Pod": {"metadata": {"name": "p", "annotations": {"a": 1}}}}',
     "Pod.metadata.annotations"),
    ("filter", b'{"Pod": {"metadata": {"name": "p"}}, "NodeNames": "n0"}', "NodeNames must be"),
    ("filter", b'{"Pod": {"metadata": {"name": "p"}}, "NodeNames": ["n0", 7]}', "NodeNames[1]"),
    ("filter", b'{"Pod": {"metadata": {"name": "p"}}, "Nodes": {"items": [{"x": 1}]}}',
     "Nodes.items[0]"),
    ("prioritize", b'{"Pod": {"metadata": {"name": "p"}}, "Nodes": []}', "Nodes must be"),
    ("bind", b'{"PodName": "p", "PodNamespace": "default", "Node": "n0"}', "missing PodUID"),
    ("bind", b'{"PodName": "p", "PodNamespace": "default", "PodUID": "u", "Node": 3}',
     "Node must be a string"),
    ("bind", b'{"PodName": "", "PodNamespace": "default", "PodUID": "u", "Node": "n"}',
     "PodName must not be empty"),
]


@pytest.mark.parametrize(("verb", "body", "needle"), BAD_REQUESTS)
def test_bad_input_is_a_400_naming_the_problem(cluster, api, verb, body, needle) -> None:
    _, srv, _ = cluster
    r = srv.post(verb, body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["Error"]
    # the worker is alive and still answers correctly
    pod = api.pod(copack_pod("after", role="decode", demand="sm=0.1,bw=0.1,mem=1Gi"))
    assert srv.post("filter", extender_args(pod, ["n0"])).json()["NodeNames"] == ["n0"]


def test_huge_body_is_refused_with_400(make_served, api) -> None:
    cfg = ExtenderConfig.model_validate({"limits": {"max_body_bytes": 64 * 1024}})
    _state, srv = make_served(config=cfg)
    pod = api.pod(copack_pod("p"))
    names = [f"node-{i:06d}" for i in range(20_000)]
    r = srv.post("filter", extender_args(pod, names))
    assert r.status_code == 400 and "exceeds the limit of 65536 bytes" in r.json()["Error"]
    # and without a Content-Length (chunked upload), the stream is cut off as well
    def gen():
        for _ in range(100):
            yield b" " * 4096
    r = srv.client.post("/filter", content=gen())
    assert r.status_code == 400 and "exceeds the limit" in r.json()["Error"]
    assert srv.post("filter", extender_args(pod, ["x"])).status_code == 200


def test_bind_writes_annotations_assumes_and_is_idempotent(cluster, api, binder, clock) -> None:
    state, srv, _ = cluster
    pod = api.pod(copack_pod("p", role="decode", demand="sm=0.2,bw=0.4,mem=30Gi"))
    assert srv.post("filter", extender_args(pod, ["n0", "n1"])).json()["NodeNames"] == ["n0"]
    r = srv.post("bind", binding_args(pod, "n0"))
    assert r.status_code == 200 and r.json() == {"Error": ""}
    assert len(binder.calls) == 1
    ns, name, uid, node, ann = binder.calls[0]
    assert (ns, name, uid, node) == ("default", "p", pod["metadata"]["uid"], "n0")
    assert ann["copack.io/unit"] in ("GPU-n0-0", "GPU-n0-1")
    assert 1 <= int(ann["copack.io/sm-share"]) <= 100
    assert datetime.fromisoformat(ann["copack.io/assigned-at"].replace("Z", "+00:00")
                                  ).timestamp() == pytest.approx(clock.t, abs=1e-3)
    assert set(ann) == {"copack.io/unit", "copack.io/sm-share", "copack.io/assigned-at"}
    # assumed at once: visible in the state before any watch event
    assert state.view.unit_of("default/p") == ann["copack.io/unit"]
    # kube-scheduler retries the bind: success, no second binding
    assert srv.post("bind", binding_args(pod, "n0")).json() == {"Error": ""}
    assert len(binder.calls) == 1
    # a bind of the same pod to another node is refused
    err = srv.post("bind", binding_args(pod, "n1")).json()["Error"]
    assert "already bound to n0" in err
    # the watch then shows the pod bound: the assumption is confirmed, not doubled
    state.upsert_pod(api.bind(pod, "n0", ann))
    assert state.pods["default/p"].source == "watch"
    assert [r.key for r in state.view.pods_on(ann["copack.io/unit"])] == ["default/p"]


def test_failed_binding_leaves_nothing_behind(cluster, api, binder) -> None:
    state, srv, _ = cluster
    pod = api.pod(copack_pod("p", demand="sm=0.2,bw=0.2,mem=10Gi"))
    srv.post("filter", extender_args(pod, ["n0"]))
    binder.fail_with = BindError("creating the binding of default/p to n0 failed: etcd timeout")
    r = srv.post("bind", binding_args(pod, "n0"))
    assert r.status_code == 200
    assert "etcd timeout" in r.json()["Error"]
    assert state.view.unit_of("default/p") is None
    assert state.pods["default/p"].unit is None
    explained = srv.client.get("/explain/default/p").json()
    assert "etcd timeout" in explained["bind"]["error"]
    # the next attempt (binder healthy again) succeeds
    binder.fail_with = None
    assert srv.post("bind", binding_args(pod, "n0")).json() == {"Error": ""}
    assert state.view.unit_of("default/p") is not None


def test_lost_bind_answer_is_adopted(cluster, api, binder) -> None:
    state, srv, _ = cluster
    pod = api.pod(copack_pod("p", demand="sm=0.2,bw=0.2,mem=10Gi"))
    srv.post("filter", extender_args(pod, ["n0"]))
    binder.fail_with = AlreadyBound("already bound", "n0", {"copack.io/unit": "GPU-n0-1",
                                                            "copack.io/sm-share": "40"})
    assert srv.post("bind", binding_args(pod, "n0")).json() == {"Error": ""}
    assert state.view.unit_of("default/p") == "GPU-n0-1"
    binder.fail_with = AlreadyBound("bound elsewhere", "n1", {"copack.io/unit": "GPU-n1-0"})
    other = api.pod(copack_pod("q", demand="sm=0.2,bw=0.2,mem=10Gi"))
    srv.post("filter", extender_args(other, ["n0"]))
    assert "bound elsewhere" in srv.post("bind", binding_args(other, "n0")).json()["Error"]
    assert state.view.unit_of("default/q") is None


def test_bind_refuses_unknown_pod_and_full_node(cluster, api) -> None:
    state, srv, _ = cluster
    stranger = api.pod(copack_pod("stranger"))
    err = srv.post("bind", binding_args(stranger, "n0")).json()["Error"]
    assert "unknown to the extender" in err
    pod = api.pod(copack_pod("p", demand="sm=0.1,bw=0.1,mem=30Gi"))
    srv.post("filter", extender_args(pod, ["n1"]))
    err = srv.post("bind", binding_args(pod, "n1")).json()["Error"]
    assert "no unit on n1 can take default/p" in err and "over memory" in err
    assert state.view.unit_of("default/p") is None


def test_metrics_debug_state_and_explain(cluster, api) -> None:
    _state, srv, _ = cluster
    pod = api.pod(copack_pod("p", role="decode", demand="sm=0.2,bw=0.4,mem=30Gi"))
    srv.post("filter", extender_args(pod, ["n0", "n1"]))
    srv.post("prioritize", extender_args(pod, ["n0"]))
    srv.post("bind", binding_args(pod, "n0"))
    srv.post("filter", b"{")
    text = srv.client.get("/metrics").text
    assert 'copack_extender_request_duration_seconds_count{verb="filter"} 2.0' in text
    assert 'copack_extender_decisions_total{outcome="feasible",verb="filter"} 1.0' in text
    assert 'copack_extender_decisions_total{outcome="bad_request",verb="filter"} 1.0' in text
    assert 'copack_extender_decisions_total{outcome="reused",verb="prioritize"} 1.0' in text
    assert 'copack_extender_decisions_total{outcome="bound",verb="bind"} 1.0' in text
    assert 'copack_extender_units{state="stale"} 4.0' in text
    assert 'copack_extender_telemetry_stale{node="n0"} 1.0' in text
    dbg = srv.client.get("/debug/state").json()
    assert dbg["synced"] is True
    assert dbg["placements"]["default/p"]["unit"].startswith("GPU-n0-")
    assert dbg["nodes"]["n1"]["telemetry"]["stale"] is True
    assert "plain" in dbg["node_problems"]
    one = srv.client.get("/debug/state", params={"node": "n1"}).json()
    assert list(one["nodes"]) == ["n1"]
    assert sorted(one["placements"]) == [f"default/big-{i}" for i in range(4)]
    assert set(one["pods"]) == set(one["placements"])
    assert one["nodes"]["n1"]["units"] == dbg["nodes"]["n1"]["units"]
    ex = srv.client.get("/explain/default/p").json()
    assert ex["decision"]["chosen"]["node"] == "n0"
    assert ex["bind"]["unit"] == ex["state"]["unit"]
    assert srv.client.get("/explain/default/nobody").status_code == 404
