"""Inventory annotations through the official kubernetes client against the fake API server."""

from __future__ import annotations

import logging

from node_agent.inventory_publisher import InventoryPublisher, load_api_client
from policies.inventory import AGENT_ANNOTATION, INVENTORY_ANNOTATION, Inventory, InventoryUnit
from tests.fakes import nvml as fake
from tests.node_agent.conftest import wait_readings, wait_until


def _annotations(kube, node="node-a") -> dict[str, str]:
    return (kube.server.get("nodes", node) or {}).get("metadata", {}).get("annotations") or {}


def _patches(kube) -> int:
    return len([r for r in kube.server.requests_matching(verb="patch", resource="nodes")
                if 200 <= r.status < 300])


def test_inventory_is_patched_once_and_again_only_on_change(nvml, make_agent, fake_kube):
    fake_kube.server.add_node("node-a", annotations={"keep.me/too": "yes"})
    gpus = [fake.gpu("H100", 0, gpm=fake.gpm(sm=20)),
            fake.gpu("H100", 1, mig=fake.mig_layout("H100", 1, ["3g.40gb", "3g.40gb"]))]
    nvml.write(fake.scenario(gpus))
    agent = make_agent(publish_inventory=True, kubeconfig=str(fake_kube.kubeconfig),
                       advertise="10.1.2.3:50051")
    wait_until(lambda: INVENTORY_ANNOTATION in _annotations(fake_kube), what="the first patch")
    ann = _annotations(fake_kube)
    assert ann[AGENT_ANNOTATION] == "10.1.2.3:50051"
    assert ann["keep.me/too"] == "yes"  # a merge patch, not a replace
    inv = Inventory.from_annotation(ann[INVENTORY_ANNOTATION])
    assert [u.uuid for u in inv.units] == [fake.gpu_uuid(0), *[d["uuid"] for d in gpus[1]["mig"]
                                                               ["devices"]]]
    assert inv.units[0] == InventoryUnit(uuid=fake.gpu_uuid(0), index=0,
                                         product="NVIDIA H100 80GB HBM3", sm_count=132,
                                         memory_bytes=81559 * fake.MIB, healthy=True)
    mig0 = inv.units[1]
    assert (mig0.parent, mig0.mig_profile, mig0.sm_count, mig0.memory_bytes, mig0.index) == (
        fake.gpu_uuid(1), "3g.40gb", 60, 42412802048, 1)
    assert inv == agent.sampler.inventory()
    # Ticks with changing metric values do not patch again.
    seq = agent.sampler.latest().sequence
    gpus[0]["gpm"] = fake.gpm(sm=70)
    nvml.write(fake.scenario(gpus))
    wait_until(lambda: agent.sampler.latest().sequence > seq + 10, what="ten more ticks")
    assert _patches(fake_kube) == 1
    # A health change is a new inventory: one more patch, with only what changed.
    gpus[0]["lost"] = True
    nvml.write(fake.scenario(gpus))
    wait_until(lambda: _patches(fake_kube) == 2, what="the health patch")
    inv = Inventory.from_annotation(_annotations(fake_kube)[INVENTORY_ANNOTATION])
    assert [u.healthy for u in inv.units] == [False, True, True]
    last = [r for r in fake_kube.server.requests_matching(verb="patch", resource="nodes")][-1]
    assert INVENTORY_ANNOTATION in str(last.body)
    assert AGENT_ANNOTATION not in str(last.body)  # unchanged annotation not re-sent
    seq = agent.sampler.latest().sequence
    wait_until(lambda: agent.sampler.latest().sequence > seq + 5, what="five more ticks")
    assert _patches(fake_kube) == 2


def test_without_a_cluster_the_agent_serves_and_says_so_once(nvml, make_agent, caplog,
                                                             monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert load_api_client(None) is None
    with caplog.at_level(logging.WARNING, logger="copack.agent.inventory"):
        agent = make_agent(publish_inventory=True)
        wait_readings(agent.sampler)
        seq = agent.sampler.latest().sequence
        wait_until(lambda: agent.sampler.latest().sequence > seq + 3, what="more ticks")
    assert not agent.inventory.enabled
    msgs = [r.getMessage() for r in caplog.records if r.name == "copack.agent.inventory"]
    assert len(msgs) == 1 and "not patching" in msgs[0]


def test_publisher_retries_a_failing_api_server_and_a_missing_node(fake_kube):
    inv1 = Inventory(units=(InventoryUnit(uuid="GPU-a", index=0, product="NVIDIA H100 80GB HBM3",
                                          sm_count=132, memory_bytes=1),))
    inv2 = Inventory(units=(inv1.units[0].model_copy(update={"healthy": False}),))
    pub = InventoryPublisher("node-b", "h:1", fake_kube.api_client, retry_initial_s=0.05,
                             retry_max_s=0.2)
    pub.start()
    try:
        pub.submit(inv1)  # the node does not exist yet: 404, retried
        wait_until(lambda: pub.failures >= 2, what="failed attempts")
        fake_kube.server.fail_next("patch", count=2, status=500)
        fake_kube.server.add_node("node-b")
        pub.submit(inv2)  # newer inventory replaces the pending one
        wait_until(lambda: INVENTORY_ANNOTATION in _annotations(fake_kube, "node-b"),
                   what="the patch after the outage")
        got = Inventory.from_annotation(_annotations(fake_kube, "node-b")[INVENTORY_ANNOTATION])
        assert got == inv2
        assert _annotations(fake_kube, "node-b")[AGENT_ANNOTATION] == "h:1"
        assert pub.patches == 1
    finally:
        pub.stop()
