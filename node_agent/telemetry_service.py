"""gRPC TelemetryService (node_agent/telemetry.proto): GetSnapshot and a server-streaming Watch.

The sampler hands each snapshot to a :class:`Broadcaster`, which converts it to protobuf once and
appends it to every subscriber's bounded queue, dropping the oldest entry when a subscriber is
behind. Publishing therefore never waits for a subscriber: a slow or stuck client loses old
snapshots (it only ever needs the newest) and the sampler keeps its cadence."""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Iterator
from concurrent import futures

import grpc

from node_agent import telemetry_pb2 as pb
from node_agent import telemetry_pb2_grpc as pb_grpc
from node_agent.readings import MetricReading, Snapshot, UnitReading

log = logging.getLogger("copack.agent.telemetry")


def _metric(m: MetricReading) -> pb.Metric:
    if m.value is None:
        return pb.Metric(present=False)
    return pb.Metric(
        present=True,
        value=m.value,
        ewma=m.ewma if m.ewma is not None else m.value,
        p95=m.p95 if m.p95 is not None else m.value,
    )


def unit_to_proto(u: UnitReading, pods: list[tuple[str, str, str]] | None = None) -> pb.UnitSample:
    return pb.UnitSample(
        uuid=u.uuid,
        parent_uuid=u.parent_uuid or "",
        gpu_index=u.gpu_index,
        mig_profile=u.mig_profile or "",
        gpu_instance_id=-1 if u.gpu_instance_id is None else u.gpu_instance_id,
        product=u.product,
        healthy=u.healthy,
        source=u.source if u.healthy else "",
        timestamp=u.timestamp,
        sm_active=_metric(u.sm_active),
        dram_bw_active=_metric(u.dram_bw_active),
        tensor_active=_metric(u.tensor_active),
        sm_occupancy=_metric(u.sm_occupancy),
        memory_used_bytes=u.memory_used_bytes,
        memory_total_bytes=u.memory_total_bytes,
        sm_count=u.sm_count,
        error=u.error,
        sm_share=u.sm_share,
        bandwidth_share=u.bandwidth_share,
        pods=[pb.PodRef(namespace=ns, pod=p, container=c) for ns, p, c in pods or ()],
    )


def snapshot_to_proto(
    snap: Snapshot, pods_by_unit: dict[str, list[tuple[str, str, str]]] | None = None
) -> pb.Snapshot:
    pods_by_unit = pods_by_unit or {}
    return pb.Snapshot(
        node=snap.node,
        timestamp=snap.timestamp,
        sequence=snap.sequence,
        interval_s=snap.interval_s,
        units=[unit_to_proto(u, pods_by_unit.get(u.uuid)) for u in snap.units],
        inventory_generation=snap.inventory_generation,
    )


class _Subscriber:
    __slots__ = ("closed", "cond", "dropped", "peer", "queue")

    def __init__(self, depth: int, peer: str) -> None:
        self.queue: deque[pb.Snapshot] = deque(maxlen=depth)
        self.cond = threading.Condition()
        self.closed = False
        self.dropped = 0
        self.peer = peer


class Broadcaster:
    """Fans snapshots out to Watch streams through bounded drop-oldest queues."""

    def __init__(self, queue_depth: int = 8) -> None:
        if queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        self.queue_depth = queue_depth
        self._subs: set[_Subscriber] = set()
        self._lock = threading.Lock()
        self._latest: pb.Snapshot | None = None
        self.dropped_total = 0
        self.published_total = 0

    @property
    def latest(self) -> pb.Snapshot | None:
        return self._latest

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def publish(self, msg: pb.Snapshot) -> None:
        self._latest = msg
        self.published_total += 1
        with self._lock:
            subs = list(self._subs)
        for s in subs:
            with s.cond:
                if len(s.queue) == s.queue.maxlen:
                    s.dropped += 1
                    self.dropped_total += 1
                s.queue.append(msg)
                s.cond.notify()

    def subscribe(self, peer: str = "") -> _Subscriber:
        s = _Subscriber(self.queue_depth, peer)
        if self._latest is not None:
            s.queue.append(self._latest)  # Watch starts with the current snapshot
        with self._lock:
            self._subs.add(s)
        return s

    def unsubscribe(self, s: _Subscriber) -> None:
        with self._lock:
            self._subs.discard(s)
        with s.cond:
            s.closed = True
            s.cond.notify_all()

    def close_all(self) -> None:
        with self._lock:
            subs = list(self._subs)
        for s in subs:
            self.unsubscribe(s)

    def stream(self, s: _Subscriber, is_active=lambda: True) -> Iterator[pb.Snapshot]:
        """Yield queued snapshots until the subscriber is closed or `is_active()` turns false."""
        try:
            while True:
                with s.cond:
                    while not s.queue and not s.closed:
                        s.cond.wait(timeout=1.0)
                        if not is_active():
                            return
                    if s.closed:
                        return
                    msg = s.queue.popleft()
                yield msg
        finally:
            self.unsubscribe(s)


