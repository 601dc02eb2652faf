"""Which pods to move so that whole GPUs empty: a what-if over a copy of the extender's view.

For each physical GPU in use, cheapest first, the planner takes its pods off a private copy of
the ClusterView, closes the GPU and every idle GPU (a move onto an idle GPU frees nothing), and
asks the same decision core the extender binds with where each pod would go. If all of them fit
on GPUs already in use, and the budget allows each eviction, the GPU is planned empty and its
pods stay placed at their new units in the copy, so the next GPU is judged against them. The
live view is never touched; the replacements are scheduled by the extender as any pod is, and
the `copack.io/draining` annotation keeps them off the GPU while the evicted pods terminate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from policies.cluster_view import ClusterView, PodRecord
from policies.config import PolicyConfig
from policies.decision import DemandModelLike, decide

GpuKey = tuple[str, int]  # (node, GPU index): MIG siblings share the index


@dataclass(frozen=True)
class Move:
    pod: str
    workload: str
    gpu: GpuKey
    source_unit: str
    target_node: str
    target_unit: str
    cost: float

    @property
    def reason(self) -> str:
        node, index = self.gpu
        return (
            f"copack-rebalancer empties GPU {index} of {node}: this pod fits on "
            f"{self.target_unit} ({self.target_node}), a GPU already in use"
        )


@dataclass
class RepackPlan:
    moves: list[Move] = field(default_factory=list)
    gpus: list[GpuKey] = field(default_factory=list)
    # GPUs in use that were considered and why they stay as they are
    kept: dict[GpuKey, str] = field(default_factory=dict)

    def units(self, view: ClusterView) -> dict[str, list[str]]:
        """The units to mark draining, per node."""
        out: dict[str, list[str]] = {}
        for node, index in self.gpus:
            out.setdefault(node, []).extend(gpu_units(view, node, index))
        return out


def gpu_units(view: ClusterView, node: str, index: int) -> list[str]:
    return [u for u in view.units_of(node) if (iu := view.unit(u)) and iu.index == index]


def gpus_in_use(view: ClusterView) -> dict[GpuKey, list[PodRecord]]:
    out: dict[GpuKey, list[PodRecord]] = {}
    for rec in view.iter_pods():
        node = view.node_of_unit(rec.uuid)
        unit = view.unit(rec.uuid)
        if node is None or unit is None:
            continue
        out.setdefault((node, unit.index), []).append(rec)
    return out


def plan_repack(
    view: ClusterView,
    now: float,
    config: PolicyConfig,
    demand_model: DemandModelLike,
    *,
    workload_of: Callable[[str], str | None],
    refusal: Callable[[PodRecord, str], str | None],
    cost: Callable[[PodRecord], float],
    max_gpus: int,
) -> RepackPlan:
    """Up to `max_gpus` GPUs to empty. `workload_of(pod key)`: its Deployment (None: a pod
    nobody recreates, never moved); `refusal(pod, workload)`: the budget's objection or None;
    `cost(pod)`: what moving it loses (in-flight work), to try the cheapest GPUs first."""
    plan = RepackPlan()
    if max_gpus <= 0:
        return plan
    used = gpus_in_use(view)
    if len(used) < 2:
        return plan
    what_if = copy.deepcopy(view)
    closed: set[str] = set()
    for node in what_if.node_names:  # idle GPUs take nothing: moving there frees nothing
        for u in what_if.units_of(node):
            iu = what_if.unit(u)
            if iu is not None and (node, iu.index) not in used:
                what_if.set_unit_health(u, False)
                closed.add(u)

    def order(item: tuple[GpuKey, list[PodRecord]]) -> tuple[float, int, float]:
        recs = item[1]
        return (sum(cost(r) for r in recs), len(recs), sum(r.demand.mem_bytes for r in recs))

    moved_workloads: set[str] = set()
    for gpu, recs in sorted(used.items(), key=order):
        if len(plan.gpus) >= max_gpus:
            break
        why = _movable(recs, workload_of, refusal, moved_workloads)
        if why is not None:
            plan.kept[gpu] = why
            continue
        moves = _try_empty(what_if, gpu, recs, now, config, demand_model, workload_of, cost)
        if isinstance(moves, str):
            plan.kept[gpu] = moves
            continue
        plan.gpus.append(gpu)
        plan.moves.extend(moves)
        moved_workloads.update(m.workload for m in moves)
    return plan


def _movable(
    recs: Sequence[PodRecord],
    workload_of: Callable[[str], str | None],
    refusal: Callable[[PodRecord, str], str | None],
    taken: set[str],
) -> str | None:
    seen: set[str] = set()
    for r in recs:
        w = workload_of(r.key)
        if w is None:
            return f"{r.key} has no controller to recreate it"
        if r.request is None:
            return f"{r.key}: its request is unknown to the view"
        if w in seen or w in taken:
            return f"{r.key}: another replica of {w} moves in this round"
        seen.add(w)
        why = refusal(r, w)
        if why is not None:
            return f"{r.key}: {why}"
    return None


def _try_empty(
    view: ClusterView,
    gpu: GpuKey,
    recs: Sequence[PodRecord],
    now: float,
    config: PolicyConfig,
    demand_model: DemandModelLike,
    workload_of: Callable[[str], str | None],
    cost: Callable[[PodRecord], float],
) -> list[Move] | str:
    node, index = gpu
    units = gpu_units(view, node, index)
    health = {u: bool(view.healthy[view.slot_of(u)]) for u in units}
    for r in recs:
        view.unplace(r.key)
    for u in units:
        view.set_unit_health(u, False)
    moves: list[Move] = []
    for r in sorted(recs, key=lambda r: -r.demand.mem_bytes):
        assert r.request is not None
        d = decide(view, r.request, None, now, config, demand_model)
        p = d.placement()
        if p is None:
            for m in moves:  # undo: the GPU stays as it is
                view.unplace(m.pod)
            for u, h in health.items():
                view.set_unit_health(u, h)
            for back in recs:
                _restore(view, back)
            why = "; ".join(f"{n}: {w}" for n, w in sorted(d.failed_nodes.items())[:3])
            return f"{r.key} fits on no other GPU in use ({why or d.refusal or 'no unit'})"
        view.place(r.key, p.unit, p.demand, now, r.role, p.sm_share, r.request, p.timing)
        w = workload_of(r.key)
        assert w is not None
        moves.append(Move(r.key, w, gpu, r.uuid, p.node, p.unit, cost(r)))
    return moves


def _restore(view: ClusterView, r: PodRecord) -> None:
    view.place(r.key, r.uuid, r.demand, r.t, r.role, r.sm_share, r.request, r.timing)
