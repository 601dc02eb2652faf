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


MAX_REASON_TEXTS = 4096  # distinct failure texts kept per entry before it starts afresh


class ReasonMemo:
    """Each row's failure text for one cached shape, filled in as filters ask for it.

    A row's text is a function of its masks (and of the shape and layout, which the entry's
    key and facts pin), so it stays true until the row is re-scored: a patch forgets the
    re-scored rows and bumps `gen`, and a Decision trusts the memo only at the `gen` it was
    made at (a later patch may have changed rows its own masks still show the old way)."""

    __slots__ = ("_array", "_index", "gen", "ids", "texts")

    def __init__(self, n_rows: int) -> None:
        self.ids = np.full(n_rows, -1, dtype=np.int32)
        self.texts: list[str] = []
        self._index: dict[str, int] = {}
        self._array: np.ndarray | None = None
        self.gen = 0

    def forget(self, rows: np.ndarray) -> None:
        self.ids[rows] = -1
        self.gen += 1
        if len(self.texts) > MAX_REASON_TEXTS:
            self.ids[:] = -1
            self.texts, self._index, self._array = [], {}, None

    def intern(self, text: str) -> int:
        i = self._index.get(text)
        if i is None:
            i = self._index[text] = len(self.texts)
            self.texts.append(text)
            self._array = None
        return i

    def text_array(self) -> np.ndarray:
        """The texts as an object array, so that texts[ids] is one fancy index."""
        if self._array is None:
            self._array = np.empty(len(self.texts), dtype=object)
            self._array[:] = self.texts
        return self._array


@dataclass(slots=True)
class RowEval:
    """decide()'s per-row scoring: masks and stale (K, m), row_best and best_j (m,); from the
    cache, also the entry's failure-text memo and its generation."""

    masks: dict[str, np.ndarray | None]
    stale: np.ndarray
    row_best: np.ndarray
    best_j: np.ndarray
    node_val: np.ndarray | None = None  # never set for the cached (row-local) policies
    memo: ReasonMemo | None = None
    memo_gen: int = -1


@dataclass(slots=True)
class _Entry:
    facts: tuple
    epoch: int
    ev: RowEval
    memo: ReasonMemo


class _Cache:
    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        # shapes asked about over candidate rows only, without an entry yet: the second such
        # question builds one (a workload's replicas come one after the other)
        self.asked: OrderedDict[tuple, None] = OrderedDict()


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
        view.largest_pod_mem,
        view.max_gpu_mem,
        view.assumed_window_s,
    )


def _copy(entry: _Entry, cols: np.ndarray | None) -> RowEval:
    """The caller's own arrays (decide() folds rows in place; a Decision keeps its masks),
    with the entry's memo (shared: it is keyed by absolute row)."""
    ev, memo = entry.ev, entry.memo
    if cols is None:
        return RowEval(
            {k: None if v is None else v.copy() for k, v in ev.masks.items()},
            ev.stale.copy(), ev.row_best.copy(), ev.best_j.copy(), None, memo, memo.gen,
        )
    return RowEval(
        {k: None if v is None else v[:, cols] for k, v in ev.masks.items()},
        ev.stale[:, cols], ev.row_best[cols], ev.best_j[cols], None, memo, memo.gen,
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
    None when the caller should score `cols` itself: the first time a shape is asked about
    over a few candidate rows (a one-off pod, kube-scheduler's rotating 500-node window) those
    rows are cheaper to score than every row; the second time, every row is scored once and
    kept, and later windows are served from the entry."""
    cache: _Cache = view.__dict__.setdefault("_row_cache", _Cache())
    facts = view_facts(view)
    entry = cache.entries.get(key)
    if entry is not None and entry.facts != facts:
        del cache.entries[key]
        entry = None
    r = view.n_rows
    if entry is None:
        if cols is not None and key not in cache.asked:
            cache.asked[key] = None
            while len(cache.asked) > SHAPES_KEPT:
                cache.asked.popitem(last=False)
            return None
        cache.asked.pop(key, None)
        entry = _Entry(facts, view.epoch, evaluate(None), ReasonMemo(r))
        cache.entries[key] = entry
        while len(cache.entries) > SHAPES_KEPT:
            cache.entries.popitem(last=False)
        return _copy(entry, cols)
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
            entry.memo = ReasonMemo(r)
        else:
            entry.memo.forget(dirty)
    entry.epoch = epoch
    return _copy(entry, cols)
