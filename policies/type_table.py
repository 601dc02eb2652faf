"""The pod's demand and predicted timing on each unit type of the view (TypeTable), built once
per pod and shared by decide() and the packing rules: kube-scheduler asks about one pod several
times (filter, prioritize, bind, retries)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from policies.cluster_view import burst_headroom
from policies.config import PolicyConfig
from policies.model import Demand, PodRequest, Timing, UnitType

EPS = 1e-9  # slack of every feasibility comparison (decide(), the packing rules)


class DemandModelLike(Protocol):
    """What decide() needs from workloads.roofline.DemandModel (policies does not import it)."""

    def demand(self, request: PodRequest, unit_type: UnitType) -> Demand: ...

    def timing(self, request: PodRequest, unit_type: UnitType) -> Timing | None: ...

    def explain(self, request: PodRequest, unit_type: UnitType) -> dict: ...


@dataclass
class TypeTable:
    """The pod's demand and predicted timing on each unit type of the view."""

    sm: np.ndarray
    bw: np.ndarray
    mem: np.ndarray
    bad: np.ndarray  # the pod cannot run on this type at all
    why: list[str]
    ttft: np.ndarray
    tpot: np.ndarray
    a_p: np.ndarray
    a_d: np.ndarray
    mf_p: np.ndarray
    mf_d: np.ndarray
    demands: list[Demand | None]
    timings: list[Timing | None]
    # SMs above its declared demand the pod takes while it bursts (cluster_view.burst_headroom)
    burst: np.ndarray = field(default_factory=lambda: np.zeros(1))


# Per demand model: (request, config, unit types) -> its table. The model is pure (its own
# cache relies on that too), and kube-scheduler asks about one pod several times (filter,
# prioritize, bind, retries), so a pod's table is built once. Bounded: cleared when full.
_TABLES: weakref.WeakKeyDictionary[Any, dict[tuple, TypeTable]] = weakref.WeakKeyDictionary()
_TABLES_MAX = 1024


def type_table(
    types: list[UnitType], request: PodRequest, dm: DemandModelLike, config: PolicyConfig
) -> TypeTable:
    """The pod's table, cached; callers must not write into it."""
    try:
        cache = _TABLES.setdefault(dm, {})
    except TypeError:  # a model that takes no weak reference: no cache
        return build_type_table(types, request, dm, config)
    key = (request, config, tuple(types))
    tab = cache.get(key)
    if tab is None:
        if len(cache) >= _TABLES_MAX:
            cache.clear()
        tab = cache[key] = build_type_table(types, request, dm, config)
    return tab


def build_type_table(
    types: list[UnitType], request: PodRequest, dm: DemandModelLike, config: PolicyConfig
) -> TypeTable:
    """Ask the demand model once per unit type; mark types the pod can never use."""
    k = max(1, len(types))  # type id 0 also marks never-used slots: keep the table non-empty

    def z() -> np.ndarray:
        return np.zeros(k, dtype=np.float64)

    tab = TypeTable(
        z(), z(), z(), np.zeros(k, dtype=bool), [""] * k, z(), z(), z(), z(), z(), z(),
        [None] * k, [None] * k, z(),
    )  # fmt: skip
    bound = 1.0 + config.overcommit + EPS
    for i, t in enumerate(types):
        try:
            d = dm.demand(request, t)
            tm = dm.timing(request, t)
        except (KeyError, ValueError) as e:
            tab.bad[i], tab.why[i] = True, f"demand model: {e}"
            continue
        tab.demands[i], tab.timings[i] = d, tm
        tab.sm[i], tab.bw[i], tab.mem[i] = d.sm, d.bw, float(d.mem_bytes)
        # a burst-provisioned pod must get its provisioned SMs when alone, whatever it declares
        peak_sm = d.sm + burst_headroom(request.role, d.sm, tm)
        if config.policy != "binpack" and (peak_sm > bound or d.bw > bound):
            tab.bad[i] = True
            what = "SMs" if peak_sm >= d.bw else "bandwidth"
            tab.why[i] = f"needs {max(peak_sm, d.bw):.2f}x the unit's {what}"
            if peak_sm > d.sm and peak_sm >= d.bw:
                tab.why[i] += " at its provisioned load"
        if tm is None:
            continue
        tab.burst[i] = burst_headroom(request.role, d.sm, tm)
        tab.ttft[i], tab.tpot[i] = tm.ttft_s, tm.tpot_s
        tab.a_p[i], tab.a_d[i] = tm.a_prefill, tm.a_decode
        tab.mf_p[i], tab.mf_d[i] = tm.mem_frac_prefill, tm.mem_frac_decode
        slo = request.slo
        if not config.slo_check or config.policy == "binpack" or tab.bad[i]:
            continue
        if slo.ttft_s is not None and request.role != "decode" and tm.ttft_s > slo.ttft_s:
            tab.bad[i] = True
            tab.why[i] = (
                f"predicted TTFT {tm.ttft_s * 1e3:.0f} ms alone > SLO {slo.ttft_s * 1e3:.0f} ms"
            )
        elif slo.tpot_s is not None and request.role != "prefill" and tm.tpot_s > slo.tpot_s:
            tab.bad[i] = True
            tab.why[i] = (
                f"predicted TPOT {tm.tpot_s * 1e3:.1f} ms alone > SLO {slo.tpot_s * 1e3:.1f} ms"
            )
    return tab
