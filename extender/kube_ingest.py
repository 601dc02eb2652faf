"""Kubernetes objects into the cluster state: Nodes (inventory, sharing mode, draining, agent
endpoint) and copack Pods (bound, or assumed by our own bind until the watch confirms them).

Split out of state.py to keep it readable; `KubeIngestMixin` is only ever used as a base of
`ClusterState`, which provides the attributes declared below, `_agents_changed`, `count` and
`_node_problem`. Locking is exactly as it was there: the state's one re-entrant lock, where
it was taken."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from extender.state_records import NodeInfo, PodInfo, parse_rfc3339
from policies.annotations import AnnotationError, pod_request_from_k8s, requests_gpu
from policies.cluster_view import ClusterView
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
from workloads.model_catalog import find_model
from workloads.roofline import RUNTIME_OVERHEAD_BYTES

log = logging.getLogger("copack.extender.state")

# Per-node sharing mode (DESIGN.md "Why it works"): MPS when this label or annotation says so.
SHARING_KEY = "copack.io/sharing"
TERMINAL_PHASES = ("Succeeded", "Failed")
RELIST_BATCH = 256


def least_memory(request: PodRequest | None) -> int | None:
    """The least memory a pod needs on any unit: its declared `mem=`, else its model's weights
    and vLLM's runtime; None when neither is known."""
    if request is None:
        return None
    if request.demand is not None and request.demand.mem_bytes:
        return int(request.demand.mem_bytes)
    spec = find_model(request.model) if request.model else None
    return int(spec.weight_bytes + RUNTIME_OVERHEAD_BYTES) if spec is not None else None


class KubeIngestMixin:
    """Node and Pod ingestion of `ClusterState` (see the module docstring)."""

    # provided by ClusterState.__init__
    now: Callable[[], float]
    demand_model: Any
    bind_confirm_timeout_s: float
    lock: Any  # threading.RLock
    view: ClusterView
    nodes: dict[str, NodeInfo]
    problem_nodes: dict[str, str]
    pods: dict[str, PodInfo]
    _pods_by_node: dict[str, set[str]]

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
                # a pod still to be placed: the view keeps GPUs for the largest of them
                self.view.note_waiting(key, None if node else least_memory(info.request))

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
        self.view.note_waiting(key, None)
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
