"""Run a scenario on an earlier commit of copack, in the same benchmark run.

The commit is checked out as a detached git worktree under the system temp dir (kept between
runs) and driven in a subprocess with only that tree on `sys.path`, so the figures come from
its own code. A scenario written for today's schema is translated for it: fields it does not
know are dropped, and services whose request lengths are scaled (`prompt_scale`,
`output_scale`, `max_prompt_tokens`) replay a JSON-lines trace with the lengths already scaled
(the same requests: scaling is per request, after the seeded replay).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sim.scenario import Scenario
from sim.traces import load_trace

ROOT = Path(__file__).resolve().parent.parent
_NEW_SERVICE_FIELDS = ("prompt_scale", "output_scale", "max_prompt_tokens")
_NEW_TOP_FIELDS = ("rebalancer",)
_NEW_AUTOSCALER_FIELDS = ("prefill_speed",)  # an earlier planner sized from the profile alone

_RUNNER = r"""
import json, sys
from sim.scenario import load_scenario
from sim.simulate import run_scenario
from sim.report import rows, lower_bound_hours
s = load_scenario(sys.argv[1])
res = run_scenario(s, policies=sys.argv[2].split(","), workers=int(sys.argv[3]))
out = {"lb": lower_bound_hours(res), "rows": []}
for r in rows(res):
    out["rows"].append({"policy": r.policy, "gpu_hours": r.gpu_hours, "slo": r.slo,
                        "peak_gpus": r.peak_gpus, "ttft_p99": r.ttft_p99, "tpot_p99": r.tpot_p99})
print("BASELINE-JSON " + json.dumps(out))
"""


def worktree(rev: str) -> Path:
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"copack-baseline-{sha}"
    if not (path / "sim").is_dir():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), sha],
            check=True, capture_output=True, text=True,
        )
    return path


def _scaled_trace(svc: Any, out: Path) -> str:
    """The service's trace with its lengths scaled, as JSON lines (ms timestamps)."""
    trace = load_trace(svc.trace)
    p = np.maximum(1, np.rint(trace.prompt_tokens * svc.prompt_scale)).astype(np.int64)
    o = np.maximum(1, np.rint(trace.output_tokens * svc.output_scale)).astype(np.int64)
    if svc.max_prompt_tokens is not None:
        p = np.minimum(p, svc.max_prompt_tokens)
    path = out / f"{svc.name}.jsonl"
    with path.open("w") as f:
        for t, a, b in zip(trace.arrival_s, p, o, strict=True):
            f.write(json.dumps({"timestamp": float(t) * 1000.0, "input_length": int(a),
                                "output_length": int(b)}) + "\n")
    return str(path)


def translate(scenario: Scenario, out: Path) -> Path:
    raw = scenario.model_dump(mode="json")
    for k in _NEW_TOP_FIELDS:
        raw.pop(k, None)
    for k in _NEW_AUTOSCALER_FIELDS:
        raw["autoscaler"].pop(k, None)
    for svc, rs in zip(scenario.services, raw["services"], strict=True):
        if rs.pop("start_s", 0.0):  # no trace file can say it: the pods would exist from t = 0
            raise ValueError(f"service {svc.name}: the previous main cannot deploy a service "
                             f"late (start_s, 2026-12-08)")
        scaled = (svc.prompt_scale, svc.output_scale, svc.max_prompt_tokens) != (1.0, 1.0, None)
        for k in _NEW_SERVICE_FIELDS:
            rs.pop(k, None)
        if scaled:
            rs["trace"] = _scaled_trace(svc, out)
    path = out / f"{scenario.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_baseline(rev: str, scenario: Scenario, policies: list[str], workers: int) -> dict:
    """{"lb": GPU-h, "rows": [{policy, gpu_hours, slo, ...}]} of `scenario` run at `rev`."""
    tree = worktree(rev)
    with tempfile.TemporaryDirectory() as d:
        path = translate(scenario, Path(d))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        res = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(path), ",".join(policies), str(workers)],
            cwd=tree, env=env, capture_output=True, text=True,
        )
    for line in res.stdout.splitlines():
        if line.startswith("BASELINE-JSON "):
            return json.loads(line.removeprefix("BASELINE-JSON "))
    raise RuntimeError(f"baseline {rev} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
