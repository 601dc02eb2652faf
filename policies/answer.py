"""Decision: decide()'s answer for one pod over its candidate nodes, and Placement, where
the pod goes. decide() keeps its arrays; what only a filter answer, prioritize or an
explanation needs (reason codes and texts, the dicts, kube-scheduler's 0..10 scores) is built
here lazily, on first access."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter
from typing import Any

import numpy as np

from policies import feasibility as fz
from policies import packing_rules as rules
from policies.model import Demand, Timing
from policies.open_order import OPEN_PENALTY
from policies.share import sm_share

_SQRT3 = math.sqrt(3.0)


def unit_scores(nb: np.ndarray) -> np.ndarray:
    """complementary's continuous unit score (decide()'s -|h|^2, with the consolidation
    tiers) mapped to 0..1: a GPU in use 0.5..1 by best fit, an idle GPU 0..0.45 by its size
    (the largest near 0.45), so kube-scheduler's 0..10 node scores keep the order."""
    used = nb > -OPEN_PENALTY
    fit_used = 1.0 - np.sqrt(np.maximum(0.0, -nb)) / _SQRT3
    # (1 - size ratio) + 0.1 |h|^2 (+ 0.5 time-sliced): 0 .. ~1.5
    idle = np.maximum(0.0, -nb - OPEN_PENALTY)
    return np.where(
        used, 0.5 + 0.5 * np.clip(fit_used, 0.0, 1.0), 0.45 * np.clip(1.0 - idle / 1.5, 0.0, 1.0)
    )

@dataclass(frozen=True, slots=True)
class Placement:
    """Where a pod goes: the unit, what it declares there and its MPS share (percent)."""

    node: str
    unit: str
    demand: Demand
    sm_share: int
    timing: Timing | None = None
    score: int = 0


