"""Leader election (extender/leader.py) against the fake API server's coordination.k8s.io/v1
Leases through the official client: acquire, renew, a rival kept out until the Lease expires
on its own clock, steal after expiry, conflicts, release, losing the lease when renewals fail;
the binder refusing to bind without the lease; the config section's validation."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from extender.binder import KubeBinder, NotLeader
from extender.config import ConfigError, validate_config
from extender.leader import LeaderElector, micro_time
from tests.fakes.kube_fixtures import FakeKube
from tests.fakes.kube_objects import copack_pod

NS = "copack-system"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _elector(kube: FakeKube, identity: str, clock: Clock, **kw: float) -> LeaderElector:
    return LeaderElector(kube.api_client, name="copack-extender", namespace=NS,
                         identity=identity, lease_duration_s=kw.get("duration", 15.0),
                         renew_deadline_s=kw.get("deadline", 10.0),
                         retry_period_s=kw.get("retry", 2.0), clock=clock)


def _lease(kube: FakeKube) -> dict:
    obj = kube.server.get("leases", "copack-extender", NS)
    assert obj is not None
    return obj


def test_acquire_renew_and_rival_waits_for_expiry(fake_kube: FakeKube) -> None:
    clock = Clock()
    a, b = _elector(fake_kube, "a", clock), _elector(fake_kube, "b", clock)
    assert a.try_acquire_or_renew() and a.holds_lease() and a.term == 1
    spec = _lease(fake_kube)["spec"]
    assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == 0 and spec["acquireTime"] and spec["renewTime"]

    assert not b.try_acquire_or_renew()  # held, and b has just seen it
    assert b.leader() == "a" and not b.holds_lease()

    clock.t += 5
    first_renew = _lease(fake_kube)["spec"]["renewTime"]
    assert a.try_acquire_or_renew() and a.term == 1  # a renewal, not a new term
    spec = _lease(fake_kube)["spec"]
    assert spec["renewTime"] != first_renew and spec["leaseTransitions"] == 0

    # b saw the record change at t=1005: it waits 15 s from *that*, on its own clock
    clock.t += 1
    assert not b.try_acquire_or_renew()
    clock.t += 14.5
    assert not b.try_acquire_or_renew()  # 15.5 s since a's 2nd renew, but b saw it at 1006


def test_steal_after_expiry_and_the_old_leader_has_stopped_before(fake_kube: FakeKube) -> None:
    clock = Clock()
    a, b = _elector(fake_kube, "a", clock), _elector(fake_kube, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.t += 10  # a did not renew for its renew deadline: it stops leading at once
    assert not a.holds_lease() and a.lease_left() == 0.0
    clock.t += 5  # lease duration after b observed it: b takes it
    assert b.try_acquire_or_renew() and b.holds_lease()
    spec = _lease(fake_kube)["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    # a, coming back, sees b's fresh record and stays out
    assert not a.try_acquire_or_renew()
    assert a.leader() == "b"


def test_a_leader_that_reads_another_holder_stops_at_once(fake_kube: FakeKube) -> None:
    clock = Clock()
    a = _elector(fake_kube, "a", clock)
    assert a.try_acquire_or_renew() and a.holds_lease()
    fake_kube.server.patch("leases", "copack-extender", {"spec": {"holderIdentity": "b"}},
                           NS, patch_type="merge")
    assert not a.try_acquire_or_renew()
    assert not a.holds_lease() and a.leader() == "b"


def test_lease_left_caps_a_bind_before_a_rival_can_hold_it(fake_kube: FakeKube) -> None:
    clock = Clock()
    a = _elector(fake_kube, "a", clock)
    assert a.try_acquire_or_renew()
    assert a.lease_left() == pytest.approx(14.0)  # 15 s lease - 1 s margin
    clock.t += 9.5
    assert a.holds_lease() and a.lease_left() == pytest.approx(4.5)
    clock.t += 0.5
    assert not a.holds_lease() and a.lease_left() == 0.0


def test_conflicting_writes_lose_the_round(fake_kube: FakeKube) -> None:
    clock = Clock()
    a = _elector(fake_kube, "a", clock)
    assert a.try_acquire_or_renew()
    coord = k8s.CoordinationV1Api(fake_kube.api_client)
    lease = coord.read_namespaced_lease("copack-extender", NS)
    stale_rv = lease.metadata.resource_version
    clock.t += 1
    assert a.try_acquire_or_renew()  # bumps the resourceVersion
    lease.spec.holder_identity = "intruder"
    lease.spec.renew_time = micro_time()
    with pytest.raises(ApiException) as e:
        coord.replace_namespaced_lease("copack-extender", NS, lease)
    assert e.value.status == 409 and stale_rv != _lease(fake_kube)["metadata"]["resourceVersion"]
    # the elector's own read-then-replace loses to a write in between (409 -> False)
    b = _elector(fake_kube, "b", clock)
    fake_kube.server.delete("leases", "copack-extender", NS)
    fake_kube.server.create("leases", {"metadata": {"name": "copack-extender"}, "spec": {
        "holderIdentity": "c", "leaseDurationSeconds": 15}}, NS)
    fake_kube.server.fail_next("update", 1, 409, resource="leases", reason="Conflict")
    clock.t += 100
    assert not b.try_acquire_or_renew()  # first sight of c's record: wait the duration
    clock.t += 15
    assert not b.try_acquire_or_renew()  # expired, but the replace meets a 409
    assert fake_kube.server.requests_matching(verb="update", resource="leases")[-1].status == 409
    assert b.try_acquire_or_renew() and _lease(fake_kube)["spec"]["holderIdentity"] == "b"


def test_create_race_and_release(fake_kube: FakeKube) -> None:
    clock = Clock()
    a, b = _elector(fake_kube, "a", clock), _elector(fake_kube, "b", clock)
    fake_kube.server.fail_next("create", 1, 409, resource="leases", reason="AlreadyExists")
    assert not a.try_acquire_or_renew()
    assert b.try_acquire_or_renew()
    b.stop(release=True)
    spec = _lease(fake_kube)["spec"]
    assert not spec.get("holderIdentity") and spec["leaseDurationSeconds"] == 1
    assert a.try_acquire_or_renew()  # a released lease is taken at once


def test_renewals_failing_past_the_deadline_lose_leadership(fake_kube: FakeKube) -> None:
    import time

    a = LeaderElector(fake_kube.api_client, name="copack-extender", namespace=NS,
                      identity="a", lease_duration_s=1.5, renew_deadline_s=1.0,
                      retry_period_s=0.1)
    stopped: list[bool] = []
    a._on_stopped = lambda: stopped.append(True)
    a.start()
    try:
        deadline = time.monotonic() + 5
        while not a.holds_lease():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        fake_kube.server.fail_next("get", 1000, 503, resource="leases")
        t0 = time.monotonic()
        while a.holds_lease():
            assert time.monotonic() - t0 < 1.5, "still leader past the renew deadline"
            time.sleep(0.01)
        assert 0.7 < time.monotonic() - t0 <= 1.2
        deadline = time.monotonic() + 2
        while not stopped:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        fake_kube.server.clear_faults()
        a.stop()


def test_binder_refuses_without_the_lease_and_sends_nothing(fake_kube: FakeKube) -> None:
    pod = fake_kube.server.add_pod(copack_pod("p0"))
    left = [0.0]
    binder = KubeBinder(fake_kube.api_client, lease_left=lambda: left[0])
    fake_kube.server.clear_requests()
    with pytest.raises(NotLeader, match="no longer holds the leader lease"):
        binder.bind("default", "p0", pod["metadata"]["uid"], "n0", {})
    assert fake_kube.server.requests_matching(subresource="binding") == []
    left[0] = 3.0
    binder.bind("default", "p0", pod["metadata"]["uid"], "n0", {})
    assert fake_kube.server.get("pods", "p0", "default")["spec"]["nodeName"] == "n0"


def test_fake_refuses_lease_times_a_real_server_cannot_parse(fake_kube: FakeKube) -> None:
    coord = k8s.CoordinationV1Api(fake_kube.api_client)
    body = k8s.V1Lease(metadata=k8s.V1ObjectMeta(name="x"),
                       spec=k8s.V1LeaseSpec(holder_identity="a", lease_duration_seconds=5,
                                            renew_time=micro_time().replace(microsecond=0)))
    with pytest.raises(ApiException) as e:
        coord.create_namespaced_lease(NS, body)
    assert e.value.status == 400
    assert body.spec is not None
    body.spec.renew_time = micro_time().replace(microsecond=0)
    body.spec.renew_time = micro_time(body.spec.renew_time)
    created = coord.create_namespaced_lease(NS, body)
    assert created.spec.holder_identity == "a"
    patched = coord.patch_namespaced_lease("x", NS, {"spec": {"holderIdentity": "b"}})
    assert patched.spec.holder_identity == "b"
    assert [i.metadata.name for i in coord.list_namespaced_lease(NS).items] == ["x"]


@pytest.mark.parametrize(("section", "message"), [
    ({"renew_deadline_s": 20}, "renew_deadline_s (20.0) must be less than lease_duration_s"),
    ({"retry_period_s": 10}, "retry_period_s (10.0) must be less than renew_deadline_s"),
    ({"lease_name": "Not_A_Name"}, "leader_election.lease_name: 'Not_A_Name' is not a valid"),
    ({"identity": " "}, "leader_election.identity: must not be empty"),
    ({"lease_duration_s": 0}, "leader_election.lease_duration_s: Input should be greater"),
    ({"bogus": 1}, "leader_election.bogus: unknown key"),
])
def test_config_section_is_validated(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config({"leader_election": section})


def test_identity_defaults_to_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = validate_config({"leader_election": {"enabled": True}})
    monkeypatch.setenv("POD_NAME", "copack-extender-abc")
    assert cfg.leader_election.resolved_identity() == "copack-extender-abc"
    monkeypatch.delenv("POD_NAME")
    assert cfg.leader_election.resolved_identity()


def test_serve_flags_reach_the_section_and_bad_ones_are_refused() -> None:
    from typer.testing import CliRunner

    from copack.cli import app as copack_app

    runner = CliRunner()
    r = runner.invoke(copack_app, ["extender", "serve", "--leader-elect",
                                   "--lease-name", "Bad_Name"])
    assert r.exit_code == 2, r.output
    assert "leader_election.lease_name: 'Bad_Name' is not a valid" in r.output
    assert "Traceback" not in r.output
    cfg = validate_config({}).with_overrides({
        "leader_election.enabled": True, "leader_election.lease_namespace": "ops",
        "leader_election.identity": "me", "leader_election.lease_name": None,
    })
    le = cfg.leader_election
    assert (le.enabled, le.lease_namespace, le.identity, le.lease_name) == (
        True, "ops", "me", "copack-extender")
