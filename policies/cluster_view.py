"""The cluster as the decision core sees it: every unit (whole GPU or MIG instance) in one
struct-of-arrays, updated one event at a time in O(1) amortized, read by decide() in a few
vectorized passes.

Per unit we keep capacity (memory bytes; sm and bw capacity are 1.0 by definition, demands are
fractions of the unit), health, the last telemetry sample and its time, the sum of declared
demands of pods bound to it and the part of that sum placed too recently to show in the
telemetry. Python-side dicts map names to slots and hold the pods; nothing on the decision
path loops over units in Python."""

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
    "tol_x",
    "tol_y",
)
_INT_FIELDS = ("node_id", "type_id", "npods", "index")
_BOOL_FIELDS = ("active", "healthy", "tel_tensor")


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
    slots: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    mps: bool = False


def _tolerance(
    request: PodRequest | None, timing: Timing | None, sm_share: int
) -> tuple[float, float]:
    """How much bandwidth excess (x-1) and compute excess (y-1) this pod's SLO tolerates.

    From slowdown_factor: f = a/s + 1 - a + mem_frac*(x-1) + a*(y-1) must stay within
    slo/base, so (x-1) <= slack/mem_frac and (y-1) <= slack/a, per metric."""
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


class UnknownUnitError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class ClusterView:
    """Mutable vectorized view of every unit; see the module docstring."""

    def __init__(self, capacity: int = 1024) -> None:
        self._cap = max(16, capacity)
        self._n = 0  # slots ever used (high-water mark)
        for f in _FLOAT_FIELDS:
            setattr(self, f, np.zeros(self._cap, dtype=np.float64))
        for f in _INT_FIELDS:
            setattr(self, f, np.zeros(self._cap, dtype=np.int32))
        for f in _BOOL_FIELDS:
            setattr(self, f, np.zeros(self._cap, dtype=bool))
        self.tel_t[:] = -np.inf
        self.tol_x[:] = np.inf
        self.tol_y[:] = np.inf
        self._free: list[int] = []
        self.slot_uuid: list[str | None] = [None] * self._cap
        self.slot_unit: list[InventoryUnit | None] = [None] * self._cap
        self._uuid_slot: dict[str, int] = {}
        self._nodes: dict[str, _Node] = {}
        self._node_by_id: list[_Node | None] = []
        self._free_node_ids: list[int] = []
        self.types: list[UnitType] = []
        self._type_index: dict[UnitType, int] = {}
        self._pods: dict[str, PodRecord] = {}
        self._unit_pods: dict[int, dict[str, PodRecord]] = {}
        self._pending: dict[str, PodRecord] = {}  # placed on a unit not (yet) in the view
        self._order_dirty = True
        self._order: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._group_of_node = np.zeros(0, dtype=np.intp)
        self._order_version = 0  # bumped when the node/unit membership (the order) changes
        self._slo_pods = 0  # attached pods whose SLO makes them sensitive to contention
        self.version = 0  # bumped on every change (caches key on it)
        self._window = 10.0  # assumed window (s); see set_assumed_window

    # -- storage ---------------------------------------------------------------------------
    def _grow(self) -> None:
        new = self._cap * 2
        for f in (*_FLOAT_FIELDS, *_INT_FIELDS, *_BOOL_FIELDS):
            old = getattr(self, f)
            arr = np.zeros(new, dtype=old.dtype)
            arr[: self._cap] = old
            setattr(self, f, arr)
        self.tel_t[self._cap :] = -np.inf
        self.tol_x[self._cap :] = np.inf
        self.tol_y[self._cap :] = np.inf
        self.slot_uuid.extend([None] * (new - self._cap))
        self.slot_unit.extend([None] * (new - self._cap))
        self._cap = new

    def _alloc_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._n == self._cap:
            self._grow()
        self._n += 1
        return self._n - 1

    def _type_id(self, t: UnitType) -> int:
        tid = self._type_index.get(t)
        if tid is None:
            tid = len(self.types)
            self.types.append(t)
            self._type_index[t] = tid
        return tid

    def _reset_slot(self, slot: int) -> None:
        self.active[slot] = False
        self.healthy[slot] = False
        self.tel_t[slot] = -np.inf
        for f in ("tel_sm", "tel_bw", "tel_mem", "decl_sm", "decl_bw", "decl_mem"):
            getattr(self, f)[slot] = 0.0
        for f in ("recent_sm", "recent_bw", "recent_mem"):
            getattr(self, f)[slot] = 0.0
        self.tol_x[slot] = np.inf
        self.tol_y[slot] = np.inf
        self.npods[slot] = 0
        self.tel_tensor[slot] = False
        self.slot_uuid[slot] = None
        self.slot_unit[slot] = None

    # -- nodes and units -------------------------------------------------------------------
    def set_node(
        self,
        name: str,
        units: Sequence[InventoryUnit],
        labels: Mapping[str, str] | None = None,
        mps: bool = False,
    ) -> list[str]:
        """Create or replace a node's units (from its `copack.io/inventory`).

        Units keep their slot, telemetry and pods when their UUID stays; units that vanished
        (re-partition, GPU lost from the inventory) are dropped with their pods, whose keys are
        returned. Pods placed earlier on a UUID that now appears are attached."""
        node = self._nodes.get(name)
        if node is None:
            nid = self._free_node_ids.pop() if self._free_node_ids else len(self._node_by_id)
            node = _Node(name, nid)
            if nid == len(self._node_by_id):
                self._node_by_id.append(node)
            else:
                self._node_by_id[nid] = node
            self._nodes[name] = node
        node.labels = dict(labels or {})
        node.mps = bool(mps)
        wanted = {u.uuid: u for u in units}
        if len(wanted) != len(units):
            raise ValueError(f"node {name}: duplicate unit uuids in inventory")
        dropped: list[str] = []
        keep: list[int] = []
        for slot in node.slots:
            uuid = self.slot_uuid[slot]
            if uuid in wanted:
                keep.append(slot)
            else:
                dropped.extend(self._drop_slot(slot))
        for uuid in wanted:
            other = self._uuid_slot.get(uuid)
            if other is not None and other not in keep:
                # The same UUID under another node: the inventories disagree; the newest wins.
                dropped.extend(self._drop_slot(other))
                for n in self._nodes.values():
                    if other in n.slots:
                        n.slots.remove(other)
        by_uuid = {self.slot_uuid[s]: s for s in keep}
        new_slots: list[int] = []
        for u in units:  # inventory order = order of units within the node
            slot = by_uuid.get(u.uuid)
            if slot is None:
                slot = self._alloc_slot()
                self._reset_slot(slot)
                self.slot_uuid[slot] = u.uuid
                self._uuid_slot[u.uuid] = slot
                self.active[slot] = True
                self._unit_pods[slot] = {}
            self.slot_unit[slot] = u
            self.node_id[slot] = node.node_id
            self.type_id[slot] = self._type_id(UnitType(u.product, u.mig_profile))
            self.mem_cap[slot] = float(u.memory_bytes)
            self.healthy[slot] = bool(u.healthy)
            self.index[slot] = u.index
            new_slots.append(slot)
        node.slots = new_slots
        for key in list(self._pending):
            rec = self._pending[key]
            slot = self._uuid_slot.get(rec.uuid)
            if slot is not None:
                del self._pending[key]
                self._attach(rec, slot)
        self._order_dirty = True
        self.version += 1
        return dropped

    def _drop_slot(self, slot: int) -> list[str]:
        uuid = self.slot_uuid[slot]
        pods = list(self._unit_pods.pop(slot, {}).keys())
        for key in pods:
            rec = self._pods.pop(key, None)
            if rec is not None and (math.isfinite(rec.tol_x) or math.isfinite(rec.tol_y)):
                self._slo_pods -= 1
        if uuid is not None:
            self._uuid_slot.pop(uuid, None)
        self._reset_slot(slot)
        self._free.append(slot)
        return pods

    def remove_node(self, name: str) -> list[str]:
        """Forget a node and its units; returns the keys of pods that were on them."""
        node = self._nodes.pop(name, None)
        if node is None:
            return []
        dropped: list[str] = []
        for slot in node.slots:
            dropped.extend(self._drop_slot(slot))
        self._node_by_id[node.node_id] = None
        self._free_node_ids.append(node.node_id)
        self._order_dirty = True
        self.version += 1
        return dropped

    def set_unit_health(self, uuid: str, healthy: bool) -> bool:
        """Mark a unit healthy or not (agent reports, GPU lost). False if the UUID is unknown."""
        slot = self._uuid_slot.get(uuid)
        if slot is None:
            return False
        self.healthy[slot] = bool(healthy)
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
        False for an unknown UUID; older samples than the one held are ignored."""
        slot = self._uuid_slot.get(uuid)
        if slot is None:
            return False
        if t < self.tel_t[slot]:
            return True
        comp = tensor if tensor is not None and math.isfinite(tensor) else sm
        self.tel_t[slot] = t
        self.tel_sm[slot] = _ratio(comp)
        self.tel_bw[slot] = _ratio(bw)
        self.tel_mem[slot] = (
            max(0.0, float(mem_used_bytes)) if math.isfinite(mem_used_bytes) else 0.0
        )
        self.tel_tensor[slot] = tensor is not None and math.isfinite(tensor)
        self._recompute_sums(slot)
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
        if slot is None:
            self._pending[pod_key] = rec
            self.version += 1
            return False
        self._attach(rec, slot)
        self.version += 1
        return True

    def _attach(self, rec: PodRecord, slot: int) -> None:
        self._pods[rec.key] = rec
        if math.isfinite(rec.tol_x) or math.isfinite(rec.tol_y):
            self._slo_pods += 1
        self._unit_pods.setdefault(slot, {})[rec.key] = rec
        self._recompute_sums(slot)

    def unplace(self, pod_key: str) -> bool:
        """Forget a pod (deleted, finished, bind failed). False if it was not known."""
        if self._pending.pop(pod_key, None) is not None:
            self.version += 1
            return True
        rec = self._pods.pop(pod_key, None)
        if rec is None:
            return False
        if math.isfinite(rec.tol_x) or math.isfinite(rec.tol_y):
            self._slo_pods -= 1
        slot = self._uuid_slot.get(rec.uuid)
        if slot is not None:
            self._unit_pods.get(slot, {}).pop(pod_key, None)
            self._recompute_sums(slot)
        self.version += 1
        return True

    def _recompute_sums(self, slot: int) -> None:
        """Declared sums, the recently-placed part and SLO tolerances of one unit (exact; a unit
        holds a handful of pods so this is O(1) in the cluster size)."""
        pods = self._unit_pods.get(slot) or {}
        cutoff = self.tel_t[slot] - self._window
        dsm = dbw = dmem = rsm = rbw = rmem = 0.0
        tx = ty = math.inf
        for rec in pods.values():
            d = rec.demand
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
        self.tol_x[slot], self.tol_y[slot] = tx, ty
        self.npods[slot] = len(pods)

    def set_assumed_window(self, seconds: float) -> None:
        """Pods placed less than `seconds` before a unit's latest telemetry count as not yet
        visible in it. Recomputes every unit (configuration change, not a hot path)."""
        if seconds < 0:
            raise ValueError("assumed window must be >= 0")
        self._window = float(seconds)
        for slot in self._uuid_slot.values():
            self._recompute_sums(slot)
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
        return [self.slot_uuid[s] for s in n.slots] if n else []  # type: ignore[misc]

    def unit(self, uuid: str) -> InventoryUnit | None:
        slot = self._uuid_slot.get(uuid)
        return None if slot is None else self.slot_unit[slot]

    def node_of_unit(self, uuid: str) -> str | None:
        slot = self._uuid_slot.get(uuid)
        if slot is None:
            return None
        node = self._node_by_id[int(self.node_id[slot])]
        return node.name if node else None

    def unit_type(self, uuid: str) -> UnitType | None:
        slot = self._uuid_slot.get(uuid)
        return None if slot is None else self.types[int(self.type_id[slot])]

    def pods_on(self, uuid: str) -> list[PodRecord]:
        slot = self._uuid_slot.get(uuid)
        if slot is None:
            return []
        return list((self._unit_pods.get(slot) or {}).values())

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

    def slot_of(self, uuid: str) -> int | None:
        return self._uuid_slot.get(uuid)

    def node_slots(self, name: str) -> list[int]:
        n = self._nodes.get(name)
        return list(n.slots) if n else []

    def node_id_of(self, name: str) -> int | None:
        n = self._nodes.get(name)
        return n.node_id if n else None

    def node_name_by_id(self, nid: int) -> str:
        node = self._node_by_id[nid]
        return node.name if node else ""

    @property
    def n_node_ids(self) -> int:
        return len(self._node_by_id)

    @property
    def n_slots(self) -> int:
        return self._n

    def order(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(perm, starts, group_node_ids, group_of_pos): active slots sorted by node, each
        node's units contiguous in inventory order, for per-node reductions. Rebuilt only
        when units are added or removed."""
        if self._order_dirty or self._order is None:
            slots: list[int] = []
            starts: list[int] = []
            gids: list[int] = []
            for node in self._node_by_id:
                if node is None or not node.slots:
                    continue
                starts.append(len(slots))
                gids.append(node.node_id)
                slots.extend(node.slots)
            perm = np.asarray(slots, dtype=np.intp)
            st = np.asarray(starts, dtype=np.intp)
            counts = np.diff(np.append(st, len(perm)))
            group_of_pos = np.repeat(np.arange(len(st), dtype=np.intp), counts)
            self._order = (perm, st, np.asarray(gids, dtype=np.intp), group_of_pos)
            gon = np.full(len(self._node_by_id), -1, dtype=np.intp)
            gon[np.asarray(gids, dtype=np.intp)] = np.arange(len(gids), dtype=np.intp)
            self._group_of_node = gon
            self._order_dirty = False
            self._order_version += 1
        return self._order

    def group_of_node(self) -> np.ndarray:
        """node id -> group index in order() (-1: node without units)."""
        self.order()
        return self._group_of_node

    def has_slo_pods(self) -> bool:
        """Whether any placed pod carries an SLO (else the neighbour check is skipped)."""
        return self._slo_pods > 0

    # -- load ------------------------------------------------------------------------------
    def load_arrays(self, now: float, stale_after_s: float) -> tuple[np.ndarray, ...]:
        """Effective load of every slot (DESIGN.md "Units, demand, load"):
        fresh telemetry + recently-placed declared demand, never below the declared sum;
        stale (or no) telemetry -> declared sum only. Returns (sm, bw, mem_bytes, stale)."""
        n = self._n
        tel_t = self.tel_t[:n]
        fresh = tel_t >= (now - stale_after_s)
        lsm = np.where(
            fresh,
            np.maximum(self.tel_sm[:n] + self.recent_sm[:n], self.decl_sm[:n]),
            self.decl_sm[:n],
        )
        lbw = np.where(
            fresh,
            np.maximum(self.tel_bw[:n] + self.recent_bw[:n], self.decl_bw[:n]),
            self.decl_bw[:n],
        )
        lmem = np.where(
            fresh,
            np.maximum(self.tel_mem[:n] + self.recent_mem[:n], self.decl_mem[:n]),
            self.decl_mem[:n],
        )
        return lsm, lbw, lmem, ~fresh

    def unit_load(self, uuid: str, now: float, stale_after_s: float) -> dict[str, Any]:
        """One unit's effective load and where it came from (for explanations)."""
        slot = self._uuid_slot.get(uuid)
        if slot is None:
            raise UnknownUnitError(f"unknown unit {uuid!r}")
        fresh = self.tel_t[slot] >= now - stale_after_s
        if fresh:
            sm = max(self.tel_sm[slot] + self.recent_sm[slot], self.decl_sm[slot])
            bw = max(self.tel_bw[slot] + self.recent_bw[slot], self.decl_bw[slot])
            mem = max(self.tel_mem[slot] + self.recent_mem[slot], self.decl_mem[slot])
        else:
            sm, bw, mem = self.decl_sm[slot], self.decl_bw[slot], self.decl_mem[slot]
        age = now - self.tel_t[slot]
        return {
            "sm": round(float(sm), 4),
            "bw": round(float(bw), 4),
            "mem_bytes": int(mem),
            "mem_capacity_bytes": int(self.mem_cap[slot]),
            "stale": not fresh,
            "telemetry_age_s": None if not math.isfinite(age) else round(float(age), 3),
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
        """JSON-able dump for /debug/state."""
        nodes: dict[str, Any] = {}
        for name, node in self._nodes.items():
            units = []
            for slot in node.slots:
                uuid = self.slot_uuid[slot]
                u = self.slot_unit[slot]
                entry: dict[str, Any] = {
                    "uuid": uuid,
                    "type": str(self.types[int(self.type_id[slot])]),
                    "index": int(self.index[slot]),
                    "parent": u.parent if u else None,
                    "pods": sorted(self._unit_pods.get(slot, {})),
                }
                if now is not None:
                    entry["load"] = self.unit_load(uuid, now, stale_after_s)  # type: ignore[arg-type]
                else:
                    entry["healthy"] = bool(self.healthy[slot])
                    entry["telemetry_t"] = (
                        None if not math.isfinite(self.tel_t[slot]) else float(self.tel_t[slot])
                    )
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


def _ratio(x: float) -> float:
    """Telemetry ratios are 0..1 (DESIGN: never percent); NaN (GPM hiccup) counts as 0."""
    if x is None or not math.isfinite(x):
        return 0.0
    return min(1.0, max(0.0, float(x)))
