"""The node agents' side: Snapshots (`node_agent/telemetry.proto`) built from what the
performance model says each unit did, on the simulated clock.

Per unit and interval, like the agent: the latest reading (`value`), an exponentially weighted
mean (`ewma`) and the 95th percentile of the interval's readings (`p95`), for tensor-pipe,
DRAM and SM activity; memory used is what the pods on the unit hold. The source is `gpm`
(Hopper), so the extender reads compute load from tensor activity, as it would on an H100.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from node_agent import telemetry_pb2 as pb
from sim.cluster import Cluster
from sim.engine import StepActivity

EWMA_ALPHA = 0.6
IDLE_EVERY = 3  # ticks between Snapshots of a node without pods


class TelemetryAgent:
    def __init__(self, cluster: Cluster, interval_s: float, step_s: float) -> None:
        self.cluster = cluster
        self.interval = interval_s
        self.per = max(1, round(interval_s / step_s))
        n = len(cluster.units)
        self._buf = np.zeros((3, self.per, n))
        self._k = 0
        self._ewma = np.zeros((3, n))
        self._next = interval_s
        self._seq = 0
        self._node_units: dict[str, list[int]] = {}
        for u in cluster.units:
            self._node_units.setdefault(u.node, []).append(u.index)
        self._snaps: dict[str, pb.Snapshot] = {}
        self._was_busy: set[str] = set()
        self._gpu_idx_in_node: dict[int, int] = {}
        per_node: dict[str, list[str]] = {}
        for u in cluster.units:
            lst = per_node.setdefault(u.node, [])
            if u.gpu_uuid not in lst:
                lst.append(u.gpu_uuid)
            self._gpu_idx_in_node[u.index] = lst.index(u.gpu_uuid)

    def record(self, act: StepActivity) -> None:
        i = self._k % self.per
        self._buf[0, i] = act.tensor
        self._buf[1, i] = act.dram
        self._buf[2, i] = act.sm_active
        self._k += 1

    def due(self, t_next: float) -> bool:
        return t_next + 1e-9 >= self._next

    def _template(self, node: str, idxs: list[int]) -> pb.Snapshot:
        """A node's Snapshot with the fields that never change filled in once; each tick
        overwrites the readings in place (the extender copies values out, never keeps it)."""
        snap = pb.Snapshot(node=node, interval_s=self.interval)
        for i in idxs:
            u = self.cluster.units[i]
            s = snap.units.add()
            s.uuid = u.uuid
            if u.gpu_uuid != u.uuid:
                s.parent_uuid = u.gpu_uuid
                s.mig_profile = u.type.profile or ""
                s.gpu_instance_id = i
            else:
                s.gpu_instance_id = -1
            s.gpu_index = self._gpu_idx_in_node[i]
            s.product = u.type.product
            s.healthy = True
            s.source = "gpm"
            s.memory_total_bytes = int(u.type.memory_bytes)
            s.sm_count = u.type.sm_count
            s.sm_share = u.type.sm_fraction
            s.bandwidth_share = u.type.bw_fraction
            for m in (s.tensor_active, s.dram_bw_active, s.sm_active, s.sm_occupancy):
                m.present = True
        return snap

    def snapshots(
        self,
        timestamp: float,
        unit_pods: np.ndarray,
        unit_mem_used: np.ndarray,
        pods: Sequence[Any],
    ) -> Iterator[tuple[str, pb.Snapshot]]:
        """This tick's Snapshots. Nodes without pods report every IDLE_EVERY-th tick only:
        their readings are zero either way, and sending them costs the run time."""
        self._next += self.interval
        filled = min(self._k, self.per)
        if filled == 0:
            return
        last = self._buf[:, (self._k - 1) % self.per]
        window = self._buf[:, :filled]
        mean = window.mean(axis=1)
        p95 = np.sort(window, axis=1)[:, min(filled - 1, int(np.ceil(0.95 * filled)) - 1)]
        self._ewma = EWMA_ALPHA * mean + (1 - EWMA_ALPHA) * self._ewma
        self._seq += 1
        refs: dict[int, list[str]] = {}
        for rec in pods:
            if rec.state in ("bound", "draining") and rec.unit >= 0:
                refs.setdefault(rec.unit, []).append(rec.name)
        last_l, ewma_l, p95_l = last.tolist(), self._ewma.tolist(), p95.tolist()
        mem_l = unit_mem_used.tolist()
        for node, idxs in self._node_units.items():
            busy = any(unit_pods[i] > 0 for i in idxs) or node in self._was_busy
            if not busy and self._seq % IDLE_EVERY:
                continue
            if busy:
                self._was_busy.add(node)
            if not any(unit_pods[i] > 0 for i in idxs):
                self._was_busy.discard(node)
            snap = self._snaps.get(node)
            if snap is None:
                snap = self._snaps[node] = self._template(node, idxs)
            snap.timestamp = timestamp
            snap.sequence = self._seq
            for s, i in zip(snap.units, idxs, strict=True):
                s.timestamp = timestamp
                for m, k in (
                    (s.tensor_active, 0), (s.dram_bw_active, 1), (s.sm_active, 2)
                ):
                    m.value = last_l[k][i]
                    m.ewma = ewma_l[k][i]
                    m.p95 = p95_l[k][i]
                occ = min(1.0, last_l[0][i] + 0.2 * last_l[1][i])
                s.sm_occupancy.value = s.sm_occupancy.ewma = s.sm_occupancy.p95 = occ
                s.memory_used_bytes = int(max(mem_l[i], 0))
                del s.pods[:]
                for name in refs.get(i, ()):
                    ref = s.pods.add()
                    ref.namespace = "inference"
                    ref.pod = name
                    ref.container = "vllm"
            yield node, snap
