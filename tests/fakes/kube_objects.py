"""Builders of Kubernetes objects as copack sees them: GPU nodes with a `copack.io/inventory`
annotation and copack pods. Create them in the fake API server to get them back exactly as the
API serves them (defaults, uid, resourceVersion), which is also how kube-scheduler sends them."""

from __future__ import annotations

from typing import Any

from policies.inventory import (
    AGENT_ANNOTATION,
    GPU_RESOURCE,
    INVENTORY_ANNOTATION,
    SCHEDULER_NAME,
    Inventory,
    InventoryUnit,
)

H100 = "NVIDIA H100 80GB HBM3"
H100_MEMORY = 85_520_809_984  # 81559 MiB, NVML total of an H100 80GB HBM3
H100_SMS = 132


def gpu_units(node: str, count: int = 8, product: str = H100) -> list[InventoryUnit]:
    """Whole GPUs named GPU-<node>-<i> (stable across calls, so tests can refer to them)."""
    return [
        InventoryUnit(
            uuid=f"GPU-{node}-{i}", index=i, product=product, sm_count=H100_SMS,
            memory_bytes=H100_MEMORY,
        )
        for i in range(count)
    ]


def mig_units(node: str, gpu_index: int = 0, profiles: tuple[str, ...] = ("3g.40gb", "3g.40gb"),
              product: str = H100) -> list[InventoryUnit]:
    sizes = {"1g.10gb": (16, 10_200_547_328), "2g.20gb": (32, 20_937_965_568),
             "3g.40gb": (60, 42_412_802_048), "4g.40gb": (64, 42_412_802_048),
             "7g.80gb": (132, 85_520_809_984)}
    out = []
    for i, p in enumerate(profiles):
        sms, mem = sizes[p]
        out.append(InventoryUnit(
            uuid=f"MIG-{node}-{gpu_index}-{i}", parent=f"GPU-{node}-{gpu_index}", index=gpu_index,
            product=product, mig_profile=p, sm_count=sms, memory_bytes=mem,
        ))
    return out


def gpu_node(
    name: str,
    units: list[InventoryUnit] | None = None,
    agent: str | None = None,
    labels: dict[str, str] | None = None,
    extra_annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Node body with the inventory (and agent endpoint) annotations."""
    ann = dict(extra_annotations or {})
    if units is not None:
        ann[INVENTORY_ANNOTATION] = Inventory(units=tuple(units)).to_annotation()
    if agent is not None:
        ann[AGENT_ANNOTATION] = agent
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       **(labels or {})},
            "annotations": ann,
        },
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", GPU_RESOURCE: "64"},
            "allocatable": {"cpu": "63", "memory": "500Gi", "pods": "110", GPU_RESOURCE: "64"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "nodeInfo": {"kubeletVersion": "v1.31.0", "architecture": "amd64",
                         "operatingSystem": "linux"},
        },
    }


def copack_pod(
    name: str,
    namespace: str = "default",
    *,
    role: str | None = None,
    demand: str | None = None,
    model: str | None = None,
    load: str | None = None,
    slo: str | None = None,
    gpu: int | None = 1,
    annotations: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> dict[str, Any]:
    """A vLLM-like pod asking for one copack unit share."""
    ann = dict(annotations or {})
    for key, value in (("copack.io/role", role), ("copack.io/demand", demand),
                       ("copack.io/model", model), ("copack.io/load", load),
                       ("copack.io/slo", slo)):
        if value is not None:
            ann[key] = value
    resources: dict[str, Any] = {"requests": {"cpu": "4", "memory": "32Gi"},
                                 "limits": {"cpu": "4", "memory": "32Gi"}}
    if gpu is not None:
        resources["limits"][GPU_RESOURCE] = str(gpu)
        resources["requests"][GPU_RESOURCE] = str(gpu)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "vllm"},
                     "annotations": ann},
        "spec": {
            "schedulerName": SCHEDULER_NAME,
            "containers": [{
                "name": "vllm",
                "image": "vllm/vllm-openai:v0.8.0",
                "args": args or ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--port", "8000"],
                "ports": [{"containerPort": 8000, "protocol": "TCP"}],
                "resources": resources,
            }],
        },
    }


def extender_args(pod: dict[str, Any], nodes: list[dict[str, Any]] | list[str],
                  cache_capable: bool = True) -> dict[str, Any]:
    """ExtenderArgs exactly as kube-scheduler marshals it (Go field names, no json tags)."""
    if cache_capable:
        names = [n if isinstance(n, str) else n["metadata"]["name"] for n in nodes]
        return {"Pod": pod, "Nodes": None, "NodeNames": names}
    items = [n for n in nodes if isinstance(n, dict)]
    return {"Pod": pod, "Nodes": {"metadata": {}, "items": items}, "NodeNames": None}


def binding_args(pod: dict[str, Any], node: str) -> dict[str, Any]:
    meta = pod["metadata"]
    return {"PodName": meta["name"], "PodNamespace": meta.get("namespace", "default"),
            "PodUID": meta.get("uid", ""), "Node": node}
