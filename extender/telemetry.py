"""Telemetry subscriptions: one gRPC `Watch` stream per node agent.

All streams live on one asyncio loop in its own thread (grpc.aio), so a 5,000-node cluster costs
5,000 coroutines, not 5,000 threads, and a slow agent never blocks the HTTP verbs. Each stream
reconnects with capped exponential backoff and jitter; while it is down the node's telemetry
ages past the staleness bound and the decision core falls back to declared demand (DESIGN.md),
which `/debug/state` and the metrics show per node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc

from node_agent import telemetry_pb2, telemetry_pb2_grpc

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


class TelemetrySubscriber:
    """Keeps a Watch stream open to every agent endpoint the cluster state knows."""

    def __init__(
        self,
        state: ClusterState,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
    ) -> None:
        self._state = state
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
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
                    call = stub.Watch(telemetry_pb2.WatchRequest())
                    state.telemetry_connecting(node, endpoint)
                    async for snapshot in call:
                        state.apply_snapshot(node, snapshot)
                        backoff = self._backoff_initial
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
