"""The Service reaches the leader by a label, not by readiness: every replica labels its own pod
`copack.io/extender-role` (leader once it holds the Lease and has relisted, else standby), with
the official client against the fake API server, and re-labels after failures and failovers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extender.config import ExtenderConfig
from extender.role_label import ROLE_LABEL
from extender.serve import ExtenderService
from tests.extender.test_leader_failover import LEASE_S, RENEW_S, RETRY_S, eventually
from tests.fakes.kube_fixtures import FakeKube

NS = "copack-system"


def _config(kube: FakeKube, identity: str, election: bool = True) -> ExtenderConfig:
    return ExtenderConfig.model_validate({
        "listen": {"host": "127.0.0.1", "port": 0},
        "kube": {"kubeconfig": str(kube.kubeconfig), "backoff_initial_s": 0.05,
                 "backoff_max_s": 0.5},
        "telemetry": {"enabled": False},
        "leader_election": {"enabled": election, "identity": identity, "lease_namespace": NS,
                            "pod_namespace": NS, "lease_duration_s": LEASE_S,
                            "renew_deadline_s": RENEW_S, "retry_period_s": RETRY_S},
    })


def _own_pod(kube: FakeKube, name: str) -> None:
    kube.server.add_pod({"metadata": {"name": name, "namespace": NS,
                                      "labels": {"app.kubernetes.io/name": "copack-extender"}},
                         "spec": {"containers": [{"name": "extender", "image": "x"}]}})


def _roles(kube: FakeKube, names: list[str]) -> dict[str, str | None]:
    out = {}
    for n in names:
        pod = kube.server.get("pods", n, NS)
        out[n] = ((pod or {}).get("metadata", {}).get("labels") or {}).get(ROLE_LABEL)
    return out


@pytest.fixture
def pair(fake_kube: FakeKube) -> Iterator[list[ExtenderService]]:
    for n in ("ext-a", "ext-b"):
        _own_pod(fake_kube, n)
    svcs = [ExtenderService(_config(fake_kube, n)).start() for n in ("ext-a", "ext-b")]
    try:
        yield svcs
    finally:
        for x in svcs:
            x.stop()


def _one_leader_labelled(kube: FakeKube, svcs: list[ExtenderService]) -> str | None:
    roles = _roles(kube, ["ext-a", "ext-b"])
    leaders = [x.config.leader_election.identity for x in svcs if x.is_leader()]
    if len(leaders) == 1 and sorted(map(str, roles.values())) == ["leader", "standby"]:
        assert roles[leaders[0]] == "leader"
        return leaders[0]
    return None


def test_the_leader_labels_itself_and_the_standby_is_ready(fake_kube, pair) -> None:
    leader = eventually(lambda: _one_leader_labelled(fake_kube, pair), what="labels")
    import httpx

    for x in pair:  # both Ready: a PDB counts both, so a drain may evict either
        assert httpx.get(f"{x.url}/readyz", timeout=5).status_code == 200
    # graceful stop of the leader: it hands the label over before releasing the Lease
    old = next(x for x in pair if x.config.leader_election.identity == leader)
    new = next(x for x in pair if x is not old)
    old.stop()
    eventually(lambda: _roles(fake_kube, [leader])[leader] == "standby", what="old standby")
    new_id = new.config.leader_election.identity
    eventually(lambda: new.is_leader() and _roles(fake_kube, [new_id])[new_id] == "leader",
               what="the survivor labelled leader")


def test_a_crashed_leader_is_replaced_and_label_failures_are_retried(fake_kube, pair) -> None:
    leader = eventually(lambda: _one_leader_labelled(fake_kube, pair), what="labels")
    old = next(x for x in pair if x.config.leader_election.identity == leader)
    new = next(x for x in pair if x is not old)
    new_id = new.config.leader_election.identity
    fake_kube.server.fail_next("patch", count=2, status=500, resource="pods")
    old.stop(release_lease=False)  # a crash: nobody relabels it, the Lease expires
    eventually(lambda: new.is_leader() and _roles(fake_kube, [new_id])[new_id] == "leader",
               timeout=LEASE_S + 10, what="the new leader labelled after two failed patches")
    assert new.labeler is not None and new.labeler.failures >= 1
    assert _roles(fake_kube, [leader])[leader] == "leader"  # stale: only the pod's end clears it


def test_a_single_replica_without_election_labels_itself_leader(fake_kube) -> None:
    _own_pod(fake_kube, "solo")
    svc = ExtenderService(_config(fake_kube, "solo", election=False)).start()
    try:
        eventually(lambda: _roles(fake_kube, ["solo"])["solo"] == "leader", what="solo label")
    finally:
        svc.stop()
    assert _roles(fake_kube, ["solo"])["solo"] == "standby"
