"""kube-scheduler's cycle as the simulator runs it, against the real extender app."""

from __future__ import annotations

from typing import Any

import pytest

from sim.cluster import build_cluster
from sim.extender_client import AsgiExtenderClient
from sim.harness import ExtenderHarness
from sim.kube import KubeScheduler, parse_quantity, pod_requests
from sim.pods import NAMESPACE, make_pod
from sim.run import PodRecord, SimBinder
from sim.scenario import parse_scenario
from tests.sim.conftest import small_raw


class Recording:
    """The real client, remembering what kube-scheduler sent and got (a tap, not a fake)."""

    def __init__(self, inner: AsgiExtenderClient) -> None:
        self.inner = inner
        self.filtered: list[list[str]] = []
        self.prioritized: list[dict[str, int]] = []

    def filter(self, pod, nodes):
        self.filtered.append([n["metadata"]["name"] for n in nodes])
        return self.inner.filter(pod, nodes)

    def prioritize(self, pod, nodes):
        out = self.inner.prioritize(pod, nodes)
        self.prioritized.append(out)
        return out

    def bind(self, pod, node):
        return self.inner.bind(pod, node)


def _setup(policy: str, **sched: Any):
    scn = parse_scenario(small_raw(), "small")
    cluster = build_cluster(scn.cluster)
    binder = SimBinder()
    h = ExtenderHarness(scn, policy, binder, clock=lambda: 1_767_225_600.0)
    for n in cluster.nodes:
        h.upsert_node(n)
    h.mark_synced()
    tap = Recording(h.client)
    ks = KubeScheduler(tap, **sched)
    for n in cluster.nodes:
        ks.add_node(n)
    return scn, binder, h, tap, ks


def _pod(scn, binder, h, name: str, role: str = "decode"):
    svc = scn.services[0]
    obj = make_pod(svc, role, name, seed=1, rps=1.0, prompt=1000, output=200, cpu=8,
                   memory_gib=64, created=0.0)
    binder.pods[(NAMESPACE, name)] = PodRecord(name, 0, 1, obj, 0.0, 0.0)
    h.upsert_pod(obj)
    return obj


def test_quantities_and_requests():
    assert parse_quantity("64Gi") == 64 * 2**30
    assert parse_quantity("500m") == 0.5
    assert parse_quantity("2") == 2.0
    scn = parse_scenario(small_raw(), "small")
    obj = make_pod(scn.services[0], "prefill", "p", seed=1, rps=1, prompt=10, output=5, cpu=8,
                   memory_gib=64, created=0.0)
    assert pod_requests(obj) == {"cpu": 8.0, "memory": 64 * 2**30, "copack.io/gpu": 1.0}


@pytest.mark.parametrize(("nodes", "pct", "want"), [(50, 0, 50), (128, 0, 100), (5000, 0, 500),
                                                   (5000, 30, 1500), (20000, 0, 1000)])
def test_adaptive_sample_size_matches_kube(nodes, pct, want):
    ks = KubeScheduler(None, percentage_of_nodes_to_score=pct)  # type: ignore[arg-type]
    assert ks.num_feasible_nodes_to_find(nodes) == want


def test_score_is_least_allocated_plus_weighted_extender_score():
    scn, binder, h, tap, ks = _setup("complementary", extender_weight=5)
    res = ks.schedule(_pod(scn, binder, h, "d1"))
    assert res.node is not None
    ext = tap.prioritized[-1]
    for node, total in res.scores.items():
        la = total - ext.get(node, 0) * 5 * 10
        assert 0 <= la <= 100
    assert res.scores[res.node] == max(res.scores.values())
    # ties go to the first node evaluated: both nodes are empty and equal for `spread` LA
    h.close()


