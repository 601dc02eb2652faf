"""Telemetry and effective load of the units in `ClusterView` (policies/cluster_view.py):
recording samples, recomputing a unit's declared sums, recently-placed part and effective load
from its pods, and reading the load arrays decisions use. `ClusterView` inherits
`UnitLoadMixin`, whose state its `__init__` creates."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from policies.view_pods import burst_headroom, declares_typical_sm
from policies.view_storage import Slot


class UnknownUnitError(KeyError):
    """A unit UUID the view does not know."""

    def __str__(self) -> str:
        return str(self.args[0])


class UnitLoadMixin:
    """Per-unit telemetry and load of `ClusterView`: samples, the derived per-unit arrays
    (declared sums, recent part, effective load, SLO tolerances, burst headroom, time-slice
    and decode-cap sums) and the load reads for decisions and explanations. The attributes it
    uses are created by `ClusterView.__init__`."""

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


def _ratio(x: float | None) -> float:
    """Telemetry ratios are 0..1 (DESIGN: never percent); NaN (GPM hiccup) counts as 0."""
    if x is None or not math.isfinite(x):
        return 0.0
    return min(1.0, max(0.0, float(x)))
