"""Placement benchmark: every policy on the default (16 nodes x 8 GPUs), long-prompt (`long`),
model-mix (`mix`: other models, cluster and SLOs), `scarce` (mix's services, one H200 node)
and large (128 nodes x 8 GPUs) scenarios, where each policy's GPU-hours above the fluid bound
go, the previous main side by side, and complementary against the goals.

    .venv/bin/python bench/placement.py [--only default|long|mix|scarce|large] [--workers N]
        [--minutes M] [--baseline REV | --no-baseline]

Per policy: GPU-h, x the fluid bound, x the packing bound, x fewer GPU-hours than dedicated,
SLO attainment, rebalancer evictions per hour and requests they lost, then the gap
attribution (sim/gap.py). The previous main (`--baseline`, default dbfc003: main before the
rebalancer) runs the same scenario through a detached worktree (bench/baseline.py).

Goals for complementary, with the rebalancer (the scenarios' default): GPU-hours <= 1.25x
the fluid lower bound, >= 2.8x fewer than dedicated, SLO attainment >= 99 % and no more than
0.1 point below dedicated. Each is printed PASS or FAIL with the figure reached. Wall times
are for this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.report import lower_bound_hours, packing_bound_hours, render_text, rows, text_table
from sim.results import RunResult
from sim.scenario import (
    DEFAULT_SCENARIO,
    LARGE_SCENARIO,
    LONG_SCENARIO,
    MIX_SCENARIO,
    SCARCE_SCENARIO,
    load_scenario,
)
from sim.simulate import default_workers, run_scenario, write_report

PREVIOUS_MAIN = "dbfc003"
SCENARIOS = {"default": DEFAULT_SCENARIO, "long": LONG_SCENARIO, "mix": MIX_SCENARIO,
             "scarce": SCARCE_SCENARIO, "large": LARGE_SCENARIO}
MAX_VS_FLUID = 1.25
MIN_FEWER_THAN_DEDICATED = 2.8
MIN_SLO = 0.99
MAX_SLO_POINTS_BELOW_DEDICATED = 0.1


def _rebalancer(r: RunResult) -> tuple[float, int] | None:
    """(evictions per hour, requests lost) of a run with the rebalancer, else None."""
    stats = r.extra.get("rebalancer")
    if stats is None:
        return None
    hours = r.duration_s / 3600.0
    return stats.evictions / hours if hours else 0.0, stats.requests_lost


def policy_table(
    results: list[RunResult], previous: dict[str, Any] | None, commit: str = PREVIOUS_MAIN
) -> str:
    lb, plb = lower_bound_hours(results), packing_bound_hours(results)
    by = {r.policy: r for r in rows(results)}
    ded = by.get("dedicated")
    heads = ["policy", "GPU-h", "x fluid", "x packing", "x fewer than dedicated", "SLO met",
             "evictions/h", "requests lost"]
    prev_rows = {p["policy"]: p for p in (previous or {}).get("rows", [])}
    if previous is not None:
        heads += [f"{commit} GPU-h", f"{commit} SLO", "GPU-h change"]
    body = []
    for r in results:
        row = by[r.policy]
        reb = _rebalancer(r)
        cells = [
            r.policy,
            f"{row.gpu_hours:.1f}",
            f"{row.gpu_hours / lb:.2f}" if lb else "-",
            f"{row.gpu_hours / plb:.2f}" if plb else "-",
            f"{ded.gpu_hours / row.gpu_hours:.2f}" if ded and row.gpu_hours else "-",
            f"{row.slo:.2%}",
            f"{reb[0]:.1f}" if reb else "-",
            f"{reb[1]}" if reb else "-",
        ]
        if previous is not None:
            p = prev_rows.get(r.policy)
            cells += (
                [f"{p['gpu_hours']:.1f}", f"{p['slo']:.2%}",
                 f"{(row.gpu_hours / p['gpu_hours'] - 1):+.1%}" if p["gpu_hours"] else "-"]
                if p else ["-", "-", "-"]
            )
        body.append(cells)
    return text_table(heads, body)


def goals(results: list[RunResult]) -> list[tuple[str, bool, str]]:
    by = {r.policy: r for r in rows(results)}
    lb = lower_bound_hours(results)
    c, d = by.get("complementary"), by.get("dedicated")
    out: list[tuple[str, bool, str]] = []
    if c is None:
        return out
    ratio = c.gpu_hours / lb if lb else float("inf")
    out.append((f"GPU-hours <= {MAX_VS_FLUID}x the fluid lower bound", ratio <= MAX_VS_FLUID,
                f"{ratio:.2f}x ({c.gpu_hours:.1f} vs bound {lb:.1f} GPU-h)"))
    if d is not None:
        fewer = d.gpu_hours / c.gpu_hours if c.gpu_hours else float("inf")
        out.append((f">= {MIN_FEWER_THAN_DEDICATED}x fewer GPU-hours than dedicated",
                    fewer >= MIN_FEWER_THAN_DEDICATED,
                    f"{fewer:.2f}x ({c.gpu_hours:.1f} vs {d.gpu_hours:.1f} GPU-h)"))
    out.append((f"SLO attainment >= {MIN_SLO:.0%}", c.slo >= MIN_SLO, f"{c.slo:.2%}"))
    if d is not None:
        below = (d.slo - c.slo) * 100
        out.append((f"SLO at most {MAX_SLO_POINTS_BELOW_DEDICATED} point below dedicated",
                    below <= MAX_SLO_POINTS_BELOW_DEDICATED + 1e-12,
                    f"{c.slo:.2%} vs {d.slo:.2%} ({-below:+.2f} points)"))
    return out


def _previous(scenario, workers: int, rev: str) -> tuple[dict[str, Any] | None, str]:
    from bench.baseline import run_baseline

    t0 = time.perf_counter()
    try:
        prev = run_baseline(rev, scenario, list(scenario.policies), workers)
    except Exception as e:  # an old tree that cannot run this scenario: say so, go on
        return None, f"previous main {rev} could not run: {type(e).__name__}: {str(e)[:300]}"
    return prev, f"previous main {rev}: {time.perf_counter() - t0:.0f} s wall"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=list(SCENARIOS), action="append", default=None)
    ap.add_argument("--workers", type=int, default=0, help="processes (0: up to 2)")
    ap.add_argument("--minutes", type=float, default=None, help="shorten the scenarios")
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--baseline", default=PREVIOUS_MAIN, help="the previous main's commit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the previous main")
    args = ap.parse_args()
    workers = args.workers or default_workers()
    todo = [(k, v) for k, v in SCENARIOS.items() if not args.only or k in args.only]
    for label, path in todo:
        scenario = load_scenario(path)
        if args.minutes:
            scenario = scenario.model_copy(update={"duration_s": args.minutes * 60})
        gpus = sum(p.count * p.gpus_per_node for p in scenario.cluster.pools)
        nodes = sum(p.count for p in scenario.cluster.pools)
        t0 = time.perf_counter()
        results = run_scenario(scenario, workers=workers)
        wall = time.perf_counter() - t0
        report = write_report(results, args.out, scenario)
        prev, prev_note = (None, "previous main skipped")
        if not args.no_baseline:
            prev, prev_note = _previous(scenario, workers, args.baseline)
        print(
            f"\n== {label}: {nodes} nodes, {gpus} GPUs, {len(scenario.services)} services, "
            f"{len(results[0].requests):,} requests, {scenario.duration_s / 60:.0f} simulated "
            f"minutes; {wall:.0f} s wall with {workers} worker(s) on this machine; {prev_note}"
        )
        print(render_text(results))
        print()
        print(policy_table(results, prev, args.baseline))
        rebal = ", ".join(scenario.rebalancer.policies) or "none"
        print(f"   (rebalancer on: {rebal})")
        print(f"   goals for complementary ({label}):")
        for name, ok, detail in goals(results):
            print(f"   {'PASS' if ok else 'FAIL'} {label}: {name}: {detail}")
        print(f"   report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
