"""kube-scheduler's scheduling cycle, as far as it decides where a copack pod lands.

For each pending pod, in order: NodeUnschedulable and NodeResourcesFit filters on the node's
allocatable (cpu, memory and the `copack.io/gpu` slots) over kube's sample of nodes (adaptive
`percentageOfNodesToScore`, rotating start index), then the extender's filter, then
NodeResourcesFit's LeastAllocated score (weight 1) plus the extender's score × weight × 10
(MaxNodeScore / MaxExtenderPriority), highest total wins with ties broken by the order nodes
were evaluated (kube samples among ties at random; a simulator must be reproducible), then the
extender's bind. Prioritize is skipped when a single node is feasible, as kube does.

The extender's failure, as kube-scheduler's HTTPExtender handles it (KubeSchedulerConfiguration
`managedResources`, `ignorable`): with `managed_resources` set, only a pod requesting one of them
goes to the extender at all (`IsInterested`); any other pod is filtered, scored and bound by
kube alone, so it schedules while the extender is down. A call that fails (unreachable,
timeout, a non-JSON answer) makes the pod unschedulable with the error as its reason (it stays
Pending and is retried) unless the extender is `ignorable`, when filter and prioritize go on
without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_NODE_SCORE = 100
MAX_EXTENDER_PRIORITY = 10
MIN_FEASIBLE_NODES_TO_FIND = 100
MIN_FEASIBLE_NODES_PERCENTAGE = 5


class ExtenderClient(Protocol):
    """The three extender verbs, as kube-scheduler calls them."""

    def filter(
        self, pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]
    ) -> tuple[list[str], dict[str, str], str]: ...

    def prioritize(
        self, pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]
    ) -> dict[str, int]: ...

    def bind(self, pod: Mapping[str, Any], node: str) -> str: ...


def parse_quantity(value: str | int | float) -> float:
    """Kubernetes quantity to a float (cpu in cores, memory in bytes); enough suffixes for us."""
    if isinstance(value, int | float):
        return float(value)
    s = str(value).strip()
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
    decimal = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix, mult in binary.items():
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * mult
    if s and s[-1] in decimal:
        return float(s[:-1]) * decimal[s[-1]]
    return float(s)


def pod_requests(pod: Mapping[str, Any]) -> dict[str, float]:
    """Summed container requests (limits stand in for requests of extended resources)."""
    total: dict[str, float] = {}
    for c in pod.get("spec", {}).get("containers", []):
        res = c.get("resources", {}) or {}
        merged = dict(res.get("limits", {}) or {})
        merged.update(res.get("requests", {}) or {})
        for k, v in merged.items():
            total[k] = total.get(k, 0.0) + parse_quantity(v)
    return total


@dataclass
class ScheduleResult:
    node: str | None
    reason: str = ""
    filtered_by_fit: int = 0
    filtered_by_extender: int = 0
    scores: dict[str, int] = field(default_factory=dict)


@dataclass
class _NodeCache:
    obj: dict[str, Any]
    allocatable: dict[str, float]
    requested: dict[str, float] = field(default_factory=dict)


class KubeScheduler:
    """One kube-scheduler instance with one extender (the binder)."""

    def __init__(
        self,
        extender: ExtenderClient,
        *,
        extender_weight: int = 5,
        least_allocated_resources: Sequence[str] = ("cpu", "memory"),
        percentage_of_nodes_to_score: int = 0,
        managed_resources: Sequence[str] | None = None,
        ignorable: bool = False,
        default_binder: Callable[[Mapping[str, Any], str], str] | None = None,
    ) -> None:
        """`managed_resources` None: every pod is the extender's (the simulator's default).
        `default_binder(pod, node) -> error` binds pods the extender does not manage (kube's
        own binder); without one they are only assumed on the chosen node."""
        self._extender = extender
        self._managed = frozenset(managed_resources) if managed_resources is not None else None
        self._ignorable = ignorable
        self._default_binder = default_binder
        self._weight = extender_weight
        self._la_resources = tuple(least_allocated_resources)
        self._percentage = percentage_of_nodes_to_score
        self._nodes: dict[str, _NodeCache] = {}
        self._order: list[str] = []
        self._next_start = 0
        self._assumed: dict[str, tuple[str, dict[str, float]]] = {}  # pod uid -> node, requests

    # --- cache, fed by the simulator as informers would ---
    def add_node(self, node: dict[str, Any]) -> None:
        name = node["metadata"]["name"]
        alloc = {
            k: parse_quantity(v) for k, v in node.get("status", {}).get("allocatable", {}).items()
        }
        if name not in self._nodes:
            self._order.append(name)
        prev = self._nodes.get(name)
        self._nodes[name] = _NodeCache(node, alloc, prev.requested if prev else {})

    def remove_pod(self, uid: str) -> None:
        entry = self._assumed.pop(uid, None)
        if entry is None:
            return
        node, req = entry
        cache = self._nodes.get(node)
        if cache is not None:
            for k, v in req.items():
                cache.requested[k] = cache.requested.get(k, 0.0) - v

    def requested(self, node: str) -> dict[str, float]:
        return dict(self._nodes[node].requested)

    # --- the scheduling cycle ---
    def num_feasible_nodes_to_find(self, num_all: int) -> int:
        if num_all < MIN_FEASIBLE_NODES_TO_FIND:
            return num_all
        pct = self._percentage
        if pct == 0:
            pct = max(50 - num_all // 125, MIN_FEASIBLE_NODES_PERCENTAGE)
        return max(num_all * pct // 100, MIN_FEASIBLE_NODES_TO_FIND)

    def _fits(self, cache: _NodeCache, req: Mapping[str, float]) -> str | None:
        if cache.obj.get("spec", {}).get("unschedulable"):
            return "node(s) were unschedulable"
        for k, v in req.items():
            if v <= 0:
                continue
            if cache.requested.get(k, 0.0) + v > cache.allocatable.get(k, 0.0) + 1e-9:
                return f"Insufficient {k}"
        return None

    def _least_allocated(self, cache: _NodeCache, req: Mapping[str, float]) -> int:
        total, weights = 0, 0
        for r in self._la_resources:
            alloc = cache.allocatable.get(r, 0.0)
            if alloc <= 0:
                continue
            used = cache.requested.get(r, 0.0) + req.get(r, 0.0)
            total += int(max(alloc - used, 0.0) * MAX_NODE_SCORE / alloc)
            weights += 1
        return total // weights if weights else 0

    def is_interested(self, pod: Mapping[str, Any]) -> bool:
        """Whether the extender sees this pod (upstream HTTPExtender.IsInterested)."""
        if self._managed is None:
            return True
        spec = pod.get("spec", {})
        for c in list(spec.get("containers", [])) + list(spec.get("initContainers", []) or []):
            res = c.get("resources", {}) or {}
            if any(k in self._managed for part in ("requests", "limits")
                   for k in (res.get(part) or {})):
                return True
        return False

    def _without_extender(self, pod: dict[str, Any], feasible: list[str],
                          req: Mapping[str, float], fit_failed: int) -> ScheduleResult:
        scores = {x: self._least_allocated(self._nodes[x], req) for x in feasible}
        best = max(scores.values())
        chosen = next(x for x in feasible if scores[x] == best)
        self._assume(pod, chosen, req)
        if self._default_binder is not None:
            error = self._default_binder(pod, chosen)
            if error:
                self.remove_pod(pod["metadata"]["uid"])
                return ScheduleResult(None, f"binding rejected: {error}", fit_failed, 0, scores)
        return ScheduleResult(chosen, "", fit_failed, 0, scores)

    def schedule(self, pod: dict[str, Any]) -> ScheduleResult:
        req = pod_requests(pod)
        n = len(self._order)
        if n == 0:
            return ScheduleResult(None, "0/0 nodes are available")
        to_find = self.num_feasible_nodes_to_find(n)
        feasible: list[str] = []
        reasons: dict[str, int] = {}
        processed = 0
        for i in range(n):
            name = self._order[(self._next_start + i) % n]
            processed += 1
            why = self._fits(self._nodes[name], req)
            if why is None:
                feasible.append(name)
                if len(feasible) >= to_find:
                    break
            else:
                reasons[why] = reasons.get(why, 0) + 1
        self._next_start = (self._next_start + processed) % n
        fit_failed = processed - len(feasible)
        if not feasible:
            return ScheduleResult(None, _summary(n, reasons), filtered_by_fit=fit_failed)
        if not self.is_interested(pod):
            return self._without_extender(pod, feasible, req, fit_failed)
        try:
            passed, failed, error = self._extender.filter(
                pod, [self._nodes[x].obj for x in feasible])
        except Exception as e:  # unreachable, timed out, garbled: the HTTPExtender's error
            if not self._ignorable:
                return ScheduleResult(None, f"extender filter error: {_failure(e)}", fit_failed)
            passed, failed, error = list(feasible), {}, ""
        if error:
            return ScheduleResult(None, f"extender filter error: {error}", fit_failed)
        for why in failed.values():
            reasons[why] = reasons.get(why, 0) + 1
        keep = set(passed)
        feasible = [x for x in feasible if x in keep]
        if not feasible:
            return ScheduleResult(None, _summary(n, reasons), fit_failed, len(failed))
        if len(feasible) == 1:
            chosen = feasible[0]
            scores = {chosen: 0}
        else:
            try:
                ext = self._extender.prioritize(pod, [self._nodes[x].obj for x in feasible])
            except Exception:  # kube ignores a failed prioritize (FACTS: extender v1)
                ext = {}
            scores = {}
            for name in feasible:
                la = self._least_allocated(self._nodes[name], req)
                scores[name] = la + ext.get(name, 0) * self._weight * (
                    MAX_NODE_SCORE // MAX_EXTENDER_PRIORITY
                )
            best = max(scores.values())
            chosen = next(x for x in feasible if scores[x] == best)
        # kube assumes the pod on the node before the (asynchronous) bind.
        self._assume(pod, chosen, req)
        try:
            error = self._extender.bind(pod, chosen)
        except Exception as e:
            error = _failure(e)
        if error:
            self.remove_pod(pod["metadata"]["uid"])
            why = f"binding rejected: {error}"
            return ScheduleResult(None, why, fit_failed, len(failed), scores)
        return ScheduleResult(chosen, "", fit_failed, len(failed), scores)

    def _assume(self, pod: Mapping[str, Any], node: str, req: Mapping[str, float]) -> None:
        uid = pod["metadata"]["uid"]
        cache = self._nodes[node]
        for k, v in req.items():
            cache.requested[k] = cache.requested.get(k, 0.0) + v
        self._assumed[uid] = (node, dict(req))


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _summary(n: int, reasons: Mapping[str, int]) -> str:
    parts = ", ".join(f"{c} {why}" for why, c in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"0/{n} nodes are available: {parts}." if parts else f"0/{n} nodes are available."
