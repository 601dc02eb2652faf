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
so a decision only has to swap in the declared sums where telemetry went stale)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.contention import sm_share_slowdown
from policies.inventory import InventoryUnit
from policies.model import Demand, PodRequest, Timing, UnitType

_FLOAT_FIELDS = (
    "mem_cap",
    "tel_t",
    "tel_sm",
    "tel_bw",
    "tel_mem",
    "decl_sm",
    "decl_bw",
    "decl_mem",
    "recent_sm",
    "recent_bw",
    "recent_mem",
    "eff_sm",
    "eff_bw",
    "eff_mem",
    "tol_x",
    "tol_y",
    "burst_sm",
    "time_sum",
    "decode_caps",
    "typical_sm",
    "gpu_mem",
)
_INT_FIELDS = ("type_id", "npods", "index", "gpu_pods")
_BOOL_FIELDS = ("active", "healthy", "tel_tensor", "mps")
_DEFAULTS = {"tel_t": -np.inf, "tol_x": np.inf, "tol_y": np.inf, "mem_cap": 1.0}
# Roles that may be provisioned for bursts (declaring a typical demand below their load)
BURSTY_ROLES = frozenset(("prefill", "mixed"))

Slot = tuple[int, int]  # (column j, row)


def declares_typical_sm(role: str, request: PodRequest | None) -> bool:
    """A prefill/mixed pod that declares its SMs (`copack.io/demand: sm=`): with a load it is
    provisioned for, that is its typical demand, which must be served between bursts."""
    return (
        role in BURSTY_ROLES
        and request is not None
        and request.demand is not None
        and request.demand.sm is not None
    )


def burst_headroom(role: str, declared_sm: float, timing: Timing | None) -> float:
    """SMs a bursty pod takes above its declared (typical) demand while it bursts: a
    prefill/mixed pod whose `copack.io/demand` sm= is below what its `copack.io/load` needs
    declares its typical load and is provisioned for the latter. 0 for other pods."""
    if role not in BURSTY_ROLES or timing is None:
        return 0.0
    return max(0.0, float(timing.sm_at_load) - float(declared_sm))


