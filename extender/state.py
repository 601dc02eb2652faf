"""The extender's cluster state: nodes, copack pods, assumed placements and telemetry, on top of
the decision core's `ClusterView`.

Inputs are plain method calls so that the simulator can drive the very same object without
Kubernetes or gRPC (docs/extender.md, "Seams"): `upsert_node`, `delete_node`, `upsert_pod`,
`delete_pod`, `apply_snapshot`, `mark_synced`, with an injectable clock `now`. The Kubernetes
watchers (kube_watch.py) and the telemetry subscriber (telemetry.py) are just two producers of
those calls.

One re-entrant lock guards everything: watch events, telemetry and decisions each hold it for
microseconds to a millisecond, far below the scheduler's timeout, and a single lock makes
"decide, then assume" at bind trivially atomic with respect to every other input."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from policies.annotations import AnnotationError, pod_request_from_k8s, requests_gpu
from policies.cluster_view import ClusterView
from policies.config import PolicyConfig
from policies.draining import DRAINING_ANNOTATION, DrainingError, parse_draining
from policies.inventory import (
    AGENT_ANNOTATION,
    ASSIGNED_AT_ANNOTATION,
    INVENTORY_ANNOTATION,
    SM_SHARE_ANNOTATION,
    UNIT_ANNOTATION,
    Inventory,
    InventoryError,
    InventoryUnit,
)
from policies.model import PodRequest

log = logging.getLogger("copack.extender.state")

# Per-node sharing mode (DESIGN.md "Why it works"): MPS when this label or annotation says so.
SHARING_KEY = "copack.io/sharing"
TERMINAL_PHASES = ("Succeeded", "Failed")
RELIST_BATCH = 256


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(slots=True)
class NodeInfo:
    """What the extender knows of a node beyond its units (those live in the ClusterView)."""

    name: str
    signature: tuple = ()
    agent: str | None = None
    agent_error: str | None = None
    inventory_error: str | None = None  # None and has_inventory False: no annotation
    has_inventory: bool = False
    unit_count: int = 0
    unhealthy_units: int = 0  # per the inventory annotation
    # copack.io/draining: units the rebalancer is emptying, unavailable until `draining_until`
    draining: frozenset = frozenset()
    draining_until: float = -math.inf
    draining_error: str | None = None

    def is_draining(self, uuid: str, now: float) -> bool:
        return now < self.draining_until and uuid in self.draining


@dataclass(slots=True)
class PodInfo:
    """A pod asking for `copack.io/gpu`, bound or not."""

    namespace: str
    name: str
    uid: str
    key: str  # "namespace/name", one string shared by every index (80,000 pods add up)
    rv: str = ""
    node: str | None = None
    unit: str | None = None
    sm_share: int | None = None
    assigned_at: float | None = None
    request: PodRequest | None = None
    request_error: str | None = None
    source: str = "watch"  # "watch": seen bound in the API; "bind": assumed by our own bind
    assumed_at: float | None = None
    placed: bool = False  # recorded in the ClusterView
    uncertain: bool = False  # our binding request failed in transit: maybe bound, maybe not

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "node": self.node,
            "unit": self.unit,
            "sm_share": self.sm_share,
            "assigned_at": self.assigned_at,
            "role": self.request.role if self.request else None,
            "request_error": self.request_error,
            "source": self.source,
            "placed": self.placed,
            "uncertain": self.uncertain,
        }


@dataclass(slots=True)
class NodeTelemetry:
    endpoint: str
    state: str = "connecting"  # connecting | streaming | down
    last_seen: float | None = None  # state clock when the last snapshot arrived
    sequence: int = 0
    snapshots: int = 0
    reconnects: int = 0
    last_error: str | None = None
    units: int = 0
    sources: tuple[str, ...] = ()
    unknown_units: int = 0
    unhealthy: int = 0  # units reported unhealthy in the last snapshot
    recorded: int = 0  # units whose sample was recorded from the last snapshot


@dataclass
class _Synced:
    nodes: bool = False
    pods: bool = False
    manual: bool = False


@dataclass
class DemandCache:
    """The last parsed request per pod UID, so prioritize and bind reuse filter's parsing."""

    size: int = 4096
    entries: OrderedDict[str, tuple[str, PodRequest]] = field(default_factory=OrderedDict)

    def get(self, uid: str, rv: str) -> PodRequest | None:
        hit = self.entries.get(uid)
        if hit is None or hit[0] != rv:
            return None
        self.entries.move_to_end(uid)
        return hit[1]

    def put(self, uid: str, rv: str, req: PodRequest) -> None:
        self.entries[uid] = (rv, req)
        self.entries.move_to_end(uid)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class ClusterState:
    """See the module docstring."""

    def __init__(
        self,
        policy: PolicyConfig | None = None,
        *,
        now: Callable[[], float] = time.time,
        demand_model: Any = None,
        telemetry_statistic: str = "ewma",
        bind_confirm_timeout_s: float = 120.0,
        explain_entries: int = 10_000,
    ) -> None:
        if demand_model is None:
            from workloads.roofline import DemandModel

            demand_model = DemandModel()
        self.policy = policy or PolicyConfig()
        self.now = now
        self.demand_model = demand_model
        self.statistic = telemetry_statistic
        self.bind_confirm_timeout_s = bind_confirm_timeout_s
        self.lock = threading.RLock()
        self.view = ClusterView()
        self.view.set_assumed_window(self.policy.assumed_window_s)
        self.nodes: dict[str, NodeInfo] = {}
        # nodes that can never host a copack pod (no/invalid inventory, no units) -> why
        self.problem_nodes: dict[str, str] = {}
        self._stale_cache: tuple[float, frozenset[str]] = (-math.inf, frozenset())
        self.pods: dict[str, PodInfo] = {}
        self._pods_by_node: dict[str, set[str]] = {}
        self.telemetry: dict[str, NodeTelemetry] = {}
        self.requests = DemandCache()
        self.explanations: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._explain_entries = explain_entries
        self._synced = _Synced()
        self._watch_errors: dict[str, str] = {}
        self.counters: Counter[tuple[str, str]] = Counter()
        self._agent_listeners: list[Callable[[Mapping[str, str]], None]] = []
        self._node_locks: dict[str, threading.Lock] = {}
        self._node_locks_guard = threading.Lock()

    # -- sync -------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        s = self._synced
        return s.manual or (s.nodes and s.pods)

    def mark_synced(self) -> None:
        """Declare the inputs complete (the simulator's way; the watchers use `listed`)."""
        self._synced.manual = True

    def listed(self, resource: str) -> None:
        """A full list of `resource` has been applied (initial sync or relist)."""
        setattr(self._synced, resource, True)
        self._watch_errors.pop(resource, None)

    def watch_error(self, resource: str, message: str) -> None:
        self._watch_errors[resource] = message

    def count(self, name: str, label: str, n: int = 1) -> None:
        with self.lock:
            self.counters[(name, label)] += n

    # -- node locks (bind) ------------------------------------------------------------------

    def node_lock(self, node: str) -> threading.Lock:
        with self._node_locks_guard:
            lk = self._node_locks.get(node)
            if lk is None:
                lk = self._node_locks[node] = threading.Lock()
            return lk

    # -- agent endpoint listeners (telemetry subscriber) ------------------------------------

    def add_agent_listener(self, cb: Callable[[Mapping[str, str]], None]) -> None:
        with self.lock:
            self._agent_listeners.append(cb)
            cb(self.agent_endpoints())

    def remove_agent_listener(self, cb: Callable[[Mapping[str, str]], None]) -> None:
        with self.lock:
            if cb in self._agent_listeners:
                self._agent_listeners.remove(cb)

    def agent_endpoints(self) -> dict[str, str]:
        with self.lock:
            return {n: i.agent for n, i in self.nodes.items() if i.agent}

    def _agents_changed(self) -> None:
        endpoints = self.agent_endpoints()
        for node in list(self.telemetry):
            if node not in endpoints:
                del self.telemetry[node]
        for cb in list(self._agent_listeners):
            try:
                cb(endpoints)
            except Exception:  # a listener must not break the watch
                log.exception("agent listener failed")

    # -- nodes ------------------------------------------------------------------------------

    def upsert_node(self, node: Mapping[str, Any]) -> None:
        meta = node.get("metadata") or {}
        name = meta.get("name")
        if not name:
            return
        ann = meta.get("annotations") or {}
        labels = meta.get("labels") or {}
        inv_text = ann.get(INVENTORY_ANNOTATION)
        agent_text = ann.get(AGENT_ANNOTATION)
        drain_text = ann.get(DRAINING_ANNOTATION)
        mps = str(labels.get(SHARING_KEY, ann.get(SHARING_KEY, ""))).lower() == "mps"
        signature = (
            hash(inv_text), agent_text, mps, hash(tuple(sorted(labels.items()))), drain_text
        )
        with self.lock:
            info = self.nodes.get(name)
            if info is not None and info.signature == signature:
                return  # status heartbeats: nothing copack reads changed
            if info is None:
                info = self.nodes[name] = NodeInfo(name)
            info.signature = signature
            units: tuple = ()
            info.inventory_error = None
            info.has_inventory = inv_text is not None
            if inv_text is not None:
                try:
                    units = tuple(_compact(u) for u in Inventory.from_annotation(inv_text).units)
                except InventoryError as e:
                    info.inventory_error = str(e)
            info.unit_count = len(units)
            info.unhealthy_units = sum(1 for u in units if not u.healthy)
            try:
                info.draining, info.draining_until = parse_draining(drain_text)
                info.draining_error = None
            except DrainingError as e:  # a bad drain note must not take the node out
                info.draining, info.draining_until = frozenset(), -math.inf
                info.draining_error = str(e)
            if info.draining:
                now = self.now()
                units = tuple(
                    _compact(InventoryUnit(**{**u.__dict__, "healthy": False}))
                    if info.is_draining(u.uuid, now)
                    else u
                    for u in units
                )
            problem = self._node_problem(info)
            if problem is None:
                self.problem_nodes.pop(name, None)
            else:
                self.problem_nodes[name] = problem
            dropped = self.view.set_node(name, units, labels, mps)
            for key in dropped:
                p = self.pods.get(key)
                if p is not None:
                    p.placed = False
            for key in list(self._pods_by_node.get(name, ())):
                p = self.pods.get(key)
                if p is not None and not p.placed and p.unit:
                    self._place(p)
            agent, agent_error = _parse_agent(agent_text)
            if agent != info.agent or agent_error != info.agent_error:
                info.agent, info.agent_error = agent, agent_error
                self._agents_changed()

    def delete_node(self, name: str) -> None:
        with self.lock:
            info = self.nodes.pop(name, None)
            self.problem_nodes.pop(name, None)
            for key in self.view.remove_node(name):
                p = self.pods.get(key)
                if p is not None:
                    p.placed = False
            if info is not None and info.agent:
                self._agents_changed()

    def replace_nodes(self, items: Iterable[Mapping[str, Any]], started: float) -> None:
        """A relist: the items are the whole truth (nodes absent from it are gone). Applied in
        batches so decisions are not held up for the length of a big relist; each object is as
        current as a watch event would make it, so no half state is ever served."""
        seen: set[str] = set()
        for batch in _batches(items, RELIST_BATCH):
            with self.lock:
                for n in batch:
                    name = (n.get("metadata") or {}).get("name")
                    if name:
                        seen.add(name)
                        self.upsert_node(n)
        with self.lock:
            for name in [n for n in self.nodes if n not in seen]:
                self.delete_node(name)

    # -- pods -------------------------------------------------------------------------------

    def upsert_pod(self, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        name, ns = meta.get("name"), meta.get("namespace") or "default"
        if not name:
            return
        key = f"{ns}/{name}"
        uid = meta.get("uid") or ""
        rv = str(meta.get("resourceVersion") or "")
        with self.lock:
            info = self.pods.get(key)
            if info is not None and info.uid != uid:
                self._forget(key)  # same name, new pod
                info = None
            if info is not None and rv and info.rv == rv and info.source != "bind":
                return  # unchanged (an assumption still waits for the API to confirm it)
            if not requests_gpu(pod):
                if info is not None:
                    self._forget(key)
                return
            status = pod.get("status") or {}
            if status.get("phase") in TERMINAL_PHASES:
                if info is not None:
                    self._forget(key)
                return
            spec = pod.get("spec") or {}
            ann = meta.get("annotations") or {}
            node = spec.get("nodeName") or None
            unit = ann.get(UNIT_ANNOTATION) or None
            if info is None:
                info = self.pods[key] = PodInfo(ns, name, uid, key)
            info.rv = rv
            try:
                info.request = pod_request_from_k8s(pod)
                info.request_error = None
            except AnnotationError as e:
                info.request, info.request_error = None, str(e)
            if node and unit:
                sm = _int_or_none(ann.get(SM_SHARE_ANNOTATION))
                at = parse_rfc3339(ann.get(ASSIGNED_AT_ANNOTATION))
                info.uncertain = False  # the API shows it bound: nothing left in doubt
                if info.placed and info.node == node and info.unit == unit:
                    info.source = "watch"  # our assumption confirmed
                    return
                self._set_node_of(info, sys.intern(node))
                info.unit, info.sm_share, info.source = sys.intern(unit), sm, "watch"
                info.assigned_at = at
                self._place(info)
            elif info.source == "bind" and info.unit:
                return  # our own bind, not visible in the watch yet: keep the assumption
            else:
                if info.placed:
                    self.view.unplace(key)
                    info.placed = False
                self._set_node_of(info, node)
                info.unit = None

    def delete_pod(self, namespace: str, name: str, uid: str | None = None) -> None:
        key = f"{namespace or 'default'}/{name}"
        with self.lock:
            info = self.pods.get(key)
            if info is None or (uid and info.uid != uid):
                return
            self._forget(key)

    def replace_pods(self, items: Iterable[Mapping[str, Any]], started: float) -> None:
        """A relist. Pods absent from it are gone, except those our own binds assumed after the
        list was started (the list cannot show them yet). Batched like replace_nodes."""
        seen: set[str] = set()
        for batch in _batches(items, RELIST_BATCH):
            with self.lock:
                for p in batch:
                    meta = p.get("metadata") or {}
                    if meta.get("name"):
                        seen.add(f"{meta.get('namespace') or 'default'}/{meta['name']}")
                        self.upsert_pod(p)
        with self.lock:
            for key, info in list(self.pods.items()):
                if key in seen:
                    continue
                if info.source == "bind" and (info.assumed_at or -math.inf) >= started:
                    continue
                self._forget(key)

    def sweep(self) -> None:
        """Drop assumed placements whose binding never showed up in the watch."""
        with self.lock:
            now = self.now()
            for key, info in list(self.pods.items()):
                if (
                    info.source == "bind"
                    and info.assumed_at is not None
                    and now - info.assumed_at > self.bind_confirm_timeout_s
                ):
                    log.warning("assumed placement of %s never confirmed; dropping it", key)
                    self.count("assumed_expired", "bind")
                    self._forget(key)

    def _set_node_of(self, info: PodInfo, node: str | None) -> None:
        if info.node == node:
            return
        if info.node is not None:
            keys = self._pods_by_node.get(info.node)
            if keys is not None:
                keys.discard(info.key)
                if not keys:
                    del self._pods_by_node[info.node]
        info.node = node
        if node is not None:
            self._pods_by_node.setdefault(node, set()).add(info.key)

    def _forget(self, key: str) -> None:
        info = self.pods.pop(key, None)
        if info is None:
            return
        if info.placed:
            self.view.unplace(key)
        self._set_node_of(info, None)

    def _request_for(self, info: PodInfo) -> PodRequest:
        if info.request is not None:
            return info.request
        # A bound pod with a malformed annotation still holds its unit: account for it with
        # the role default rather than not at all.
        return PodRequest(namespace=info.namespace, name=info.name, uid=info.uid)

    def _place(self, info: PodInfo) -> bool:
        """Record a bound or assumed pod in the view (demand for its unit's type)."""
        assert info.unit is not None
        utype = self.view.unit_type(info.unit)
        if utype is None:
            info.placed = False  # node (or its inventory) not seen yet; retried on upsert_node
            return False
        req = self._request_for(info)
        demand = self.demand_model.demand(req, utype)
        timing = self.demand_model.timing(req, utype)
        t = info.assigned_at if info.assigned_at is not None else self.now()
        self.view.place(
            info.key, info.unit, demand, t, req.role,
            info.sm_share if info.sm_share is not None else 100, req, timing,
        )
        info.placed = True
        return True

    # -- assumptions made by bind -------------------------------------------------------------

    def assume(
        self,
        request: PodRequest,
        node: str,
        unit: str,
        sm_share: int,
        at: float,
    ) -> None:
        """Record our own placement at once (before the binding is even created)."""
        key = request.key
        with self.lock:
            info = self.pods.get(key)
            if info is not None and info.uid != request.uid:
                self._forget(key)
                info = None
            if info is None:
                info = self.pods[key] = PodInfo(
                    request.namespace, request.name, request.uid, key
                )
            elif (
                info.source == "watch" and info.placed and info.node == node and info.unit == unit
            ):
                return  # the API already shows exactly this placement: nothing to assume
            info.request = request
            self._set_node_of(info, node)
            info.unit, info.sm_share, info.assigned_at = unit, sm_share, at
            info.source, info.assumed_at = "bind", at
            info.uncertain = False
            self._place(info)

    def unassume(self, key: str, uid: str) -> None:
        """Undo `assume` after a failed binding (nothing of it may stay behind)."""
        with self.lock:
            info = self.pods.get(key)
            if info is None or info.uid != uid or info.source != "bind":
                return
            if info.placed:
                self.view.unplace(key)
                info.placed = False
            info.unit = info.sm_share = info.assigned_at = info.assumed_at = None
            info.source = "watch"
            info.uncertain = False
            self._set_node_of(info, None)

    def mark_uncertain(self, key: str, uid: str, uncertain: bool) -> None:
        """Whether our last binding request for the pod may not have reached the API (a retry
        of the bind then binds again instead of answering success from the assumption)."""
        with self.lock:
            info = self.pods.get(key)
            if info is not None and info.uid == uid:
                info.uncertain = uncertain

    def request_of(self, info: PodInfo) -> PodRequest:
        return self._request_for(info)

    # -- telemetry ----------------------------------------------------------------------------

    def telemetry_connecting(self, node: str, endpoint: str) -> None:
        with self.lock:
            t = self.telemetry.get(node)
            if t is None or t.endpoint != endpoint:
                t = self.telemetry[node] = NodeTelemetry(endpoint)
            t.state = "connecting"

    def telemetry_disconnected(
        self, node: str, reason: str, forget: bool = False, endpoint: str | None = None
    ) -> None:
        with self.lock:
            t = self.telemetry.get(node)
            if t is None or (endpoint is not None and t.endpoint != endpoint):
                return  # a stream to an endpoint the node no longer names
            if forget:
                del self.telemetry[node]
                return
            t.state = "down"
            t.last_error = reason
            t.reconnects += 1
            self.counters[("telemetry_reconnects", node)] += 1

    def apply_snapshots(self, items: list[tuple[str, Any]]) -> list[tuple[str, str]]:
        """Several nodes' snapshots under one lock hold (a telemetry batch). One that cannot
        be applied is returned as (node, reason) and kept as the node's last error; the others
        still land."""
        failed = []
        with self.lock:
            for node, snapshot in items:
                try:
                    self.apply_snapshot(node, snapshot)
                except Exception as e:
                    reason = f"{type(e).__name__}: {e}"
                    if (t := self.telemetry.get(node)) is not None:
                        t.last_error = reason
                    failed.append((node, reason))
        return failed

    def apply_snapshot(self, node_name: str, snapshot: Any) -> None:
        """One telemetry tick of a node (telemetry_pb2.Snapshot).

        Samples are timed by *arrival* on the state clock, less how much older the unit's
        reading was than the tick: agent and extender clocks need not agree."""
        stat = self.statistic
        sequence, units = snapshot.sequence, snapshot.units  # not a Snapshot: fail untouched
        with self.lock:
            now = self.now()
            t = self.telemetry.get(node_name)
            if t is None:
                ep = self.nodes[node_name].agent if node_name in self.nodes else ""
                t = self.telemetry[node_name] = NodeTelemetry(ep or "")
            t.state = "streaming"
            if t.last_seen is None or t.last_seen < now - self.policy.stale_after_s:
                self._stale_cache = (-math.inf, frozenset())  # this node turns fresh
            t.last_seen = now
            t.sequence = sequence
            t.snapshots += 1
            t.last_error = None
            unknown = unhealthy = recorded = 0
            info = self.nodes.get(node_name)
            sources = set()
            for u in units:
                lag = max(0.0, snapshot.timestamp - u.timestamp) if u.timestamp > 0 else 0.0
                if self.view.unit_type(u.uuid) is None:
                    unknown += 1
                    continue
                draining = info is not None and info.is_draining(u.uuid, now)
                self.view.set_unit_health(u.uuid, bool(u.healthy) and not draining)
                if not u.healthy:
                    unhealthy += 1
                    continue
                if not u.sm_active.present:
                    continue
                recorded += 1
                sources.add(u.source)
                self.view.record_telemetry(
                    u.uuid,
                    now - lag,
                    _metric(u.sm_active, stat),
                    _metric(u.dram_bw_active, stat) if u.dram_bw_active.present else 0.0,
                    float(u.memory_used_bytes),
                    _metric(u.tensor_active, stat) if u.tensor_active.present else None,
                )
            t.units = len(units)
            t.unknown_units = unknown
            t.unhealthy = unhealthy
            t.recorded = recorded
            t.sources = tuple(sorted(sources))

    def telemetry_age(self, node: str, now: float | None = None) -> float | None:
        t = self.telemetry.get(node)
        if t is None or t.last_seen is None:
            return None
        return (self.now() if now is None else now) - t.last_seen

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

    def stale_nodes(self, max_age_s: float = 0.5) -> frozenset[str]:
        """Nodes whose telemetry is older than the staleness bound (or absent), recomputed at
        most every `max_age_s` of the state clock: filter consults it for every failed node."""
        with self.lock:
            now = self.now()
            at, cached = self._stale_cache
            if 0 <= now - at <= max_age_s:
                return cached
            bound = now - self.policy.stale_after_s
            tel = self.telemetry
            stale = frozenset(
                n for n in self.nodes
                if (t := tel.get(n)) is None or t.last_seen is None or t.last_seen < bound
            )
            self._stale_cache = (now, stale)
            return stale

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


_UNIT_FIELDS = frozenset(InventoryUnit.model_fields)


def _compact(u: InventoryUnit) -> InventoryUnit:
    """The same validated unit, sharing one fields-set and interned strings: 40,000 units
    cost ~17 MB instead of ~46 MB."""
    d = dict(u.__dict__)
    for k in ("product", "mig_profile", "parent"):
        if isinstance(d.get(k), str):
            d[k] = sys.intern(d[k])
    return InventoryUnit.model_construct(_fields_set=_UNIT_FIELDS, **d)


def _batches(items: Iterable[Any], n: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for it in items:
        batch.append(it)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def _metric(m: Any, stat: str) -> float:
    if stat == "ewma" and m.ewma > 0:
        return float(m.ewma)
    if stat == "p95" and m.p95 > 0:
        return float(m.p95)
    return float(m.value)


def _int_or_none(text: str | None) -> int | None:
    try:
        v = int(str(text))
    except (TypeError, ValueError):
        return None
    return v if 1 <= v <= 100 else None


def _parse_agent(text: str | None) -> tuple[str | None, str | None]:
    """`host:port` (IPv6 as `[::1]:port`) -> (endpoint, None) or (None, error)."""
    if text is None:
        return None, None
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None, f"{AGENT_ANNOTATION}: {text!r} is not host:port"
    return text.strip(), None
