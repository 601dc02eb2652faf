"""Which pod is the kubelet admitting? The device plugin API does not say (Allocate carries only
device IDs), so the plugin finds out, by identity and never by requested size:

1. With the kubelet's pod-resources view: the admitted pod is the one the kubelet lists whose
   `copack.io/gpu` containers do not hold slots yet (the kubelet admits pods one at a time and
   records devices only after Allocate returns). Should several qualify, a pod part-way through
   (an earlier container already served) goes first, then one whose assigned unit owns the slots
   the kubelet picked, then the oldest `copack.io/assigned-at`.
2. Without it (socket unavailable): pods with `copack.io/unit` that have not been served all
   their containers, in the same order. Weaker: it trusts that admissions follow assignments.

Pure functions over snapshots, so every rule is tested without sockets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from node_agent.device_plugin.allocations import Allocation
from node_agent.device_plugin.kubelet_view import KubeletView
from node_agent.device_plugin.pods import PodView
from policies.inventory import GPU_RESOURCE, SM_SHARE_ANNOTATION, UNIT_ANNOTATION, InventoryUnit

BY_POD_RESOURCES = "pod-resources"
BY_ASSIGNED_AT = "assigned-at"


class AllocationError(Exception):
    """Why a container cannot be given a unit; the kubelet shows this text in the pod's
    admission failure, so it names the pod, the annotation and what to do."""


@dataclass(frozen=True)
class Resolution:
    pod: PodView
    resolved_by: str
    candidates: int  # how many pods qualified (1 = unambiguous)


def served(pod: PodView, allocations: Mapping[str, Allocation]) -> int:
    a = allocations.get(pod.key)
    return a.record.containers if a is not None and a.uid == pod.uid else 0


def kubelet_pending(pod: PodView, view: KubeletView, allocations: Mapping[str, Allocation]) -> bool:
    """True if the kubelet lists the pod and one of its copack.io/gpu containers has no slots."""
    containers = view.holds(pod.key)
    if containers is None or not pod.wants_gpu:
        return False
    listed = [c for c in pod.gpu_containers if c in containers]
    if listed:
        return any(not containers[c] for c in listed)
    # Only init containers ask (pod-resources does not list them): our own count decides.
    return served(pod, allocations) < pod.expected_allocations


def kubelet_partial(pod: PodView, view: KubeletView | None) -> bool:
    if view is None:
        return False
    containers = view.holds(pod.key) or {}
    return any(containers.get(c) for c in pod.gpu_containers)


def pending_pods(
    pods: Sequence[PodView],
    view: KubeletView,
    allocations: Mapping[str, Allocation],
    rejected: Mapping[str, str],
) -> list[PodView]:
    """Pods the kubelet lists that still wait for copack.io/gpu slots (admitted or refused)."""
    return [
        p for p in pods
        if not p.terminal and p.wants_gpu and rejected.get(p.key) != p.uid
        and kubelet_pending(p, view, allocations)
    ]


def resolve(
    pods: Sequence[PodView],
    view: KubeletView | None,
    allocations: Mapping[str, Allocation],
    rejected: Mapping[str, str],
    requested_units: set[str],
    node: str,
) -> Resolution:
    """The pod being admitted, or AllocationError saying why none can be named."""
    if view is not None:
        pending = pending_pods(pods, view, allocations, rejected)
        by = BY_POD_RESOURCES
        if not pending:
            raise AllocationError(
                f"no pod on node {node} is waiting for {GPU_RESOURCE} in the kubelet's "
                "pod-resources view; refusing to hand out a device without an assignment"
            )
    else:
        live = [p for p in pods
                if not p.terminal and p.wants_gpu and rejected.get(p.key) != p.uid]
        pending = [p for p in live if served(p, allocations) < p.expected_allocations]
        by = BY_ASSIGNED_AT
        if not any(p.unit for p in pending):
            raise AllocationError(
                f"no pod on node {node} with a {UNIT_ANNOTATION} annotation is waiting for "
                f"{GPU_RESOURCE} (kubelet pod-resources API unavailable); refusing to hand out "
                "a device without an assignment"
            )
    assigned = [p for p in pending if p.unit]
    if not assigned:
        names = ", ".join(p.key for p in pending[:5])
        raise AllocationError(
            f"pod {names} asks for {GPU_RESOURCE} but has no {UNIT_ANNOTATION} annotation: it "
            "was not placed by copack-scheduler (set schedulerName: copack-scheduler), so there "
            "is no unit to give it; refusing to pick one"
        )

    def rank(p: PodView) -> tuple:
        partial = kubelet_partial(p, view) or served(p, allocations) > 0
        return (not partial, p.unit not in requested_units, *p.order_key())

    chosen = min(assigned, key=rank)
    if len(pending) > 1:
        by = f"{by}+{BY_ASSIGNED_AT}" if by == BY_POD_RESOURCES else by
    return Resolution(pod=chosen, resolved_by=by, candidates=len(pending))


def assigned_unit(pod: PodView, units: Mapping[str, InventoryUnit], node: str) -> InventoryUnit:
    """The unit named by the pod's annotation, present and healthy on this node."""
    uuid = pod.unit or ""
    unit = units.get(uuid)
    if unit is None:
        known = ", ".join(sorted(units)) or "none"
        raise AllocationError(
            f"pod {pod.key} is assigned unit {uuid} ({UNIT_ANNOTATION}), which node {node} does "
            f"not have (units here: {known}); the assignment is stale: delete the pod so it is "
            "scheduled again"
        )
    if not unit.healthy:
        raise AllocationError(
            f"pod {pod.key} is assigned unit {uuid}, which is unhealthy on node {node}; delete "
            "the pod so it is scheduled onto a healthy unit"
        )
    return unit


def sm_share(pod: PodView) -> int | None:
    """The MPS percentage from `copack.io/sm-share` (1..100), None when absent."""
    raw = pod.sm_share_raw
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if not 1 <= value <= 100:
        raise AllocationError(
            f"pod {pod.key} has {SM_SHARE_ANNOTATION}={raw!r}: expected an integer 1..100"
        )
    return value
