"""The simulated cluster: Node objects as the API server serves them, with the agent's
`copack.io/inventory` annotation and the device plugin's `copack.io/gpu` slots.

UUIDs are derived from node names, so a scenario always produces the same cluster. The
sharing mode (MPS or time-slicing) is a per-node label that the performance model reads.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from policies.inventory import (
    AGENT_ANNOTATION,
    GPU_RESOURCE,
    INVENTORY_ANNOTATION,
    Inventory,
    InventoryUnit,
)
from sim.catalog import UnitType, unit_type
from sim.scenario import ClusterSpec

SHARING_LABEL = "copack.io/sharing"
POOL_LABEL = "copack.io/pool"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
_NS = uuidlib.UUID("6f1c7a52-3b0e-4c55-9a7e-2f0c1d9b8e11")


@dataclass(frozen=True)
class SimUnit:
    """One schedulable unit and where it sits."""

    index: int  # position in Cluster.units
    uuid: str
    node: str
    gpu_uuid: str  # the physical GPU (itself for a whole GPU)
    type: UnitType
    mps: bool


@dataclass
class Cluster:
    nodes: list[dict[str, Any]]
    units: list[SimUnit]
    gpu_uuids: list[str]  # physical GPUs, in node order
    slots_per_unit: int

    def units_by_uuid(self) -> dict[str, SimUnit]:
        return {u.uuid: u for u in self.units}

    @property
    def gpu_count(self) -> int:
        return len(self.gpu_uuids)


def _uuid(prefix: str, *parts: object) -> str:
    return f"{prefix}-{uuidlib.uuid5(_NS, '/'.join(str(p) for p in parts))}"


def build_cluster(spec: ClusterSpec) -> Cluster:
    nodes: list[dict[str, Any]] = []
    units: list[SimUnit] = []
    gpus: list[str] = []
    for pool in spec.pools:
        whole = unit_type(pool.product, None)
        for n in range(pool.count):
            name = f"{pool.name}-{n:03d}"
            inv_units: list[InventoryUnit] = []
            for g in range(pool.gpus_per_node):
                gpu_uuid = _uuid("GPU", name, g)
                gpus.append(gpu_uuid)
                layout = pool.mig_layouts[g % len(pool.mig_layouts)] if pool.mig_layouts else None
                if not layout:
                    pieces: list[tuple[str, UnitType, str | None]] = [(gpu_uuid, whole, None)]
                else:
                    pieces = [
                        (_uuid("MIG", name, g, i, prof), unit_type(pool.product, prof), gpu_uuid)
                        for i, prof in enumerate(layout)
                    ]
                for uid, ut, parent in pieces:
                    inv_units.append(
                        InventoryUnit(
                            uuid=uid,
                            parent=parent,
                            index=g,
                            product=ut.product,
                            mig_profile=ut.profile,
                            sm_count=ut.sm_count,
                            memory_bytes=ut.memory_bytes,
                            healthy=True,
                        )
                    )
                    units.append(
                        SimUnit(len(units), uid, name, gpu_uuid, ut, pool.sharing == "mps")
                    )
            inventory = Inventory(units=tuple(inv_units))
            slots = len(inv_units) * spec.slots_per_unit
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "uid": str(uuidlib.uuid5(_NS, "node/" + name)),
                        "resourceVersion": "1",
                        "labels": {
                            "kubernetes.io/hostname": name,
                            POOL_LABEL: pool.name,
                            SHARING_LABEL: pool.sharing,
                            GPU_PRODUCT_LABEL: whole.product.replace(" ", "-"),
                        },
                        "annotations": {
                            INVENTORY_ANNOTATION: inventory.to_annotation(),
                            AGENT_ANNOTATION: f"{name}.sim:50051",
                        },
                    },
                    "spec": {},
                    "status": {
                        "capacity": {
                            "cpu": str(pool.cpu),
                            "memory": f"{pool.memory_gib}Gi",
                            "pods": "110",
                            GPU_RESOURCE: str(slots),
                        },
                        "allocatable": {
                            "cpu": str(pool.cpu),
                            "memory": f"{pool.memory_gib}Gi",
                            "pods": "110",
                            GPU_RESOURCE: str(slots),
                        },
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                }
            )
    return Cluster(nodes, units, gpus, spec.slots_per_unit)
