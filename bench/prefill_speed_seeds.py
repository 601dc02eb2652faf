"""Seed study of `autoscaler.prefill_speed`: dedicated and complementary on default and long
with seeds other than the scenarios' own, planner sized from the profile vs from the measured
prefill speed. Prints GPU-h and SLO per run.

    .venv/bin/python bench/prefill_speed_seeds.py default 1   (scenario, seed)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sim.scenario import DEFAULT_SCENARIO, LONG_SCENARIO, load_scenario
from sim.simulate import run_scenario

S = {"default": DEFAULT_SCENARIO, "long": LONG_SCENARIO}
name, seed = sys.argv[1], int(sys.argv[2])
base = load_scenario(S[name])
for mode in ("profile", "measured"):
    auto = base.autoscaler.model_copy(update={"prefill_speed": mode})
    sc = base.model_copy(update={"seed": seed, "autoscaler": auto})
    res = run_scenario(sc, policies=["dedicated", "complementary"], workers=1)
    d = {r.policy: r for r in res}
    ded, com = d["dedicated"], d["complementary"]
    s_ded, s_com = ded.slo_met().mean(), com.slo_met().mean()
    print(
        f"{name} seed {seed} {mode:8s} dedicated {ded.gpu_hours:6.2f} GPU-h SLO "
        f"{100 * s_ded:.3f}% | complementary {com.gpu_hours:6.2f} GPU-h SLO "
        f"{100 * s_com:.3f}% ({100 * (s_com - s_ded):+.3f} pts)",
        flush=True,
    )