class Decision:
    """The answer for one pod over a set of candidate nodes.

    `chosen`, `feasible_nodes`, `failed_nodes`, `scores`, `best_unit`, `stale_nodes` are
    computed on first access from what decide() kept; `explain()` also reads the view's current
    per-unit loads, so call it before changing the view if the two must agree exactly."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    chosen: tuple[str, str] | None  # (node, unit uuid), resolved when decided

    def _full(self, a: np.ndarray | None, fill: Any = False) -> np.ndarray | None:
        """A (K, m) array of the decided columns as (K, rows) (decide() may score only the
        candidates' rows when they are few)."""
        if a is None or self.cols is None:
            return a
        out = np.full((a.shape[0], self.rows), fill, dtype=a.dtype)
        out[:, self.cols] = a
        return out

    @cached_property
    def full_masks(self) -> dict[str, np.ndarray | None]:
        return {k: self._full(v) for k, v in self.masks.items()}

    def _uuid(self, slot: tuple[int, int]) -> str | None:
        """The unit in a slot, or None if the view's layout changed since the decision."""
        if self.view.layout_version != self.layout_version:
            return None
        return self.view.slot_uuid.get(slot)

    @cached_property
    def _feasible_mask(self) -> np.ndarray:
        cr = self.cand_row
        ok = np.zeros(len(cr), dtype=bool)
        if self.refusal:
            return ok
        known = cr >= 0
        ok[known] = np.isfinite(self.node_best[cr[known]])
        return ok

    @cached_property
    def feasible_rows(self) -> np.ndarray:
        """The view rows of `feasible_nodes`, in their order."""
        return self.cand_row[self._feasible_mask]

    def _pick(self, seq: Sequence[Any], idx: list[int]) -> list[Any]:
        """seq[i] for i in idx, at C speed (itemgetter) for the 5,000-node case."""
        if not idx:
            return []
        if len(idx) == 1:
            return [seq[idx[0]]]
        return list(itemgetter(*idx)(seq))

    @cached_property
    def failed_all_in_view(self) -> bool:
        """Every candidate that failed resolved to a row of the view (none is unknown)."""
        return bool((self.cand_row[~self._feasible_mask] >= 0).all())

    @cached_property
    def feasible_nodes(self) -> list[str]:
        return self.cand_array[self._feasible_mask].tolist()

    @cached_property
    def node_score(self) -> np.ndarray:
        """kube-scheduler's 0..10 per row; only prioritize and explain need it."""
        nb = self.node_best
        fin = np.isfinite(nb)
        out = np.zeros(len(nb), dtype=np.int64)
        if self.config.policy == "complementary" and self.config.consolidate:
            unit_score = unit_scores(nb[fin])
        elif self.config.policy == "complementary":
            unit_score = 1.0 - np.sqrt(np.maximum(0.0, -nb[fin])) / _SQRT3
        else:
            unit_score = nb[fin]
        out[fin] = np.clip(np.rint(10.0 * unit_score), 0, 10).astype(np.int64)
        return out

    def feasible_scores(self) -> list[int]:
        """The scores of `feasible_nodes`, in their order."""
        return self.node_score[self.feasible_rows].tolist()

    @cached_property
    def scores(self) -> dict[str, int]:
        vals = self.node_score[self.feasible_rows].tolist()
        return dict(zip(self.feasible_nodes, vals, strict=True))

    @cached_property
    def best_unit(self) -> dict[str, str]:
        rows = self.feasible_rows
        slots = zip(self.best_j[rows].tolist(), self.best_row[rows].tolist(), strict=True)
        out = {}
        for n, slot in zip(self.feasible_nodes, slots, strict=True):
            uuid = self._uuid(slot)
            if uuid is not None:
                out[n] = uuid
        return out

    def _codes_of(self, pos: np.ndarray | None) -> np.ndarray:
        """Per-unit reason code over the decided columns `pos` (None = all), shape (K, m);
        0 = feasible or no unit in that slot."""
        m = self.masks if pos is None else {
            k: None if v is None else v[:, pos] for k, v in self.masks.items()
        }

        def neg(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else ~a

        code = fz.reason_codes(
            m["healthy"], m["type_bad"], neg(m["empty"]), neg(m["has_room"]), neg(m["fits_mem"]),
            neg(m["fits_sm"]), neg(m["fits_bw"]), m["slo_bad"], m["correlated"],
            m["time_bad"], m["burst_bad"],
        )  # fmt: skip
        code[~m["active"]] = fz.OK
        return code

    @cached_property
    def _codes(self) -> np.ndarray:
        """Reason codes over every decided column. The decided columns only: a filter over
        500 of 5,000 nodes must not pay for the other 4,500."""
        return self._codes_of(None)

    @cached_property
    def reason_codes(self) -> np.ndarray:
        """Per-unit reason code, shape (K, rows); 0 = feasible or no unit in that slot."""
        full = self._full(self._codes, fz.OK)
        assert full is not None
        return full

    def _pos(self, rows: np.ndarray) -> np.ndarray:
        """Absolute rows -> columns of the decided arrays (candidate rows are always there)."""
        return rows if self.cols is None else np.searchsorted(self.cols, rows)

    @cached_property
    def _multi_pos(self) -> list[np.ndarray]:
        """The decided columns of each multi-row node whose rows were decided."""
        out = []
        for rows in self.multi_rows.values():
            arr = np.asarray(rows, dtype=np.intp)
            if self.cols is None:
                out.append(arr)
                continue
            if np.isin(arr, self.cols).all():  # a candidate's rows come all together
                out.append(np.searchsorted(self.cols, arr))
        return out

    @cached_property
    def _row_reason_counts(self) -> np.ndarray:
        """(m, N_REASONS) counts per decided column, multi-row nodes folded into their first."""
        code = self._codes
        m = code.shape[1]
        flat = code.astype(np.intp) * m + np.arange(m, dtype=np.intp)
        counts = np.bincount(flat.ravel(), minlength=fz.N_REASONS * m).reshape(fz.N_REASONS, m).T
        counts = np.ascontiguousarray(counts)
        for pos in self._multi_pos:
            counts[pos[0]] = counts[pos].sum(axis=0)
        return counts

    def _reason_counts_at(self, pos: np.ndarray) -> np.ndarray:
        """(len(pos), N_REASONS) counts for some decided columns: filter needs them for its
        failed nodes only, and counting over those beats a pass (and two 0.5 MB temporaries)
        over every column."""
        if self._multi_pos:  # folding needs the other rows of wide nodes
            return self._row_reason_counts[pos]
        return _count_codes(self._codes[:, pos])

    @cached_property
    def _row_bad_types(self) -> dict[int, np.ndarray]:
        """type id -> decided columns holding a unit of that type the pod cannot use (folded)."""
        tid = self.view.type_id[:, : self.rows] if self.cols is None else (
            self.view.type_id[:, self.cols]
        )
        bad_types = np.flatnonzero(self.table.bad).tolist()
        out = dict(zip(bad_types, _bad_type_cols(self._codes, tid, bad_types), strict=True))
        for cols in out.values():
            for pos in self._multi_pos:
                cols[pos[0]] = cols[pos].any()
        return out

    def _reason_texts(self, pos: np.ndarray, few: bool = False) -> tuple[list[str], np.ndarray]:
        """(distinct failure texts, the text of each decided column in `pos`). Nodes fail for
        a handful of distinct reasons: group identical reason counts (and unusable unit types)
        and format each group once. `few`: `pos` is a handful of the columns (the rows the
        memo does not know), so their codes are worked out for them alone (no wide nodes)."""
        bad_types = np.flatnonzero(self.table.bad).tolist()
        if few:
            code = self._codes_of(pos)
            key = _count_codes(code)
            tid = self.view.type_id[:, pos if self.cols is None else self.cols[pos]]
            flags = _bad_type_cols(code, tid, bad_types)
        else:
            key = self._reason_counts_at(pos)
            flags = [self._row_bad_types[t][pos] for t in bad_types]
        if flags:
            key = np.hstack([key, np.stack(flags, axis=1).astype(key.dtype)])
        uniq, inverse = _group_rows(key)
        texts = []
        for u in uniq.tolist():
            text = fz.summarize(np.asarray(u[: fz.N_REASONS]))
            types = [t for t, f in zip(bad_types, u[fz.N_REASONS :], strict=True) if f]
            if types:
                why = "; ".join(f"{self.view.types[t]}: {self.table.why[t]}" for t in types)
                text = f"{text} ({why})"
            texts.append(text)
        return texts, inverse

    @cached_property
    def failed_nodes(self) -> dict[str, str]:
        if self.refusal:
            return dict.fromkeys(self.candidates, self.refusal)
        bad = np.flatnonzero(~self._feasible_mask)
        if not len(bad):
            return {}
        names = self.cand_array[bad].tolist()
        rows = self.cand_row[bad]
        known = rows >= 0
        msgs: list[str] = ["unknown node: no copack inventory seen for it"] * len(bad)
        if known.any():
            krows = rows[known]
            memo = self.reason_memo
            if memo is None or memo.gen != self.reason_memo_gen or self.multi_rows:
                texts, inverse = self._reason_texts(self._pos(krows))
                if len(texts) == 1 and known.all():  # one reason for all (the common case)
                    return dict.fromkeys(names, texts[0])
                known_msgs = self._pick(texts, inverse.ravel().tolist())
            else:
                # the row cache's memo knows most rows' texts already: work out the others
                ids = memo.ids[krows]
                miss = ids < 0
                if miss.any():
                    texts, inverse = self._reason_texts(
                        self._pos(krows[miss]), few=int(miss.sum()) * 4 < len(self.cand_row)
                    )
                    new = np.fromiter(map(memo.intern, texts), np.int32, len(texts))[
                        inverse.ravel()
                    ]
                    memo.ids[krows[miss]] = new
                    ids[miss] = new
                if known.all() and (ids == ids[0]).all():
                    return dict.fromkeys(names, memo.texts[ids[0]])
                known_msgs = memo.text_array()[ids].tolist()
            if known.all():
                msgs = known_msgs
            else:
                it = iter(known_msgs)
                msgs = [next(it) if k else m for k, m in zip(known.tolist(), msgs, strict=True)]
        return dict(zip(names, msgs, strict=True))

    @cached_property
    def stale_nodes(self) -> list[str]:
        """Candidate nodes with a unit whose telemetry is stale (declared demand used)."""
        stale = self._full(self.stale)
        active = self.full_masks["active"]
        assert stale is not None and active is not None
        stale_rows = (stale & active).any(axis=0)
        for rows in self.multi_rows.values():
            stale_rows[rows[0]] = stale_rows[rows].any()
        out = []
        for name, row in zip(self.candidates, self.cand_row.tolist(), strict=True):
            if row >= 0 and stale_rows[row]:
                out.append(name)
        return out

    def placement(self, node: str | None = None) -> Placement | None:
        """The Placement on the chosen node, or the best unit of `node`."""
        if self.refusal:
            return None
        if node is None:
            if self.chosen is None:
                return None
            node = self.chosen[0]
        row = self.view.primary_row(node)
        if row is None or row >= len(self.node_best) or not math.isfinite(self.node_best[row]):
            return None
        slot = (int(self.best_j[row]), int(self.best_row[row]))
        uuid = self._uuid(slot)
        if uuid is None:
            return None
        tid = int(self.view.type_id[slot])
        d = self.table.demands[tid]
        assert d is not None
        if slot == self.chosen_slot:
            load_sm = float(self.chosen_load[0])
        else:
            load_sm = float(self._load(uuid)["sm"])
        alone = rules.sole_tenant(self.view, self.table, slot, d.mem_bytes)
        share = 100 if alone else sm_share(self.request.role, d.sm, load_sm, self.config)
        score = int(self.node_score[row])
        return Placement(node, uuid, d, share, self.table.timings[tid], score)

    def _load(self, uuid: str) -> dict[str, Any]:
        """The unit's load now (explanations read the live view), or a note if it is gone."""
        try:
            return self.view.unit_load(uuid, self.now, self.config.stale_after_s)
        except KeyError:
            return {"gone": True, "sm": 0.0, "bw": 0.0, "mem_bytes": 0, "mem_capacity_bytes": 1}

    def explain(self, limit: int = 200) -> dict[str, Any]:
        """JSON-able account: the pod, its demand per unit type, the chosen unit with its load,
        demand and residual headroom, each candidate node's score or reason (over 2 x `limit`
        candidates: the `limit` best and `limit` failed ones, with totals), and up to `limit`
        rejected units with their reason and load."""
        req = self.request
        out: dict[str, Any] = {
            "pod": req.key,
            "role": req.role,
            "role_source": req.role_source,
            "model": req.model,
            "policy": self.config.policy,
            "overcommit": self.config.overcommit,
            "now": self.now,
        }
        if self.refusal:
            out["refused"] = self.refusal
            return out
        view = self.view
        n_types = len(self.table.why) if view.types else 0
        if view.layout_version == self.layout_version:
            active = self.full_masks["active"]
            types_used = sorted(set(view.type_id[:, : self.rows][active].tolist()))
        else:  # units changed since: list every type the decision knew
            types_used = list(range(n_types))
        demand_by_type: dict[str, Any] = {}
        for t in types_used:
            ut = view.types[t]
            try:
                info = self.demand_model.explain(req, ut)
            except (KeyError, ValueError) as e:
                info = {"error": str(e)}
            if self.table.bad[t]:
                info["cannot_host"] = self.table.why[t]
            demand_by_type[str(ut)] = info
        out["demand_by_type"] = demand_by_type
        p = self.placement() if self.chosen is not None else None
        if self.chosen is not None and p is None:
            out["chosen"] = {
                "node": self.chosen[0],
                "unit": self.chosen[1],
                "note": "the cluster's units changed since this decision",
            }
        if self.chosen is not None and p is not None:
            node, uuid = self.chosen
            load = self._load(uuid)
            d = p.demand
            cap = float(load["mem_capacity_bytes"])
            after = {
                "sm": round(load["sm"] + d.sm, 4),
                "bw": round(load["bw"] + d.bw, 4),
                "mem": round((load["mem_bytes"] + d.mem_bytes) / cap, 4),
            }
            out["chosen"] = {
                "node": node,
                "unit": uuid,
                "unit_type": str(view.unit_type(uuid)),
                "score": p.score,
                "unit_score": round(float(self.unit_score_of_row(self.chosen_row)), 6),
                "load": load,
                "demand": d.as_dict(),
                "after": after,
                "residual_headroom": {k: round(1 - v, 4) for k, v in after.items()},
                "sm_share": p.sm_share,
                "pods_there": [r.key for r in view.pods_on(uuid)],
            }
        nodes: dict[str, Any] = {}
        failed, scores, best = self.failed_nodes, self.scores, self.best_unit
        stale = set(self.stale_nodes)
        shown = self.candidates
        if len(shown) > 2 * limit:  # big clusters: the best `limit` nodes and `limit` failures
            top = sorted(scores, key=lambda n: (-scores[n], n))[:limit]
            shown = top + list(failed)[:limit]
            out["nodes_omitted"] = len(self.candidates) - len(shown)
        for name in shown:
            if name in scores:
                nodes[name] = {"score": scores[name], "best_unit": best.get(name)}
            else:
                nodes[name] = {"reason": failed.get(name, "")}
            if name in stale:
                nodes[name]["stale_telemetry"] = True
        out["nodes"] = nodes
        out["feasible_nodes_total"] = len(scores)
        out["failed_nodes_total"] = len(failed)
        code = self.reason_codes
        cand_rows = np.zeros(self.rows, dtype=bool)
        for row in self.cand_row[self.cand_row >= 0].tolist():
            for r in self.multi_rows.get(int(view.row_node[row]), [row]):
                cand_rows[r] = True
        rej = (code != fz.OK) & cand_rows[None, :]
        rejected = []
        js, rs = np.nonzero(rej)
        for j, r in list(zip(js.tolist(), rs.tolist(), strict=True))[:limit]:
            slot = (j, r)
            uuid = self._uuid(slot)
            if uuid is None:
                continue
            c = int(code[slot])
            why = fz.REASONS[c]
            if c == fz.UNIT_TYPE:
                why += ": " + self.table.why[int(view.type_id[slot])]
            rejected.append(
                {
                    "node": view.node_name_by_id(int(view.row_node[r])),
                    "unit": uuid,
                    "reason": why,
                    "load": self._load(uuid),
                }
            )
        out["rejected_units"] = rejected
        out["rejected_units_total"] = int(rej.sum())
        return out

    def unit_score_of_row(self, row: int) -> float:
        v = float(self.node_best[row])
        if self.config.policy == "complementary" and math.isfinite(v):
            if self.config.consolidate:
                return float(unit_scores(np.array([v]))[0])
            return 1.0 - math.sqrt(max(0.0, -v)) / _SQRT3
        return v


_ROW_HASH = np.random.default_rng(20240611).integers(1, 2**62, size=64, dtype=np.int64)


def _bad_type_cols(code: np.ndarray, tid: np.ndarray, bad_types: list[int]) -> list[np.ndarray]:
    """Per unusable type: which columns hold a unit of it that failed for its type."""
    unit_type = code == fz.UNIT_TYPE
    return [(unit_type & (tid == t)).any(axis=0) for t in bad_types]


def _count_codes(code: np.ndarray) -> np.ndarray:
    """(m, N_REASONS): how many units of each column have each reason code."""
    n = code.shape[1]
    flat = code.astype(np.intp) * n + np.arange(n, dtype=np.intp)
    return np.bincount(flat.ravel(), minlength=fz.N_REASONS * n).reshape(fz.N_REASONS, n).T


def _group_rows(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(key, axis=0, return_inverse=True), fast: np.unique over rows is a slow
    lexicographic sort (1.4 ms for 1,250 x 11); hash each row to one int64 instead, and check
    that every row equals its group's representative (else fall back to the exact method)."""
    if key.shape[1] > len(_ROW_HASH):
        return np.unique(key, axis=0, return_inverse=True)
    with np.errstate(over="ignore"):
        h = key.astype(np.int64) @ _ROW_HASH[: key.shape[1]]
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    uniq = key[first]
    if not np.array_equal(uniq[inverse], key):  # a hash collision: be exact
        return np.unique(key, axis=0, return_inverse=True)
    return uniq, inverse
