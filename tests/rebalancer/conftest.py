"""A cluster in the fake API server for the rebalancer: GPU nodes with copack inventories,
copack pods bound to units, Running and Ready, owned by ReplicaSets; and the rebalancer itself
(RebalancerService: the extender's watchers, the controller, the metrics server) on it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from policies.config import PolicyConfig
from policies.inventory import ASSIGNED_AT_ANNOTATION, SM_SHARE_ANNOTATION, UNIT_ANNOTATION
from rebalancer.budget import BudgetSpec
from rebalancer.controller import ControllerConfig
from rebalancer.service import RebalancerService
from tests.fakes.kube_fixtures import (  # noqa: F401  (fake_kube: re-exported fixture)
    FakeKube,
    eventually,
    fake_kube,
)
from tests.fakes.kube_objects import copack_pod, gpu_node, gpu_units

SMALL_DECODE = "sm=0.2,bw=0.3,mem=20Gi"


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_node(kube: FakeKube, name: str, gpus: int = 2) -> dict[str, Any]:
    return kube.server.create("nodes", gpu_node(name, gpu_units(name, gpus)))


def add_running_pod(
    kube: FakeKube,
    name: str,
    node: str | None,
    gpu: int = 0,
    *,
    workload: str | None = "rs-a",
    role: str = "decode",
    demand: str = SMALL_DECODE,
    ready_for_s: float | None = 3600.0,
    labels: dict[str, str] | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    """A copack pod of ReplicaSet `workload` (None: no controller), bound to GPU `gpu` of
    `node` (None: pending), Running and Ready for `ready_for_s` seconds (None: not Ready)."""
    pod = copack_pod(name, namespace, role=role, demand=demand)
    meta = pod["metadata"]
    if labels is not None:
        meta["labels"] = labels
    if workload is not None:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                    "name": workload, "uid": f"uid-{workload}",
                                    "controller": True, "blockOwnerDeletion": True}]
    s = kube.server
    s.add_pod(pod)
    if node is not None:
        s.bind(namespace, name, node, annotations={
            UNIT_ANNOTATION: f"GPU-{node}-{gpu}", SM_SHARE_ANNOTATION: "50",
            ASSIGNED_AT_ANNOTATION: rfc3339(time.time() - 7200)})
    status: dict[str, Any] = {"phase": "Running" if node else "Pending"}
    if ready_for_s is not None and node is not None:
        status["conditions"] = [{"type": "Ready", "status": "True",
                                 "lastTransitionTime": rfc3339(time.time() - ready_for_s)}]
    return s.patch("pods", name, {"status": status}, namespace, "merge", subresource="status")


def add_pdb(kube: FakeKube, name: str, allowed: int, min_available: int = 1,
            labels: dict[str, str] | None = None, namespace: str = "default") -> dict[str, Any]:
    return kube.server.create("poddisruptionbudgets", {
        "metadata": {"name": name},
        "spec": {"minAvailable": min_available,
                 "selector": {"matchLabels": labels or {"app": "vllm"}}},
        "status": {"disruptionsAllowed": allowed, "currentHealthy": 2, "desiredHealthy": 1,
                   "expectedPods": 2},
    }, namespace)


def evictions(kube: FakeKube) -> list[str]:
    return [f"{r.namespace}/{r.name}" for r in
            kube.server.requests_matching(verb="create", resource="pods", subresource="eviction")]


def spec(**kw: Any) -> BudgetSpec:
    return BudgetSpec(**{"min_age_s": 60.0, "interval_s": 60.0, "grace_s": 5.0, **kw})


@pytest.fixture
def start_rebalancer(fake_kube: FakeKube) -> Iterator[Callable[..., RebalancerService]]:  # noqa: F811
    started: list[RebalancerService] = []

    def start(dry_run: bool = False, metrics: bool = False, **budget: Any) -> RebalancerService:
        svc = RebalancerService(
            ControllerConfig(budget=spec(**budget), dry_run=dry_run), PolicyConfig(),
            api_client=fake_kube.api_client, telemetry=False,
            metrics_host="127.0.0.1", metrics_port=0 if metrics else None,
            watch_backoff_s=(0.05, 0.5),
        ).start()
        started.append(svc)
        assert svc.watcher.wait_synced(10), "the rebalancer's state did not sync"
        return svc

    yield start
    for svc in started:
        svc.stop()


def settled(svc: RebalancerService, pods: int) -> bool:
    """The rebalancer's state shows `pods` copack pods placed."""
    with svc.state.lock:
        return len(list(svc.state.view.iter_pods())) == pods
