"""Telemetry from a test gRPC agent (real grpc, loopback) into decisions: fresh samples count,
stale ones fall back to declared demand (and say so), streams reconnect and follow the node's
agent annotation."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from extender.app import create_app
from extender.config import ExtenderConfig
from extender.state import ClusterState
from extender.telemetry import TelemetrySubscriber
from node_agent import telemetry_pb2 as pb
from node_agent import telemetry_pb2_grpc as pb_grpc
from policies.config import PolicyConfig
from tests.extender.conftest import Clock, serve_app
from tests.fakes.kube_objects import copack_pod, extender_args, gpu_node, gpu_units
from tests.fakes.polling import eventually as wait_for

GI = 1024**3


class FakeAgent(pb_grpc.TelemetryServiceServicer):
    """A node agent's gRPC face: the test pushes snapshots into the stream."""

    def __init__(self, port: int = 0) -> None:
        self.snapshots: queue.Queue[pb.Snapshot] = queue.Queue()
        self.streams = 0
        self.asked_intervals: list[float] = []  # what each Watch asked for (this agent ignores it)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_TelemetryServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def Watch(self, request, context):
        self.asked_intervals.append(request.min_interval_s)
        self.streams += 1
        while context.is_active():
            try:
                yield self.snapshots.get(timeout=0.05)
            except queue.Empty:
                continue

    def stop(self) -> None:
        self.server.stop(0).wait(5)


def snapshot(node: str, seq: int, units: dict[str, dict], t: float = 1_800_000_000.0):
    out = pb.Snapshot(node=node, timestamp=t, sequence=seq, interval_s=1.0)
    for uuid, v in units.items():
        u = out.units.add(uuid=uuid, product="NVIDIA H100 80GB HBM3",
                          healthy=v.get("healthy", True), source="gpm",
                          timestamp=t - v.get("lag", 0.0),
                          memory_used_bytes=int(v.get("mem", 0)), memory_total_bytes=80 * GI)
        u.sm_active.CopyFrom(pb.Metric(present=True, value=v.get("sm", 0.0), ewma=v.get("sm", 0.0)))
        u.tensor_active.CopyFrom(pb.Metric(present=True, value=v.get("tensor", 0.0),
                                           ewma=v.get("tensor", 0.0)))
        u.dram_bw_active.CopyFrom(pb.Metric(present=True, value=v.get("bw", 0.0),
                                            ewma=v.get("bw", 0.0)))
    return out


@pytest.fixture
def setup(api) -> Iterator[tuple]:
    clock = Clock()
    state = ClusterState(PolicyConfig(stale_after_s=15.0), now=clock)
    state.mark_synced()
    agents: list[FakeAgent] = []
    agent = FakeAgent()
    agents.append(agent)
    state.upsert_node(api.node(gpu_node("n0", gpu_units("n0", 1), agent=agent.endpoint)))
    sub = TelemetrySubscriber(state, backoff_initial_s=0.05, backoff_max_s=0.2).start()
    url, stop = serve_app(create_app(state, ExtenderConfig(), None))
    import httpx

    client = httpx.Client(base_url=url, timeout=10)
    yield state, clock, agent, agents, client
    client.close()
    stop()
    sub.stop()
    for a in agents:
        a.stop()


def _filter(client, api, name: str) -> dict:
    import orjson

    pod = api.pod(copack_pod(name, role="prefill", demand="sm=0.3,bw=0.1,mem=10Gi"))
    return client.post("/filter", content=orjson.dumps(extender_args(pod, ["n0"]))).json()


