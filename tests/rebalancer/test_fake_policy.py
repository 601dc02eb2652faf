"""The fake API server's policy/v1 block, through the official client: PodDisruptionBudgets
are listed under /apis/policy/v1 and an Eviction spends a PDB's allowed disruption, deletes the
pod, and is refused with 429 when the PDB allows none (as kube-apiserver does)."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from rebalancer.kube import KubeActions
from tests.fakes.kube_fixtures import FakeKube
from tests.rebalancer.conftest import add_node, add_pdb, add_running_pod


def _evict(kube: FakeKube, name: str) -> None:
    client.CoreV1Api(kube.api_client).create_namespaced_pod_eviction(
        name, "default", client.V1Eviction(api_version="policy/v1", kind="Eviction",
                                           metadata=client.V1ObjectMeta(name=name)),
        _preload_content=False)


def test_eviction_spends_the_pdb_then_answers_429(fake_kube: FakeKube) -> None:
    add_node(fake_kube, "n1")
    add_running_pod(fake_kube, "a", "n1", 0)
    add_running_pod(fake_kube, "b", "n1", 1)
    add_pdb(fake_kube, "vllm", allowed=1)
    _evict(fake_kube, "a")
    assert fake_kube.server.get("pods", "a", "default") is None
    pdb = fake_kube.server.get("poddisruptionbudgets", "vllm", "default")
    assert pdb["status"]["disruptionsAllowed"] == 0 and "a" in pdb["status"]["disruptedPods"]
    with pytest.raises(ApiException) as e:
        _evict(fake_kube, "b")
    assert e.value.status == 429 and "disruption budget" in e.value.body
    assert fake_kube.server.get("pods", "b", "default") is not None


def test_pending_pods_and_unmatched_pods_evict_freely(fake_kube: FakeKube) -> None:
    add_node(fake_kube, "n1")
    add_running_pod(fake_kube, "pending", None)
    add_running_pod(fake_kube, "other", "n1", 0, labels={"app": "other"})
    add_pdb(fake_kube, "vllm", allowed=0)
    _evict(fake_kube, "pending")
    _evict(fake_kube, "other")
    assert fake_kube.server.list("pods") == []
    with pytest.raises(ApiException) as e:
        _evict(fake_kube, "gone")
    assert e.value.status == 404


def test_pdbs_list_typed_and_raw(fake_kube: FakeKube) -> None:
    add_pdb(fake_kube, "vllm", allowed=2, min_available=3)
    typed = client.PolicyV1Api(fake_kube.api_client).list_namespaced_pod_disruption_budget(
        "default")
    assert typed.items[0].status.disruptions_allowed == 2
    (pdb,) = KubeActions(fake_kube.api_client).pdbs("default")
    assert pdb.name == "vllm" and pdb.disruptions_allowed == 2 and pdb.floor(5) == 3
    assert pdb.matches({"app": "vllm"}) and not pdb.matches({"app": "x"})
    assert KubeActions(fake_kube.api_client).pdbs("elsewhere") == []
    groups = client.ApisApi(fake_kube.api_client).get_api_versions()
    assert "policy" in [g.name for g in groups.groups]


def test_kube_actions_report_outcomes(fake_kube: FakeKube) -> None:
    add_node(fake_kube, "n1")
    pod = add_running_pod(fake_kube, "a", "n1", 0)
    kube = KubeActions(fake_kube.api_client)
    wrong = kube.evict("default", "a", "not-its-uid")
    assert wrong.outcome == "failed" and "409" in wrong.message
    fake_kube.server.fail_next("create", status=429, resource="pods", subresource="eviction")
    assert kube.evict("default", "a", pod["metadata"]["uid"]).outcome == "refused"
    assert kube.evict("default", "a", pod["metadata"]["uid"]).outcome == "evicted"
    kube.set_draining("n1", ["GPU-n1-0"], 2e9)
    assert "copack.io/draining" in fake_kube.server.get("nodes", "n1")["metadata"]["annotations"]
    kube.set_draining("n1", [], 0)
    assert "copack.io/draining" not in fake_kube.server.get("nodes", "n1")["metadata"][
        "annotations"]
