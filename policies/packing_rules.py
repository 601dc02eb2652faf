"""The packing rules beyond capacity that the decision core ANDs into a unit's feasibility:
bursts (one at a time, beside the unit's summed per-pod time when time-sliced), prefill's
typical load beside the decode pods' MPS caps, burst-provisioned replicas kept apart, units a
pod would leave closed, and the SLO check. Each is one vectorized pass over the (K, rows)
arrays, row-local (row_cache.py relies on that). docs/policies.md states them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from policies.cluster_view import ClusterView, declares_typical_sm
from policies.config import PolicyConfig
from policies.contention import slowdown_factor
from policies.model import PodRequest
from policies.share import sm_share_fraction
from policies.type_table import EPS, TypeTable


def policy_is_burst_aware(config: PolicyConfig) -> bool:
    """Only copack's own policy reads typical-vs-provisioned demand; the baselines keep the
    semantics of the schedulers they stand for."""
    return config.policy == "complementary"


# A pod's typical prefill load over the SMs its MPS neighbours' decode caps leave it: a queue
# whose utilization reaches 1 grows without bound, whatever the per-request SLO check says.
_MIN_SM_LEFT = 0.05


def one_burst_fits(
    view: ClusterView,
    table: TypeTable,
    tid: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    bound: float,
    cols: np.ndarray | None,
    r: int,
) -> np.ndarray:
    """Units where a burst still fits (docs/policies.md "one burst at a time"). At most one of
    a unit's burst-provisioned pods bursts at a time (bursts of different workloads are rare
    and independent): while it does, the others run at their typical load and the largest
    burst must still fit beside it. Under MPS that load is the summed SMs with the new pod's
    (`y`; the decode caps' share is typical_load_served's). A time-sliced unit never runs two
    pods' kernels at once, so its resource is time, and each pod holds the larger of its SM
    and bandwidth share of it: a decode pod holds the GPU for its bandwidth-bound kernels
    however few SMs it declares, and a prefill pod for its compute. So there the bursts must
    fit beside the summed per-pod times (never below the summed SMs or bandwidth, which may
    come from telemetry)."""
    sel = slice(None, r) if cols is None else cols
    mps = view.mps[:, sel]
    need = np.maximum(view.burst_sm[:, sel], np.take(table.burst, tid, mode="clip"))
    if mps.all():
        return np.less_equal(need + y, bound)
    own = np.maximum(np.take(table.sm, tid, mode="clip"), np.take(table.bw, tid, mode="clip"))
    held = np.maximum(np.maximum(x, y), view.time_sum[:, sel] + own)
    return np.less_equal(need + np.where(mps, y, held), bound)


def typical_load_served(
    view: ClusterView,
    request: PodRequest,
    table: TypeTable,
    tid: np.ndarray,
    dsm: np.ndarray,
    lsm: np.ndarray,
    config: PolicyConfig,
    cols: np.ndarray | None,
    r: int,
) -> np.ndarray | bool:
    """Units where every typical-declaring prefill pod (the new one or one already there)
    still serves its typical load with the SMs the decode pods' MPS caps leave: decode kernels
    hold their cap's SMs while they run, and decode pods run nearly all the time. Conservative
    (the whole typical load is taken as SM-bound)."""
    sel = slice(None, r) if cols is None else cols
    caps = view.decode_caps[:, sel]
    slack = config.overcommit + EPS
    if declares_typical_sm(request.role, request):
        left = np.maximum(_MIN_SM_LEFT, 1.0 - caps)
        return np.less_equal(dsm, left + slack) | ~view.mps[:, sel]
    if request.role == "decode":
        typical = view.typical_sm[:, sel]
        cap = sm_share_fraction("decode", dsm, lsm, config)
        left = np.maximum(_MIN_SM_LEFT, 1.0 - caps - cap)
        return np.less_equal(typical, left + slack) | ~view.mps[:, sel]
    return True


def correlated_units(
    view: ClusterView,
    request: PodRequest,
    table: TypeTable,
    config: PolicyConfig,
    shape: tuple[int, ...],
    cols: np.ndarray | None,
) -> np.ndarray | None:
    """Units holding a burst-provisioned replica of the pod's own workload when the pod is
    burst-provisioned too (None: no such unit)."""
    if (
        not policy_is_burst_aware(config)
        or not config.separate_bursty_replicas
        or not request.group
        or not table.burst.any()
    ):
        return None
    slots = view.bursty_slots(request.group)
    if not slots:
        return None
    out = np.zeros(shape, dtype=bool)
    for j, row in slots:
        if cols is None:
            if row < shape[1]:
                out[j, row] = True
            continue
        at = int(np.searchsorted(cols, row))
        if at < len(cols) and cols[at] == row:
            out[j, at] = True
    return out


def smallest_pod_mem(view: ClusterView, table: TypeTable) -> float:
    """The smallest memory any pod the cluster runs declares (the pod itself included): a unit
    with less memory left can take no other pod."""
    sizes = table.mem[(~table.bad) & (table.mem > 0)]
    small = float(sizes.min()) if len(sizes) else math.inf
    known = view.min_pod_mem_bytes
    return small if known is None else min(small, float(known))


def reserve_mem(view: ClusterView, table: TypeTable) -> float | None:
    """The memory of the largest pod the cluster runs or waits to place, when some GPU
    product of the cluster cannot hold it whole and the pod at hand needs less: GPUs with a
    unit that holds it open last for this pod (decide()), so that a model only the big GPUs
    hold (Mixtral-8x7B, 93 GB: H200s, not H100s) still finds one. None when every product
    holds it (MIG slices too small for it do not count: the operator cut them to hold less),
    when the pod at hand is that large itself, or when no pod is known."""
    big = view.largest_pod_mem
    whole = view.smallest_whole_gpu_mem()
    if big is None or whole is None or big <= whole:
        return None
    sizes = table.mem[(~table.bad) & (table.mem > 0)]
    if len(sizes) == 0 or float(sizes.min()) >= big:
        return None
    return float(big)


def sole_tenant(view: ClusterView, table: TypeTable, slot: tuple[int, int], mem: int) -> bool:
    """An MPS unit with no pod on it that a pod of `mem` bytes leaves closed to every pod the
    cluster runs (memory): the pod will be alone there for as long as it stays, so an MPS cap
    would protect no neighbour and only slow it (a decode pod at a 30 % cap runs at ~0.8 of
    its speed, and a KV-bound one with few sequences queues its requests for it)."""
    if not view.mps[slot] or view.npods[slot] != 0:
        return False
    return float(view.mem_cap[slot]) - mem < smallest_pod_mem(view, table)


def closed_units(
    view: ClusterView,
    table: TypeTable,
    msum: np.ndarray,
    mem_cap: np.ndarray,
    npods: np.ndarray,
    config: PolicyConfig,
    buf: Any,
    tmp: np.ndarray,
) -> np.ndarray:
    """Units the pod would leave closed to every pod the cluster runs: the memory left is
    below the smallest pod placed anywhere (or the pod itself), or its last slot is taken.
    Their leftover SMs and bandwidth are lost for as long as the pod stays (fragmentation)."""
    closed = np.greater_equal(npods, config.max_pods_per_unit - 1, out=buf("closed", bool))
    small = smallest_pod_mem(view, table)
    if math.isfinite(small):
        np.subtract(mem_cap, msum, out=tmp)
        closed |= np.less(tmp, small, out=buf("closed_mem", bool))
    return closed


def slo_violations(
    view: ClusterView,
    request: PodRequest,
    table: TypeTable,
    tid: np.ndarray,
    dsm: np.ndarray,
    lsm: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    config: PolicyConfig,
    cols: np.ndarray | None = None,
) -> np.ndarray | None:
    """Units where the pod's predicted slowdown breaks its SLO, or where the contention it adds
    exceeds the tolerance of an SLO-carrying pod already there (cluster_view._tolerance)."""
    slo = request.slo
    if slo.empty and not view.has_slo_pods():
        return None
    r = view.n_rows
    bad = None
    ex = np.maximum(0.0, x - 1.0)
    ey = np.maximum(0.0, y - 1.0)
    if view.has_slo_pods():
        with np.errstate(divide="ignore", invalid="ignore"):
            tol_x = view.tol_x[:, :r] if cols is None else view.tol_x[:, cols]
            tol_y = view.tol_y[:, :r] if cols is None else view.tol_y[:, cols]
            ux = np.where(ex > 0, ex / tol_x, 0.0)
            uy = np.where(ey > 0, ey / tol_y, 0.0)
        bad = ux + uy > 1.0 + 1e-9
    if slo.empty:
        return bad
    share = sm_share_fraction(request.role, dsm, lsm, config)
    own = np.zeros(tid.shape, dtype=bool)
    if slo.ttft_s is not None and request.role != "decode":
        f = slowdown_factor(table.a_p[tid], table.mf_p[tid], share, x, y)
        base = table.ttft[tid]
        own |= (base * f > slo.ttft_s * (1 + 1e-9)) & (base > 0)
    if slo.tpot_s is not None and request.role != "prefill":
        f = slowdown_factor(table.a_d[tid], table.mf_d[tid], share, x, y)
        base = table.tpot[tid]
        own |= (base * f > slo.tpot_s * (1 + 1e-9)) & (base > 0)
    return own if bad is None else (bad | own)
