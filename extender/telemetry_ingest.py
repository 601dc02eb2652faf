"""Telemetry into the cluster state: the node agents' Snapshots become unit health and load
samples in the `ClusterView`, and each stream's state is kept for the metrics and
/debug/state (the subscriber, telemetry.py, is the producer of these calls).

Split out of state.py to keep it readable; `TelemetryIngestMixin` is only ever used as a base
of `ClusterState`, which provides the attributes declared below. `apply_snapshot` and
`stale_nodes` are on the hot path and benchmarked: their code is unchanged from state.py."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from extender.state_records import NodeInfo, NodeTelemetry
from policies.cluster_view import ClusterView
from policies.config import PolicyConfig


class TelemetryIngestMixin:
    """Telemetry application of `ClusterState` (see the module docstring)."""

    # provided by ClusterState.__init__
    policy: PolicyConfig
    now: Callable[[], float]
    statistic: str
    lock: Any  # threading.RLock
    view: ClusterView
    nodes: dict[str, NodeInfo]
    _stale_cache: tuple[float, frozenset[str]]
    telemetry: dict[str, NodeTelemetry]
    counters: Counter[tuple[str, str]]

    # -- telemetry ----------------------------------------------------------------------------

    def telemetry_connecting(self, node: str, endpoint: str) -> None:
        with self.lock:
            t = self.telemetry.get(node)
            if t is None or t.endpoint != endpoint:
                t = self.telemetry[node] = NodeTelemetry(endpoint)
            t.state = "connecting"

    def telemetry_disconnected(
        self, node: str, reason: str, forget: bool = False, endpoint: str | None = None
    ) -> None:
        with self.lock:
            t = self.telemetry.get(node)
            if t is None or (endpoint is not None and t.endpoint != endpoint):
                return  # a stream to an endpoint the node no longer names
            if forget:
                del self.telemetry[node]
                return
            t.state = "down"
            t.last_error = reason
            t.reconnects += 1
            self.counters[("telemetry_reconnects", node)] += 1

    def apply_snapshots(self, items: list[tuple[str, Any]]) -> list[tuple[str, str]]:
        """Several nodes' snapshots under one lock hold (a telemetry batch). One that cannot
        be applied is returned as (node, reason) and kept as the node's last error; the others
        still land."""
        failed = []
        with self.lock:
            for node, snapshot in items:
                try:
                    self.apply_snapshot(node, snapshot)
                except Exception as e:
                    reason = f"{type(e).__name__}: {e}"
                    if (t := self.telemetry.get(node)) is not None:
                        t.last_error = reason
                    failed.append((node, reason))
        return failed

    def apply_snapshot(self, node_name: str, snapshot: Any) -> None:
        """One telemetry tick of a node (telemetry_pb2.Snapshot).

        Samples are timed by *arrival* on the state clock, less how much older the unit's
        reading was than the tick: agent and extender clocks need not agree."""
        stat = self.statistic
        sequence, units = snapshot.sequence, snapshot.units  # not a Snapshot: fail untouched
        with self.lock:
            now = self.now()
            t = self.telemetry.get(node_name)
            if t is None:
                ep = self.nodes[node_name].agent if node_name in self.nodes else ""
                t = self.telemetry[node_name] = NodeTelemetry(ep or "")
            t.state = "streaming"
            if t.last_seen is None or t.last_seen < now - self.policy.stale_after_s:
                self._stale_cache = (-math.inf, frozenset())  # this node turns fresh
            t.last_seen = now
            t.sequence = sequence
            t.snapshots += 1
            t.last_error = None
            unknown = unhealthy = recorded = 0
            info = self.nodes.get(node_name)
            sources = set()
            for u in units:
                lag = max(0.0, snapshot.timestamp - u.timestamp) if u.timestamp > 0 else 0.0
                if self.view.unit_type(u.uuid) is None:
                    unknown += 1
                    continue
                draining = info is not None and info.is_draining(u.uuid, now)
                self.view.set_unit_health(u.uuid, bool(u.healthy) and not draining)
                if not u.healthy:
                    unhealthy += 1
                    continue
                if not u.sm_active.present:
                    continue
                recorded += 1
                sources.add(u.source)
                self.view.record_telemetry(
                    u.uuid,
                    now - lag,
                    _metric(u.sm_active, stat),
                    _metric(u.dram_bw_active, stat) if u.dram_bw_active.present else 0.0,
                    float(u.memory_used_bytes),
                    _metric(u.tensor_active, stat) if u.tensor_active.present else None,
                )
            t.units = len(units)
            t.unknown_units = unknown
            t.unhealthy = unhealthy
            t.recorded = recorded
            t.sources = tuple(sorted(sources))

    def telemetry_age(self, node: str, now: float | None = None) -> float | None:
        t = self.telemetry.get(node)
        if t is None or t.last_seen is None:
            return None
        return (self.now() if now is None else now) - t.last_seen

    def stale_nodes(self, max_age_s: float = 0.5) -> frozenset[str]:
        """Nodes whose telemetry is older than the staleness bound (or absent), recomputed at
        most every `max_age_s` of the state clock: filter consults it for every failed node."""
        with self.lock:
            now = self.now()
            at, cached = self._stale_cache
            if 0 <= now - at <= max_age_s:
                return cached
            bound = now - self.policy.stale_after_s
            tel = self.telemetry
            stale = frozenset(
                n for n in self.nodes
                if (t := tel.get(n)) is None or t.last_seen is None or t.last_seen < bound
            )
            self._stale_cache = (now, stale)
            return stale


def _metric(m: Any, stat: str) -> float:
    if stat == "ewma" and m.ewma > 0:
        return float(m.ewma)
    if stat == "p95" and m.p95 > 0:
        return float(m.p95)
    return float(m.value)
