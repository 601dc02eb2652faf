"""The controller against the fake API server through the official client: it evicts exactly
what it planned through policy/v1 Eviction, marks the GPU draining first, and keeps to its
budget and the PodDisruptionBudgets."""

from __future__ import annotations

import orjson

from policies.draining import DRAINING_ANNOTATION, parse_draining
from tests.fakes.kube_fixtures import FakeKube
from tests.rebalancer.conftest import (
    add_node,
    add_pdb,
    add_running_pod,
    eventually,
    evictions,
    settled,
)


def _two_half_empty_gpus(kube: FakeKube) -> None:
    add_node(kube, "n1", gpus=2)
    add_running_pod(kube, "a", "n1", 0, workload="rs-a")
    add_running_pod(kube, "b", "n1", 1, workload="rs-b")


def test_consolidates_two_half_empty_gpus(fake_kube: FakeKube, start_rebalancer) -> None:
    _two_half_empty_gpus(fake_kube)
    svc = start_rebalancer()
    eventually(lambda: settled(svc, 2), what="two pods placed")
    fake_kube.server.clear_requests()
    report = svc.controller.round()
    (move,) = report["moves"]
    assert move["action"] == "evicted"
    evicted = move["pod"]
    assert evictions(fake_kube) == [evicted]  # exactly the planned pod, through the Eviction API
    assert fake_kube.server.get("pods", evicted.split("/")[1], "default") is None
    # the node was marked draining (the emptied GPU's unit) before the eviction was sent
    reqs = [(r.verb, r.resource, r.subresource) for r in fake_kube.server.requests
            if r.verb in ("patch", "create")]
    assert reqs[:2] == [("patch", "nodes", None), ("create", "pods", "eviction")]
    units, until = parse_draining(
        fake_kube.server.get("nodes", "n1")["metadata"]["annotations"][DRAINING_ANNOTATION])
    assert units == {move["unit"]} and until > 0
    assert move["target"]["unit"] != move["unit"]
    body = next(r.body for r in fake_kube.server.requests if r.subresource == "eviction")
    assert body["kind"] == "Eviction" and body["apiVersion"] == "policy/v1"
    assert body["deleteOptions"]["preconditions"]["uid"]
    # the GPU empties: counted; the mark stays until the replacement is Ready
    eventually(lambda: settled(svc, 1), what="the evicted pod to leave the view")
    svc.controller.reconcile()
    assert svc.metrics.gpus_freed._value.get() == 1
    assert DRAINING_ANNOTATION in fake_kube.server.get("nodes", "n1")["metadata"]["annotations"]
    workload = "rs-a" if evicted.endswith("/a") else "rs-b"
    add_running_pod(fake_kube, f"{workload}-new", "n1", 1 - int(move["unit"][-1]),
                    workload=workload, ready_for_s=1)
    eventually(lambda: settled(svc, 2), what="the replacement placed")
    svc.controller.reconcile()
    assert DRAINING_ANNOTATION not in fake_kube.server.get("nodes", "n1")["metadata"][
        "annotations"]
    assert svc.controller.budget.moving == {}


def test_dry_run_evicts_nothing_and_reports(fake_kube: FakeKube, start_rebalancer) -> None:
    _two_half_empty_gpus(fake_kube)
    svc = start_rebalancer(dry_run=True)
    eventually(lambda: settled(svc, 2), what="two pods placed")
    fake_kube.server.clear_requests()
    report = svc.controller.round()
    (move,) = report["moves"]
    assert move["action"] == "dry_run" and move["reason"].startswith("would evict")
    assert evictions(fake_kube) == []
    assert fake_kube.server.requests_matching(verb="patch") == []
    assert len(fake_kube.server.list("pods")) == 2
    assert svc.metrics.evictions.labels("dry_run")._value.get() == 1
    assert svc.controller.explain(move["pod"])["action"] == "dry_run"


def test_pdb_refusal_429_is_reported_not_raised(fake_kube: FakeKube, start_rebalancer) -> None:
    """Two GPUs to empty in one round, one PDB over all four workloads allowing one
    disruption: the first eviction spends it, the second gets 429 from the API server."""
    add_node(fake_kube, "n1", gpus=4)
    for i, w in enumerate("abcd"):
        add_running_pod(fake_kube, w, "n1", i, workload=f"rs-{w}")
    add_pdb(fake_kube, "vllm", allowed=1)
    svc = start_rebalancer(max_gpus_per_round=2)
    eventually(lambda: settled(svc, 4), what="four pods placed")
    report = svc.controller.round()
    outcomes = sorted(m["action"] for m in report["moves"])
    assert outcomes == ["evicted", "refused"], report
    refused = next(m for m in report["moves"] if m["action"] == "refused")
    assert "429" in refused["reason"] and "disruption budget" in refused["reason"]
    assert len(evictions(fake_kube)) == 2
    assert len(fake_kube.server.list("pods")) == 3
    assert svc.metrics.evictions.labels("refused")._value.get() == 1
    assert svc.controller.explain(refused["pod"])["action"] == "refused"
    # the refused GPU's draining mark is lifted at once; the other one stays
    units, _ = parse_draining(
        fake_kube.server.get("nodes", "n1")["metadata"]["annotations"][DRAINING_ANNOTATION])
    evicted = next(m for m in report["moves"] if m["action"] == "evicted")
    assert units == {evicted["unit"]}


