"""Telemetry subscriptions: one gRPC `Watch` stream per node agent.

All streams live on one asyncio loop in its own thread (grpc.aio), so a 5,000-node cluster costs
5,000 coroutines, not 5,000 threads, and a slow agent never blocks the HTTP verbs. Each stream
reconnects with capped exponential backoff and jitter; while it is down the node's telemetry
ages past the staleness bound and the decision core falls back to declared demand (DESIGN.md),
which `/debug/state` and the metrics show per node.

What the extender absorbs is bounded, not what the agents send: applying a snapshot costs
~0.1 ms of the one Python process that also answers the verbs, and 5,000 agents at 1 Hz would
take most of it. So each stream asks its agent for one snapshot per `interval()` (the agent
count over `snapshots_per_s`, capped at a third of the staleness bound so a node stays fresh),
and a snapshot that arrives sooner anyway (an older agent ignores the field) is dropped here,
unless its layout or a unit's health changed.

Snapshots are applied in batches, not one by one as they arrive: the latest of each node waits
in a `SnapshotBatch` and every `flush_s` (0.1 s) the batch is applied in chunks of
`FLUSH_CHUNK` nodes, one state-lock hold each. The decisions' row cache re-scores the rows
changed since its last answer, and most of that cost is per re-scoring, not per row: rows
changing in a few clumps a second instead of a thousand times cost the verbs ~10x less, for
at most `flush_s` more delay on numbers that are seconds apart anyway. A chunk holds the lock
~1 ms, so a verb waits at most that long behind one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc

from node_agent import telemetry_pb2, telemetry_pb2_grpc
from node_agent.telemetry_service import ThinGate

if TYPE_CHECKING:
    from extender.state import ClusterState

log = logging.getLogger("copack.extender.telemetry")

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]


FLUSH_S = 0.1  # how often the batch of pending snapshots is applied
FLUSH_CHUNK = 16  # nodes applied per state-lock hold (~56 us each)


class SnapshotBatch:
    """The newest snapshot of each node since the last `take` (older ones are superseded:
    a node's snapshot carries its whole state). Not thread-safe: one thread offers and takes
    (the subscriber's event loop)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def offer(self, node: str, snapshot: Any) -> None:
        self._pending.pop(node, None)  # re-inserted at the end: nodes flush in arrival order
        self._pending[node] = snapshot

    def take(self, chunk: int = FLUSH_CHUNK) -> list[list[tuple[str, Any]]]:
        items = list(self._pending.items())
        self._pending = {}
        return [items[i : i + chunk] for i in range(0, len(items), chunk)]


class TelemetrySubscriber:
    """Keeps a Watch stream open to every agent endpoint the cluster state knows."""

    def __init__(
        self,
        state: ClusterState,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        snapshots_per_s: float = 0.0,
        flush_s: float = FLUSH_S,
    ) -> None:
        self._state = state
        self._per_s = snapshots_per_s
        self._flush_s = flush_s
        self._batch = SnapshotBatch()
        self._flusher: asyncio.Task[None] | None = None
        self.dropped = 0  # snapshots that came sooner than asked for and were not applied
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._ready = threading.Event()

    def start(self) -> TelemetrySubscriber:
        self._thread = threading.Thread(target=self._run, name="copack-telemetry", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self._state.add_agent_listener(self.reconcile)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._flusher = loop.create_task(self._flush_forever())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        self._state.remove_agent_listener(self.reconcile)
        loop = self._loop
        if loop is None or not loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(self._cancel_all(), loop)
        with contextlib.suppress(Exception):
            fut.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _cancel_all(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        if self._flusher is not None:
            tasks.append(self._flusher)
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            for chunk in self._batch.take():
                # a node unsubscribed meanwhile (removed, agent moved) gets nothing
                live = [(n, snap) for n, snap in chunk if n in self._tasks]
                for node, reason in self._state.apply_snapshots(live) if live else ():
                    log.warning("telemetry from %s not applied: %s", node, reason)
                await asyncio.sleep(0)  # the verbs get the lock between chunks

    def interval(self) -> float:
        """Seconds between two snapshots of one agent that keep the total within budget."""
        if self._per_s <= 0:
            return 0.0
        return min(len(self._tasks) / self._per_s, self._state.policy.stale_after_s / 3.0)

    def reconcile(self, endpoints: Mapping[str, str]) -> None:
        """Thread-safe: make the set of streams match {node: "host:port"}."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        snapshot = dict(endpoints)
        loop.call_soon_threadsafe(self._reconcile, snapshot)

    def _reconcile(self, endpoints: dict[str, str]) -> None:
        assert self._loop is not None
        for node, (endpoint, task) in list(self._tasks.items()):
            if endpoints.get(node) != endpoint or task.done():
                task.cancel()
                del self._tasks[node]
        for node, endpoint in endpoints.items():
            if node not in self._tasks:
                task = self._loop.create_task(self._follow(node, endpoint))
                self._tasks[node] = (endpoint, task)

    async def _follow(self, node: str, endpoint: str) -> None:
        backoff = self._backoff_initial
        state = self._state
        while True:
            try:
                async with grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS) as ch:
                    stub = telemetry_pb2_grpc.TelemetryServiceStub(ch)
                    call = stub.Watch(telemetry_pb2.WatchRequest(min_interval_s=self.interval()))
                    state.telemetry_connecting(node, endpoint)
                    gate = ThinGate()
                    async for snapshot in call:
                        backoff = self._backoff_initial
                        # 0.8: an agent that honours the interval is never cut by jitter
                        if gate.admit(snapshot, time.monotonic(), 0.8 * self.interval()):
                            self._batch.offer(node, snapshot)
                        else:
                            self.dropped += 1
                    state.telemetry_disconnected(node, "the agent ended the stream",
                                                 endpoint=endpoint)
            except asyncio.CancelledError:
                state.telemetry_disconnected(node, "unsubscribed", forget=True, endpoint=endpoint)
                raise
            except grpc.aio.AioRpcError as e:
                state.telemetry_disconnected(node, f"{e.code().name}: {e.details()}",
                                             endpoint=endpoint)
            except Exception as e:  # a bad snapshot must not end the subscription
                log.warning("telemetry from %s (%s): %r", node, endpoint, e)
                state.telemetry_disconnected(node, f"{type(e).__name__}: {e}", endpoint=endpoint)
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(self._backoff_max, backoff * 2)
