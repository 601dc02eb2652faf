"""copack-rebalancer inside a simulated run: the sim's API server plays the evictions.

Every `interval_s` the rebalancer plans over the extender's own state (rebalancer/planner.py)
and, within its budget (rebalancer/budget.py), evicts: the node gets `copack.io/draining` for
the GPU, the pod stops taking requests and finishes what it holds, and its ReplicaSet's
replacement is created at once (pending, scheduled by the extender, paying the model load).
Whatever the pod still holds when its grace period ends is lost: those requests never finish
and count as SLO misses. With `handover` an evicted prefill pod goes on taking requests while
another pod of its role is starting (the proxy's handover rule, workloads/discovery.py) until
it has been idle `handover_idle_s` (its preStop hook) or `handover_drain_s` before the end of
its grace period: a burst that comes while the replacement loads its model finds the capacity
the service was sized for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from policies.cluster_view import PodRecord as ViewPod
from policies.draining import DRAINING_ANNOTATION, format_draining
from rebalancer.budget import BudgetSpec, DisruptionBudget
from rebalancer.rounds import draining_until, plan_round
from sim.engine import PREFILL
from sim.harness import ExtenderHarness
from sim.scenario import RebalancerSpec

ROLE_NAMES = ("prefill", "decode")


@dataclass
class _Eviction:
    rec: Any  # sim.run.PodRecord
    node: str
    deadline: float
    workload: str
    handover: bool = False  # still taking requests (make-before-break)
    busy_t: float = 0.0  # last time it held a request


@dataclass
class RebalanceStats:
    evictions: int = 0
    requests_lost: int = 0
    gpus_emptied: int = 0
    rounds: int = 0
    gpus_kept: int = 0  # GPUs in use looked at and left (budget, or their pods fit nowhere)
    handovers: int = 0  # evicted prefill pods that served on while their replacement started


class SimRebalancer:
    def __init__(
        self,
        spec: RebalancerSpec,
        harness: ExtenderHarness,
        nodes: Sequence[dict[str, Any]],
        epoch: float,
        startup_s: float,
        in_flight: Callable[[int], int],
    ) -> None:
        self.spec = spec
        self.harness = harness
        self.nodes = {n["metadata"]["name"]: n for n in nodes}
        self.epoch = epoch
        self.startup_s = startup_s
        self.in_flight = in_flight
        self.budget = DisruptionBudget(
            BudgetSpec(
                evictions_per_minute=spec.evictions_per_minute,
                min_age_s=spec.min_age_s,
                max_gpus_per_round=spec.max_gpus_per_round,
                interval_s=spec.interval_s,
                grace_s=spec.grace_s,
            )
        )
        self.next_round = spec.interval_s
        self.evicting: list[_Eviction] = []
        self.draining: dict[str, set[str]] = {}  # node -> units
        self.replacements: dict[str, Any] = {}  # workload -> replacement record
        self.stats = RebalanceStats()

    @staticmethod
    def workload(rec: Any, services: Sequence[Any]) -> str:
        return f"{services[rec.service].name}-{ROLE_NAMES[rec.role]}"

    def tick(
        self,
        t: float,
        live: list[list[list[Any]]],
        services: Sequence[Any],
        evict: Callable[[Any, str, float, bool], Any],
        kill: Callable[[Any, float], int],
        unroute: Callable[[Any], None],
    ) -> None:
        """One step: end handovers and grace periods, settle replaced workloads, maybe plan a
        round. `evict(rec, reason, t, handover)` returns the replacement record (a pod handed
        over keeps taking requests until `unroute(rec)`); `kill(rec, t)` the requests lost."""
        for ev in self.evicting:
            if ev.handover and self._handover_ends(ev, t, live):
                ev.handover = False
                unroute(ev.rec)
        for ev in [e for e in self.evicting if e.rec.state == "deleted" or t >= e.deadline]:
            if ev.rec.state != "deleted":
                self.stats.requests_lost += kill(ev.rec, t)
            self.evicting.remove(ev)
        if self.draining and not self.evicting:
            for node in list(self.draining):
                self._annotate(node, set(), t)
        for w, rep in list(self.replacements.items()):
            if rep.state == "deleted" or (
                rep.state == "bound" and t >= rep.bound_t + self.startup_s
            ):
                self.budget.settle(w)
                del self.replacements[w]
        if t + 1e-9 < self.next_round:
            return
        self.next_round += self.spec.interval_s
        self._round(t, live, services, evict)

    def _handover_ends(self, ev: _Eviction, t: float, live: list[list[list[Any]]]) -> bool:
        if self.in_flight(ev.rec.pid) > 0:
            ev.busy_t = t
        starting = any(
            r.state == "pending" or (r.state == "bound" and t < r.bound_t + self.startup_s)
            for r in live[ev.rec.service][ev.rec.role]
        )
        return (
            not starting
            or t - ev.busy_t >= self.spec.handover_idle_s
            or t >= ev.deadline - self.spec.handover_drain_s
        )

    def _round(
        self,
        t: float,
        live: list[list[list[Any]]],
        services: Sequence[Any],
        evict: Callable[[Any, str, float, bool], Any],
    ) -> None:
        self.stats.rounds += 1
        by_key: dict[str, Any] = {}
        ready: dict[str, int] = {}
        for per in live:
            for recs in per:
                for r in recs:
                    if r.state != "bound":
                        continue
                    w = self.workload(r, services)
                    by_key[f"{r.obj['metadata']['namespace']}/{r.name}"] = r
                    if t >= r.bound_t + self.startup_s:
                        ready[w] = ready.get(w, 0) + 1

        def workload_of(key: str) -> str | None:
            r = by_key.get(key)
            return None if r is None else self.workload(r, services)

        def refusal(pod: ViewPod, w: str) -> str | None:
            r = by_key[pod.key]
            return self.budget.refusal(
                w, t - r.bound_t, t, ready.get(w, 0), self.spec.pdb_min_available
            )

        def cost(pod: ViewPod) -> float:
            r = by_key.get(pod.key)
            return float(self.in_flight(r.pid)) if r is not None else 0.0

        plan, units = plan_round(
            self.harness.state, self.epoch + t, self.budget.spec,
            workload_of=workload_of, refusal=refusal, cost=cost,
        )
        self.stats.gpus_kept += len(plan.kept)
        if not plan.moves:
            return
        for (node, _), us in units.items():
            self._annotate(node, self.draining.get(node, set()) | set(us), t)
        self.stats.gpus_emptied += len(plan.gpus)
        for m in plan.moves:
            rec = by_key[m.pod]
            hand = self.spec.handover and rec.role == PREFILL
            rep = evict(rec, m.reason, t, hand)
            self.budget.record(m.workload, rec.name, t)
            self.replacements[m.workload] = rep
            self.evicting.append(
                _Eviction(rec, m.gpu[0], t + self.spec.grace_s, m.workload, hand, t)
            )
            self.stats.evictions += 1
            self.stats.handovers += hand

    def _annotate(self, node: str, units: set[str], t: float) -> None:
        obj = copy.deepcopy(self.nodes[node])
        ann = obj["metadata"].setdefault("annotations", {})
        if units:
            until = draining_until(self.epoch + t, self.budget.spec)
            ann[DRAINING_ANNOTATION] = format_draining(units, until)
            self.draining[node] = units
        else:
            self.draining.pop(node, None)
        self.harness.upsert_node(obj)
