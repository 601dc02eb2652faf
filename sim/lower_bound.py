"""The fluid lower bound: at each instant, the GPUs a perfect packer would need.

Work is infinitely divisible and may be spread over GPUs at will; only capacity binds. At each
step the summed demand of all pods is, in absolute units: compute (the compute-bound
seconds of the roofline, in peak-FLOP/s equivalents), bandwidth (memory-bound seconds, in
peak-bytes/s equivalents) and memory (bytes the pods hold). Filling the
cluster's largest GPUs first, each dimension needs a (fractional) number of GPUs; the bound is
the largest of the three. No placement can use fewer GPUs, whatever the policy.
"""

from __future__ import annotations

import numpy as np

from sim.cluster import Cluster


def _gpus_needed(demand: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """Fractional GPU count covering `demand` with the biggest capacities first."""
    caps = np.sort(capacities)[::-1]
    cum = np.r_[0.0, np.cumsum(caps)]
    idx = np.arange(len(cum), dtype=float)
    need = np.interp(demand, cum, idx)
    over = demand > cum[-1]
    if over.any():  # beyond the cluster: extrapolate with the smallest GPU
        need[over] = len(caps) + (demand[over] - cum[-1]) / caps[-1]
    return need


DIMENSIONS = ("compute", "bandwidth", "memory")


def fluid_needs(cluster: Cluster, inputs: np.ndarray) -> np.ndarray:
    """GPUs needed per step and per dimension, shape (steps, 3) in `DIMENSIONS` order;
    `inputs[k] = (flop/s, bytes/s, memory bytes)` of step k. Kept apart from the bound so the
    gap attribution (sim/gap.py) can say which dimension binds."""
    if len(inputs) == 0:
        return np.zeros((0, 3))
    specs = {}
    for u in cluster.units:
        specs[u.gpu_uuid] = u.type.spec
    gpus = list(specs.values())
    caps = (
        np.array([g.bf16_flops for g in gpus]),
        np.array([g.hbm_bw for g in gpus]),
        np.array([float(g.memory_bytes) for g in gpus]),
    )
    return np.stack([_gpus_needed(inputs[:, d], caps[d]) for d in range(3)], axis=1)


def fluid_lower_bound(cluster: Cluster, inputs: np.ndarray) -> np.ndarray:
    """GPUs needed per step: the binding dimension of `fluid_needs`."""
    if len(inputs) == 0:
        return np.zeros(0)
    return fluid_needs(cluster, inputs).max(axis=1)


def memory_bin_bound(sizes: np.ndarray, capacity: float) -> int:
    """GPUs needed to hold pods of these memory sizes whole, every GPU relaxed to `capacity`
    (the cluster's largest): Martello & Toth's L2 bound for bin packing. For each threshold K
    (0 and every size <= C/2): pods above C - K each need a GPU no other pod of size >= K can
    join, pods in (C/2, C - K] each need their own GPU, and pods in [K, C/2] fill what those
    leave and then whole GPUs. A pod cannot be split across GPUs, which the fluid bound allows.
    """
    s = np.sort(np.asarray(sizes, dtype=float))
    s = s[s > 0]
    if len(s) == 0:
        return 0
    c = float(capacity)
    best = 0
    for k in np.unique(np.r_[0.0, s[s <= c / 2]]):
        n1 = int((s > c - k).sum())
        mid = s[(s > c / 2) & (s <= c - k)]
        small = s[(s >= k) & (s <= c / 2)]
        free = len(mid) * c - float(mid.sum())
        rest = max(0.0, float(small.sum()) - free)
        best = max(best, n1 + len(mid) + int(np.ceil(rest / c - 1e-9)))
    return best


def packing_lower_bound(
    cluster: Cluster, fluid: np.ndarray, pod_memory: list[tuple[int, ...]], index: np.ndarray
) -> np.ndarray:
    """GPUs needed per step when pods stay whole and GPUs are counted whole: the fluid bound
    rounded up (a fraction of a GPU cannot be in use) and never under the memory bin bound of
    the pods then holding memory. `pod_memory[index[k]]` is the multiset of step k (the set
    changes only when a pod is bound or deleted, so each distinct one is evaluated once)."""
    if len(fluid) == 0:
        return np.zeros(0)
    cap = max(float(u.type.spec.memory_bytes) for u in cluster.units)
    per_set = np.array([memory_bin_bound(np.array(m), cap) for m in pod_memory], dtype=float)
    whole = np.ceil(fluid - 1e-9)
    return np.maximum(whole, per_set[index] if len(per_set) else 0.0)
