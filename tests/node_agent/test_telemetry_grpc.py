"""TelemetryService over real gRPC on loopback: values on the wire, Watch fan-out, slow readers."""

from __future__ import annotations

import threading

import grpc
import pytest

from node_agent import telemetry_pb2 as pb
from node_agent import telemetry_pb2_grpc as pb_grpc
from node_agent.telemetry_service import Broadcaster
from tests.fakes import nvml as fake
from tests.node_agent.conftest import snapshot_or_none, wait_until


def _stub(agent):
    ch = grpc.insecure_channel(f"127.0.0.1:{agent.grpc_port}")
    return ch, pb_grpc.TelemetryServiceStub(ch)


def test_gpm_values_on_the_wire_equal_the_scenario_per_gpu_and_mig_instance(nvml, make_agent):
    mig = fake.mig_layout("H100", 1, ["4g.40gb", "2g.20gb", "1g.10gb"])
    mig_values = [fake.gpm(61, 22, 47, 9), fake.gpm(12, 70, 3, 81), fake.gpm(100, 100, 100, 100)]
    for d, v in zip(mig, mig_values, strict=True):
        d["gpm"] = v
        d["memory_used"] = 3 * fake.GIB
    whole = fake.gpm(44, 31, 18, 27)
    h200 = fake.gpm(5, 6, 7, 8)
    nvml.write(fake.scenario([
        fake.gpu("H100", 0, gpm=whole, memory_used=7 * fake.GIB),
        fake.gpu("H100", 1, mig=mig),
        fake.gpu("H200", 2, gpm=h200),
        fake.gpu("L40S", 3, utilization=(64, 16)),
    ]))
    agent = make_agent()
    ch, stub = _stub(agent)
    with ch:
        def ready():
            s = snapshot_or_none(stub)
            if s is None or s.sequence < 3:
                return None
            return s if all(u.sm_active.present for u in s.units) else None

        snap = wait_until(ready, what="three ticks with values")
    assert snap.node == "node-a" and snap.interval_s == pytest.approx(0.1)
    units = {u.uuid: u for u in snap.units}
    expect = {fake.gpu_uuid(0): whole, fake.gpu_uuid(2): h200}
    expect.update({d["uuid"]: v for d, v in zip(mig, mig_values, strict=True)})
    for uuid, v in expect.items():
        u = units[uuid]
        assert u.healthy and u.source == "gpm", uuid
        assert u.sm_active.value == pytest.approx(v["sm_util"] / 100, abs=1e-9)
        assert u.sm_occupancy.value == pytest.approx(v["sm_occupancy"] / 100, abs=1e-9)
        assert u.tensor_active.value == pytest.approx(v["any_tensor_util"] / 100, abs=1e-9)
        assert u.dram_bw_active.value == pytest.approx(v["dram_bw_util"] / 100, abs=1e-9)
        # Constant input: the smoothed figures agree with the raw one.
        assert u.sm_active.ewma == pytest.approx(u.sm_active.value, abs=1e-9)
        assert u.sm_active.p95 == pytest.approx(u.sm_active.value, abs=1e-9)
    g0 = units[fake.gpu_uuid(0)]
    assert (g0.parent_uuid, g0.mig_profile, g0.gpu_instance_id) == ("", "", -1)
    assert g0.memory_used_bytes == 7 * fake.GIB and g0.sm_count == 132
    m0 = units[mig[0]["uuid"]]
    assert (m0.parent_uuid, m0.mig_profile, m0.gpu_instance_id, m0.gpu_index) == (
        fake.gpu_uuid(1), "4g.40gb", 1, 1)
    assert m0.sm_count == 64 and m0.bandwidth_share == 0.5
    assert m0.memory_used_bytes == 3 * fake.GIB
    coarse = units[fake.gpu_uuid(3)]
    assert coarse.source == "coarse"
    assert coarse.sm_active.value == pytest.approx(0.64)
    assert coarse.dram_bw_active.value == pytest.approx(0.16)
    assert not coarse.tensor_active.present and not coarse.sm_occupancy.present