def test_fresh_stale_and_reconnect(setup, api) -> None:
    state, clock, agent, agents, client = setup
    wait_for(lambda: agent.streams == 1, what="subscription")
    # fresh: the unit's tensor pipes are 90 % busy, a 30 % SM prefill does not fit
    agent.snapshots.put(snapshot("n0", 1, {"GPU-n0-0": {"sm": 0.95, "tensor": 0.9, "bw": 0.2,
                                                        "mem": 10 * GI}}))
    wait_for(lambda: state.telemetry.get("n0") and state.telemetry["n0"].snapshots == 1,
             what="first snapshot")
    body = _filter(client, api, "a")
    assert body["NodeNames"] == []
    assert "over SM capacity" in body["FailedNodes"]["n0"]
    assert "stale" not in body["FailedNodes"]["n0"]
    dbg = client.get("/debug/state").json()["nodes"]["n0"]
    assert dbg["telemetry"]["state"] == "streaming" and dbg["telemetry"]["stale"] is False
    load = dbg["units"][0]["load"]
    assert load["sm"] == pytest.approx(0.9) and load["compute_source"] == "tensor"
    metrics = client.get("/metrics").text
    assert 'copack_extender_telemetry_stale{node="n0"} 0.0' in metrics
    assert 'copack_extender_units{state="fresh"} 1.0' in metrics

    # stale: the agent goes quiet past the bound; judged on declared demand (none) -> fits
    clock.t += 20.0
    body = _filter(client, api, "b")
    assert body["NodeNames"] == ["n0"]
    dbg = client.get("/debug/state").json()["nodes"]["n0"]
    assert dbg["telemetry"]["stale"] is True and dbg["telemetry"]["age_s"] == pytest.approx(20.0)
    assert dbg["units"][0]["load"]["stale"] is True
    metrics = client.get("/metrics").text
    assert 'copack_extender_telemetry_stale{node="n0"} 1.0' in metrics
    assert 'copack_extender_telemetry_age_seconds{node="n0"} 20.0' in metrics
    assert 'copack_extender_units{state="stale"} 1.0' in metrics

    # the agent restarts on the same port: the stream comes back by itself
    port = agent.port
    agent.stop()
    wait_for(lambda: state.telemetry["n0"].state == "down", what="stream down")
    again = FakeAgent(port)
    agents.append(again)
    wait_for(lambda: again.streams >= 1, what="resubscription")
    again.snapshots.put(snapshot("n0", 1, {"GPU-n0-0": {"sm": 0.95, "tensor": 0.9, "bw": 0.2}}))
    wait_for(lambda: state.telemetry["n0"].state == "streaming", what="streaming again")
    assert "over SM capacity" in _filter(client, api, "c")["FailedNodes"]["n0"]
    assert state.telemetry["n0"].reconnects >= 1
    assert 'copack_extender_telemetry_reconnects_total{node="n0"}' in client.get("/metrics").text


def test_follows_agent_annotation_and_unhealthy_units(setup, api) -> None:
    state, _clock, agent, agents, client = setup
    wait_for(lambda: agent.streams == 1, what="subscription")
    moved = FakeAgent()
    agents.append(moved)
    state.upsert_node(api.annotate_node("n0", {"copack.io/agent": moved.endpoint}))
    wait_for(lambda: moved.streams == 1, what="subscription to the new endpoint")
    moved.snapshots.put(snapshot("n0", 1, {"GPU-n0-0": {"healthy": False}}))
    wait_for(lambda: state.telemetry["n0"].snapshots == 1, what="snapshot")
    body = _filter(client, api, "a")
    assert "1 unhealthy" in body["FailedNodes"]["n0"]
    assert 'copack_extender_units{state="unhealthy"} 1.0' in client.get("/metrics").text
    # a bad endpoint annotation is reported, not crashed on
    state.upsert_node(api.annotate_node("n0", {"copack.io/agent": "not-an-endpoint"}))
    dbg = client.get("/debug/state").json()["nodes"]["n0"]
    assert "is not host:port" in dbg["agent_error"]


