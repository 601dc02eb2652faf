"""What the cluster state tells about itself: the per-pod decision explanations, why a node
cannot host copack pods, unit and occupancy counts for the metrics, and the /debug/state dump.

Split out of state.py to keep it readable; `IntrospectionMixin` is only ever used as a base of
`ClusterState`, which provides the attributes declared below, `synced` and `telemetry_age`.
Locking is exactly as it was there: the state's one re-entrant lock, where it was taken."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from extender.state_records import NodeInfo, NodeTelemetry, PodInfo
from policies.cluster_view import ClusterView
from policies.config import PolicyConfig
from policies.inventory import INVENTORY_ANNOTATION


class IntrospectionMixin:
    """Explanations, node problems, counts and dumps of `ClusterState` (see the module
    docstring)."""

    # provided by ClusterState.__init__
    policy: PolicyConfig
    now: Callable[[], float]
    lock: Any  # threading.RLock
    view: ClusterView
    nodes: dict[str, NodeInfo]
    problem_nodes: dict[str, str]
    pods: dict[str, PodInfo]
    _pods_by_node: dict[str, set[str]]
    telemetry: dict[str, NodeTelemetry]
    explanations: OrderedDict[str, dict[str, Any]]
    _explain_entries: int
    _watch_errors: dict[str, str]
    counters: Counter[tuple[str, str]]

    # -- explanations -------------------------------------------------------------------------

    def record_explanation(self, key: str, explanation: dict[str, Any]) -> None:
        with self.lock:
            self.explanations[key] = explanation
            self.explanations.move_to_end(key)
            while len(self.explanations) > self._explain_entries:
                self.explanations.popitem(last=False)

    def explanation(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            return self.explanations.get(key)

    # -- introspection ------------------------------------------------------------------------

    def node_problem(self, name: str) -> str | None:
        """Why a node cannot host copack pods at all (None: it has units)."""
        info = self.nodes.get(name)
        if info is None:
            return "node is not in the extender's cluster view (unknown node)"
        return self._node_problem(info)

    @staticmethod
    def _node_problem(info: NodeInfo) -> str | None:
        if info.inventory_error:
            return f"invalid inventory: {info.inventory_error}"
        if not info.has_inventory:
            return f"node has no {INVENTORY_ANNOTATION} annotation (no copack agent)"
        if info.unit_count == 0:
            return "node's inventory lists no units"
        return None

    def unit_states(self) -> dict[str, int]:
        """Units by state for the metrics, per node from what the extender itself tracks (no
        reach into the view's arrays): fresh = healthy and read in the node's last snapshot
        while that is within the staleness bound; stale = other healthy units; unhealthy."""
        with self.lock:
            now = self.now()
            stale_after = self.policy.stale_after_s
            out = {"fresh": 0, "stale": 0, "unhealthy": 0}
            for name, info in self.nodes.items():
                if info.unit_count == 0:
                    continue
                tel = self.telemetry.get(name)
                fresh_tel = (
                    tel is not None
                    and tel.last_seen is not None
                    and now - tel.last_seen <= stale_after
                )
                unhealthy = tel.unhealthy if fresh_tel and tel else info.unhealthy_units
                unhealthy = min(unhealthy, info.unit_count)
                fresh = min(tel.recorded, info.unit_count - unhealthy) if fresh_tel and tel else 0
                out["unhealthy"] += unhealthy
                out["fresh"] += fresh
                out["stale"] += info.unit_count - unhealthy - fresh
            return out

    def occupied_units(self) -> int:
        with self.lock:
            return len({p.unit for p in self.pods.values() if p.placed and p.unit})

    def _telemetry_dict(self, name: str, now: float) -> dict[str, Any]:
        tel = self.telemetry.get(name)
        age = self.telemetry_age(name, now)
        return {
            "state": tel.state if tel else "none",
            "age_s": None if age is None else round(age, 3),
            "stale": age is None or age > self.policy.stale_after_s,
            "sequence": tel.sequence if tel else None,
            "reconnects": tel.reconnects if tel else 0,
            "last_error": tel.last_error if tel else None,
            "sources": list(tel.sources) if tel else [],
        }

    def to_dict(self, node: str | None = None) -> dict[str, Any]:
        """What /debug/state serves: everything, or only `node`'s units, pods and telemetry."""
        with self.lock:
            now = self.now()
            stale_after = self.policy.stale_after_s
            if node is None:
                view = self.view.to_dict(now=now, stale_after_s=stale_after)
                nodes, placements = view["nodes"], view["pods"]
                pending, version = view["pending_pods"], view["version"]
                pods = {k: p.to_dict() for k, p in self.pods.items()}
                problems = dict(self.problem_nodes)
            else:
                v = self.view
                nodes, placements, pending = {}, {}, {}
                if v.has_node(node):
                    units = []
                    for uuid in v.units_of(node):
                        u = v.unit(uuid)
                        recs = v.pods_on(uuid)
                        placements.update({r.key: r.to_dict() for r in recs})
                        units.append({
                            "uuid": uuid, "type": str(v.unit_type(uuid)),
                            "index": u.index if u else None, "parent": u.parent if u else None,
                            "pods": sorted(r.key for r in recs),
                            "load": v.unit_load(uuid, now, stale_after),
                        })
                    nodes[node] = {"mps": v.node_mps(node), "labels": v.node_labels(node),
                                   "units": units}
                version = v.version
                keys = self._pods_by_node.get(node, set())
                pods = {k: self.pods[k].to_dict() for k in sorted(keys) if k in self.pods}
                problems = {node: self.problem_nodes[node]} if node in self.problem_nodes else {}
            for name, n in nodes.items():
                info = self.nodes.get(name)
                n["agent"] = info.agent if info else None
                n["agent_error"] = info.agent_error if info else None
                n["telemetry"] = self._telemetry_dict(name, now)
            return {
                "now": now,
                "synced": self.synced,
                "watch_errors": dict(self._watch_errors),
                "policy": self.policy.to_dict(),
                "nodes": nodes,
                "node_problems": problems,
                "placements": placements,
                "pending_placements": pending,
                "pods": pods,
                "view_version": version,
                "counters": {f"{a}:{b}": c for (a, b), c in sorted(self.counters.items())},
            }
