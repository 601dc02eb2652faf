"""The disruption budget: which evictions the rebalancer may make now.

A move costs the evicted pod's in-flight work and a replacement's model load, so it is rationed
per workload (a Deployment's pods: one service role): at most `evictions_per_minute` in any
sliding minute, never a pod younger than its warm-up, never a second replica while one is still
being replaced, never below the workload's PodDisruptionBudget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetSpec:
    evictions_per_minute: int = 1  # per workload
    min_age_s: float = 300.0  # a pod younger than this is still warming up (or just moved)
    max_gpus_per_round: int = 2  # GPUs emptied by one planning round
    interval_s: float = 60.0  # between planning rounds
    grace_s: float = 30.0  # terminationGracePeriodSeconds of an evicted pod

    def __post_init__(self) -> None:
        if self.evictions_per_minute < 0:
            raise ValueError("evictions_per_minute must be >= 0")
        if self.min_age_s < 0 or self.grace_s < 0:
            raise ValueError("min_age_s and grace_s must be >= 0")
        if self.max_gpus_per_round < 0:
            raise ValueError("max_gpus_per_round must be >= 0")
        if self.interval_s <= 0:
            raise ValueError("interval_s must be positive")


class DisruptionBudget:
    def __init__(self, spec: BudgetSpec) -> None:
        self.spec = spec
        self._history: dict[str, deque[float]] = {}
        self._moving: dict[str, str] = {}  # workload -> the evicted pod not yet replaced

    def _recent(self, workload: str, now: float) -> deque[float]:
        h = self._history.setdefault(workload, deque())
        while h and h[0] <= now - 60.0:
            h.popleft()
        return h

    def left(self, workload: str, now: float) -> int:
        """Evictions the workload may still take this minute."""
        return max(0, self.spec.evictions_per_minute - len(self._recent(workload, now)))

    def refusal(
        self, workload: str, pod_age_s: float, now: float, available: int, min_available: int
    ) -> str | None:
        """Why the pod may not be evicted now, or None. `available`: the workload's ready
        pods; `min_available`: its PodDisruptionBudget's floor."""
        if workload in self._moving:
            return f"a replica of {workload} ({self._moving[workload]}) is still being replaced"
        if pod_age_s < self.spec.min_age_s:
            return f"pod is {pod_age_s:.0f} s old, under its {self.spec.min_age_s:.0f} s warm-up"
        if self.left(workload, now) <= 0:
            return f"{workload} had {self.spec.evictions_per_minute} eviction(s) in the last minute"
        if available - 1 < min_available:
            return (
                f"evicting would leave {workload} {available - 1} ready pod(s), under its "
                f"PodDisruptionBudget's {min_available}"
            )
        return None

    def record(self, workload: str, pod: str, now: float) -> None:
        self._recent(workload, now).append(now)
        self._moving[workload] = pod

    def settle(self, workload: str) -> None:
        """The workload's replacement is ready (or the eviction was refused)."""
        self._moving.pop(workload, None)

    @property
    def moving(self) -> dict[str, str]:
        return dict(self._moving)
