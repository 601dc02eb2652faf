"""The allocation engine behind Allocate and GetPreferredAllocation: identifies the admitted pod
(resolver.py), checks its unit, records the allocation in memory at once and on the pod
(`copack.io/allocated`), rebuilds the table after an agent restart and drops entries of pods that
are gone. The only lock is in-process and held for one bounded Allocate; nothing is locked in the
API server, so nothing can stay locked after a crash."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kubernetes import client

from node_agent.device_plugin import metrics
from node_agent.device_plugin.allocations import (
    ALLOCATED_ANNOTATION,
    Allocation,
    AllocationRecord,
    AllocationRecordError,
)
from node_agent.device_plugin.config import DevicePluginConfig
from node_agent.device_plugin.kubelet_view import KubeletView, PodResourcesClient
from node_agent.device_plugin.pods import PodCache, PodView
from node_agent.device_plugin.resolver import (
    AllocationError,
    assigned_unit,
    pending_pods,
    resolve,
    sm_share,
)
from node_agent.device_plugin.slots import slot_unit, units_of
from policies.inventory import InventoryUnit

log = logging.getLogger(__name__)

REBUILT = "rebuilt-from-pod-resources"
FETCH_ATTEMPTS = 3
FETCH_RETRY_S = 0.1


@dataclass(frozen=True)
class Grant:
    """What one container gets: the unit and its MPS share."""

    pod_key: str
    unit: InventoryUnit
    sm_share: int | None
    mismatch: bool
    record: AllocationRecord


def preferred_slots(
    available: Sequence[str], must_include: Sequence[str], size: int, unit: str | None
) -> list[str]:
    """must_include first, then the assigned unit's slots, then the rest in a stable order."""
    chosen = list(dict.fromkeys(must_include))
    taken = set(chosen)

    def order(d: str) -> tuple[bool, str, int]:
        try:
            uuid = slot_unit(d)
            k = int(d.rpartition("::")[2])
        except ValueError:
            return (True, d, 0)
        return (uuid != unit, uuid, k)

    pool = sorted((d for d in dict.fromkeys(available) if d not in taken), key=order)
    chosen.extend(pool[: max(size - len(chosen), 0)])
    return chosen


