"""copack-rebalancer: re-packs running pods, within a disruption budget, to empty whole GPUs."""