def test_nodes_without_free_gpu_slots_never_reach_the_extender():
    scn, binder, h, tap, ks = _setup("dedicated")
    h100 = "h100-000"
    ks._nodes[h100].requested["copack.io/gpu"] = ks._nodes[h100].allocatable["copack.io/gpu"]
    res = ks.schedule(_pod(scn, binder, h, "d2"))
    assert res.node == "h200-000"
    assert tap.filtered[-1] == ["h200-000"]
    assert not tap.prioritized  # a single feasible node: kube skips prioritize
    assert binder.pods[(NAMESPACE, "d2")].obj["spec"]["nodeName"] == "h200-000"
    ks._nodes["h200-000"].requested["copack.io/gpu"] = 1e9
    res = ks.schedule(_pod(scn, binder, h, "d3"))
    assert res.node is None and "Insufficient copack.io/gpu" in res.reason
    h.close()


def test_failed_bind_releases_what_kube_assumed():
    scn, binder, h, _tap, ks = _setup("complementary")
    obj = _pod(scn, binder, h, "d4")
    del binder.pods[(NAMESPACE, "d4")]  # the API server no longer has it
    res = ks.schedule(obj)
    assert res.node is None and res.reason.startswith("binding rejected")
    assert "not found" in res.reason
    assert all(ks.requested(n).get("copack.io/gpu", 0) == 0 for n in ("h100-000", "h200-000"))
    h.close()


def test_binder_keeps_the_uid_precondition_and_refuses_a_second_binding():
    from extender.binder import AlreadyBound, BindError

    scn, binder, h, _tap, _ks = _setup("complementary")
    _pod(scn, binder, h, "d5")
    with pytest.raises(BindError, match="Precondition failed"):
        binder.bind(NAMESPACE, "d5", "another-uid", "h100-000", {})
    uid = binder.pods[(NAMESPACE, "d5")].obj["metadata"]["uid"]
    binder.bind(NAMESPACE, "d5", uid, "h100-000", {"copack.io/unit": "GPU-x"})
    with pytest.raises(AlreadyBound) as e:
        binder.bind(NAMESPACE, "d5", uid, "h200-000", {})
    assert e.value.node == "h100-000" and e.value.annotations["copack.io/unit"] == "GPU-x"
    h.close()


def _unreachable_extender():
    """The real HTTP client pointed at a loopback port nothing listens on (extender down)."""
    import socket

    from sim.extender_client import LoopbackExtenderClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return LoopbackExtenderClient(f"http://127.0.0.1:{port}")


@pytest.mark.parametrize("ignorable", [False, True])
def test_extender_down_keeps_gpu_pods_pending_and_schedules_the_rest(ignorable: bool):
    """deploy/base/scheduler-config.yaml: managedResources [copack.io/gpu], ignorable false."""
    scn, binder, h, _tap, _ks = _setup("complementary")
    client = _unreachable_extender()
    bound: list[tuple[str, str]] = []

    def default_binder(pod, node):
        bound.append((pod["metadata"]["name"], node))
        return ""

    ks = KubeScheduler(client, managed_resources=["copack.io/gpu"], ignorable=ignorable,
                       default_binder=default_binder)
    for n in build_cluster(scn.cluster).nodes:
        ks.add_node(n)
    gpu_pod = _pod(scn, binder, h, "d6")
    web = {"metadata": {"name": "web", "namespace": "default", "uid": "uid-web"},
           "spec": {"containers": [{"name": "c", "resources": {
               "requests": {"cpu": "1", "memory": "1Gi"}}}]}}
    assert ks.is_interested(gpu_pod) and not ks.is_interested(web)

    res = ks.schedule(gpu_pod)
    assert res.node is None
    if ignorable:  # filter and prioritize go on without it, but the extender is the binder
        assert res.reason.startswith("binding rejected: ConnectError")
    else:
        assert res.reason.startswith("extender filter error: ConnectError")
    assert all(ks.requested(n).get("copack.io/gpu", 0) == 0 for n in ("h100-000", "h200-000"))
    assert "nodeName" not in binder.pods[(NAMESPACE, "d6")].obj["spec"]  # still Pending

    res = ks.schedule(web)
    assert res.node is not None and res.reason == ""
    assert bound == [("web", res.node)]
    assert ks.requested(res.node)["cpu"] == 1.0
    client.close()
    h.close()
