"""The whole extender (`ExtenderService`: watchers, binder, HTTP) against the fake API server
through the official client and a kubeconfig: sync, 410 relists, dropped watches, restarts that
rebuild placements from pod annotations, concurrent binds, failed bindings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from extender.binder import AlreadyBound, BindError, BindUncertain, KubeBinder
from extender.config import ExtenderConfig
from extender.serve import ExtenderService
from tests.fakes.kube_fixtures import FakeKube, eventually
from tests.fakes.kube_objects import (
    H100_MEMORY,
    binding_args,
    copack_pod,
    extender_args,
    gpu_node,
    gpu_units,
)

GI = 1024**3


def _config(kube: FakeKube, **kube_section: Any) -> ExtenderConfig:
    return ExtenderConfig.model_validate({
        "listen": {"host": "127.0.0.1", "port": 0},
        "kube": {"kubeconfig": str(kube.kubeconfig), "backoff_initial_s": 0.05,
                 "backoff_max_s": 0.5, **kube_section},
        "telemetry": {"enabled": False},
    })


class Running:
    def __init__(self, svc: ExtenderService) -> None:
        self.svc = svc
        self.http = httpx.Client(base_url=svc.url, timeout=10)

    @property
    def state(self):
        return self.svc.state

    def post(self, verb: str, body: Any) -> httpx.Response:
        return self.http.post(f"/{verb}", content=orjson.dumps(body))

    def stop(self) -> None:
        self.http.close()
        self.svc.stop()


@pytest.fixture
def start_extender(fake_kube: FakeKube) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(wait_ready: bool = True, **kube_section: Any) -> Running:
        r = Running(ExtenderService(_config(fake_kube, **kube_section)).start())
        running.append(r)
        if wait_ready:
            eventually(lambda: r.http.get("/readyz").status_code == 200, what="readyz")
        return r

    yield start
    for r in running:
        r.stop()


def _pod_json(kube: FakeKube, name: str, ns: str = "default") -> dict:
    obj = kube.server.get("pods", name, ns)
    assert obj is not None
    return {"kind": "Pod", "apiVersion": "v1", **obj}


def _schedule(ext: Running, kube: FakeKube, name: str, nodes: list[str]) -> str:
    """What kube-scheduler does: filter, prioritize (if > 1 node), bind the best; -> Error."""
    pod = _pod_json(kube, name)
    feasible = ext.post("filter", extender_args(pod, nodes)).json()["NodeNames"]
    if not feasible:
        return "no feasible node"
    best = feasible[0]
    if len(feasible) > 1:
        scores = ext.post("prioritize", extender_args(pod, feasible)).json()
        best = max(scores, key=lambda s: (s["Score"], -feasible.index(s["Host"])))["Host"]
    return ext.post("bind", binding_args(pod, best)).json()["Error"]


def test_sync_waits_for_lists_and_survives_list_errors(fake_kube, start_extender) -> None:
    s = fake_kube.server
    s.create("nodes", gpu_node("n0", gpu_units("n0", 2)))
    s.fail_next("list", 3, 500, resource="nodes")
    ext = start_extender(wait_ready=False)
    eventually(lambda: ext.http.get("/readyz").status_code == 200, what="sync after errors")
    assert ext.state.view.units_of("n0") == ["GPU-n0-0", "GPU-n0-1"]
    failed_lists = [r for r in s.requests_matching(verb="list", resource="nodes")
                    if r.status == 500]
    assert len(failed_lists) == 3
    metrics = ext.http.get("/metrics").text
    assert 'copack_extender_watch_restarts_total{reason="http_500",resource="nodes"} 3.0' in metrics


def test_watch_events_update_the_state(fake_kube, start_extender) -> None:
    s = fake_kube.server
    ext = start_extender()
    s.wait_for_watches(2)
    s.create("nodes", gpu_node("n0", gpu_units("n0", 1)))
    eventually(lambda: ext.state.view.has_node("n0"), what="node added")
    pod = s.add_pod(copack_pod("p", demand="sm=0.1,bw=0.1,mem=8Gi"))
    s.bind("default", "p", "n0", pod["metadata"]["uid"], {"copack.io/unit": "GPU-n0-0"})
    eventually(lambda: ext.state.view.unit_of("default/p") == "GPU-n0-0", what="placement")
    # pods of other schedulers are not copack's (the watch's field selector leaves them out)
    other = copack_pod("other", demand="sm=0.1,bw=0.1,mem=8Gi")
    other["spec"]["schedulerName"] = "default-scheduler"
    uid = s.add_pod(other)["metadata"]["uid"]
    s.bind("default", "other", "n0", uid, {"copack.io/unit": "GPU-n0-0"})
    watch = s.requests_matching(verb="watch", resource="pods")[-1]
    assert "spec.schedulerName=copack-scheduler" in watch.query["fieldSelector"]
    s.set_pod_phase("default", "p", "Succeeded")  # leaves the selector: arrives as DELETED
    eventually(lambda: ext.state.view.unit_of("default/p") is None, what="finished pod freed")
    assert "default/other" not in ext.state.pods
    s.delete("nodes", "n0")
    eventually(lambda: not ext.state.view.has_node("n0"), what="node removed")


def test_watch_expiry_410_relists(fake_kube, start_extender) -> None:
    s = fake_kube.server
    s.create("nodes", gpu_node("n0", gpu_units("n0", 1)))
    ext = start_extender()
    s.wait_for_watches(2)
    lists_before = len(s.requests_matching(verb="list"))
    # the server forgets its history and tells every open watch 410 Gone
    s.expire_history(kick_watchers=True)
    s.create("nodes", gpu_node("n1", gpu_units("n1", 1)))
    eventually(lambda: ext.state.view.has_node("n1"), what="node seen after relist")
    eventually(lambda: len(s.requests_matching(verb="list")) >= lists_before + 2,
               what="both resources relisted")
    metrics = ext.http.get("/metrics").text
    assert 'reason="expired",resource="pods"' in metrics
    assert 'reason="expired",resource="nodes"' in metrics
    assert ext.http.get("/readyz").status_code == 200


def test_dropped_watch_reconnects_and_relists_only_when_needed(fake_kube, start_extender) -> None:
    s = fake_kube.server
    ext = start_extender()
    s.wait_for_watches(2)
    lists = len(s.requests_matching(verb="list"))
    s.drop_watches()  # connections cut mid-stream: ProtocolError in the client
    s.create("nodes", gpu_node("n0", gpu_units("n0", 1)))
    eventually(lambda: ext.state.view.has_node("n0"), what="event after a dropped watch")
    s.wait_for_watches(2)
    # re-watched from the last resourceVersion: no relist was needed
    assert len(s.requests_matching(verb="list")) == lists
    assert 'reason="dropped"' in ext.http.get("/metrics").text
    # the re-watch itself fails too (two errors in a row): relist with backoff
    node_lists = len(s.requests_matching(verb="list", resource="nodes"))
    s.fail_next("watch", 1, 500, resource="nodes")
    s.drop_watches()
    eventually(lambda: len(s.requests_matching(verb="list", resource="nodes")) > node_lists,
               what="relist of nodes after two watch errors in a row")
    s.wait_for_watches(2)
    lists = len(s.requests_matching(verb="list"))
    # dropped while history expired: the re-watch gets 410 and relists
    s.drop_watches()
    s.create("nodes", gpu_node("n1", gpu_units("n1", 1)))
    s.expire_history()
    eventually(lambda: ext.state.view.has_node("n1"), what="node seen via relist")
    eventually(lambda: len(s.requests_matching(verb="list")) > lists, what="relist")


def test_restart_rebuilds_placements_from_annotations(fake_kube, start_extender) -> None:
    s = fake_kube.server
    nodes = ["n0", "n1"]
    for n in nodes:
        s.create("nodes", gpu_node(n, gpu_units(n, 2)))
    ext = start_extender()
    names = []
    for i in range(6):
        role = "decode" if i % 2 else "prefill"
        s.add_pod(copack_pod(f"p{i}", role=role, demand="sm=0.3,bw=0.3,mem=30Gi"))
        names.append(f"p{i}")
        assert _schedule(ext, fake_kube, f"p{i}", nodes) == ""
    truth = {}
    for n in names:
        pod = s.get("pods", n, "default")
        ann = pod["metadata"]["annotations"]
        assert pod["spec"]["nodeName"] in nodes
        assert ann["copack.io/unit"].startswith(f"GPU-{pod['spec']['nodeName']}-")
        truth[f"default/{n}"] = ann["copack.io/unit"]
    before = ext.http.get("/debug/state").json()["placements"]
    assert {k: v["unit"] for k, v in before.items()} == truth
    ext.stop()

    again = start_extender()
    after = again.http.get("/debug/state").json()["placements"]
    assert {k: v["unit"] for k, v in after.items()} == truth
    for key, unit in truth.items():
        assert again.state.view.unit_of(key) == unit
        assert again.state.pods[key].source == "watch"
    # the rebuilt state constrains new decisions: 30 GiB pods fill units two at a time
    per_unit: dict[str, int] = {}
    for unit in truth.values():
        per_unit[unit] = per_unit.get(unit, 0) + 1
    s.add_pod(copack_pod("big", demand="sm=0.1,bw=0.1,mem=30Gi"))
    pod = _pod_json(fake_kube, "big")
    feasible = again.post("filter", extender_args(pod, nodes)).json()["NodeNames"]
    expected = sorted({n for n in nodes for i in range(2) if per_unit.get(f"GPU-{n}-{i}", 0) < 2})
    assert sorted(feasible) == expected


def test_50_concurrent_binds_onto_one_node(fake_kube, start_extender) -> None:
    s = fake_kube.server
    s.create("nodes", gpu_node("n0", gpu_units("n0", 2)))
    ext = start_extender()
    pods = []
    for i in range(50):
        s.add_pod(copack_pod(f"p{i:02d}", demand="sm=0.1,bw=0.1,mem=20Gi"))
    for i in range(50):
        pod = _pod_json(fake_kube, f"p{i:02d}")
        assert ext.post("filter", extender_args(pod, ["n0"])).json()["NodeNames"] == ["n0"]
        pods.append(pod)
    errors: dict[str, str] = {}

    async def bind_all() -> None:
        # one event loop, 50 connections, all 50 requests in flight at once
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=ext.svc.url, timeout=60, limits=limits) as c:
            answers = await asyncio.gather(*(
                c.post("/bind", content=orjson.dumps(binding_args(p, "n0"))) for p in pods
            ))
        for p, r in zip(pods, answers, strict=True):
            assert r.status_code == 200
            errors[p["metadata"]["name"]] = r.json()["Error"]

    asyncio.run(bind_all())
    assert len(errors) == 50
    ok = [n for n, e in errors.items() if e == ""]
    # 79.6 GiB per GPU: three 20 GiB pods each, never four
    assert len(ok) == 6
    assert all("over memory" in e for e in errors.values() if e), errors
    mem_by_unit: dict[str, int] = {}
    for p in s.list("pods"):
        ann = p["metadata"].get("annotations") or {}
        if p["metadata"]["name"] in ok:
            assert p["spec"]["nodeName"] == "n0"
            mem_by_unit[ann["copack.io/unit"]] = mem_by_unit.get(ann["copack.io/unit"], 0) + 20 * GI
        else:  # refused pods carry nothing half-written
            assert not p["spec"].get("nodeName")
            assert "copack.io/unit" not in ann
    assert sorted(mem_by_unit) == ["GPU-n0-0", "GPU-n0-1"]
    assert all(m <= H100_MEMORY for m in mem_by_unit.values())
    eventually(lambda: all(ext.state.pods[f"default/{n}"].source == "watch" for n in ok),
               what="binds confirmed by the watch")


def test_failed_binding_is_reported_and_rolled_back(fake_kube, start_extender) -> None:
    s = fake_kube.server
    s.create("nodes", gpu_node("n0", gpu_units("n0", 1)))
    ext = start_extender()
    s.add_pod(copack_pod("p", demand="sm=0.1,bw=0.1,mem=10Gi"))
    pod = _pod_json(fake_kube, "p")
    ext.post("filter", extender_args(pod, ["n0"]))
    s.fail_next("bind", 1, 500, message="etcdserver: request timed out")
    err = ext.post("bind", binding_args(pod, "n0")).json()["Error"]
    assert "etcdserver: request timed out" in err
    got = s.get("pods", "p", "default")
    assert not got["spec"].get("nodeName")
    assert "copack.io/unit" not in got["metadata"]["annotations"]
    assert ext.state.view.unit_of("default/p") is None
    assert ext.post("bind", binding_args(pod, "n0")).json()["Error"] == ""
    assert s.get("pods", "p", "default")["spec"]["nodeName"] == "n0"


def test_kube_binder_against_the_api(fake_kube) -> None:
    s = fake_kube.server
    b = KubeBinder(fake_kube.api_client)
    uid = s.add_pod(copack_pod("p"))["metadata"]["uid"]
    with pytest.raises(BindError, match="Precondition failed"):
        b.bind("default", "p", "not-the-uid", "n0", {"copack.io/unit": "GPU-x"})
    b.bind("default", "p", uid, "n0", {"copack.io/unit": "GPU-x", "copack.io/sm-share": "30"})
    pod = s.get("pods", "p", "default")
    assert pod["spec"]["nodeName"] == "n0"
    assert pod["metadata"]["annotations"]["copack.io/sm-share"] == "30"
    with pytest.raises(AlreadyBound) as e:
        b.bind("default", "p", uid, "n1", {"copack.io/unit": "GPU-y"})
    assert e.value.node == "n0" and e.value.annotations["copack.io/unit"] == "GPU-x"
    with pytest.raises(BindError, match="not found"):
        b.bind("default", "ghost", "", "n0", {})
    binding = s.requests_matching(verb="create", subresource="binding")[1]
    assert binding.body["metadata"]["uid"] == uid
    assert binding.body["target"] == {"apiVersion": "v1", "kind": "Node", "name": "n0"}
    s.stop()
    with pytest.raises(BindError, match="failed"):
        b.bind("default", "p", uid, "n0", {})


def test_kube_binder_settles_lost_answers(fake_kube) -> None:
    s = fake_kube.server
    b = KubeBinder(fake_kube.api_client)
    uid = s.add_pod(copack_pod("p"))["metadata"]["uid"]
    # the connection drops before the server acted: not bound, safe to roll back
    s.fail_next("bind", drop=True)
    with pytest.raises(BindError, match="the pod is not bound") as e:
        b.bind("default", "p", uid, "n0", {"copack.io/unit": "GPU-x"})
    assert not isinstance(e.value, (AlreadyBound, BindUncertain))
    # the server bound the pod, then the answer was lost: read back as AlreadyBound
    s.fail_next("bind", drop_after=True)
    with pytest.raises(AlreadyBound) as e:
        b.bind("default", "p", uid, "n0", {"copack.io/unit": "GPU-x"})
    assert e.value.node == "n0" and e.value.annotations == {"copack.io/unit": "GPU-x"}
    # neither the answer nor the pod can be read: uncertain
    uid2 = s.add_pod(copack_pod("q"))["metadata"]["uid"]
    s.fail_next("bind", drop_after=True)
    s.fail_next("get", 100, drop=True, resource="pods")  # (urllib3 retries GETs itself)
    with pytest.raises(BindUncertain):
        b.bind("default", "q", uid2, "n0", {"copack.io/unit": "GPU-y"})
    s.clear_faults()
    assert s.get("pods", "q", "default")["spec"]["nodeName"] == "n0"


def test_lost_binding_answers_never_overcommit(fake_kube, start_extender) -> None:
    s = fake_kube.server
    s.create("nodes", gpu_node("n0", gpu_units("n0", 1)))
    ext = start_extender()
    for name in ("a", "b", "c", "d", "e"):
        s.add_pod(copack_pod(name, demand="sm=0.1,bw=0.1,mem=20Gi"))
    pods = {n: _pod_json(fake_kube, n) for n in ("a", "b", "c", "d", "e")}
    for pod in pods.values():
        ext.post("filter", extender_args(pod, ["n0"]))
    # a: bound by the server, answer lost -> adopted as success
    s.fail_next("bind", drop_after=True)
    assert ext.post("bind", binding_args(pods["a"], "n0")).json()["Error"] == ""
    # b: bound, answer lost, pod unreadable -> reported, capacity stays reserved
    s.fail_next("bind", drop_after=True)
    s.fail_next("get", 100, drop=True, resource="pods")
    err = ext.post("bind", binding_args(pods["b"], "n0")).json()["Error"]
    s.clear_faults()
    assert "unknown" in err
    assert ext.state.view.unit_of("default/b") == "GPU-n0-0"
    # kube-scheduler retries b: the extender binds again (no blind success), the API says
    # 409 already bound, and the pod's own annotations settle it
    binds = len(s.requests_matching(verb="create", subresource="binding"))
    assert ext.post("bind", binding_args(pods["b"], "n0")).json()["Error"] == ""
    assert len(s.requests_matching(verb="create", subresource="binding")) == binds + 1
    # c: the request never reached the API and the pod is unreadable -> uncertain; the retry
    # really binds it
    s.fail_next("bind", drop=True)
    s.fail_next("get", 100, drop=True, resource="pods")
    assert "unknown" in ext.post("bind", binding_args(pods["c"], "n0")).json()["Error"]
    s.clear_faults()
    assert not s.get("pods", "c", "default")["spec"].get("nodeName")
    assert ext.post("bind", binding_args(pods["c"], "n0")).json()["Error"] == ""
    assert s.get("pods", "c", "default")["spec"]["nodeName"] == "n0"
    # d and e do not fit (3 x 20 GiB per GPU): the lost answers never freed memory
    results = [ext.post("bind", binding_args(pods[n], "n0")).json()["Error"] for n in "de"]
    assert all("over memory" in r for r in results)
    bound = [p["metadata"]["name"] for p in s.list("pods") if p["spec"].get("nodeName")]
    assert sorted(bound) == ["a", "b", "c"]
    units = {s.get("pods", n, "default")["metadata"]["annotations"]["copack.io/unit"]
             for n in "abc"}
    assert units == {"GPU-n0-0"}
    eventually(lambda: all(ext.state.pods[f"default/{n}"].source == "watch" for n in "abc"),
               what="a, b, c confirmed by the watch")