def test_sample_age_is_the_units_lag_behind_its_tick(api) -> None:
    clock = Clock()
    state = ClusterState(PolicyConfig(stale_after_s=15.0), now=clock)
    state.upsert_node(api.node(gpu_node("n0", gpu_units("n0", 2))))
    # the agent's clock is a day off; GPU-n0-1 was last read 30 s before the tick
    snap = snapshot("n0", 7, {"GPU-n0-0": {"tensor": 0.5}, "GPU-n0-1": {"tensor": 0.5, "lag": 30}},
                    t=clock.t + 86_400)
    state.apply_snapshot("n0", snap)
    fresh = state.view.unit_load("GPU-n0-0", clock.t, 15.0)
    lagging = state.view.unit_load("GPU-n0-1", clock.t, 15.0)
    assert fresh["stale"] is False and fresh["sm"] == pytest.approx(0.5)
    assert lagging["stale"] is True


def test_a_budget_thins_what_an_agent_sends_but_not_a_health_change(api) -> None:
    """One agent and a budget of 0.5 snapshots/s: the stream asks for one per 2 s; an agent
    that sends every tick anyway has the early ones dropped, except the one where a unit
    turns unhealthy."""
    clock = Clock()
    state = ClusterState(PolicyConfig(stale_after_s=15.0), now=clock)
    state.mark_synced()
    agent = FakeAgent()
    state.upsert_node(api.node(gpu_node("n0", gpu_units("n0", 1), agent=agent.endpoint)))
    sub = TelemetrySubscriber(state, backoff_initial_s=0.05, snapshots_per_s=0.5).start()
    try:
        wait_for(lambda: agent.streams == 1, what="subscription")
        assert agent.asked_intervals == [2.0]
        for seq in range(1, 11):
            agent.snapshots.put(snapshot("n0", seq, {"GPU-n0-0": {"tensor": 0.1 * seq}}))
        wait_for(lambda: sub.dropped == 9, what="nine early snapshots dropped")
        wait_for(lambda: state.telemetry.get("n0") and state.telemetry["n0"].snapshots == 1,
                 what="the first snapshot applied")
        assert state.view.unit_load("GPU-n0-0", clock.t, 15.0)["sm"] == pytest.approx(0.1)
        agent.snapshots.put(snapshot("n0", 11, {"GPU-n0-0": {"healthy": False}}))
        wait_for(lambda: state.telemetry["n0"].snapshots == 2, what="the health change")
        assert sub.dropped == 9
    finally:
        sub.stop()
        agent.stop()


def test_a_batch_keeps_each_nodes_newest_snapshot_and_chunks_in_arrival_order() -> None:
    from extender.telemetry import SnapshotBatch

    b = SnapshotBatch()
    for seq, node in enumerate(["a", "b", "a", "c", "d", "e"]):
        b.offer(node, seq)
    assert len(b) == 5
    assert b.take(chunk=2) == [[("b", 1), ("a", 2)], [("c", 3), ("d", 4)], [("e", 5)]]
    assert len(b) == 0 and b.take() == []


def test_a_snapshot_that_cannot_be_applied_does_not_stop_the_batch(api) -> None:
    clock = Clock()
    state = ClusterState(PolicyConfig(stale_after_s=15.0), now=clock)
    for n in ("n0", "n1", "n2"):
        state.upsert_node(api.node(gpu_node(n, gpu_units(n, 1))))
    state.apply_snapshot("n1", snapshot("n1", 1, {"GPU-n1-0": {"tensor": 0.2}}))
    seen = state.telemetry["n1"].last_seen
    clock.t += 5.0
    failed = state.apply_snapshots([
        ("n0", snapshot("n0", 1, {"GPU-n0-0": {"tensor": 0.4}})),
        ("n1", object()),  # not a Snapshot
        ("n2", snapshot("n2", 1, {"GPU-n2-0": {"tensor": 0.6}})),
    ])
    assert [n for n, _ in failed] == ["n1"] and "AttributeError" in failed[0][1]
    assert state.telemetry["n1"].last_error == failed[0][1]
    assert state.telemetry["n1"].last_seen == seen  # the bad one left the node as it was
    for n, v in (("n0", 0.4), ("n1", 0.2), ("n2", 0.6)):
        assert state.view.unit_load(f"GPU-{n}-0", clock.t, 15.0)["sm"] == pytest.approx(v)
