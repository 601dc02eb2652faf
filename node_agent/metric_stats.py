"""Per-metric smoothing the agent publishes beside each raw reading: an EWMA with a half-life in
seconds (so it means the same at any sampling interval) and the 95th percentile over a sliding
time window (what the extender sizes headroom against: bursts, not the mean)."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque


class MetricStats:
    """EWMA and windowed p95 of one metric of one unit. Not thread-safe: the sampler owns it."""

    __slots__ = ("_ewma", "_halflife", "_last_t", "_sorted", "_values", "_window")

    def __init__(self, halflife_s: float, window_s: float) -> None:
        self._halflife = halflife_s
        self._window = window_s
        self._values: deque[tuple[float, float]] = deque()
        self._sorted: list[float] = []  # the window's values, kept sorted (p95 in O(1))
        self._ewma: float | None = None
        self._last_t: float | None = None

    def add(self, t: float, value: float) -> None:
        if not math.isfinite(value):
            return
        if self._ewma is None or self._last_t is None:
            self._ewma = value
        else:
            dt = max(t - self._last_t, 0.0)
            alpha = 1.0 - 0.5 ** (dt / self._halflife) if self._halflife > 0 else 1.0
            self._ewma += alpha * (value - self._ewma)
        self._last_t = t
        self._values.append((t, value))
        insort(self._sorted, value)
        cutoff = t - self._window
        while self._values and self._values[0][0] < cutoff:
            _, old = self._values.popleft()
            del self._sorted[bisect_left(self._sorted, old)]

    @property
    def ewma(self) -> float | None:
        return self._ewma

    def p95(self) -> float | None:
        """Nearest-rank 95th percentile of the readings in the window."""
        n = len(self._sorted)
        if n == 0:
            return None
        return self._sorted[max(0, math.ceil(0.95 * n) - 1)]
