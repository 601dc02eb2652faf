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


def fluid_lower_bound(cluster: Cluster, inputs: np.ndarray) -> np.ndarray:
    """GPUs needed per step; `inputs[k] = (flop/s, bytes/s, memory bytes)` of step k."""
    if len(inputs) == 0:
        return np.zeros(0)
    specs = {}
    for u in cluster.units:
        specs[u.gpu_uuid] = u.type.spec
    gpus = list(specs.values())
    flops = np.array([g.bf16_flops for g in gpus])
    bw = np.array([g.hbm_bw for g in gpus])
    mem = np.array([float(g.memory_bytes) for g in gpus])
    n_c = _gpus_needed(inputs[:, 0], flops)
    n_b = _gpus_needed(inputs[:, 1], bw)
    n_m = _gpus_needed(inputs[:, 2], mem)
    return np.maximum(np.maximum(n_c, n_b), n_m)
