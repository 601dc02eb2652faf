"""Builders shared by the policy tests: inventories as the agent publishes them."""

from __future__ import annotations

import pytest

from policies.inventory import InventoryUnit
from workloads.gpu_catalog import gpu_spec
from workloads.mig_catalog import mig_profile
from workloads.roofline import DemandModel

H100 = "NVIDIA H100 80GB HBM3"


def whole_gpu(node: str, i: int, product: str = H100, healthy: bool = True) -> InventoryUnit:
    g = gpu_spec(product)
    return InventoryUnit(
        uuid=f"GPU-{node}-{i}",
        index=i,
        product=product,
        sm_count=g.sm_count,
        memory_bytes=g.memory_bytes,
        healthy=healthy,
    )


def mig_unit(node: str, i: int, j: int, profile: str, product: str = H100) -> InventoryUnit:
    p = mig_profile(product, profile)
    return InventoryUnit(
        uuid=f"MIG-{node}-{i}-{j}",
        parent=f"GPU-{node}-{i}",
        index=i,
        product=product,
        mig_profile=profile,
        sm_count=p.sm_count,
        memory_bytes=p.memory_bytes,
    )


@pytest.fixture(scope="session")
def demand_model() -> DemandModel:
    return DemandModel()
