"""Run a scenario under every policy it lists, optionally in parallel processes, and write
the report. Shared by `copack demo`, `copack sim` and `bench/placement.py`."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sim.report import write_html
from sim.run import RunResult, run_policy
from sim.scenario import Scenario
from sim.workload import build_workload

ProgressFn = Callable[[str, float], None]


@dataclass
class ScenarioResult:
    scenario: Scenario
    results: list[RunResult]
    report: Path | None = None


_QUEUE = None


def _init_worker(queue) -> None:
    global _QUEUE
    _QUEUE = queue


def _worker(scenario: Scenario, policy: str) -> RunResult:
    wl = build_workload(scenario)

    def cb(f: float) -> None:
        if _QUEUE is not None:
            _QUEUE.put((policy, f))

    return run_policy(scenario, policy, wl, progress=cb)


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def run_scenario(
    scenario: Scenario,
    *,
    policies: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
    workers: int = 1,
) -> list[RunResult]:
    pols = list(policies or scenario.policies)
    if workers <= 1 or len(pols) == 1:
        wl = build_workload(scenario)
        out = []
        for p in pols:
            out.append(
                run_policy(
                    scenario, p, wl, progress=(lambda f, p=p: progress(p, f)) if progress else None
                )
            )
        return out
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    results: dict[str, RunResult] = {}
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,)
    ) as pool:
        futs = {pool.submit(_worker, scenario, p): p for p in pols}
        pending = set(futs)
        while pending:
            try:
                policy, frac = queue.get(timeout=0.2)
                if progress:
                    progress(policy, frac)
            except Exception:  # queue.Empty
                pass
            for f in [f for f in pending if f.done()]:
                pending.discard(f)
                results[futs[f]] = f.result()
        while not queue.empty():
            policy, frac = queue.get()
            if progress:
                progress(policy, frac)
    return [results[p] for p in pols]


def write_report(results: Sequence[RunResult], out_dir: Path, scenario: Scenario) -> Path:
    notes = (
        f"{scenario.name}: {sum(p.count * p.gpus_per_node for p in scenario.cluster.pools)} GPUs "
        f"on {sum(p.count for p in scenario.cluster.pools)} nodes, {len(scenario.services)} "
        f"services, {len(results[0].requests):,} requests over {scenario.duration_s / 60:.0f} "
        f"simulated minutes, seed {scenario.seed}."
    )
    return write_html(
        results,
        out_dir / f"{scenario.name}-report.html",
        title=f"copack simulation: {scenario.name}",
        notes=notes,
    )