class Allocator:
    def __init__(
        self,
        config: DevicePluginConfig,
        api: client.CoreV1Api,
        cache: PodCache,
        pod_resources: PodResourcesClient | None,
        units: Callable[[], Mapping[str, InventoryUnit]],
        boot_id: str,
    ) -> None:
        self._cfg = config
        self._api = api
        self._cache = cache
        self._podres = pod_resources
        self._units = units
        self._boot_id = boot_id
        self._lock = threading.Lock()
        self._table: dict[str, Allocation] = {}
        self._rejected: dict[str, str] = {}  # pod key -> uid refused at admission

    # ---- reading state -------------------------------------------------------------------

    def allocations(self) -> dict[str, Allocation]:
        with self._lock:
            return dict(self._table)

    def _kubelet_view(self) -> KubeletView | None:
        return self._podres.list() if self._podres is not None else None

    def _refresh(self, pods: dict[str, PodView], keys: Sequence[str]) -> None:
        """Read these pods from the API now, bypassing the watch (gone pods are dropped)."""
        for key in keys:
            ns, _, name = key.partition("/")
            try:
                fresh = self._fetch_retrying(ns, name)
            except Exception as e:
                log.warning("cannot read pod %s from the API: %s", key, e)
                continue
            if fresh is None:
                pods.pop(key, None)
            else:
                pods[key] = fresh

    def _fetch_retrying(self, namespace: str, name: str) -> PodView | None:
        """A transient API error here would fail the pod's admission for good: try thrice."""
        for attempt in range(FETCH_ATTEMPTS):
            try:
                return self._cache.fetch(namespace, name)
            except Exception:
                if attempt == FETCH_ATTEMPTS - 1:
                    raise
                time.sleep(FETCH_RETRY_S * (attempt + 1))
        return None

    def _pods_for(self, view: KubeletView | None) -> dict[str, PodView]:
        """Cached pods, plus fresh reads of pods the kubelet lists before our watch shows them
        (or shows them without their copack.io/unit yet)."""
        pods = {p.key: p for p in self._cache.pods()}
        if view is not None:
            stale = [k for k in view.pods
                     if k not in pods or (pods[k].wants_gpu and pods[k].unit is None)]
            self._refresh(pods, stale)
        return pods

    def _resolve(self, requested_units: set[str]):
        view = self._kubelet_view()
        pods = self._pods_for(view)
        try:
            res = resolve(list(pods.values()), view, self._table, self._rejected,
                          requested_units, self._cfg.node_name)
            if view is None or res.candidates == 1:
                return res
            # Several pods look admitted: all but one were refused by the kubelet before device
            # allocation (its pod list keeps them); their Failed phase may not have reached our
            # watch yet, so read the waiting pods afresh and decide again.
            self._refresh(pods, [p.key for p in pending_pods(
                list(pods.values()), view, self._table, self._rejected)])
            return resolve(list(pods.values()), view, self._table, self._rejected,
                           requested_units, self._cfg.node_name)
        except AllocationError:
            if view is not None:
                raise
            # Without the kubelet's view our watch may simply be behind: list once more.
            return resolve(self._cache.list_fresh(), None, self._table, self._rejected,
                           requested_units, self._cfg.node_name)

    # ---- kubelet calls -------------------------------------------------------------------

    def preferred(
        self, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]:
        """Never fails: without a resolvable pod, no preference (Allocate then says why)."""
        unit: str | None = None
        try:
            with self._lock:
                unit = self._resolve(set()).pod.unit
        except Exception as e:
            log.info("no preferred unit for this admission: %s", e)
        return preferred_slots(available, must_include, size, unit)

    def allocate(self, device_ids: Sequence[str]) -> Grant:
        requested = units_of(device_ids)
        with self._lock:
            try:
                res = self._resolve(requested)
            except AllocationError:
                metrics.ALLOCATIONS.labels("error").inc()
                raise
            pod = res.pod
            try:
                unit = assigned_unit(pod, self._units(), self._cfg.node_name)
                share = sm_share(pod)
            except AllocationError:
                self._rejected[pod.key] = pod.uid
                metrics.ALLOCATIONS.labels("error").inc()
                raise
            mismatch = requested != {unit.uuid}
            prev = self._table.get(pod.key)
            if prev is not None and prev.uid == pod.uid and prev.record.unit == unit.uuid:
                record = prev.record.plus_container(tuple(device_ids), mismatch)
            else:
                record = AllocationRecord(
                    unit=unit.uuid,
                    slots=tuple(device_ids),
                    containers=1,
                    sm_share=share,
                    mismatch=mismatch,
                    resolved_by=res.resolved_by,
                    boot_id=self._boot_id,
                )
            self._table[pod.key] = Allocation(uid=pod.uid, record=record, persisted=False)
            metrics.ALLOCATED_PODS.set(len(self._table))
        metrics.ALLOCATIONS.labels("mismatch" if mismatch else "ok").inc()
        if mismatch:
            log.warning(
                "pod %s: kubelet picked slots %s but the pod is assigned unit %s; giving the "
                "assigned unit (slots are bookkeeping; the unit is what the extender placed)",
                pod.key, list(device_ids), unit.uuid,
            )
        if res.candidates > 1:
            log.warning("pod %s chosen among %d waiting pods by %s", pod.key, res.candidates,
                        res.resolved_by)
        log.info("allocated unit %s (sm-share %s) to pod %s", unit.uuid, share, pod.key)
        self._persist(pod.key)
        return Grant(pod_key=pod.key, unit=unit, sm_share=share, mismatch=mismatch,
                     record=record)

    # ---- persistence, rebuild, reconcile ---------------------------------------------------

    def _persist(self, key: str) -> None:
        with self._lock:
            a = self._table.get(key)
            if a is None or a.persisted:
                return
            record, uid = a.record, a.uid
        ns, _, name = key.partition("/")
        body = {"metadata": {"annotations": {ALLOCATED_ANNOTATION: record.to_annotation()}}}
        try:
            self._api.patch_namespaced_pod(name, ns, body,
                                           _request_timeout=self._cfg.api_timeout_s)
        except Exception as e:
            log.warning("could not record %s on pod %s (will retry): %s",
                        ALLOCATED_ANNOTATION, key, e)
            return
        with self._lock:
            a = self._table.get(key)
            if a is not None and a.uid == uid and a.record == record:
                a.persisted = True

    def rebuild(self) -> tuple[int, int]:
        """After an agent restart: records from pod annotations (this boot only), plus pods the
        kubelet shows holding slots that lack a record (their annotation is then rewritten).
        Returns (from annotations, repaired)."""
        view = self._kubelet_view()
        pods = {p.key: p for p in self._cache.pods()}
        table: dict[str, Allocation] = {}
        for p in pods.values():
            raw = p.annotations.get(ALLOCATED_ANNOTATION)
            if p.terminal or not raw:
                continue
            try:
                rec = AllocationRecord.from_annotation(raw)
            except AllocationRecordError as e:
                log.warning("pod %s: ignoring unreadable record: %s", p.key, e)
                continue
            if rec.boot_id and self._boot_id and rec.boot_id != self._boot_id:
                log.info("pod %s: record from an earlier boot of the node ignored", p.key)
                continue
            table[p.key] = Allocation(uid=p.uid, record=rec, persisted=True)
        from_annotations = len(table)
        repaired = 0
        if view is not None:
            for key, containers in view.pods.items():
                slots = tuple(s for ids in containers.values() for s in ids)
                p = pods.get(key)
                if not slots or key in table or p is None or p.terminal or not p.unit:
                    continue
                try:
                    share = sm_share(p)
                except AllocationError:
                    share = None
                rec = AllocationRecord(
                    unit=p.unit,
                    slots=slots,
                    containers=sum(1 for ids in containers.values() if ids),
                    sm_share=share,
                    mismatch=units_of(slots) != {p.unit},
                    resolved_by=REBUILT,
                    boot_id=self._boot_id,
                )
                table[key] = Allocation(uid=p.uid, record=rec, persisted=False)
                repaired += 1
        with self._lock:
            self._table = table
            metrics.ALLOCATED_PODS.set(len(table))
        for key in [k for k, a in table.items() if not a.persisted]:
            self._persist(key)
        log.info("rebuilt %d allocations (%d from %s, %d from pod-resources)",
                 len(table), from_annotations, ALLOCATED_ANNOTATION, repaired)
        return from_annotations, repaired

    def forget(self, pod: PodView) -> None:
        """A pod was deleted: drop what we held for it."""
        with self._lock:
            a = self._table.get(pod.key)
            if a is not None and a.uid == pod.uid:
                del self._table[pod.key]
            if self._rejected.get(pod.key) == pod.uid:
                del self._rejected[pod.key]
            metrics.ALLOCATED_PODS.set(len(self._table))

    def reconcile(self) -> int:
        """Drop entries whose pods are gone, replaced (new UID) or finished; retry unwritten
        records. Returns how many entries were dropped."""
        live = {p.key: p for p in self._cache.pods()}
        dropped = 0
        with self._lock:
            for key, a in list(self._table.items()):
                p = live.get(key)
                if p is None or p.uid != a.uid or p.terminal:
                    del self._table[key]
                    dropped += 1
            for key, uid in list(self._rejected.items()):
                p = live.get(key)
                if p is None or p.uid != uid:
                    del self._rejected[key]
            unpersisted = [k for k, a in self._table.items() if not a.persisted]
            metrics.ALLOCATED_PODS.set(len(self._table))
        for key in unpersisted:
            self._persist(key)
        if dropped:
            log.info("reconcile: dropped %d allocations of pods that are gone", dropped)
        return dropped
