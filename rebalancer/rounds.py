"""One planning round over a live ClusterState, shared by the controller and the simulator:
the plan is made under the state's lock, on the extender's own view, and the units to mark
draining are read in the same breath, so both drivers act on exactly what was planned."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from policies.cluster_view import PodRecord
from rebalancer.budget import BudgetSpec
from rebalancer.planner import GpuKey, RepackPlan, gpu_units, plan_repack


def plan_round(
    state: Any,  # extender.state.ClusterState (or the sim harness's, the same class)
    now: float,
    spec: BudgetSpec,
    *,
    workload_of: Callable[[str], str | None],
    refusal: Callable[[PodRecord, str], str | None],
    cost: Callable[[PodRecord], float],
) -> tuple[RepackPlan, dict[GpuKey, list[str]]]:
    """The plan and, per GPU it empties, the units to mark draining."""
    with state.lock:
        plan = plan_repack(
            state.view,
            now,
            state.policy,
            state.demand_model,
            workload_of=workload_of,
            refusal=refusal,
            cost=cost,
            max_gpus=spec.max_gpus_per_round,
        )
        units = {gpu: gpu_units(state.view, gpu[0], gpu[1]) for gpu in plan.gpus}
    return plan, units


def draining_until(now: float, spec: BudgetSpec) -> float:
    """When a draining mark lapses by itself: the evicted pods have had their grace period and
    the next round has come, so a rebalancer that died leaves nothing cordoned for long."""
    return now + spec.grace_s + spec.interval_s