def snapshot_key(snap: pb.Snapshot) -> tuple:
    """What of a snapshot must reach a subscriber at once: its layout and units' health."""
    return (snap.inventory_generation, tuple((u.uuid, u.healthy) for u in snap.units))


class ThinGate:
    """Lets one snapshot through per interval, and any whose layout or unit health differs
    from the last one let through: the subscriber must not place onto a unit that failed or
    a layout that changed while it waits for the next one. Shared by the agent's Watch (tick
    time) and the extender's subscriber (arrival time, for agents that send every tick)."""

    def __init__(self) -> None:
        self._last_t = -math.inf
        self._last_key: tuple | None = None

    def admit(self, snap: pb.Snapshot, t: float, interval_s: float) -> bool:
        """`snap`, at time `t`, goes through when at least `interval_s` passed since the last
        one that did (<= 0: every snapshot goes through)."""
        if interval_s <= 0:
            return True
        key = snapshot_key(snap)
        if key != self._last_key or t - self._last_t >= interval_s:
            self._last_t, self._last_key = t, key
            return True
        return False


def thin(snapshots: Iterator[pb.Snapshot], min_interval_s: float) -> Iterator[pb.Snapshot]:
    """At most one snapshot per `min_interval_s` of tick time (a quarter tick of slack, so a
    5 s interval at 1 s ticks is every fifth tick, not every sixth), layout and health
    changes at once (ThinGate)."""
    if min_interval_s <= 0:
        yield from snapshots
        return
    gate = ThinGate()
    for snap in snapshots:
        if gate.admit(snap, snap.timestamp, min_interval_s - 0.25 * snap.interval_s):
            yield snap


class TelemetryServicer(pb_grpc.TelemetryServiceServicer):
    def __init__(self, broadcaster: Broadcaster) -> None:
        self._b = broadcaster

    def GetSnapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext):
        msg = self._b.latest
        if msg is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the agent has not sampled yet")
        return msg

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext):
        min_interval = request.min_interval_s
        if not math.isfinite(min_interval) or min_interval < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"min_interval_s must be a finite number >= 0, not {min_interval!r}")
        sub = self._b.subscribe(context.peer())
        context.add_callback(lambda: self._b.unsubscribe(sub))
        yield from thin(self._b.stream(sub, context.is_active), min_interval)


class TelemetryServer:
    """A gRPC server for TelemetryService; each Watch holds one worker thread while it streams,
    so `max_watchers` bounds both threads and concurrent streams (extra ones are refused with
    RESOURCE_EXHAUSTED instead of queueing forever)."""

    def __init__(self, broadcaster: Broadcaster, address: str, max_watchers: int = 32) -> None:
        self.broadcaster = broadcaster
        workers = max_watchers + 4
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="copack-grpc"),
            maximum_concurrent_rpcs=workers,
            options=[("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_TelemetryServiceServicer_to_server(TelemetryServicer(broadcaster), self._server)
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen for gRPC on {address}: {e}") from None
        if self.port == 0 and not address.startswith("unix:") and not address.endswith(":0"):
            raise OSError(f"cannot listen for gRPC on {address}")
        self.address = address

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float = 1.0) -> None:
        self.broadcaster.close_all()
        self._server.stop(grace).wait(grace + 1)
