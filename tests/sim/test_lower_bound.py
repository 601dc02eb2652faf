"""The fluid lower bound fills the biggest GPUs first, per dimension, and takes the worst."""

from __future__ import annotations

import numpy as np
import pytest

from sim.cluster import build_cluster
from sim.lower_bound import fluid_lower_bound
from sim.scenario import ClusterSpec
from workloads.gpu_catalog import gpu_spec


def _cluster():
    return build_cluster(
        ClusterSpec.model_validate(
            {
                "pools": [
                    {"name": "a", "count": 1, "gpus_per_node": 2, "product": "H100-SXM"},
                    {"name": "b", "count": 1, "gpus_per_node": 1, "product": "H200"},
                ]
            }
        )
    )


def test_bound_is_the_binding_dimension():
    cl = _cluster()
    h100, h200 = gpu_spec("H100-SXM"), gpu_spec("H200")
    inputs = np.array(
        [
            [0.0, 0.0, 0.0],
            [0.5 * h100.bf16_flops, 0.0, 0.0],  # half a GPU of compute
            [0.0, h200.hbm_bw + 0.5 * h100.hbm_bw, 0.0],  # the H200 first, then half an H100
            [0.0, 0.0, h200.memory_bytes * 1.0],  # exactly the H200's memory
            [0.1 * h100.bf16_flops, 0.2 * h200.hbm_bw, 3 * h200.memory_bytes],  # beyond the cluster
        ]
    )
    lb = fluid_lower_bound(cl, inputs)
    assert lb[0] == 0.0
    assert lb[1] == pytest.approx(0.5)
    assert lb[2] == pytest.approx(1.5)
    assert lb[3] == pytest.approx(1.0)
    extra = 3 * h200.memory_bytes - h200.memory_bytes - 2 * h100.memory_bytes
    assert lb[4] == pytest.approx(3 + extra / h100.memory_bytes)


def test_cluster_units_and_inventory():
    from policies.inventory import GPU_RESOURCE, INVENTORY_ANNOTATION, Inventory

    cl = build_cluster(
        ClusterSpec.model_validate(
            {
                "slots_per_unit": 3,
                "pools": [
                    {
                        "name": "m",
                        "count": 1,
                        "gpus_per_node": 2,
                        "product": "H100-SXM",
                        "mig_layouts": [["3g.40gb", "3g.40gb"], ["4g.40gb", "2g.20gb", "1g.10gb"]],
                        "sharing": "time-slicing",
                    }
                ],
            }
        )
    )
    node = cl.nodes[0]
    inv = Inventory.from_annotation(node["metadata"]["annotations"][INVENTORY_ANNOTATION])
    assert [u.mig_profile for u in inv.units] == [
        "3g.40gb", "3g.40gb", "4g.40gb", "2g.20gb", "1g.10gb"
    ]
    assert {u.parent for u in inv.units} == set(cl.gpu_uuids)
    assert node["status"]["allocatable"][GPU_RESOURCE] == "15"
    assert node["metadata"]["labels"]["copack.io/sharing"] == "time-slicing"
    assert cl.gpu_count == 2 and len(cl.units) == 5
    # UUIDs derive from node names: the same scenario always builds the same cluster.
    spec = {"pools": [{"name": "m", "count": 1, "gpus_per_node": 2, "product": "H100-SXM"}]}
    one = build_cluster(ClusterSpec.model_validate(spec))
    two = build_cluster(ClusterSpec.model_validate(spec))
    assert one.gpu_uuids == two.gpu_uuids and one.nodes == two.nodes


def test_memory_bin_bound_keeps_pods_whole() -> None:
    from sim.lower_bound import memory_bin_bound

    c = 100.0
    assert memory_bin_bound(np.array([]), c) == 0
    # two 60s cannot share a GPU though their sum fits two fluid GPUs' worth (1.2)
    assert memory_bin_bound(np.array([60.0, 60.0]), c) == 2
    # three 40s: the fluid bound says 1.2 GPUs, whole pods need 2
    assert memory_bin_bound(np.array([40.0, 40.0, 40.0]), c) == 2
    # 70 + 30 fit one GPU exactly
    assert memory_bin_bound(np.array([70.0, 30.0]), c) == 1
    # K = 35: the 70s and the 35s cannot pair, so 2 + ceil(70 / 100) = 3
    assert memory_bin_bound(np.array([70.0, 70.0, 35.0, 35.0]), c) == 3


def test_memory_bin_bound_never_exceeds_a_brute_force_packing() -> None:
    """A valid lower bound: never above the optimum, found by brute force on small cases."""
    import itertools

    from sim.lower_bound import memory_bin_bound

    rng = np.random.default_rng(3)
    for _ in range(60):
        sizes = rng.integers(5, 100, size=int(rng.integers(1, 7))).astype(float)
        best = len(sizes)
        for assign in itertools.product(range(len(sizes)), repeat=len(sizes)):
            loads = np.bincount(assign, weights=sizes, minlength=len(sizes))
            if (loads <= 100.0).all():
                best = min(best, int((loads > 0).sum()))
        lb = memory_bin_bound(sizes, 100.0)
        assert np.ceil(sizes.sum() / 100.0) <= lb <= best


def test_packing_bound_rounds_up_and_covers_memory() -> None:
    from sim.lower_bound import packing_lower_bound

    cl = _cluster()
    cap = max(float(u.type.spec.memory_bytes) for u in cl.units)
    fluid = np.array([0.0, 0.3, 1.2, 0.4])
    sets = [(), (int(0.6 * cap), int(0.6 * cap))]
    out = packing_lower_bound(cl, fluid, sets, np.array([0, 0, 0, 1]))
    assert out.tolist() == [0.0, 1.0, 2.0, 2.0]


def test_fluid_needs_per_dimension_and_the_bound_is_their_max() -> None:
    from sim.lower_bound import DIMENSIONS, fluid_needs

    cl = _cluster()
    h100 = gpu_spec("H100-SXM")
    inputs = np.array([[0.5 * h100.bf16_flops, 0.0, 0.25 * h100.memory_bytes]])
    needs = fluid_needs(cl, inputs)
    assert needs.shape == (1, len(DIMENSIONS))
    # the H200 is filled first: memory is a fraction of its (larger) memory
    h200 = gpu_spec("H200")
    assert needs[0, 2] == pytest.approx(0.25 * h100.memory_bytes / h200.memory_bytes)
    assert needs[0, 1] == 0.0
    assert fluid_lower_bound(cl, inputs)[0] == needs.max()
    assert fluid_needs(cl, np.zeros((0, 3))).shape == (0, 3)