def test_several_watchers_and_a_slow_one_never_stall_sampling(nvml, make_agent):
    # 8 GPUs x 7 MIG instances: ~15 kB per snapshot, so an unread stream fills gRPC's flow-control
    # window after a few ticks and the agent's own bounded queue has to drop.
    nvml.write(fake.scenario([
        fake.gpu("H100", i, mig=fake.mig_layout("H100", i, ["1g.10gb"] * 7)) for i in range(8)
    ]))
    agent = make_agent(watch_queue_depth=4)
    n_fast = 3
    fast_seqs: list[list[int]] = [[] for _ in range(n_fast)]
    stop = threading.Event()
    channels = []

    def watch(i: int) -> None:
        ch, stub = _stub(agent)
        channels.append(ch)
        try:
            for snap in stub.Watch(pb.WatchRequest()):
                fast_seqs[i].append(snap.sequence)
                if stop.is_set():
                    return
        except grpc.RpcError:
            return

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(n_fast)]
    for t in threads:
        t.start()
    # The slow subscriber opens its stream, reads one message, then stops reading. BDP probing
    # off keeps its HTTP/2 window at 64 kB (else gRPC buffers megabytes before pushing back).
    slow_ch = grpc.insecure_channel(f"127.0.0.1:{agent.grpc_port}",
                                    options=[("grpc.http2.bdp_probe", 0)])
    slow_stub = pb_grpc.TelemetryServiceStub(slow_ch)
    slow = slow_stub.Watch(pb.WatchRequest())
    first_slow = next(slow)
    wait_until(lambda: agent.broadcaster.subscribers == n_fast + 1, what="all subscribers")
    start_seq = agent.sampler.latest().sequence
    # While it does not read, the sampler keeps ticking and the fast ones keep receiving.
    wait_until(lambda: agent.sampler.latest().sequence >= start_seq + 30, timeout=30,
               what="30 more ticks with a stuck subscriber")
    wait_until(lambda: all(s and s[-1] >= start_seq + 30 for s in fast_seqs), what="fast watchers")
    for seqs in fast_seqs:
        # Fast subscribers see every tick after joining, in order, without gaps.
        tail = [q for q in seqs if q >= start_seq]
        assert tail == list(range(tail[0], tail[-1] + 1))
    assert agent.broadcaster.dropped_total > 0  # the slow one fell behind and lost old ones
    # When it reads again it catches up quickly: what the transport held, then the newest few.
    target = agent.sampler.latest().sequence
    got = []
    for snap in slow:
        got.append(snap.sequence)
        if snap.sequence >= target:
            break
    assert got == sorted(set(got))
    assert len(got) < target - first_slow.sequence  # not a full backlog: old ones were dropped
    stop.set()
    slow.cancel()
    slow_ch.close()
    for ch in channels:
        ch.close()
    wait_until(lambda: agent.broadcaster.subscribers == 0, what="subscribers to go away")


def test_watch_starts_with_the_current_snapshot(nvml, make_agent):
    agent = make_agent(sampler={"interval_s": 5.0})  # a slow cadence: the first reply is old
    wait_until(lambda: agent.broadcaster.latest is not None, what="the first tick")
    ch, stub = _stub(agent)
    with ch:
        it = stub.Watch(pb.WatchRequest())
        first = next(it)
        assert first.sequence == 1 and first.units[0].uuid == fake.gpu_uuid(0)
        it.cancel()


def test_get_snapshot_before_the_first_tick_is_unavailable():
    from node_agent.telemetry_service import TelemetryServer

    server = TelemetryServer(Broadcaster(), "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.TelemetryServiceStub(ch).GetSnapshot(pb.SnapshotRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_broadcaster_drops_oldest_for_a_full_queue():
    b = Broadcaster(queue_depth=3)
    sub = b.subscribe()
    for i in range(1, 11):
        b.publish(pb.Snapshot(sequence=i))
    assert [m.sequence for m in sub.queue] == [8, 9, 10]
    assert sub.dropped == 7 and b.dropped_total == 7
    b.unsubscribe(sub)
    assert list(b.stream(sub)) == []  # a closed subscriber's stream ends


def test_publish_does_not_wait_for_readers():
    b = Broadcaster(queue_depth=2)
    subs = [b.subscribe() for _ in range(50)]
    for i in range(200):  # nobody reads, yet every publish returns (no blocking put)
        b.publish(pb.Snapshot(sequence=i))
    assert all([m.sequence for m in s.queue] == [198, 199] for s in subs)


def _tick(seq: int, healthy: bool = True) -> pb.Snapshot:
    return pb.Snapshot(node="node-a", sequence=seq, timestamp=1000.0 + seq, interval_s=1.0,
                       units=[pb.UnitSample(uuid="GPU-0", healthy=healthy)])


def test_watch_thins_to_min_interval_but_sends_a_health_change_at_once():
    """A subscriber of thousands of agents asks for one snapshot per 3 s of 1 s ticks: it
    gets every third tick, and the tick where a unit turns unhealthy out of turn."""
    from node_agent.telemetry_service import TelemetryServer

    b = Broadcaster(queue_depth=32)
    b.publish(_tick(1))
    server = TelemetryServer(b, "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            it = pb_grpc.TelemetryServiceStub(ch).Watch(pb.WatchRequest(min_interval_s=3.0),
                                                        timeout=30)
            got = [next(it).sequence]
            wait_until(lambda: b.subscribers == 1, what="the watcher to subscribe")
            for seq in range(2, 11):
                b.publish(_tick(seq, healthy=seq < 6))
            b.publish(_tick(13, healthy=False))
            while got[-1] != 13:
                got.append(next(it).sequence)
            it.cancel()
    finally:
        server.stop()
    assert got == [1, 4, 6, 9, 13]


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_watch_refuses_a_bad_min_interval(bad):
    from node_agent.telemetry_service import TelemetryServer

    b = Broadcaster()
    b.publish(_tick(1))
    server = TelemetryServer(b, "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            it = pb_grpc.TelemetryServiceStub(ch).Watch(pb.WatchRequest(min_interval_s=bad),
                                                        timeout=10)
            with pytest.raises(grpc.RpcError) as e:
                next(it)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "min_interval_s" in e.value.details()
        assert b.subscribers == 0
    finally:
        server.stop()
