"""decide(): score one pod against candidate nodes; choose_unit(): re-decide on one node at bind.

All units are scored in a handful of numpy passes: the demand model is asked once per unit
*type* (a cluster has a few: H100, H100 3g.40gb, ...), the per-type demand is broadcast over the
units, feasibility gives one reason code per unit, the policy gives one score per unit, and
per-node maxima come from `reduceat` over the view's node-contiguous order. Dicts for the
extender (scores, failed nodes) are built lazily, on first access."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from policies import feasibility as fz
from policies.cluster_view import ClusterView
from policies.config import PolicyConfig
from policies.contention import slowdown_factor
from policies.model import Demand, PodRequest, Timing, UnitType
from policies.share import sm_share, sm_share_fraction

_EPS = 1e-9
_SQRT3 = math.sqrt(3.0)
_UNKNOWN = -1
_EMPTY = -2


class DemandModelLike(Protocol):
    """What decide() needs from workloads.roofline.DemandModel (policies does not import it)."""

    def demand(self, request: PodRequest, unit_type: UnitType) -> Demand: ...

    def timing(self, request: PodRequest, unit_type: UnitType) -> Timing | None: ...

    def explain(self, request: PodRequest, unit_type: UnitType) -> dict: ...


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a pod goes: the unit, what it declared there and its MPS share (percent)."""

    node: str
    unit: str
    demand: Demand
    sm_share: int
    timing: Timing | None = None
    score: int = 0


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a node cannot take the pod (bind-time re-decision failed)."""

    node: str
    reason: str


@dataclass
class _TypeTable:
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


def _type_table(
    types: list[UnitType], request: PodRequest, dm: DemandModelLike, config: PolicyConfig
) -> _TypeTable:
    k = len(types)
    z = lambda: np.zeros(k, dtype=np.float64)  # noqa: E731
    tab = _TypeTable(
        z(),
        z(),
        z(),
        np.zeros(k, dtype=bool),
        [""] * k,
        z(),
        z(),
        z(),
        z(),
        z(),
        z(),
        [None] * k,
        [None] * k,
    )
    bound = 1.0 + config.overcommit + _EPS
    for i, t in enumerate(types):
        try:
            d = dm.demand(request, t)
            tm = dm.timing(request, t)
        except (KeyError, ValueError) as e:
            tab.bad[i], tab.why[i] = True, f"demand model: {e}"
            continue
        tab.demands[i], tab.timings[i] = d, tm
        tab.sm[i], tab.bw[i], tab.mem[i] = d.sm, d.bw, float(d.mem_bytes)
        if config.policy != "binpack" and (d.sm > bound or d.bw > bound):
            tab.bad[i] = True
            over = "SMs" if d.sm > bound else "bandwidth"
            tab.why[i] = f"needs {max(d.sm, d.bw):.2f}x the unit's {over}"
        if tm is not None:
            tab.ttft[i], tab.tpot[i] = tm.ttft_s, tm.tpot_s
            tab.a_p[i], tab.a_d[i], tab.mf_p[i], tab.mf_d[i] = (
                tm.a_prefill,
                tm.a_decode,
                tm.mem_frac_prefill,
                tm.mem_frac_decode,
            )
            slo = request.slo
            if config.slo_check and not tab.bad[i]:
                if slo.ttft_s is not None and request.role != "decode" and tm.ttft_s > slo.ttft_s:
                    tab.bad[i] = True
                    tab.why[i] = (
                        f"predicted TTFT {tm.ttft_s * 1e3:.0f} ms alone"
                        f" > SLO {slo.ttft_s * 1e3:.0f} ms"
                    )
                elif (
                    slo.tpot_s is not None and request.role != "prefill" and tm.tpot_s > slo.tpot_s
                ):
                    tab.bad[i] = True
                    tab.why[i] = (
                        f"predicted TPOT {tm.tpot_s * 1e3:.1f} ms alone"
                        f" > SLO {slo.tpot_s * 1e3:.1f} ms"
                    )
    return tab


class Decision:
    """The answer for one pod over a set of candidate nodes (see module docstring).

    Attributes are computed on first access: feasible_nodes, failed_nodes, scores, best_unit,
    stale_nodes; `chosen` and `explain()` too."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    # eager: request, policy, now, chosen_group, candidates (list[str]), cand_group (ndarray),
    # node_best, node_score, best_slot, and the per-sorted-position arrays for explanations

    @cached_property
    def chosen(self) -> tuple[str, str] | None:
        g = self.chosen_group
        if g < 0:
            return None
        return self.view.node_name_by_id(int(self.gnode[g])), self.view.slot_uuid[
            int(self.best_slot[g])
        ]

    @cached_property
    def _feasible_mask(self) -> np.ndarray:
        cg = self.cand_group
        ok = np.zeros(len(cg), dtype=bool)
        known = cg >= 0
        ok[known] = np.isfinite(self.node_best[cg[known]])
        return ok

    @cached_property
    def feasible_nodes(self) -> list[str]:
        return [
            n for n, ok in zip(self.candidates, self._feasible_mask.tolist(), strict=True) if ok
        ]

    @cached_property
    def scores(self) -> dict[str, int]:
        mask = self._feasible_mask
        names = self.candidates
        idx = np.flatnonzero(mask)
        vals = self.node_score[self.cand_group[idx]].tolist()
        return {names[i]: v for i, v in zip(idx.tolist(), vals, strict=True)}

    @cached_property
    def best_unit(self) -> dict[str, str]:
        idx = np.flatnonzero(self._feasible_mask)
        slots = self.best_slot[self.cand_group[idx]].tolist()
        uu = self.view.slot_uuid
        names = self.candidates
        return {names[i]: uu[s] for i, s in zip(idx.tolist(), slots, strict=True)}

    @cached_property
    def _reason_counts(self) -> np.ndarray:
        g = len(self.starts)
        flat = self.gpos.astype(np.int64) * fz.N_REASONS + self.code_s
        return np.bincount(flat, minlength=g * fz.N_REASONS).reshape(g, fz.N_REASONS)

    def _type_reasons(self, group: int) -> str:
        lo = int(self.starts[group])
        hi = int(self.starts[group + 1]) if group + 1 < len(self.starts) else len(self.code_s)
        tids = set(self.view.type_id[self.perm[lo:hi]][self.code_s[lo:hi] == fz.UNIT_TYPE].tolist())
        return "; ".join(f"{self.view.types[t]}: {self.table.why[t]}" for t in sorted(tids))

    @cached_property
    def failed_nodes(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.refusal:
            return {n: self.refusal for n in self.candidates}
        mask = self._feasible_mask
        counts = None
        for i in np.flatnonzero(~mask).tolist():
            name = self.candidates[i]
            g = int(self.cand_group[i])
            if g == _UNKNOWN:
                out[name] = "unknown node: no copack inventory seen for it"
            elif g == _EMPTY:
                out[name] = "node has no GPU units"
            else:
                if counts is None:
                    counts = self._reason_counts
                msg = fz.summarize(counts[g])
                if counts[g, fz.UNIT_TYPE]:
                    msg += f" ({self._type_reasons(g)})"
                out[name] = msg
        return out

    @cached_property
    def stale_nodes(self) -> list[str]:
        """Candidate nodes with at least one unit whose telemetry is stale (declared only)."""
        g = len(self.starts)
        stale_g = (
            np.add.reduceat(self.stale_s.astype(np.int32), self.starts) > 0
            if g
            else np.zeros(0, bool)
        )
        out = []
        for name, cg in zip(self.candidates, self.cand_group.tolist(), strict=True):
            if cg >= 0 and stale_g[cg]:
                out.append(name)
        return out

    def placement(self, node: str | None = None) -> Placement | None:
        """The Placement for the chosen node (or the best unit on `node`)."""
        if self.refusal:
            return None
        if node is None:
            if self.chosen is None:
                return None
            node = self.chosen[0]
        nid = self.view.node_id_of(node)
        if nid is None:
            return None
        g = int(self.group_of_node[nid]) if nid < len(self.group_of_node) else -1
        if g < 0 or not math.isfinite(self.node_best[g]):
            return None
        slot = int(self.best_slot[g])
        tid = int(self.view.type_id[slot])
        d = self.table.demands[tid]
        assert d is not None
        lsm = float(self.lsm[slot])
        share = sm_share(self.request.role, d.sm, lsm, self.config)
        return Placement(
            node,
            self.view.slot_uuid[slot],
            d,
            share,
            self.table.timings[tid],
            int(self.node_score[g]),
        )

    def explain(self, limit: int = 200) -> dict[str, Any]:
        """JSON-able account: the pod, its demand per unit type, the chosen unit with load and
        demand vectors, every candidate node's score or reason, and up to `limit` rejected
        units with their reason."""
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
        types_used = sorted(set(self.view.type_id[self.perm].tolist())) if len(self.perm) else []
        demand_by_type = {}
        for t in types_used:
            ut = self.view.types[t]
            try:
                info = self.demand_model.explain(req, ut)
            except (KeyError, ValueError) as e:
                info = {"error": str(e)}
            if self.table.bad[t]:
                info["cannot_host"] = self.table.why[t]
            demand_by_type[str(ut)] = info
        out["demand_by_type"] = demand_by_type
        if self.chosen is not None:
            node, uuid = self.chosen
            p = self.placement(node)
            slot = self.view.slot_of(uuid)
            assert p is not None and slot is not None
            load = self.view.unit_load(uuid, self.now, self.config.stale_after_s)
            d = p.demand
            mem_cap = float(self.view.mem_cap[slot])
            after = {
                "sm": round(load["sm"] + d.sm, 4),
                "bw": round(load["bw"] + d.bw, 4),
                "mem": round((load["mem_bytes"] + d.mem_bytes) / mem_cap, 4),
            }
            out["chosen"] = {
                "node": node,
                "unit": uuid,
                "unit_type": str(self.view.unit_type(uuid)),
                "score": p.score,
                "unit_score": round(float(self.node_best[self.chosen_group]), 6),
                "load": load,
                "demand": d.as_dict(),
                "after": after,
                "residual_headroom": {k: round(1 - v, 4) for k, v in after.items()},
                "sm_share": p.sm_share,
                "pods_there": [r.key for r in self.view.pods_on(uuid)],
            }
        nodes: dict[str, Any] = {}
        failed = self.failed_nodes
        scores = self.scores
        best = self.best_unit
        stale = set(self.stale_nodes)
        for name in self.candidates:
            if name in scores:
                nodes[name] = {"score": scores[name], "best_unit": best[name]}
            else:
                nodes[name] = {"reason": failed.get(name, "")}
            if name in stale:
                nodes[name]["stale_telemetry"] = True
        out["nodes"] = nodes
        rejected = []
        cand_pos = self.cand_s & (self.code_s != fz.OK)
        for pos in np.flatnonzero(cand_pos)[:limit].tolist():
            slot = int(self.perm[pos])
            code = int(self.code_s[pos])
            why = fz.REASONS[code]
            if code == fz.UNIT_TYPE:
                why += ": " + self.table.why[int(self.view.type_id[slot])]
            rejected.append(
                {
                    "node": self.view.node_name_by_id(int(self.view.node_id[slot])),
                    "unit": self.view.slot_uuid[slot],
                    "reason": why,
                    "load": {
                        "sm": round(float(self.lsm[slot]), 4),
                        "bw": round(float(self.lbw[slot]), 4),
                        "mem_bytes": int(self.lmem[slot]),
                    },
                    "stale": bool(self.stale[slot]),
                }
            )
        out["rejected_units"] = rejected
        out["rejected_units_total"] = int(cand_pos.sum())
        return out


class _CandidateCache:
    """Resolving 5,000 node names to ids costs more than scoring 40,000 units; kube-scheduler
    sends the same list again and again, so remember the last few resolutions."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: tuple[np.ndarray, np.ndarray] | None = None


_CAND_CACHE: dict[int, _CandidateCache] = {}


def _resolve_candidates(
    view: ClusterView, names: Sequence[str], group_of_node: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(node mask over groups, group per candidate name: >=0, _UNKNOWN or _EMPTY)."""
    cache = _CAND_CACHE.setdefault(id(view), _CandidateCache())
    tkey = tuple(names)
    key = (tkey, view._order_version)
    if cache.key == key and cache.value is not None:
        return cache.value
    ids = [view.node_id_of(n) for n in tkey]
    cand_group = np.empty(len(ids), dtype=np.intp)
    for i, nid in enumerate(ids):
        if nid is None:
            cand_group[i] = _UNKNOWN
        else:
            g = group_of_node[nid] if nid < len(group_of_node) else -1
            cand_group[i] = g if g >= 0 else _EMPTY
    mask = np.zeros(len(view.order()[1]), dtype=bool)
    mask[cand_group[cand_group >= 0]] = True
    cache.key, cache.value = key, (mask, cand_group)
    return mask, cand_group


def decide(
    view: ClusterView,
    request: PodRequest,
    candidate_nodes: Sequence[str] | None,
    now: float,
    config: PolicyConfig,
    demand_model: DemandModelLike,
) -> Decision:
    """Score `request` on every unit of the candidate nodes (None = every node in the view)."""
    if abs(view.assumed_window_s - config.assumed_window_s) > 1e-12:
        view.set_assumed_window(config.assumed_window_s)
    perm, starts, gnode, gpos = view.order()
    group_of_node = view.group_of_node()
    n = view.n_slots
    n_groups = len(starts)
    if candidate_nodes is None:
        cand_g = np.ones(n_groups, dtype=bool)
        candidates = [view.node_name_by_id(int(x)) for x in gnode.tolist()]
        cand_group = np.arange(n_groups, dtype=np.intp)
        empty_nodes = [nm for nm in view.node_names if not view.node_slots(nm)]
        if empty_nodes:
            candidates = candidates + empty_nodes
            cand_group = np.concatenate([cand_group, np.full(len(empty_nodes), _EMPTY, np.intp)])
    else:
        candidates = list(candidate_nodes)
        cand_g, cand_group = _resolve_candidates(view, candidates, group_of_node)

    refusal = ""
    if request.gpus != 1:
        refusal = (
            f"pod asks for {request.gpus} copack.io/gpu; copack places one unit share per pod"
            if request.gpus > 1
            else "pod does not request copack.io/gpu"
        )

    table = _type_table(view.types, request, demand_model, config)
    tid = view.type_id[:n]
    dsm = table.sm[tid]
    dbw = table.bw[tid]
    dmem = table.mem[tid]
    lsm, lbw, lmem, stale = view.load_arrays(now, config.stale_after_s)
    healthy = view.healthy[:n]
    npods = view.npods[:n]
    type_bad = table.bad[tid]
    mem_over = lmem + dmem > view.mem_cap[:n]
    pods_full = npods >= config.max_pods_per_unit
    exclusive_taken = npods > 0 if config.exclusive else None
    sm_over = bw_over = slo_bad = None
    if config.policy != "binpack":
        bound = 1.0 + config.overcommit + _EPS
        y = lsm + dsm
        x = lbw + dbw
        sm_over = y > bound
        bw_over = x > bound
        if config.slo_check:
            slo_bad = _slo_violations(view, request, table, tid, dsm, lsm, x, y, config, n)

    code = fz.reason_codes(
        healthy, type_bad, exclusive_taken, pods_full, mem_over, sm_over, bw_over, slo_bad
    )
    code_s = code[perm]
    cand_s = cand_g[gpos] if n_groups else np.zeros(0, dtype=bool)
    feas_s = (code_s == fz.OK) & cand_s

    counts = np.diff(np.append(starts, len(perm))).astype(np.float64)
    policy = config.policy
    if policy == "complementary":
        mem_cap = view.mem_cap[:n]
        r1 = 1.0 - (lsm + dsm)
        r2 = 1.0 - (lbw + dbw)
        r3 = 1.0 - (lmem + dmem) / mem_cap
        unit_score = 1.0 - np.sqrt(r1 * r1 + r2 * r2 + r3 * r3) / _SQRT3
        score_s = unit_score[perm]
        node_val = None
    elif policy == "binpack":
        unit_score = (lmem + dmem) / view.mem_cap[:n]
        score_s = unit_score[perm]
        node_val = None
    else:
        free_s = (npods == 0)[perm] & (healthy[perm])
        free_count = np.add.reduceat(free_s.astype(np.float64), starts) if n_groups else np.zeros(0)
        if policy == "spread":  # kube LeastAllocated over the node's units
            node_val = (free_count - 1.0) / counts
        else:  # dedicated: MostAllocated, fill nodes one unit per pod
            node_val = (counts - free_count + 1.0) / counts
        score_s = node_val[gpos]

    sc = np.where(feas_s, score_s, -np.inf)
    if n_groups:
        node_best = np.maximum.reduceat(sc, starts)
        pos = np.arange(len(sc))
        hit = np.where((sc == node_best[gpos]) & feas_s, pos, len(sc))
        best_pos = np.minimum.reduceat(hit, starts)
        best_slot = perm[np.minimum(best_pos, len(perm) - 1)]
    else:
        node_best = np.zeros(0)
        best_slot = np.zeros(0, dtype=np.intp)
    if refusal:
        node_best = np.full(n_groups, -np.inf)
    finite = np.isfinite(node_best)
    node_score = np.zeros(n_groups, dtype=np.int64)
    node_score[finite] = np.clip(np.rint(10.0 * node_best[finite]), 0, 10).astype(np.int64)

    chosen_group = -1
    ok_groups = np.flatnonzero(finite & cand_g) if n_groups else np.zeros(0, dtype=np.intp)
    if len(ok_groups):
        vals = node_best[ok_groups]
        top = ok_groups[vals >= vals.max() - 1e-12]
        if len(top) == 1:
            chosen_group = int(top[0])
        else:  # tie: the lexicographically smallest node name, whatever the candidate order
            chosen_group = int(min(top.tolist(), key=lambda g: view.node_name_by_id(int(gnode[g]))))

    return Decision(
        view=view,
        request=request,
        config=config,
        demand_model=demand_model,
        now=now,
        refusal=refusal,
        candidates=candidates,
        cand_group=cand_group,
        perm=perm,
        starts=starts,
        gnode=gnode,
        gpos=gpos,
        group_of_node=group_of_node,
        code_s=code_s,
        cand_s=cand_s,
        stale_s=stale[perm] & cand_s,
        stale=stale,
        node_best=node_best,
        node_score=node_score,
        best_slot=best_slot,
        chosen_group=chosen_group,
        table=table,
        lsm=lsm,
        lbw=lbw,
        lmem=lmem,
    )


def _slo_violations(
    view: ClusterView,
    request: PodRequest,
    table: _TypeTable,
    tid: np.ndarray,
    dsm: np.ndarray,
    lsm: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    config: PolicyConfig,
    n: int,
) -> np.ndarray | None:
    """Units where the pod's predicted slowdown breaks its SLO, or where the contention it adds
    exceeds the tolerance of an SLO-carrying pod already there (see cluster_view._tolerance)."""
    bad = None
    ex = np.maximum(0.0, x - 1.0)
    ey = np.maximum(0.0, y - 1.0)
    if view.has_slo_pods():
        tol_x = view.tol_x[:n]
        tol_y = view.tol_y[:n]
        with np.errstate(divide="ignore", invalid="ignore"):
            ux = np.where(ex > 0, ex / tol_x, 0.0)
            uy = np.where(ey > 0, ey / tol_y, 0.0)
        bad = ux + uy > 1.0 + 1e-9
    slo = request.slo
    if slo.empty:
        return bad
    share = sm_share_fraction(request.role, dsm, lsm, config)
    own = np.zeros(n, dtype=bool)
    if slo.ttft_s is not None and request.role != "decode":
        f = slowdown_factor(table.a_p[tid], table.mf_p[tid], share, x, y)
        own |= (table.ttft[tid] * f > slo.ttft_s * (1 + 1e-9)) & (table.ttft[tid] > 0)
    if slo.tpot_s is not None and request.role != "prefill":
        f = slowdown_factor(table.a_d[tid], table.mf_d[tid], share, x, y)
        own |= (table.tpot[tid] * f > slo.tpot_s * (1 + 1e-9)) & (table.tpot[tid] > 0)
    return own if bad is None else (bad | own)


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
