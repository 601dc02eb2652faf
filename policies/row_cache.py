"""Per-view cache of decide()'s row scoring, kept current by re-scoring changed rows only.

kube-scheduler asks about one pod after another, and consecutive pods mostly have the same
shape (the replicas of a workload: same role, demand and SLO). Between two such questions a
few rows of the view change (a bind, a telemetry sample of a node, a unit's health), out of
thousands. So for each recent pod shape the cache holds the masks and per-row best units of
every row, and before answering it re-scores only the rows the view stamped since
(`ClusterView.row_stamp`, bumped by every event that writes a row) plus the rows whose
telemetry went stale or fresh since (the one way time alone changes a row). View-wide facts
the scoring reads (the smallest pod placed, whether burst or SLO pods exist, the layout)
are part of the entry: when one changes the entry is rebuilt.

The answer is exactly what scoring every row afresh gives (elementwise numpy, same inputs per
row); tests/policies/test_row_cache.py checks that against decide(use_cache=False) over
random event sequences."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from policies.cluster_view import ClusterView
    from policies.config import PolicyConfig
    from policies.model import PodRequest

SHAPES_KEPT = 8  # pod shapes with a cache entry per view (~0.5 MB each at 40,000 units)
FULL_REBUILD_SHARE = 4  # more than 1/4 of the rows changed: re-score them all in one pass


@dataclass(slots=True)
class RowEval:
    """decide()'s per-row scoring: masks and stale (K, m), row_best and best_j (m,)."""

    masks: dict[str, np.ndarray | None]
    stale: np.ndarray
    row_best: np.ndarray
    best_j: np.ndarray
    node_val: np.ndarray | None = None  # never set for the cached (row-local) policies


@dataclass(slots=True)
class _Entry:
    facts: tuple
    epoch: int
    ev: RowEval


class _Cache:
    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()


def request_key(request: PodRequest, table: Any, config: PolicyConfig) -> tuple:
    """What of the pod the row scoring reads: its role, SLO, whether it declares its typical
    SMs, and its per-type table (every array of it, by value: pods of one workload have equal
    tables in different objects). The pod's name and uid are not in it."""
    declares = request.demand is not None and request.demand.sm is not None
    arrays = tuple(
        getattr(table, f.name).tobytes()
        for f in fields(table)
        if isinstance(getattr(table, f.name), np.ndarray)
    )
    return (config, request.role, request.slo, declares, arrays)


def view_facts(view: ClusterView) -> tuple:
    """The view-wide values the scoring of a row reads besides the row itself."""
    return (
        view.layout_version,
        view.n_rows,
        len(view.types),
        view.has_burst_pods(),
        view.has_slo_pods(),
        view.min_pod_mem_bytes,
        view.max_gpu_mem,
        view.assumed_window_s,
    )


def _copy(ev: RowEval, cols: np.ndarray | None) -> RowEval:
    """The caller's own arrays (decide() folds rows in place; a Decision keeps its masks)."""
    if cols is None:
        return RowEval(
            {k: None if v is None else v.copy() for k, v in ev.masks.items()},
            ev.stale.copy(), ev.row_best.copy(), ev.best_j.copy(),
        )
    return RowEval(
        {k: None if v is None else v[:, cols] for k, v in ev.masks.items()},
        ev.stale[:, cols], ev.row_best[cols], ev.best_j[cols],
    )


def _patch(ev: RowEval, rows: np.ndarray, sub: RowEval) -> bool:
    """Write re-scored rows into the entry; False when a mask came or went (rebuild)."""
    for k, v in sub.masks.items():
        old = ev.masks[k]
        if (v is None) != (old is None):
            return False
        if v is not None and old is not None:
            old[:, rows] = v
    ev.stale[:, rows] = sub.stale
    ev.row_best[rows] = sub.row_best
    ev.best_j[rows] = sub.best_j
    return True


def rows(
    view: ClusterView,
    key: tuple,
    cols: np.ndarray | None,
    now: float,
    stale_after_s: float,
    evaluate: Callable[[np.ndarray | None], RowEval],
) -> RowEval | None:
    """decide()'s RowEval for `cols` (None = every row) from the cache, brought up to date.
    None when the caller should score `cols` itself: a few candidate rows of a shape the
    cache has not seen (bind, small filters) are cheaper to score than every row."""
    cache: _Cache = view.__dict__.setdefault("_row_cache", _Cache())
    facts = view_facts(view)
    entry = cache.entries.get(key)
    if entry is not None and entry.facts != facts:
        del cache.entries[key]
        entry = None
    r = view.n_rows
    if entry is None:
        if cols is not None:
            return None
        entry = _Entry(facts, view.epoch, evaluate(None))
        cache.entries[key] = entry
        while len(cache.entries) > SHAPES_KEPT:
            cache.entries.popitem(last=False)
        return _copy(entry.ev, None)
    cache.entries.move_to_end(key)
    epoch = view.epoch
    changed = view.row_stamp[:r] > entry.epoch
    stale_now = view.tel_t[:, :r] < now - stale_after_s
    changed |= (stale_now != entry.ev.stale).any(axis=0)
    dirty = np.flatnonzero(changed)
    if len(dirty):
        many = len(dirty) * FULL_REBUILD_SHARE > r
        if many or not _patch(entry.ev, dirty, evaluate(dirty)):
            entry.ev = evaluate(None)
    entry.epoch = epoch
    return _copy(entry.ev, cols)
