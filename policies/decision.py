"""decide(): score one pod against candidate nodes; choose_unit(): re-decide on one node at bind.

Every unit is scored in a fixed number of numpy passes over the view's (K, rows) arrays: the
demand model is asked once per unit *type* (a cluster has a handful: H100, H100 3g.40gb, ...)
and the per-type demand is broadcast to the units with one `take`; feasibility is a boolean
mask; the policy gives one score per unit; per-node maxima are element-wise maxima across the
K unit columns. Temporaries live in the view's scratch buffers. What only an explanation or a
filter answer needs (reason codes, the dicts) is built lazily, on first access."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

from policies import packing_rules as rules
from policies import row_cache
from policies.answer import Decision, Placement
from policies.cluster_view import ClusterView
from policies.config import PolicyConfig
from policies.model import PodRequest
from policies.open_order import (
    OPEN_FIT_WEIGHT,
    OPEN_PENALTY,
    RESERVED_OPEN_PENALTY,
    TIME_SLICED_OPEN_PENALTY,
)
from policies.row_cache import RowEval
from policies.type_table import DemandModelLike, TypeTable, type_table

_EPS = rules.EPS
_UNKNOWN = -1


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a node cannot take the pod (bind-time re-decision failed)."""

    node: str
    reason: str


class _CandidateCache:
    """Resolving 5,000 node names costs as much as scoring 40,000 units, and kube-scheduler
    sends the same list again and again: remember the last resolution per view."""

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.version: tuple[int, int] = (-1, -1)
        self.value: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def _resolve(
    view: ClusterView, names: Sequence[str] | None
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(candidate names, the same as a numpy object array, primary row per candidate or
    _UNKNOWN, row mask of candidates)."""
    cache: _CandidateCache = view.__dict__.setdefault("_cand_cache", _CandidateCache())
    version = (view.layout_version, view.n_rows)
    if names is None:
        names = view.node_names
    elif not isinstance(names, list):
        names = list(names)
    if cache.version == version and cache.value is not None and cache.names == names:
        return cache.names, *cache.value
    cand_names = list(names)
    as_array = np.empty(len(cand_names), dtype=object)
    as_array[:] = cand_names
    get = view.primary_rows().get
    cand_row = np.fromiter(map(get, cand_names, repeat(_UNKNOWN)), np.intp, len(cand_names))
    mask = np.zeros(view.n_rows, dtype=bool)
    mask[cand_row[cand_row >= 0]] = True
    cache.names, cache.version = cand_names, version
    cache.value = (as_array, cand_row, mask)
    return cand_names, as_array, cand_row, mask


def _sparse_columns(view: ClusterView, cand_row: np.ndarray) -> np.ndarray | None:
    """The rows of the candidate nodes, sorted, when they are few enough (under 1/8 of the
    view) that gathering them beats one pass over every row; else None."""
    r = view.n_rows
    known = cand_row[cand_row >= 0]
    if r < 64 or len(known) * 8 >= r:
        return None
    if view.multi_row_nodes:  # a wide node's other rows come with its first
        firsts = set(known.tolist())
        extra = [
            row for rows in view.multi_row_nodes.values() if rows[0] in firsts for row in rows[1:]
        ]
        if extra:
            known = np.concatenate([known, np.asarray(extra, dtype=np.intp)])
    # sort + drop repeats: np.unique's general machinery costs ~5x this on 500 rows
    rows = np.sort(known)
    if len(rows) > 1 and not (rows[1:] != rows[:-1]).all():
        rows = rows[np.concatenate(([True], rows[1:] != rows[:-1]))]
    return rows


def _fold_multi_row(view: ClusterView, best: np.ndarray, best_j: np.ndarray) -> np.ndarray:
    """Nodes spanning several rows: move the best of their rows into their first row."""
    best_row = np.arange(len(best), dtype=np.intp)
    for rows in view.multi_row_nodes.values():
        vals = best[rows]
        k = int(np.argmax(vals))  # first max in row order
        first = rows[0]
        best[first], best_j[first], best_row[first] = vals[k], best_j[rows[k]], rows[k]
    return best_row


def evaluate_rows(
    view: ClusterView,
    request: PodRequest,
    table: TypeTable,
    config: PolicyConfig,
    now: float,
    cols: np.ndarray | None,
) -> RowEval:
    """Feasibility and the best unit of each row, for every row (`cols` None) or the given
    rows. Row-local: a row's answer depends only on its own arrays, the pod's table, the
    config and a few view-wide facts (row_cache.view_facts), which is what lets the row
    cache re-score only the rows changed since it was built."""
    r = view.n_rows
    if cols is None:  # score every row, in the view's scratch buffers
        tid = view.type_id[:, :r]
        # mode="clip": type ids are always in range, and skipping the bounds check halves the cost
        dsm = np.take(table.sm, tid, out=view.scratch("d_sm"), mode="clip")
        dbw = np.take(table.bw, tid, out=view.scratch("d_bw"), mode="clip")
        dmem = np.take(table.mem, tid, out=view.scratch("d_mem"), mode="clip")
        lsm, lbw, lmem, stale = view.load_arrays(now, config.stale_after_s)
        active = view.active[:, :r].copy()
        healthy = view.healthy[:, :r].copy()
        npods = view.npods[:, :r]
        mem_cap = view.mem_cap[:, :r]
        buf = view.scratch
    else:  # few candidates (bind, small filters): only their rows
        tid = view.type_id[:, cols]
        dsm = np.take(table.sm, tid, mode="clip")
        dbw = np.take(table.bw, tid, mode="clip")
        dmem = np.take(table.mem, tid, mode="clip")
        lsm, lbw, lmem, stale = view.load_arrays(now, config.stale_after_s, cols)
        active = view.active[:, cols]
        healthy = view.healthy[:, cols]
        npods = view.npods[:, cols]
        mem_cap = view.mem_cap[:, cols]
        shape = tid.shape

        def buf(name: str, dtype: Any = np.float64) -> np.ndarray:
            return np.empty(shape, dtype=dtype)

    y = np.add(lsm, dsm, out=buf("y"))
    x = np.add(lbw, dbw, out=buf("x"))
    msum = np.add(lmem, dmem, out=buf("m"))
    # Feasibility as "fits" masks ANDed in place; the reasons are derived lazily from them.
    type_bad = np.take(table.bad, tid, mode="clip") if table.bad.any() else None
    fits_mem = np.less_equal(msum, mem_cap)
    ok = healthy & fits_mem
    if type_bad is not None:
        ok &= ~type_bad
    has_room = np.less(npods, config.max_pods_per_unit)
    ok &= has_room
    empty = None
    if config.exclusive:
        empty = np.equal(npods, 0)
        ok &= empty
    fits_sm = fits_bw = slo_bad = time_bad = burst_bad = None
    correlated = rules.correlated_units(view, request, table, config, tid.shape, cols)
    if correlated is not None:
        ok &= ~correlated
    if config.policy != "binpack":
        bound = 1.0 + config.overcommit + _EPS
        fits_sm = np.less_equal(y, bound)
        fits_bw = np.less_equal(x, bound)
        if rules.policy_is_burst_aware(config) and (
            table.burst.any() or view.has_burst_pods() or view.has_time_sliced()
        ):
            turn_bad = ~rules.one_burst_fits(view, table, tid, x, y, bound, cols, r)
            turn_bad &= fits_sm  # plain SM capacity is the reason where it fails too
            ok &= ~turn_bad
            mps = view.mps[:, slice(None, r) if cols is None else cols]
            time_bad, burst_bad = turn_bad & ~mps, turn_bad & mps
        if rules.policy_is_burst_aware(config):
            fits_sm &= rules.typical_load_served(
                view, request, table, tid, dsm, lsm, config, cols, r
            )
        ok &= fits_sm
        ok &= fits_bw
        if config.slo_check:
            slo_bad = rules.slo_violations(view, request, table, tid, dsm, lsm, x, y, config, cols)
            if slo_bad is not None:
                ok &= ~slo_bad

    score = buf("score")
    tmp = buf("tmp")
    policy = config.policy
    node_val = None
    if policy == "complementary":
        # -(squared L2 norm of residual headroom); sqrt only per node, later.
        np.subtract(1.0, y, out=score)
        np.multiply(score, score, out=score)
        np.subtract(1.0, x, out=tmp)
        np.multiply(tmp, tmp, out=tmp)
        score += tmp
        w = config.fragmentation_weight
        if w > 0.0:  # residual SMs/bandwidth of a unit nothing else can enter are stranded
            closed = rules.closed_units(view, table, msum, mem_cap, npods, config, buf, tmp)
            # score *= 1 + w * closed: three plain passes are 5x faster than one `where=` pass
            np.multiply(closed, w, out=tmp)
            tmp += 1.0
            score *= tmp
        np.divide(msum, mem_cap, out=tmp)
        np.subtract(1.0, tmp, out=tmp)
        np.multiply(tmp, tmp, out=tmp)
        score += tmp
        np.negative(score, out=score)
        if config.consolidate:
            sel = slice(None, r) if cols is None else cols
            idle = np.equal(view.gpu_pods[:, sel], 0)
            if idle.any():
                # score = -(OPEN + (1 - gpu_mem / largest) + 0.1 |h|^2 [+ 0.5 time-sliced]) idle
                small = np.divide(view.gpu_mem[:, sel], max(view.max_gpu_mem, 1.0))
                np.subtract(1.0 + OPEN_PENALTY, small, out=small)
                small -= OPEN_FIT_WEIGHT * score
                if view.has_mixed_sharing():
                    small += TIME_SLICED_OPEN_PENALTY * ~view.mps[:, sel]
                big = rules.reserve_mem(view, table)
                if big is not None:  # GPUs the largest pod needs open after all others
                    small += RESERVED_OPEN_PENALTY * (view.gpu_unit_mem[:, sel] >= big)
                np.putmask(score, idle, -small)
    elif policy == "binpack":  # HAMi/gpushare binpack: fullest memory first
        np.divide(msum, mem_cap, out=score)
    else:  # spread / dedicated: every free unit of a node is as good as another
        score.fill(0.0)
        free = (npods == 0) & active & healthy
        free_count = free.sum(axis=0).astype(np.float64)
        total = active.sum(axis=0).astype(np.float64)
        if view.multi_row_nodes:
            pos = np.full(r, -1, dtype=np.intp)  # absolute row -> column of these arrays
            pos[np.arange(r) if cols is None else cols] = np.arange(len(total))
            for rows in view.multi_row_nodes.values():
                p = pos[rows]
                if p[0] >= 0:
                    free_count[p[0]] = free_count[p].sum()
                    total[p[0]] = total[p].sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            if policy == "spread":  # kube LeastAllocated over the node's units
                node_val = (free_count - 1.0) / total
            else:  # dedicated: MostAllocated, one unit per pod, fill nodes first
                node_val = (total - free_count + 1.0) / total
    np.putmask(score, np.logical_not(ok, out=ok), -np.inf)  # ok is a temporary: reuse it

    m = score.shape[1]
    row_best = score.max(axis=0) if m else np.zeros(0)
    # first unit column reaching the row's best (argmax along axis 0 is 2x slower than this)
    best_j = np.full(m, view.K - 1, dtype=np.intp)
    for j in range(view.K - 2, -1, -1):
        np.copyto(best_j, j, where=score[j] == row_best)
    masks = {
        "active": active,
        "healthy": healthy,
        "type_bad": type_bad,
        "empty": empty,
        "has_room": has_room,
        "fits_mem": fits_mem,
        "fits_sm": fits_sm,
        "fits_bw": fits_bw,
        "slo_bad": slo_bad,
        "correlated": correlated,
        "time_bad": time_bad,
        "burst_bad": burst_bad,
    }
    return RowEval(masks, stale, row_best, best_j, node_val)


def decide(
    view: ClusterView,
    request: PodRequest,
    candidate_nodes: Sequence[str] | None,
    now: float,
    config: PolicyConfig,
    demand_model: DemandModelLike,
    *,
    use_cache: bool = True,
) -> Decision:
    """Score `request` on every unit of the candidate nodes (None = every node of the view).
    Through the view's row cache when the decision is row-local (row_cache.py); `use_cache`
    False scores every candidate row afresh (the reference the cache is tested against).

    Not thread-safe: it writes the view's scratch buffers, so callers serialize decisions and
    updates on one view (the extender holds its state lock)."""
    if abs(view.assumed_window_s - config.assumed_window_s) > 1e-12:
        view.set_assumed_window(config.assumed_window_s)
    r = view.n_rows
    candidates, cand_array, cand_row, cand_mask = _resolve(view, candidate_nodes)
    refusal = ""
    if request.gpus != 1:
        refusal = (
            f"pod asks for {request.gpus} copack.io/gpu; copack places one unit share per pod"
            if request.gpus > 1
            else "pod does not request copack.io/gpu"
        )

    table = type_table(view.types, request, demand_model, config)
    cols = _sparse_columns(view, cand_row)
    ev = None
    if use_cache and _row_local(view, request, table, config):
        ev = row_cache.rows(
            view, row_cache.request_key(request, table, config), cols, now, config.stale_after_s,
            lambda c: evaluate_rows(view, request, table, config, now, c),
        )
    if ev is None:
        ev = evaluate_rows(view, request, table, config, now, cols)
    row_best, best_j, node_val = ev.row_best, ev.best_j, ev.node_val
    if cols is not None:  # back to absolute rows
        full_best = np.full(r, -np.inf)
        full_best[cols] = row_best
        full_j = np.full(r, view.K - 1, dtype=np.intp)
        full_j[cols] = best_j
        row_best, best_j = full_best, full_j
        if node_val is not None:
            full_val = np.full(r, -np.inf)
            full_val[cols] = node_val
            node_val = full_val
    best_row = _fold_multi_row(view, row_best, best_j)
    node_best = row_best
    if node_val is not None:
        node_best = np.where(np.isfinite(row_best), node_val, -np.inf)
    if refusal:
        node_best = np.full(r, -np.inf)
    node_best[~view.row_primary[:r]] = -np.inf  # only a node's first row speaks for it

    fin = np.isfinite(node_best)
    chosen_row = -1
    ok_rows = np.flatnonzero(fin & cand_mask)
    if len(ok_rows):
        vals = node_best[ok_rows]
        top = ok_rows[vals >= vals.max() - 1e-12]
        if len(top) == 1:
            chosen_row = int(top[0])
        else:  # tie: the smallest node name, whatever the candidates' order
            ranks = view.node_name_rank()[view.row_node[top]]
            chosen_row = int(top[np.argmin(ranks)])
    chosen_slot = (-1, -1)
    chosen_load = (0.0, 0.0, 0.0)
    chosen = None
    if chosen_row >= 0:
        chosen_slot = (int(best_j[chosen_row]), int(best_row[chosen_row]))
        chosen_load = _slot_load(view, chosen_slot, now, config.stale_after_s)
        chosen = (
            view.node_name_by_id(int(view.row_node[chosen_row])),
            view.slot_uuid[chosen_slot],
        )

    return Decision(
        view=view,
        request=request,
        config=config,
        demand_model=demand_model,
        now=now,
        refusal=refusal,
        rows=r,
        cols=cols,
        candidates=candidates,
        cand_array=cand_array,
        cand_row=cand_row,
        table=table,
        masks=ev.masks,
        stale=ev.stale,
        reason_memo=ev.memo,
        reason_memo_gen=ev.memo_gen,
        node_best=node_best,
        best_j=best_j,
        best_row=best_row,
        chosen=chosen,
        multi_rows={k: list(v) for k, v in view.multi_row_nodes.items()},
        chosen_row=chosen_row,
        chosen_slot=chosen_slot,
        layout_version=view.layout_version,
        chosen_load=chosen_load,
    )


def _row_local(
    view: ClusterView, request: PodRequest, table: TypeTable, config: PolicyConfig
) -> bool:
    """Whether a row's answer depends on that row alone: not for spread/dedicated (a wide
    node's free-unit count spans its rows) nor when the pod's bursty replicas elsewhere
    count (_correlated_units reads the workload's units across the cluster)."""
    if config.policy not in ("complementary", "binpack"):
        return False
    return not (
        rules.policy_is_burst_aware(config)
        and config.separate_bursty_replicas
        and request.group
        and table.burst.any()
        and view.bursty_slots(request.group)
    )


def _slot_load(
    view: ClusterView, slot: tuple[int, int], now: float, stale_after_s: float
) -> tuple[float, float, float]:
    """One unit's effective (sm, bw, mem) as load_arrays() gives it."""
    if view.tel_t[slot] < now - stale_after_s:
        return float(view.decl_sm[slot]), float(view.decl_bw[slot]), float(view.decl_mem[slot])
    return float(view.eff_sm[slot]), float(view.eff_bw[slot]), float(view.eff_mem[slot])


def choose_unit(
    view: ClusterView,
    request: PodRequest,
    node: str,
    now: float,
    config: PolicyConfig,
    demand_model: DemandModelLike,
) -> Placement | Rejection:
    """Re-decide on one node (at bind, under the extender's per-node lock)."""
    d = decide(view, request, [node], now, config, demand_model)
    if d.refusal:
        return Rejection(node, d.refusal)
    p = d.placement(node)
    if p is None:
        return Rejection(node, d.failed_nodes.get(node, "no unit fits"))
    return p
