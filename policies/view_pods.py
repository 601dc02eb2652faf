"""The pods `ClusterView` (policies/cluster_view.py) holds: `PodRecord`, what a pod's
declared demand, role and SLO mean for a unit (burst headroom, typical SMs, contention
tolerance), and the bookkeeping of placing and forgetting pods with the counters decisions read
in O(1). `ClusterView` inherits `PodPlacementMixin`, whose state its `__init__` creates; this
module does not import the view, so the view and its other parts can import it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from policies.contention import sm_share_slowdown
from policies.model import Demand, PodRequest, Timing
from policies.view_storage import Slot

# Roles that may be provisioned for bursts (declaring a typical demand below their load)
BURSTY_ROLES = frozenset(("prefill", "mixed"))


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


class PodPlacementMixin:
    """Pod records of `ClusterView`: placing, moving and forgetting pods (pending ones too) and
    the counters kept with them (SLO pods, declared memory sizes, burst-provisioned replicas).
    The attributes it uses are created by `ClusterView.__init__`; `_recompute` comes from
    `UnitLoadMixin` (policies/view_load.py)."""

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
        self.note_waiting(pod_key, None)
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

    def _drop_pods_of(self, uuid: str) -> list[str]:
        pods = list(self._unit_pods.pop(uuid, {}).values())
        for rec in pods:
            self._pods.pop(rec.key, None)
            if rec.slo_sensitive:
                self._slo_pods -= 1
            self._count_mem(rec, -1)
            self._count_group(rec, -1)
        return [rec.key for rec in pods]

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

    def note_waiting(self, pod_key: str, mem_bytes: int | None) -> None:
        """A pod not bound yet and the least memory it needs anywhere (None: forget it; placing
        it forgets it too)."""
        old = self._waiting.pop(pod_key, None)
        if old is not None:
            n = self._waiting_sizes[old] - 1
            if n:
                self._waiting_sizes[old] = n
            else:
                del self._waiting_sizes[old]
        if mem_bytes:
            m = int(mem_bytes)
            self._waiting[pod_key] = m
            self._waiting_sizes[m] = self._waiting_sizes.get(m, 0) + 1

    @property
    def largest_pod_mem(self) -> int | None:
        """The most memory any pod the cluster runs or waits to place needs (None: no pod)."""
        sizes = [*self._mem_sizes, *self._waiting_sizes]
        return max(sizes) if sizes else None

    @property
    def min_pod_mem_bytes(self) -> int | None:
        """The smallest memory any placed pod declared (None when no pod is placed)."""
        return self._min_mem

    def has_slo_pods(self) -> bool:
        """Whether any placed pod carries an SLO (else the neighbour check is skipped)."""
        return self._slo_pods > 0

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

    def iter_pods(self) -> Iterable[PodRecord]:
        return iter(list(self._pods.values()))
