"""copack-rebalancer's control loop against a live cluster (sim/rebalance.py is the same loop
inside the simulator).

Every `interval_s`: plan over the extender's own kind of state (RebalancerState, fed by the
extender's watchers and telemetry subscriber), within the DisruptionBudget and the namespaces'
PodDisruptionBudgets; then, per GPU to empty, mark its units `copack.io/draining` on the node
(so the replacements the ReplicaSet creates at once are placed elsewhere) and evict its pods
through the Eviction API. A 429 (a PDB refused) is reported and ends that GPU's moves; nothing
is retried within the round. Between rounds, `reconcile` settles workloads whose replacement is
Ready, counts GPUs seen empty, and lifts draining marks once the GPU is empty and its pods'
replacements are Ready, or when the mark's time is up. Dry-run plans and reports only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from extender.state import rfc3339
from policies.cluster_view import PodRecord
from rebalancer.budget import BudgetSpec, DisruptionBudget
from rebalancer.cost import live_cost
from rebalancer.kube import KubeActions, Pdb
from rebalancer.metrics import RebalancerMetrics
from rebalancer.planner import GpuKey, Move, gpu_units
from rebalancer.rounds import draining_until, plan_round
from rebalancer.state import PodMeta, RebalancerState

log = logging.getLogger("copack.rebalancer")


@dataclass(frozen=True)
class ControllerConfig:
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    dry_run: bool = False
    # a workload whose replacement never turns Ready may move again after this long
    settle_timeout_s: float = 900.0
    explain_entries: int = 10_000

    def __post_init__(self) -> None:
        if self.settle_timeout_s <= 0:
            raise ValueError("settle_timeout_s must be positive")


@dataclass
class _Drain:
    gpu: GpuKey
    units: tuple[str, ...]
    until: float
    workloads: set[str] = field(default_factory=set)
    freed: bool = False


@dataclass
class _Replacing:
    pod: str
    at: float
    uids: frozenset[str]  # the workload's pods when its replica was evicted


class Rebalancer:
    """See the module docstring. `round()` is one planning round (what `--once` runs)."""

    def __init__(
        self,
        state: RebalancerState,
        kube: KubeActions,
        config: ControllerConfig,
        metrics: RebalancerMetrics | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.state, self.kube, self.config = state, kube, config
        self.metrics = metrics or RebalancerMetrics()
        self.now = now
        self.budget = DisruptionBudget(config.budget)
        self._drains: dict[GpuKey, _Drain] = {}
        self._dirty_nodes: set[str] = set()  # draining marks still to write
        self._replacing: dict[str, _Replacing] = {}
        self._explained: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._workloads: set[str] = set()
        self.rounds = 0
        self.last_round_at: float | None = None

    # -- one round --------------------------------------------------------------------------

    def round(self) -> dict[str, Any]:
        """Plan and act once; returns what happened (also logged, counted and explained)."""
        now = self.now()
        self.reconcile(now)
        self.rounds += 1
        self.last_round_at = now
        self.metrics.rounds.inc()
        report: dict[str, Any] = {"round": self.rounds, "at": rfc3339(now),
                                  "dry_run": self.config.dry_run, "moves": [], "kept": {}}
        state = self.state
        if not state.synced:
            report["skipped"] = "the cluster state is not synced yet"
            return report
        with state.lock:
            meta = dict(state.meta)
            placed = {r.key for r in state.view.iter_pods()}
        pdbs = self._read_pdbs({k.split("/", 1)[0] for k in placed})
        ready = Counter(m.workload for m in meta.values()
                        if m.workload and m.ready_since is not None and not m.deleting)
        healthy: dict[tuple[str, str], int] = {}  # (namespace, PDB) -> its Ready pods

        def workload_of(key: str) -> str | None:
            m = meta.get(key)
            return m.workload if m is not None else None

        def refusal(rec: PodRecord, workload: str) -> str | None:
            return self._refusal(rec.key, meta, workload, now, pdbs, ready, healthy)

        def cost(rec: PodRecord) -> float:
            return live_cost(state.view, rec, now, state.policy.stale_after_s)

        plan, units = plan_round(state, now, self.config.budget, workload_of=workload_of,
                                 refusal=refusal, cost=cost)
        self._report_kept(plan.kept, now, report)
        by_gpu: dict[GpuKey, list[Move]] = {}
        for m in plan.moves:
            by_gpu.setdefault(m.gpu, []).append(m)
        for gpu in plan.gpus:
            report["moves"] += self._empty(gpu, units[gpu], by_gpu.get(gpu, []), meta, now)
        self._set_budget_gauges(meta, now)
        log.info("round %d: %d GPU(s) to empty, %d move(s), %d GPU(s) kept%s", self.rounds,
                 len(plan.gpus), len(plan.moves), len(plan.kept),
                 " (dry run)" if self.config.dry_run else "")
        return report

    def _read_pdbs(self, namespaces: set[str]) -> dict[str, list[Pdb] | str]:
        out: dict[str, list[Pdb] | str] = {}
        for ns in sorted(namespaces):
            try:
                out[ns] = self.kube.pdbs(ns)
            except Exception as e:  # unknown PDBs: move nothing there (fail safe)
                out[ns] = f"cannot read the PodDisruptionBudgets of {ns}: {type(e).__name__}: {e}"
        return out

    def _refusal(
        self,
        key: str,
        meta: dict[str, PodMeta],
        workload: str,
        now: float,
        pdbs: dict[str, list[Pdb] | str],
        ready: Counter[str],
        healthy: dict[tuple[str, str], int],
    ) -> str | None:
        m = meta.get(key)
        if m is None:
            return "not seen by the rebalancer's pod watch"
        if m.deleting:
            return "already being deleted"
        if m.ready_since is None:
            return "not Ready (still starting)"
        ns = key.split("/", 1)[0]
        found = pdbs.get(ns, [])
        if isinstance(found, str):
            return found
        matching = [p for p in found if p.matches(m.labels)]
        if len(matching) > 1:
            names = ", ".join(p.name for p in matching)
            return f"matches {len(matching)} PodDisruptionBudgets ({names}): not evictable"
        available, floor = ready[workload], 0
        if matching:
            pdb = matching[0]
            if pdb.disruptions_allowed <= 0:
                return (f"PodDisruptionBudget {pdb.name} allows no disruption now "
                        f"(status.disruptionsAllowed = 0)")
            if (ns, pdb.name) not in healthy:
                healthy[(ns, pdb.name)] = sum(
                    1 for k, p in meta.items() if k.split("/", 1)[0] == ns
                    and p.ready_since is not None and not p.deleting and pdb.matches(p.labels)
                )
            available = healthy[(ns, pdb.name)]
            floor = pdb.floor(available)
        return self.budget.refusal(workload, now - m.ready_since, now, available, floor)

    def _empty(
        self, gpu: GpuKey, units: list[str], moves: list[Move], meta: dict[str, PodMeta],
        now: float,
    ) -> list[dict[str, Any]]:
        """Mark the GPU draining, then evict its pods, stopping at the first refusal."""
        node, _ = gpu
        out: list[dict[str, Any]] = []
        if self.config.dry_run:
            for m in moves:
                self.metrics.evictions.labels("dry_run").inc()
                out.append(self._explain(m, "dry_run", f"would evict: {m.reason}", now))
                log.info("dry run: would evict %s (%s)", m.pod, m.reason)
            return out
        drain = _Drain(gpu, tuple(units), draining_until(now, self.config.budget))
        self._drains[gpu] = drain
        if not self._write_node(node):
            del self._drains[gpu]
            self._dirty_nodes.discard(node)
            for m in moves:
                self.metrics.evictions.labels("failed").inc()
                out.append(self._explain(m, "failed", f"not evicted: could not mark GPU "
                                         f"{gpu[1]} of {node} draining", now))
            return out
        for i, m in enumerate(moves):
            pmeta = meta.get(m.pod)
            ns, name = m.pod.split("/", 1)
            ev = self.kube.evict(ns, name, pmeta.uid if pmeta else "")
            self.metrics.evictions.labels(ev.outcome).inc()
            if ev.outcome == "evicted":
                self.budget.record(m.workload, name, now)
                with self.state.lock:
                    uids = frozenset(p.uid for p in self.state.meta.values()
                                     if p.workload == m.workload)
                self._replacing[m.workload] = _Replacing(m.pod, now, uids)
                drain.workloads.add(m.workload)
                out.append(self._explain(m, "evicted", m.reason, now))
                log.info("evicted %s: %s", m.pod, m.reason)
                continue
            why = (f"the Eviction API refused ({ev.message})" if ev.outcome == "refused"
                   else f"the eviction failed ({ev.message})")
            out.append(self._explain(m, ev.outcome, f"{m.reason}; but {why}", now))
            log.warning("eviction of %s %s: %s", m.pod, ev.outcome, ev.message)
            for rest in moves[i + 1:]:
                out.append(self._explain(rest, "kept", f"not evicted: {m.pod}, on the same "
                                         f"GPU, could not be evicted ({ev.outcome}), so the "
                                         f"GPU cannot be emptied this round", now))
            del self._drains[gpu]  # the GPU will not empty: lift its mark at once
            self._write_node(node)
            break
        return out

    # -- between rounds -------------------------------------------------------------------

    def reconcile(self, now: float | None = None) -> None:
        """Settle replaced workloads, count emptied GPUs, lift finished draining marks, and
        retry marks that could not be written."""
        now = self.now() if now is None else now
        state = self.state
        with state.lock:
            for w, r in list(self._replacing.items()):
                gone = r.pod not in state.meta or state.meta[r.pod].uid not in r.uids
                ready = any(p.workload == w and p.uid not in r.uids and p.ready_since is not None
                            for p in state.meta.values())
                if (gone and ready) or now >= r.at + self.config.settle_timeout_s:
                    self.budget.settle(w)
                    del self._replacing[w]
            done: list[_Drain] = []
            for d in self._drains.values():
                empty = not any(state.view.pods_on(u) for u in d.units)
                if empty and not d.freed:
                    d.freed = True
                    self.metrics.gpus_freed.inc()
                    log.info("GPU %d of %s is empty", d.gpu[1], d.gpu[0])
                settled = not (d.workloads & set(self._replacing))
                if (empty and settled) or now >= d.until:
                    done.append(d)
        for d in done:
            del self._drains[d.gpu]
            self._dirty_nodes.add(d.gpu[0])
        for node in sorted(self._dirty_nodes):
            self._write_node(node)
        self.metrics.draining.set(len(self._drains))

    def _write_node(self, node: str) -> bool:
        """Make the node's annotation say what `_drains` holds for it (nothing: remove it)."""
        drains = [d for d in self._drains.values() if d.gpu[0] == node]
        units = sorted({u for d in drains for u in d.units})
        until = max((d.until for d in drains), default=0.0)
        try:
            self.kube.set_draining(node, units, until)
        except Exception as e:
            log.warning("cannot write the draining mark of %s: %s", node, e)
            self._dirty_nodes.add(node)
            return False
        self._dirty_nodes.discard(node)
        return True

    # -- reporting ------------------------------------------------------------------------

    def _explain(self, m: Move, action: str, reason: str, now: float) -> dict[str, Any]:
        entry = {
            "pod": m.pod, "action": action, "reason": reason, "workload": m.workload,
            "gpu": {"node": m.gpu[0], "index": m.gpu[1]}, "unit": m.source_unit,
            "target": {"node": m.target_node, "unit": m.target_unit},
            "cost": round(m.cost, 4), "round": self.rounds, "at": rfc3339(now),
            "dry_run": self.config.dry_run,
        }
        self._remember(m.pod, entry)
        return entry

    def _report_kept(self, kept: dict[GpuKey, str], now: float, report: dict[str, Any]) -> None:
        self.metrics.gpus_kept.inc(len(kept))
        with self.state.lock:
            for (node, index), why in kept.items():
                report["kept"][f"{node}/{index}"] = why
                for u in gpu_units(self.state.view, node, index):
                    for rec in self.state.view.pods_on(u):
                        self._remember(rec.key, {
                            "pod": rec.key, "action": "kept", "unit": u,
                            "gpu": {"node": node, "index": index},
                            "reason": f"GPU {index} of {node} is kept: {why}",
                            "round": self.rounds, "at": rfc3339(now),
                            "dry_run": self.config.dry_run,
                        })

    def _remember(self, key: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self._explained[key] = entry
            self._explained.move_to_end(key)
            while len(self._explained) > self.config.explain_entries:
                self._explained.popitem(last=False)

    def explain(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._explained.get(key)

    def _set_budget_gauges(self, meta: dict[str, PodMeta], now: float) -> None:
        workloads = {m.workload for m in meta.values() if m.workload}
        for w in self._workloads - workloads:
            self.metrics.budget_left.remove(w)
        for w in workloads:
            self.metrics.budget_left.labels(w).set(self.budget.left(w, now))
        self._workloads = workloads

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Alive while rounds keep coming (a stuck loop fails the liveness probe)."""
        now = self.now()
        spec = self.config.budget
        last = self.last_round_at
        late = last is not None and now - last > 3 * spec.interval_s + 30
        return not late, {
            "synced": self.state.synced, "rounds": self.rounds, "dry_run": self.config.dry_run,
            "draining": sorted(f"{n}/{i}" for n, i in self._drains),
            "replacing": sorted(self._replacing), "late": late,
        }

    def run(self, stop: threading.Event, tick_s: float = 1.0) -> None:
        """Rounds every interval_s, reconcile every tick, until `stop` is set."""
        next_round = self.now() + self.config.budget.interval_s
        while not stop.wait(tick_s):
            try:
                if self.now() >= next_round:
                    next_round = self.now() + self.config.budget.interval_s
                    self.round()
                else:
                    self.reconcile()
            except Exception:  # one bad round must not end the controller
                log.exception("rebalancer round failed")
