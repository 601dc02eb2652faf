"""The cluster as the decision core sees it: every unit (whole GPU or MIG instance) in one
struct-of-arrays, updated one event at a time in O(1) amortized, read by decide() in a few
vectorized passes.

Layout: 2-D arrays of shape (K, rows). A node takes one row (or several, if it has more than
K units); its units sit in that row's columns in inventory order. Per-node reductions are then
element-wise operations across K contiguous rows (fast), not segmented reductions (slow), and
there is no permutation to gather through. Rows grow by doubling; freed rows are reused.

Per unit we keep capacity (memory bytes; sm and bw capacity are 1.0 by definition since demands
are fractions of the unit), health, the last telemetry sample and its time, the sum of declared
demands of the pods bound to it, the part of that sum placed too recently to show in the
telemetry, and the resulting effective load for fresh telemetry (kept current on every event,
so a decision only has to swap in the declared sums where telemetry went stale).

The view is split by concern: the array storage is in view_storage.py, the pod records and
their counters in view_pods.py, telemetry and the effective load in view_load.py; ClusterView
inherits their mixins and keeps the nodes, units and layout queries. Names that moved stay
importable from here."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.inventory import InventoryUnit
from policies.model import UnitType
from policies.view_load import UnitLoadMixin
from policies.view_load import UnknownUnitError as UnknownUnitError
from policies.view_load import _ratio as _ratio
from policies.view_pods import BURSTY_ROLES as BURSTY_ROLES
from policies.view_pods import PodPlacementMixin, PodRecord
from policies.view_pods import _tolerance as _tolerance
from policies.view_pods import burst_headroom as burst_headroom
from policies.view_pods import declares_typical_sm as declares_typical_sm
from policies.view_storage import _BOOL_FIELDS as _BOOL_FIELDS
from policies.view_storage import _DEFAULTS as _DEFAULTS
from policies.view_storage import _FLOAT_FIELDS, Slot, ViewStorageMixin
from policies.view_storage import _INT_FIELDS as _INT_FIELDS


@dataclass
class _Node:
    name: str
    node_id: int
    rows: list[int] = field(default_factory=list)
    uuids: list[str] = field(default_factory=list)  # inventory order
    labels: dict[str, str] = field(default_factory=dict)
    mps: bool = False


class ClusterView(UnitLoadMixin, PodPlacementMixin, ViewStorageMixin):
    """Mutable vectorized view of every unit; see the module docstring."""

    def __init__(self, capacity: int = 1024, units_per_row: int = 8) -> None:
        if units_per_row < 1:
            raise ValueError("units_per_row must be >= 1")
        self.K = units_per_row
        self._rows_cap = max(8, -(-capacity // self.K))
        self._rows = 0  # high-water mark of rows in use
        for f in (*_FLOAT_FIELDS, *_INT_FIELDS, *_BOOL_FIELDS):
            setattr(self, f, self._new_array(f, self._rows_cap))
        self.row_node = np.full(self._rows_cap, -1, dtype=np.intp)  # node id per row
        self.row_primary = np.zeros(self._rows_cap, dtype=bool)  # first row of its node
        # per row, the epoch of its last change: decision caches re-score only rows changed
        # since they were built (policies/row_cache.py)
        self.row_stamp = np.zeros(self._rows_cap, dtype=np.int64)
        self.epoch = 0
        self._free_rows: list[int] = []
        self.slot_uuid: dict[Slot, str] = {}
        self.slot_unit: dict[Slot, InventoryUnit] = {}
        self._uuid_slot: dict[str, Slot] = {}
        self._nodes: dict[str, _Node] = {}
        self._node_by_id: list[_Node | None] = []
        self._free_node_ids: list[int] = []
        self._name_rank: np.ndarray | None = None  # node id -> rank of its name; see node_name_rank
        self.types: list[UnitType] = []
        self._type_index: dict[UnitType, int] = {}
        self._pods: dict[str, PodRecord] = {}
        self._unit_pods: dict[str, dict[str, PodRecord]] = {}  # uuid -> pods
        self._pending: dict[str, PodRecord] = {}  # placed on a unit not (yet) in the view
        self._multi_row: dict[int, list[int]] = {}  # node id -> rows, for nodes with > K units
        self._slo_pods = 0
        # memory bytes -> number of placed pods declaring it, and the smallest such size: what
        # the fragmentation-aware score needs to know whether a unit's leftover can still
        # host any pod the cluster runs (kept incrementally: decide() must stay O(units))
        self._mem_sizes: dict[int, int] = {}
        # workload group -> {unit uuid: bursty (prefill/mixed) replicas of it there}
        self._bursty: dict[str, dict[str, int]] = {}
        self._n_burst = 0  # pods with burst headroom above their declared SMs
        self._sharing: tuple[int, bool, bool] = (-1, False, False)  # (layout, any MPS, any ts)
        self._whole_min: tuple[int, float | None] = (-1, None)  # (layout, smallest whole GPU)
        self._min_mem: int | None = None
        # pods not bound yet -> the least memory they need, and those sizes counted: with the
        # placed sizes, the largest pod the cluster has to place (packing_rules.reserve_mem)
        self._waiting: dict[str, int] = {}
        self._waiting_sizes: dict[int, int] = {}
        self._window = 10.0
        self.version = 0  # bumped on every change
        self.layout_version = 0  # bumped when nodes/units are added or removed
        self._primary_rows: tuple[int, dict[str, int]] | None = None
        self._scratch: dict[str, np.ndarray] = {}
        # slot -> the slots of every unit on the same physical GPU (itself for a whole GPU):
        # GPU-hours are counted per physical GPU, so decisions need its occupancy
        self._gpu_slots: dict[Slot, tuple[Slot, ...]] = {}
        self.max_gpu_mem = 0.0  # largest physical GPU in the view (bytes)

    # -- nodes and units -------------------------------------------------------------------
    def set_node(
        self,
        name: str,
        units: Sequence[InventoryUnit],
        labels: Mapping[str, str] | None = None,
        mps: bool = False,
    ) -> list[str]:
        """Create or replace a node's units (from its `copack.io/inventory`).

        Units keep their telemetry and pods when their UUID stays; units that vanished
        (re-partition, GPU gone from the inventory) are dropped with their pods, whose keys are
        returned. Pods placed earlier on a UUID that now appears are attached."""
        uuids = [u.uuid for u in units]
        if len(set(uuids)) != len(uuids):
            raise ValueError(f"node {name}: duplicate unit uuids in its inventory")
        node = self._nodes.get(name)
        if node is None:
            nid = self._free_node_ids.pop() if self._free_node_ids else len(self._node_by_id)
            node = _Node(name, nid)
            if nid == len(self._node_by_id):
                self._node_by_id.append(node)
            else:
                self._node_by_id[nid] = node
            self._nodes[name] = node
            self._name_rank = None
        node.labels = dict(labels or {})
        node.mps = bool(mps)
        wanted = set(uuids)
        dropped: list[str] = []
        # Save the per-unit state of units that stay, then rebuild the node's rows.
        saved: dict[str, dict[str, Any]] = {}
        for uuid in node.uuids:
            slot = self._uuid_slot.pop(uuid)
            self._gpu_slots.pop(slot, None)
            if uuid in wanted:
                saved[uuid] = {
                    f: getattr(self, f)[slot] for f in (*_FLOAT_FIELDS, "npods", "tel_tensor")
                }
            else:
                dropped.extend(self._drop_pods_of(uuid))
            self.slot_uuid.pop(slot, None)
            self.slot_unit.pop(slot, None)
        for uuid in uuids:  # the same UUID listed under another node: the newest inventory wins
            slot = self._uuid_slot.get(uuid)
            if slot is not None:
                owner = self._node_by_id[int(self.row_node[slot[1]])]
                if owner is not None and owner is not node:
                    dropped.extend(
                        self.set_node(
                            owner.name,
                            [
                                self.slot_unit[s]
                                for s in self._slots_of(owner)
                                if self.slot_uuid[s] != uuid
                            ],
                            owner.labels,
                            owner.mps,
                        )
                    )
        for row in node.rows:
            self._clear_row(row)
            self._free_rows.append(row)
        node.rows = []
        self._multi_row.pop(node.node_id, None)
        n_rows = max(1, -(-len(units) // self.K))
        for r in range(n_rows):
            node.rows.append(self._alloc_row(node.node_id, primary=(r == 0)))
        if n_rows > 1:
            self._multi_row[node.node_id] = list(node.rows)
        node.uuids = uuids
        for pos, u in enumerate(units):
            slot = (pos % self.K, node.rows[pos // self.K])
            self._uuid_slot[u.uuid] = slot
            self.slot_uuid[slot] = u.uuid
            self.slot_unit[slot] = u
            state = saved.get(u.uuid)
            if state is not None:
                for f, v in state.items():
                    getattr(self, f)[slot] = v
            else:
                self._unit_pods.setdefault(u.uuid, {})
            self.active[slot] = True
            self.mps[slot] = node.mps
            self.type_id[slot] = self._type_id(UnitType(u.product, u.mig_profile))
            self.mem_cap[slot] = float(u.memory_bytes)
            self.healthy[slot] = bool(u.healthy)
            self.index[slot] = u.index
            self._recompute(slot)
        self._index_gpus(node)
        for key in list(self._pending):
            rec = self._pending[key]
            slot = self._uuid_slot.get(rec.uuid)
            if slot is not None:
                del self._pending[key]
                self._attach(rec, slot)
        self.layout_version += 1
        self.version += 1
        return dropped

    def _index_gpus(self, node: _Node) -> None:
        """Group the node's units by physical GPU (inventory `index`, shared by MIG siblings)
        and set each unit's GPU memory and GPU pod count."""
        by_gpu: dict[int, list[Slot]] = {}
        for slot in self._slots_of(node):
            self._gpu_slots.pop(slot, None)
            by_gpu.setdefault(int(self.index[slot]), []).append(slot)
        for slots in by_gpu.values():
            group = tuple(slots)
            mem = float(sum(self.mem_cap[s] for s in group))
            unit_mem = float(max(self.mem_cap[s] for s in group))
            pods = int(sum(self.npods[s] for s in group))
            for s in group:
                self._gpu_slots[s] = group
                self.gpu_mem[s] = mem
                self.gpu_unit_mem[s] = unit_mem
                self.gpu_pods[s] = pods
            self.max_gpu_mem = max(self.max_gpu_mem, mem)

    def _slots_of(self, node: _Node) -> list[Slot]:
        return [self._uuid_slot[u] for u in node.uuids if u in self._uuid_slot]

    def remove_node(self, name: str) -> list[str]:
        """Forget a node and its units; returns the keys of pods that were on them."""
        node = self._nodes.pop(name, None)
        if node is None:
            return []
        dropped: list[str] = []
        for uuid in node.uuids:
            slot = self._uuid_slot.pop(uuid, None)
            if slot is not None:
                self.slot_uuid.pop(slot, None)
                self.slot_unit.pop(slot, None)
                self._gpu_slots.pop(slot, None)
            dropped.extend(self._drop_pods_of(uuid))
        for row in node.rows:
            self._clear_row(row)
            self._free_rows.append(row)
        self._multi_row.pop(node.node_id, None)
        self._node_by_id[node.node_id] = None
        self._free_node_ids.append(node.node_id)
        self._name_rank = None
        self.layout_version += 1
        self.version += 1
        return dropped

    def set_unit_health(self, uuid: str, healthy: bool) -> bool:
        """Mark a unit healthy or not (agent reports, GPU lost). False if the UUID is unknown."""
        slot = self._uuid_slot.get(uuid)
        if slot is None:
            return False
        self.healthy[slot] = bool(healthy)
        self._touch(slot[1])
        self.version += 1
        return True

    # -- queries ---------------------------------------------------------------------------
    def has_node(self, name: str) -> bool:
        return name in self._nodes

    @property
    def node_names(self) -> list[str]:
        return list(self._nodes)

    def node_labels(self, name: str) -> dict[str, str]:
        node = self._nodes.get(name)
        return dict(node.labels) if node else {}

    def node_mps(self, name: str) -> bool:
        node = self._nodes.get(name)
        return bool(node and node.mps)

    def units_of(self, node: str) -> list[str]:
        n = self._nodes.get(node)
        return list(n.uuids) if n else []

    def unit(self, uuid: str) -> InventoryUnit | None:
        slot = self._uuid_slot.get(uuid)
        return None if slot is None else self.slot_unit[slot]

    def node_of_unit(self, uuid: str) -> str | None:
        slot = self._uuid_slot.get(uuid)
        if slot is None:
            return None
        node = self._node_by_id[int(self.row_node[slot[1]])]
        return node.name if node else None

    def unit_type(self, uuid: str) -> UnitType | None:
        slot = self._uuid_slot.get(uuid)
        return None if slot is None else self.types[int(self.type_id[slot])]

    @property
    def unit_count(self) -> int:
        return len(self._uuid_slot)

    def slot_of(self, uuid: str) -> Slot | None:
        return self._uuid_slot.get(uuid)

    def node_rows(self, name: str) -> list[int]:
        n = self._nodes.get(name)
        return list(n.rows) if n else []

    def node_id_of(self, name: str) -> int | None:
        n = self._nodes.get(name)
        return n.node_id if n else None

    def node_name_rank(self) -> np.ndarray:
        """Rank of each node id's name in sorted order, so ties between thousands of nodes are
        broken by name with one numpy argmin instead of a Python key function per decision.
        Rebuilt only when nodes come or go."""
        if self._name_rank is None:
            live = [n for n in self._node_by_id if n is not None]
            rank = np.full(max(1, len(self._node_by_id)), np.iinfo(np.int64).max, dtype=np.int64)
            for r, n in enumerate(sorted(live, key=lambda n: n.name)):
                rank[n.node_id] = r
            self._name_rank = rank
        return self._name_rank

    def node_name_by_id(self, nid: int) -> str:
        node = self._node_by_id[nid] if 0 <= nid < len(self._node_by_id) else None
        return node.name if node else ""

    def primary_row(self, name: str) -> int | None:
        n = self._nodes.get(name)
        return n.rows[0] if n and n.rows else None

    def primary_rows(self) -> dict[str, int]:
        """Node name -> its first row (nodes with units only), rebuilt when the layout changes:
        candidate lists then resolve with one C-level dict lookup per name."""
        cached = self._primary_rows
        if cached is None or cached[0] != self.layout_version:
            rows = {name: n.rows[0] for name, n in self._nodes.items() if n.rows}
            cached = self._primary_rows = (self.layout_version, rows)
        return cached[1]

    @property
    def n_rows(self) -> int:
        return self._rows

    @property
    def multi_row_nodes(self) -> dict[int, list[int]]:
        return self._multi_row

    def _sharing_kinds(self) -> tuple[bool, bool]:
        version, any_mps, any_ts = self._sharing
        if version != self.layout_version:
            any_mps = bool((self.active & self.mps).any())
            any_ts = bool((self.active & ~self.mps).any())
            self._sharing = (self.layout_version, any_mps, any_ts)
        return any_mps, any_ts

    def smallest_whole_gpu_mem(self) -> float | None:
        """Memory of the smallest GPU not split by MIG (None: none): the GPU products differ
        in what they hold, MIG slices are the operator's choice to hold less."""
        version, mem = self._whole_min
        if version != self.layout_version:
            whole_type = np.array([t.mig_profile is None for t in self.types], dtype=bool)
            whole = self.active & whole_type[self.type_id] if len(whole_type) else self.active
            mem = float(self.gpu_mem[whole].min()) if whole.any() else None
            self._whole_min = (self.layout_version, mem)
        return mem

    def has_time_sliced(self) -> bool:
        """Whether any active unit is time-sliced (its pods' kernels never overlap)."""
        return self._sharing_kinds()[1]

    def has_mixed_sharing(self) -> bool:
        """Whether the active units include both MPS and time-sliced ones."""
        return all(self._sharing_kinds())

    def to_dict(self, now: float | None = None, stale_after_s: float = 15.0) -> dict[str, Any]:
        """JSON-able dump for /debug/state (with effective loads when `now` is given)."""
        nodes: dict[str, Any] = {}
        for name, node in self._nodes.items():
            units = []
            for uuid in node.uuids:
                slot = self._uuid_slot[uuid]
                u = self.slot_unit[slot]
                entry: dict[str, Any] = {
                    "uuid": uuid,
                    "type": str(self.types[int(self.type_id[slot])]),
                    "index": int(self.index[slot]),
                    "parent": u.parent,
                    "pods": sorted(self._unit_pods.get(uuid, {})),
                }
                if now is not None:
                    entry["load"] = self.unit_load(uuid, now, stale_after_s)
                else:
                    t = float(self.tel_t[slot])
                    entry["healthy"] = bool(self.healthy[slot])
                    entry["telemetry_t"] = t if math.isfinite(t) else None
                units.append(entry)
            nodes[name] = {"mps": node.mps, "labels": node.labels, "units": units}
        return {
            "nodes": nodes,
            "pods": {k: r.to_dict() for k, r in self._pods.items()},
            "pending_pods": {k: r.to_dict() for k, r in self._pending.items()},
            "assumed_window_s": self._window,
            "version": self.version,
        }
