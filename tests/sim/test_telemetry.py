"""The simulated agents' Snapshots, as the real extender state takes them."""

from __future__ import annotations

import numpy as np
import pytest

from extender.state import ClusterState
from sim.cluster import build_cluster
from sim.engine import StepActivity
from sim.scenario import parse_scenario
from sim.telemetry import IDLE_EVERY, TelemetryAgent
from tests.sim.conftest import small_raw

T0 = 1_767_225_600.0


def test_snapshots_carry_every_unit_and_the_extender_reads_them():
    scn = parse_scenario(small_raw(), "small")
    cl = build_cluster(scn.cluster)
    n = len(cl.units)
    agent = TelemetryAgent(cl, interval_s=5.0, step_s=0.5)
    tensor = np.linspace(0.0, 0.9, n)
    dram = np.linspace(0.9, 0.0, n)
    for _ in range(10):
        agent.record(StepActivity(tensor, dram, np.maximum(tensor, dram), 0.0, 0.0))
    assert agent.due(5.0) and not agent.due(4.0)
    unit_pods = np.ones(n, np.int64)
    mem = np.full(n, 10 * 2**30, float)
    state = ClusterState(now=lambda: T0 + 5.0)
    for node in cl.nodes:
        state.upsert_node(node)
    state.mark_synced()
    snaps = list(agent.snapshots(T0 + 5.0, unit_pods, mem, []))
    assert {s.node for _, s in snaps} == {n["metadata"]["name"] for n in cl.nodes}
    for node, snap in snaps:
        state.apply_snapshot(node, snap)
        t = state.telemetry[node]
        assert t.units == len(snap.units) and t.unknown_units == 0 and t.state == "streaming"
        for u in snap.units:
            assert u.source == "gpm" and u.healthy and u.tensor_active.present
            assert u.memory_used_bytes == 10 * 2**30
            mig = u.mig_profile != ""
            assert (u.parent_uuid != "") == mig and (u.gpu_instance_id >= 0) == mig
            assert 0 < u.sm_share <= 1 and 0 < u.bandwidth_share <= 1
    i = n - 1
    u = cl.units[i]
    got = next(x for _, s in snaps for x in s.units if x.uuid == u.uuid)
    assert got.tensor_active.value == tensor[i] and got.tensor_active.p95 == tensor[i]
    assert got.tensor_active.ewma == pytest.approx(0.6 * tensor[i])  # first tick from zero
    first = next(x for _, s in snaps for x in s.units if x.uuid == cl.units[0].uuid)
    assert first.dram_bw_active.value == dram[0] and first.tensor_active.value == 0.0


def test_idle_nodes_report_less_often():
    scn = parse_scenario(small_raw(), "small")
    cl = build_cluster(scn.cluster)
    n = len(cl.units)
    agent = TelemetryAgent(cl, interval_s=5.0, step_s=5.0)
    busy = np.zeros(n, np.int64)
    busy[0] = 1  # only the first node has a pod
    counts: dict[str, int] = {}
    z = np.zeros(n)
    for _ in range(3 * IDLE_EVERY):
        agent.record(StepActivity(z, z, z, 0.0, 0.0))
        for node, _ in agent.snapshots(T0, busy, z, []):
            counts[node] = counts.get(node, 0) + 1
    assert counts[cl.units[0].node] == 3 * IDLE_EVERY
    idle = [nd["metadata"]["name"] for nd in cl.nodes if nd["metadata"]["name"] != cl.units[0].node]
    assert all(counts.get(x, 0) == 3 for x in idle)
