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

    def snapshots(
        self,
        timestamp: float,
        unit_pods: np.ndarray,
        unit_mem_used: np.ndarray,
        pods: Sequence[Any],
    ) -> Iterator[tuple[str, pb.Snapshot]]:
        self._next += self.interval
        filled = min(self._k, self.per)
        if filled == 0:
            return
        last = self._buf[:, (self._k - 1) % self.per]
        window = self._buf[:, :filled]
        mean = window.mean(axis=1)
        p95 = np.percentile(window, 95, axis=1)
        self._ewma = EWMA_ALPHA * mean + (1 - EWMA_ALPHA) * self._ewma
        self._seq += 1
        refs: dict[int, list[str]] = {}
        for rec in pods:
            if rec.state in ("bound", "draining") and rec.unit >= 0:
                refs.setdefault(rec.unit, []).append(rec.name)
        units = self.cluster.units
        for node, idxs in self._node_units.items():
            snap = pb.Snapshot(
                node=node, timestamp=timestamp, sequence=self._seq, interval_s=self.interval
            )
            for i in idxs:
                u = units[i]
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
                s.timestamp = timestamp
                for field, k in (("tensor_active", 0), ("dram_bw_active", 1), ("sm_active", 2)):
                    m = getattr(s, field)
                    m.present = True
                    m.value = float(last[k, i])
                    m.ewma = float(self._ewma[k, i])
                    m.p95 = float(p95[k, i])
                s.sm_occupancy.present = True
                s.sm_occupancy.value = s.sm_occupancy.ewma = s.sm_occupancy.p95 = float(
                    min(1.0, last[0, i] + 0.2 * last[1, i])
                )
                s.memory_used_bytes = int(max(unit_mem_used[i], 0))
                s.memory_total_bytes = int(u.type.memory_bytes)
                s.sm_count = u.type.sm_count
                s.sm_share = u.type.sm_fraction
                s.bandwidth_share = u.type.bw_fraction
                for name in refs.get(i, ()):
                    ref = s.pods.add()
                    ref.namespace = "inference"
                    ref.pod = name
                    ref.container = "vllm"
            yield node, snap