def test_pdb_allowing_nothing_keeps_the_gpu(fake_kube: FakeKube, start_rebalancer) -> None:
    _two_half_empty_gpus(fake_kube)
    add_pdb(fake_kube, "vllm", allowed=0)
    svc = start_rebalancer()
    eventually(lambda: settled(svc, 2), what="two pods placed")
    report = svc.controller.round()
    assert report["moves"] == [] and evictions(fake_kube) == []
    assert all("PodDisruptionBudget vllm allows no disruption" in why
               for why in report["kept"].values()), report["kept"]
    assert "PodDisruptionBudget" in svc.controller.explain("default/a")["reason"]


def test_warming_up_pods_are_not_moved(fake_kube: FakeKube, start_rebalancer) -> None:
    add_node(fake_kube, "n1", gpus=2)
    add_running_pod(fake_kube, "a", "n1", 0, workload="rs-a", ready_for_s=5)
    add_running_pod(fake_kube, "b", "n1", 1, workload="rs-b", ready_for_s=5)
    svc = start_rebalancer(min_age_s=300)
    eventually(lambda: settled(svc, 2), what="two pods placed")
    report = svc.controller.round()
    assert report["moves"] == [] and evictions(fake_kube) == []
    assert all("warm-up" in why for why in report["kept"].values()), report["kept"]


def test_pods_without_a_controller_or_not_ready_stay(fake_kube: FakeKube,
                                                     start_rebalancer) -> None:
    add_node(fake_kube, "n1", gpus=2)
    add_running_pod(fake_kube, "bare", "n1", 0, workload=None)
    add_running_pod(fake_kube, "starting", "n1", 1, workload="rs-b", ready_for_s=None)
    svc = start_rebalancer()
    eventually(lambda: settled(svc, 2), what="two pods placed")
    report = svc.controller.round()
    assert report["moves"] == [] and evictions(fake_kube) == []
    kept = " ".join(report["kept"].values())
    assert "no controller" in kept and "not Ready" in kept


def test_one_replica_of_a_workload_at_a_time(fake_kube: FakeKube, start_rebalancer) -> None:
    """Two replicas of rs-a on their own GPUs, a big rs-b pod that fits nowhere else beside:
    one rs-a replica moves; the other waits, in this round and the next, until the first
    one's replacement is Ready."""
    add_node(fake_kube, "n1", gpus=3)
    add_running_pod(fake_kube, "a1", "n1", 0, workload="rs-a")
    add_running_pod(fake_kube, "a2", "n1", 1, workload="rs-a")
    add_running_pod(fake_kube, "b", "n1", 2, workload="rs-b", demand="sm=0.3,bw=0.3,mem=70Gi")
    svc = start_rebalancer(max_gpus_per_round=2, evictions_per_minute=5)
    eventually(lambda: settled(svc, 3), what="three pods placed")
    first = svc.controller.round()
    evicted = [m["pod"] for m in first["moves"] if m["action"] == "evicted"]
    assert len(evicted) == 1 and evicted[0] in ("default/a1", "default/a2"), first
    assert any("another replica of" in why for why in first["kept"].values()), first["kept"]
    eventually(lambda: settled(svc, 2), what="the evicted pod to leave the view")
    second = svc.controller.round()
    assert second["moves"] == [], second
    assert any("still being replaced" in why for why in second["kept"].values()), second
    assert len(evictions(fake_kube)) == 1


def test_report_is_json(fake_kube: FakeKube, start_rebalancer) -> None:
    _two_half_empty_gpus(fake_kube)
    svc = start_rebalancer(dry_run=True)
    eventually(lambda: settled(svc, 2), what="two pods placed")
    assert orjson.loads(orjson.dumps(svc.controller.round()))["dry_run"] is True


def test_every_request_it_makes_is_within_its_role(fake_kube: FakeKube, start_rebalancer) -> None:
    """What the rendered ClusterRole of copack-rebalancer grants covers every request seen."""
    from tests.deploy.manifests import render
    from tests.deploy.rbac_calls import Permission
    from tests.deploy.test_rbac import granted

    add_node(fake_kube, "n1", gpus=4)
    for i, w in enumerate("abcd"):
        add_running_pod(fake_kube, w, "n1", i, workload=f"rs-{w}")
    add_pdb(fake_kube, "vllm", allowed=1)
    fake_kube.server.clear_requests()
    svc = start_rebalancer(max_gpus_per_round=2)
    eventually(lambda: settled(svc, 4), what="four pods placed")
    svc.controller.round()
    eventually(lambda: settled(svc, 3), what="the evicted pod to leave the view")
    svc.controller.reconcile()
    have = granted(render("base"), "copack-rebalancer")
    groups = {"poddisruptionbudgets": "policy"}
    seen = {Permission(groups.get(r.resource, ""),
                       r.resource + (f"/{r.subresource}" if r.subresource else ""), r.verb)
            for r in fake_kube.server.requests if r.resource}
    assert Permission("", "pods/eviction", "create") in seen
    assert seen <= have, sorted(map(str, seen - have))
