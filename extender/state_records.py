"""The records `ClusterState` keeps per node, pod and telemetry stream, its cache of parsed
pod requests, and the RFC 3339 timestamps of the copack annotations. They depend on nothing of
the state, so its mixins (kube_ingest.py, telemetry_ingest.py, state_introspection.py) share
them without importing state.py, which imports those mixins."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from policies.model import PodRequest


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