class UnknownUnitError(KeyError):
    """A unit UUID the view does not know."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class PodRecord:
    """A pod bound (or assumed) to a unit, with what it declared."""

    key: str
    uuid: str
    demand: Demand
    t: float
    role: str = "mixed"
    sm_share: int = 100
    request: PodRequest | None = None
    timing: Timing | None = None
    # SLO tolerance of this pod to contention (see _tolerance); inf = no SLO
    tol_x: float = math.inf
    tol_y: float = math.inf

    @property
    def slo_sensitive(self) -> bool:
        return math.isfinite(self.tol_x) or math.isfinite(self.tol_y)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pod": self.key,
            "unit": self.uuid,
            "role": self.role,
            "demand": self.demand.as_dict(),
            "placed_at": self.t,
            "sm_share": self.sm_share,
        }


@dataclass
class _Node:
    name: str
    node_id: int
    rows: list[int] = field(default_factory=list)
    uuids: list[str] = field(default_factory=list)  # inventory order
    labels: dict[str, str] = field(default_factory=dict)
    mps: bool = False


def _tolerance(
    request: PodRequest | None, timing: Timing | None, sm_share: int
) -> tuple[float, float]:
    """How much bandwidth excess (x-1) and compute excess (y-1) this pod's SLO tolerates.

    From contention.slowdown_factor: f = a/s + 1 - a + mem_frac*(x-1) + a*(y-1) must stay within
    slo/base, so (x-1) <= slack/mem_frac and (y-1) <= slack/a, per metric (TTFT, TPOT)."""
    if request is None or timing is None or request.slo.empty:
        return math.inf, math.inf
    tol_x = tol_y = math.inf
    s = max(0.01, sm_share / 100.0)
    for slo, base, a, mf in (
        (request.slo.ttft_s, timing.ttft_s, timing.a_prefill, timing.mem_frac_prefill),
        (request.slo.tpot_s, timing.tpot_s, timing.a_decode, timing.mem_frac_decode),
    ):
        if slo is None or base <= 0:
            continue
        slack = max(0.0, slo / base - sm_share_slowdown(a, s))
        if mf > 1e-9:
            tol_x = min(tol_x, slack / mf)
        if a > 1e-9:
            tol_y = min(tol_y, slack / a)
    return tol_x, tol_y


class ClusterView:
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
        self._min_mem: int | None = None
        self._window = 10.0
        self.version = 0  # bumped on every change
        self.layout_version = 0  # bumped when nodes/units are added or removed
        self._primary_rows: tuple[int, dict[str, int]] | None = None
        self._scratch: dict[str, np.ndarray] = {}
        # slot -> the slots of every unit on the same physical GPU (itself for a whole GPU):
        # GPU-hours are counted per physical GPU, so decisions need its occupancy
        self._gpu_slots: dict[Slot, tuple[Slot, ...]] = {}
        self.max_gpu_mem = 0.0  # largest physical GPU in the view (bytes)

    # -- storage ---------------------------------------------------------------------------
    def _new_array(self, f: str, rows: int) -> np.ndarray:
        if f in _INT_FIELDS:
            dtype: Any = np.intp
        elif f in _BOOL_FIELDS:
            dtype = bool
        else:
            dtype = np.float64
        arr = np.zeros((self.K, rows), dtype=dtype)
        if f in _DEFAULTS:
            arr[:] = _DEFAULTS[f]
        return arr

    def _grow_rows(self) -> None:
        new = self._rows_cap * 2
        for f in (*_FLOAT_FIELDS, *_INT_FIELDS, *_BOOL_FIELDS):
            old = getattr(self, f)
            arr = self._new_array(f, new)
            arr[:, : self._rows_cap] = old
            setattr(self, f, arr)
        rn = np.full(new, -1, dtype=np.intp)
        rn[: self._rows_cap] = self.row_node
        self.row_node = rn
        rp = np.zeros(new, dtype=bool)
        rp[: self._rows_cap] = self.row_primary
        self.row_primary = rp
        rs = np.zeros(new, dtype=np.int64)
        rs[: self._rows_cap] = self.row_stamp
        self.row_stamp = rs
        self._rows_cap = new
        self._scratch.clear()

    def _alloc_row(self, node_id: int, primary: bool) -> int:
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            if self._rows == self._rows_cap:
                self._grow_rows()
            row = self._rows
            self._rows += 1
        self.row_node[row] = node_id
        self.row_primary[row] = primary
        self._touch(row)
        return row

    def _clear_row(self, row: int) -> None:
        for f in (*_FLOAT_FIELDS, *_INT_FIELDS, *_BOOL_FIELDS):
            getattr(self, f)[:, row] = _DEFAULTS.get(f, 0)
        self.row_node[row] = -1
        self.row_primary[row] = False
        self._touch(row)

    def _touch(self, row: int) -> None:
        self.epoch += 1
        self.row_stamp[row] = self.epoch

    def scratch(self, name: str, dtype: Any = np.float64) -> np.ndarray:
        """A reusable (K, rows) work buffer: decisions write temporaries here instead of
        allocating (allocating 300 kB arrays per decision costs page faults)."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape[1] != self._rows or buf.dtype != dtype:
            buf = np.empty((self.K, self._rows), dtype=dtype)
            self._scratch[name] = buf
        return buf

    def _type_id(self, t: UnitType) -> int:
        tid = self._type_index.get(t)
        if tid is None:
            tid = len(self.types)
            self.types.append(t)
            self._type_index[t] = tid
        return tid

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
            pods = int(sum(self.npods[s] for s in group))
            for s in group:
                self._gpu_slots[s] = group
                self.gpu_mem[s] = mem
                self.gpu_pods[s] = pods
            self.max_gpu_mem = max(self.max_gpu_mem, mem)

    def _slots_of(self, node: _Node) -> list[Slot]:
        return [self._uuid_slot[u] for u in node.uuids if u in self._uuid_slot]

    def _drop_pods_of(self, uuid: str) -> list[str]:
        pods = list(self._unit_pods.pop(uuid, {}).values())
        for rec in pods:
            self._pods.pop(rec.key, None)
            if rec.slo_sensitive:
                self._slo_pods -= 1
            self._count_mem(rec, -1)
            self._count_group(rec, -1)
        return [rec.key for rec in pods]

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

    # -- telemetry -------------------------------------------------------------------------
    def record_telemetry(
        self,
        uuid: str,
        t: float,
        sm: float,
        bw: float,
        mem_used_bytes: float,
        tensor: float | None = None,
    ) -> bool:
        """One sample for a unit. Compute load is tensor-pipe activity when the agent has it
        (GPM), else SM activity (coarse source: overstates compute use, DESIGN.md). Returns
        False for an unknown UUID; a sample older than the one held is ignored."""
        slot = self._uuid_slot.get(uuid)
        if slot is None:
            return False
        if not math.isfinite(t) or t < self.tel_t[slot]:
            return True
        has_tensor = tensor is not None and math.isfinite(tensor)
        self.tel_t[slot] = t
        self.tel_sm[slot] = _ratio(tensor if has_tensor else sm)
        self.tel_bw[slot] = _ratio(bw)
        mem = float(mem_used_bytes) if mem_used_bytes is not None else 0.0
        self.tel_mem[slot] = max(0.0, mem) if math.isfinite(mem) else 0.0
        self.tel_tensor[slot] = has_tensor
        if self.recent_sm[slot] == 0.0 and self.recent_bw[slot] == 0.0 and (
            self.recent_mem[slot] == 0.0
        ):
            # No pod counts as recent, and a later sample only ages pods out of the window:
            # the pod sums stand and only the effective load moves (telemetry's hot path,
            # thousands of units a second at scale, need not walk the unit's pods).
            self.eff_sm[slot] = max(self.tel_sm[slot], self.decl_sm[slot])
            self.eff_bw[slot] = max(self.tel_bw[slot], self.decl_bw[slot])
            self.eff_mem[slot] = max(self.tel_mem[slot], self.decl_mem[slot])
            self._touch(slot[1])
        else:
            self._recompute(slot)
        self.version += 1
        return True

    # -- pods ------------------------------------------------------------------------------
    def place(
        self,
        pod_key: str,
        unit_uuid: str,
        demand: Demand,
        t: float,
        role: str = "mixed",
        sm_share: int = 100,
        request: PodRequest | None = None,
        timing: Timing | None = None,
    ) -> bool:
        """Record a pod on a unit (an assumed placement at bind, or a bound pod seen in a
        watch). Re-placing a known pod moves it. A pod on a UUID the view does not know yet is
        kept pending and attached when the unit's node appears; returns False then."""
        self.unplace(pod_key)
        tol_x, tol_y = _tolerance(request, timing, sm_share)
        rec = PodRecord(
            pod_key, unit_uuid, demand, float(t), role, int(sm_share), request, timing, tol_x, tol_y
        )
        slot = self._uuid_slot.get(unit_uuid)
        self.version += 1
        if slot is None:
            self._pending[pod_key] = rec
            return False
        self._attach(rec, slot)
        return True

    def _attach(self, rec: PodRecord, slot: Slot) -> None:
        self._pods[rec.key] = rec
        if rec.slo_sensitive:
            self._slo_pods += 1
        self._count_mem(rec, +1)
        self._count_group(rec, +1)
        self._unit_pods.setdefault(rec.uuid, {})[rec.key] = rec
        self._recompute(slot)

    def unplace(self, pod_key: str) -> bool:
        """Forget a pod (deleted, finished, bind failed). False if it was not known."""
        if self._pending.pop(pod_key, None) is not None:
            self.version += 1
            return True
        rec = self._pods.pop(pod_key, None)
        if rec is None:
            return False
        if rec.slo_sensitive:
            self._slo_pods -= 1
        self._count_mem(rec, -1)
        self._count_group(rec, -1)
        self._unit_pods.get(rec.uuid, {}).pop(pod_key, None)
        slot = self._uuid_slot.get(rec.uuid)
        if slot is not None:
            self._recompute(slot)
        self.version += 1
        return True

    def _recompute(self, slot: Slot) -> None:
        """Declared sums, the recently-placed part, the fresh-telemetry effective load and the
        SLO tolerances of one unit. Exact, from its pods (a unit holds a handful)."""
        pods = self._unit_pods.get(self.slot_uuid[slot]) or {}
        cutoff = self.tel_t[slot] - self._window
        dsm = dbw = dmem = rsm = rbw = rmem = 0.0
        tx = ty = math.inf
        burst = caps = typical = time_sum = 0.0
        for rec in pods.values():
            d = rec.demand
            b = burst_headroom(rec.role, d.sm, rec.timing)
            burst = max(burst, b)
            time_sum += max(d.sm, d.bw)  # a time-sliced unit runs one pod at a time
            if rec.role == "decode":
                caps += rec.sm_share / 100.0
            elif declares_typical_sm(rec.role, rec.request):
                typical = max(typical, d.sm)
            dsm += d.sm
            dbw += d.bw
            dmem += d.mem_bytes
            if rec.t > cutoff:
                rsm += d.sm
                rbw += d.bw
                rmem += d.mem_bytes
            tx = min(tx, rec.tol_x)
            ty = min(ty, rec.tol_y)
        self.decl_sm[slot], self.decl_bw[slot], self.decl_mem[slot] = dsm, dbw, dmem
        self.recent_sm[slot], self.recent_bw[slot], self.recent_mem[slot] = rsm, rbw, rmem
        self.eff_sm[slot] = max(self.tel_sm[slot] + rsm, dsm)
        self.eff_bw[slot] = max(self.tel_bw[slot] + rbw, dbw)
        self.eff_mem[slot] = max(self.tel_mem[slot] + rmem, dmem)
        self.tol_x[slot], self.tol_y[slot] = tx, ty
        self.burst_sm[slot], self.time_sum[slot] = burst, time_sum
        self.decode_caps[slot], self.typical_sm[slot] = caps, typical
        delta = len(pods) - int(self.npods[slot])
        self.npods[slot] = len(pods)
        self._touch(slot[1])
        if delta:
            for s in self._gpu_slots.get(slot, (slot,)):
                self.gpu_pods[s] += delta
                self._touch(s[1])

    def set_assumed_window(self, seconds: float) -> None:
        """Pods placed less than `seconds` before a unit's latest telemetry count as not yet
        visible in it. Recomputes every unit (a configuration change, not a hot path)."""
        if not seconds >= 0:
            raise ValueError(f"assumed window must be >= 0, got {seconds!r}")
        self._window = float(seconds)
        for slot in self._uuid_slot.values():
            self._recompute(slot)
        self.version += 1

    @property
    def assumed_window_s(self) -> float:
        return self._window

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

    def pods_on(self, uuid: str) -> list[PodRecord]:
        return list((self._unit_pods.get(uuid) or {}).values())

    def unit_of(self, pod_key: str) -> str | None:
        rec = self._pods.get(pod_key) or self._pending.get(pod_key)
        return rec.uuid if rec else None

    def pod(self, pod_key: str) -> PodRecord | None:
        return self._pods.get(pod_key) or self._pending.get(pod_key)

    @property
    def pod_keys(self) -> list[str]:
        return [*self._pods, *self._pending]

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

    def _count_mem(self, rec: PodRecord, delta: int) -> None:
        m = int(rec.demand.mem_bytes)
        n = self._mem_sizes.get(m, 0) + delta
        if n > 0:
            self._mem_sizes[m] = n
            if delta > 0 and (self._min_mem is None or m < self._min_mem):
                self._min_mem = m
            return
        self._mem_sizes.pop(m, None)
        if m == self._min_mem:  # the smallest size left: rescan the distinct sizes (rare)
            self._min_mem = min(self._mem_sizes) if self._mem_sizes else None

    def _count_group(self, rec: PodRecord, delta: int) -> None:
        if burst_headroom(rec.role, rec.demand.sm, rec.timing) <= 0:
            return
        self._n_burst += delta
        group = rec.request.group if rec.request is not None else ""
        if not group:
            return
        units = self._bursty.setdefault(group, {})
        n = units.get(rec.uuid, 0) + delta
        if n > 0:
            units[rec.uuid] = n
            return
        units.pop(rec.uuid, None)
        if not units:
            del self._bursty[group]

    def has_burst_pods(self) -> bool:
        """Whether any placed pod declares a typical demand below its provisioned load."""
        return self._n_burst > 0

    def bursty_slots(self, group: str) -> list[Slot]:
        """Slots of the units holding a burst-provisioned replica of `group` (a few)."""
        units = self._bursty.get(group) if group else None
        if not units:
            return []
        return [s for u in units if (s := self._uuid_slot.get(u)) is not None]

    @property
    def min_pod_mem_bytes(self) -> int | None:
        """The smallest memory any placed pod declared (None when no pod is placed)."""
        return self._min_mem

    def _sharing_kinds(self) -> tuple[bool, bool]:
        version, any_mps, any_ts = self._sharing
        if version != self.layout_version:
            any_mps = bool((self.active & self.mps).any())
            any_ts = bool((self.active & ~self.mps).any())
            self._sharing = (self.layout_version, any_mps, any_ts)
        return any_mps, any_ts

    def has_time_sliced(self) -> bool:
        """Whether any active unit is time-sliced (its pods' kernels never overlap)."""
        return self._sharing_kinds()[1]

    def has_mixed_sharing(self) -> bool:
        """Whether the active units include both MPS and time-sliced ones."""
        return all(self._sharing_kinds())

    def has_slo_pods(self) -> bool:
        """Whether any placed pod carries an SLO (else the neighbour check is skipped)."""
        return self._slo_pods > 0

    # -- load ------------------------------------------------------------------------------
    def load_arrays(
        self, now: float, stale_after_s: float, cols: np.ndarray | None = None
    ) -> tuple[np.ndarray, ...]:
        """Effective load of every slot, shape (K, rows) (DESIGN.md "Units, demand, load"):
        fresh telemetry + recently-placed declared demand, never below the declared sum; stale
        (or no) telemetry -> declared sum only. Returns (sm, bw, mem_bytes, stale). With `cols`,
        only those rows (fresh arrays); without, the arrays may be the view's own or scratch
        buffers: read, don't keep."""
        if cols is not None:
            stale = self.tel_t[:, cols] < (now - stale_after_s)
            return (
                np.where(stale, self.decl_sm[:, cols], self.eff_sm[:, cols]),
                np.where(stale, self.decl_bw[:, cols], self.eff_bw[:, cols]),
                np.where(stale, self.decl_mem[:, cols], self.eff_mem[:, cols]),
                stale,
            )
        r = self._rows
        stale = self.tel_t[:, :r] < (now - stale_after_s)
        lsm, lbw, lmem = self.eff_sm[:, :r], self.eff_bw[:, :r], self.eff_mem[:, :r]
        if stale.any():
            out = []
            for name, eff, decl in (
                ("l_sm", lsm, self.decl_sm),
                ("l_bw", lbw, self.decl_bw),
                ("l_mem", lmem, self.decl_mem),
            ):
                buf = self.scratch(name)
                np.copyto(buf, eff)
                np.copyto(buf, decl[:, :r], where=stale)
                out.append(buf)
            lsm, lbw, lmem = out
        return lsm, lbw, lmem, stale

    def unit_load(self, uuid: str, now: float, stale_after_s: float) -> dict[str, Any]:
        """One unit's effective load and where it came from (for explanations)."""
        slot = self._uuid_slot.get(uuid)
        if slot is None:
            raise UnknownUnitError(f"unknown unit {uuid!r}")
        fresh = bool(self.tel_t[slot] >= now - stale_after_s)
        if fresh:
            sm, bw, mem = self.eff_sm[slot], self.eff_bw[slot], self.eff_mem[slot]
        else:
            sm, bw, mem = self.decl_sm[slot], self.decl_bw[slot], self.decl_mem[slot]
        age = now - self.tel_t[slot]
        return {
            "sm": round(float(sm), 4),
            "bw": round(float(bw), 4),
            "mem_bytes": int(mem),
            "mem_capacity_bytes": int(self.mem_cap[slot]),
            "stale": not fresh,
            "telemetry_age_s": round(float(age), 3) if math.isfinite(age) else None,
            "compute_source": "tensor" if self.tel_tensor[slot] else "sm_active",
            "declared": {
                "sm": round(float(self.decl_sm[slot]), 4),
                "bw": round(float(self.decl_bw[slot]), 4),
                "mem_bytes": int(self.decl_mem[slot]),
            },
            "recently_placed": {
                "sm": round(float(self.recent_sm[slot]), 4),
                "bw": round(float(self.recent_bw[slot]), 4),
                "mem_bytes": int(self.recent_mem[slot]),
            },
            "pods": int(self.npods[slot]),
            "healthy": bool(self.healthy[slot]),
        }

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

    def iter_pods(self) -> Iterable[PodRecord]:
        return iter(list(self._pods.values()))


def _ratio(x: float | None) -> float:
    """Telemetry ratios are 0..1 (DESIGN: never percent); NaN (GPM hiccup) counts as 0."""
    if x is None or not math.isfinite(x):
        return 0.0
    return min(1.0, max(0.0, float(x)))
