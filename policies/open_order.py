"""The order in which complementary opens idle GPUs (its consolidation tiers), as the
constants decide() adds to an idle unit's score and answer.unit_scores maps back."""

# consolidate: a unit on an idle GPU scores below every unit on a GPU in use (whose -|h|^2 is
# above -(2 (1 + w) + 1) for fragmentation weights w <= 10), then by the GPU's size.
OPEN_PENALTY = 32.0
OPEN_FIT_WEIGHT = 0.1  # best-fit among idle GPUs of one size, below the size term
# Where a cluster has both, an idle time-sliced GPU opens after an idle MPS GPU of any size
# down to about half its memory: it takes fewer neighbours (their times add up,
# one_burst_fits), so the pods that open GPUs go where the pods that follow can join them.
TIME_SLICED_OPEN_PENALTY = 0.5
# An idle GPU with a unit that holds the largest pod the cluster has to place, for a smaller
# pod: after every other idle GPU (above the size, fit and time-sliced terms, ~1.8 together).
RESERVED_OPEN_PENALTY = 2.0
