"""The extender's ClusterState plus what the rebalancer needs of each copack pod and the
extender does not keep: its controller (the workload a replacement comes from), its labels (for
PodDisruptionBudget selectors), whether it is Ready and since when (warm-up), and whether it is
already being deleted. Fed by the very same watchers (extender/kube_watch.py): they call these
overridden methods, which record the metadata and then defer to ClusterState."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from extender.state import ClusterState, parse_rfc3339
from policies.annotations import workload_group


@dataclass(frozen=True, slots=True)
class PodMeta:
    uid: str
    workload: str | None  # "namespace/Kind/name" of the controller owner; None: nobody recreates it
    labels: Mapping[str, str]
    created: float | None
    ready_since: float | None  # None: not Ready
    deleting: bool

    @classmethod
    def from_k8s(cls, pod: Mapping[str, Any]) -> PodMeta:
        meta = pod.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        created = parse_rfc3339(meta.get("creationTimestamp"))
        ready_since = None
        for c in (pod.get("status") or {}).get("conditions") or []:
            if isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True":
                ready_since = parse_rfc3339(c.get("lastTransitionTime")) or created or 0.0
        return cls(
            uid=meta.get("uid") or "",
            workload=workload_group(meta, ns) or None,
            labels=dict(meta.get("labels") or {}),
            created=created,
            ready_since=ready_since,
            deleting=bool(meta.get("deletionTimestamp")),
        )


class RebalancerState(ClusterState):
    """ClusterState with `meta[key]` for every copack pod it tracks (same keys as `pods`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meta: dict[str, PodMeta] = {}

    def upsert_pod(self, pod: Mapping[str, Any]) -> None:
        super().upsert_pod(pod)
        m = pod.get("metadata") or {}
        if not m.get("name"):
            return
        key = f"{m.get('namespace') or 'default'}/{m['name']}"
        with self.lock:
            info = self.pods.get(key)
            if info is not None and info.uid == (m.get("uid") or ""):
                self.meta[key] = PodMeta.from_k8s(pod)
            else:
                self.meta.pop(key, None)

    def delete_pod(self, namespace: str, name: str, uid: str | None = None) -> None:
        super().delete_pod(namespace, name, uid)
        key = f"{namespace or 'default'}/{name}"
        with self.lock:
            if key not in self.pods:
                self.meta.pop(key, None)

    def replace_pods(self, items: Iterable[Mapping[str, Any]], started: float) -> None:
        super().replace_pods(items, started)
        with self.lock:
            for key in [k for k in self.meta if k not in self.pods]:
                del self.meta[key]

    def ready_count(self, workload: str) -> int:
        with self.lock:
            return sum(1 for p in self.meta.values()
                       if p.workload == workload and p.ready_since is not None and not p.deleting)
