"""What the device plugin needs to know about the pods bound to its node, read from the
Kubernetes API: a flat, immutable view of each pod plus a list/watch cache that survives
dropped watches (FACTS: the watch loop must catch broadly, then relist)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from policies.inventory import (
    ASSIGNED_AT_ANNOTATION,
    GPU_RESOURCE,
    SM_SHARE_ANNOTATION,
    UNIT_ANNOTATION,
)

log = logging.getLogger(__name__)

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


def parse_rfc3339(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


def _gpu_count(container: Any) -> int:
    """The container's `copack.io/gpu` count (limits, else requests: equal for extended
    resources). A non-integer quantity counts as 0: the API server rejects those anyway."""
    res = getattr(container, "resources", None)
    if res is None:
        return 0
    for qty in ((res.limits or {}).get(GPU_RESOURCE), (res.requests or {}).get(GPU_RESOURCE)):
        if qty is None:
            continue
        try:
            return max(int(str(qty)), 0)
        except ValueError:
            return 0
    return 0


@dataclass(frozen=True)
class PodView:
    namespace: str
    name: str
    uid: str
    node: str | None
    phase: str | None
    annotations: dict[str, str]
    created: datetime | None
    deleting: bool
    # Containers that ask for copack.io/gpu: app containers (pod-resources lists these by name),
    # init containers apart (the kubelet allocates them first and pod-resources omits them).
    gpu_containers: tuple[str, ...]
    gpu_init_containers: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def unit(self) -> str | None:
        v = self.annotations.get(UNIT_ANNOTATION)
        return v.strip() if v and v.strip() else None

    @property
    def sm_share_raw(self) -> str | None:
        return self.annotations.get(SM_SHARE_ANNOTATION)

    @property
    def assigned_at(self) -> datetime | None:
        return parse_rfc3339(self.annotations.get(ASSIGNED_AT_ANNOTATION))

    @property
    def wants_gpu(self) -> bool:
        return bool(self.gpu_containers or self.gpu_init_containers)

    @property
    def expected_allocations(self) -> int:
        """How many Allocate calls the kubelet makes for this pod: one per container asking."""
        return len(self.gpu_containers) + len(self.gpu_init_containers)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def order_key(self) -> tuple[datetime, datetime, str]:
        """Oldest assignment first; pods without a readable assigned-at go last."""
        return (self.assigned_at or _FAR_FUTURE, self.created or _FAR_FUTURE, self.key)

    @classmethod
    def from_v1pod(cls, pod: Any) -> PodView:
        md, spec, status = pod.metadata, pod.spec, pod.status
        containers = (spec.containers or []) if spec else []
        inits = (spec.init_containers or []) if spec else []
        return cls(
            namespace=md.namespace or "default",
            name=md.name,
            uid=md.uid or "",
            node=spec.node_name if spec else None,
            phase=status.phase if status else None,
            annotations=dict(md.annotations or {}),
            created=_aware(md.creation_timestamp),
            deleting=md.deletion_timestamp is not None,
            gpu_containers=tuple(c.name for c in containers if _gpu_count(c) > 0),
            gpu_init_containers=tuple(c.name for c in inits if _gpu_count(c) > 0),
        )


class PodCache:
    """Pods on one node (fieldSelector spec.nodeName), kept by list + watch in a thread.

    Readers get the last known state; `fetch` reads one pod straight from the API for the case
    where the kubelet has seen a pod before our watch has (the kubelet watches on its own)."""

    def __init__(
        self,
        api: client.CoreV1Api,
        node_name: str,
        timeout_s: float = 5.0,
        on_delete: Callable[[PodView], None] | None = None,
    ) -> None:
        self._api = api
        self._node = node_name
        self._timeout = timeout_s
        self._on_delete = on_delete
        self._lock = threading.Lock()
        self._pods: dict[str, PodView] = {}
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    @property
    def field_selector(self) -> str:
        return f"spec.nodeName={self._node}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dp-pod-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout + 2)

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def get(self, key: str) -> PodView | None:
        with self._lock:
            return self._pods.get(key)

    def pods(self) -> list[PodView]:
        with self._lock:
            return list(self._pods.values())

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def fetch(self, namespace: str, name: str) -> PodView | None:
        """One pod read from the API now (None if it is gone or not on this node). Not stored:
        only the watch writes the cache, so a slow read can never roll a pod back."""
        try:
            pod = self._api.read_namespaced_pod(name, namespace, _request_timeout=self._timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        view = PodView.from_v1pod(pod)
        return view if view.node == self._node else None

    def list_fresh(self) -> list[PodView]:
        """The node's pods listed from the API now (not stored, as for fetch)."""
        return self._list()[0]

    def _list(self) -> tuple[list[PodView], str]:
        resp = self._api.list_pod_for_all_namespaces(
            field_selector=self.field_selector, _request_timeout=self._timeout
        )
        views = [PodView.from_v1pod(p) for p in resp.items]
        return views, resp.metadata.resource_version or ""

    def relist(self) -> str:
        """Replace the cache with a fresh list (watch thread); returns its resourceVersion."""
        views, rv = self._list()
        fresh = {v.key: v for v in views}
        with self._lock:
            gone = [v for k, v in self._pods.items() if k not in fresh]
            self._pods = fresh
        for v in gone:
            self._notify_delete(v)
        self._synced.set()
        return rv

    def _put(self, view: PodView) -> None:
        with self._lock:
            self._pods[view.key] = view

    def _remove(self, key: str) -> None:
        with self._lock:
            view = self._pods.pop(key, None)
        if view is not None:
            self._notify_delete(view)

    def _notify_delete(self, view: PodView) -> None:
        if self._on_delete is not None:
            try:
                self._on_delete(view)
            except Exception:
                log.exception("pod delete callback failed for %s", view.key)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                rv = self.relist()
                backoff = 0.2
                self._watch_from(rv)
            except Exception as e:  # dropped connections arrive as urllib3 errors, not ApiException
                if self._stop.is_set():
                    return
                log.warning("pod watch on node %s failed (%s); relisting", self._node, e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _watch_from(self, resource_version: str) -> None:
        w = watch.Watch()
        self._watch = w
        for event in w.stream(
            self._api.list_pod_for_all_namespaces,
            field_selector=self.field_selector,
            resource_version=resource_version,
            timeout_seconds=300,
            _request_timeout=330,
        ):
            if self._stop.is_set():
                break
            kind = event.get("type")
            obj = event.get("object")
            if kind == "BOOKMARK" or obj is None or isinstance(obj, dict):
                continue
            view = PodView.from_v1pod(obj)
            if kind == "DELETED" or view.node != self._node:
                self._remove(view.key)
            else:
                self._put(view)
