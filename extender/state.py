"""The extender's cluster state: nodes, copack pods, assumed placements and telemetry, on top of
the decision core's `ClusterView`.

Inputs are plain method calls so that the simulator can drive the very same object without
Kubernetes or gRPC (docs/extender.md, "Seams"): `upsert_node`, `delete_node`, `upsert_pod`,
`delete_pod`, `apply_snapshot`, `mark_synced`, with an injectable clock `now`. The Kubernetes
watchers (kube_watch.py) and the telemetry subscriber (telemetry.py) are just two producers of
those calls.

One re-entrant lock guards everything: watch events, telemetry and decisions each hold it for
microseconds to a millisecond, far below the scheduler's timeout, and a single lock makes
"decide, then assume" at bind trivially atomic with respect to every other input.

`ClusterState` is assembled from mixins, one module each: kube_ingest.py (Nodes and Pods,
bind assumptions), telemetry_ingest.py (Snapshots, staleness), state_introspection.py
(explanations, node problems, counts, /debug/state); its records live in state_records.py.
Everything they define stays importable from here."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

# The names the split moved out stay importable from here, as before it (`noqa: F401`: those
# only re-exported, for sim/, rebalancer/, tests/ and the rest of extender/).
from extender.kube_ingest import (  # noqa: F401
    _UNIT_FIELDS,
    RELIST_BATCH,
    SHARING_KEY,
    TERMINAL_PHASES,
    KubeIngestMixin,
    _batches,
    _compact,
    _int_or_none,
    _parse_agent,
)
from extender.state_introspection import IntrospectionMixin
from extender.state_records import (  # noqa: F401
    DemandCache,
    NodeInfo,
    NodeTelemetry,
    PodInfo,
    _Synced,
    parse_rfc3339,
    rfc3339,
)
from extender.telemetry_ingest import TelemetryIngestMixin, _metric  # noqa: F401
from policies.cluster_view import ClusterView
from policies.config import PolicyConfig

log = logging.getLogger("copack.extender.state")


class ClusterState(KubeIngestMixin, TelemetryIngestMixin, IntrospectionMixin):
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

