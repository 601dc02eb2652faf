"""Device check: the agent's sampler on a real GPU tells a compute-bound phase from a
bandwidth-bound one.

A child process runs, in turn, a PyTorch bf16 matmul loop (tensor pipes busy, little DRAM
traffic) and a large device-to-device copy loop (DRAM busy, no tensor work), with idle gaps; this
process runs the agent's `Sampler` (real pynvml, real NVML) the whole time and labels each
snapshot with the phase it fell in. Readings go to `--out` as JSON plus a short Markdown summary.
The check passes when, for the unit the workload ran on, the matmul phase shows high tensor
(or SM) activity with lower DRAM activity and the copy phase the reverse.

It only reads NVML: no clocks, power limits, MIG or compute-mode settings are touched.

    python bench/device_check.py --out bench/results/            # on a GPU machine (~60 s)
    python bench/device_check.py --out /tmp/dc --dry-run         # against the fake NVML

Needs torch (with CUDA), nvidia-ml-py, pydantic and orjson. `--dry-run` needs gcc instead of a
GPU: the fake library plays the GPU, and the "workload" sets the activity a real one would cause.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("idle", "matmul", "gap", "copy")


@dataclass
class Thresholds:
    """What "told apart" means (ratios 0-1). Margins are deliberately loose: the point is the
    direction of the difference, which a broken counter path (wrong metric ids, wrong unit,
    percent vs ratio, stale samples) would not reproduce."""

    compute_high: float = 0.30  # matmul: tensor (GPM) or SM activity at least this
    dram_high: float = 0.40  # copy: DRAM bandwidth activity at least this
    margin: float = 0.15  # each phase beats the other on its own signal by at least this


# ---------------------------------------------------------------- workload (child process)
def worker(kind: str, seconds: float, dry_scenario: str | None) -> None:
    if dry_scenario:
        _dry_worker(kind, seconds, dry_scenario)
        return
    import torch

    dev = torch.device("cuda", 0)
    if kind == "matmul":
        n = 8192
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
        torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        end = _ready(seconds)
        while time.monotonic() < end:
            for _ in range(20):
                torch.matmul(a, b, out=c)
            torch.cuda.synchronize()
    elif kind == "copy":
        free, _ = torch.cuda.mem_get_info()
        nbytes = min(2 << 30, int(free * 0.3))  # two buffers of up to 2 GiB each
        src = torch.empty(nbytes, device=dev, dtype=torch.uint8)
        dst = torch.empty_like(src)
        src.fill_(1)
        dst.copy_(src)
        torch.cuda.synchronize()
        end = _ready(seconds)
        while time.monotonic() < end:
            for _ in range(10):
                dst.copy_(src)
            torch.cuda.synchronize()
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")


def _ready(seconds: float) -> float:
    """Tell the parent the load starts now (after imports, allocation and warm-up)."""
    print("READY", flush=True)
    return time.monotonic() + seconds


def _dry_worker(kind: str, seconds: float, scenario_path: str) -> None:
    """Plays the GPU for --dry-run: sets the fake's GPM values a real phase would cause."""
    from tests.fakes import nvml as fake

    values = {"matmul": fake.gpm(sm=97, occupancy=40, tensor=85, dram=18),
              "copy": fake.gpm(sm=70, occupancy=60, tensor=0, dram=92)}[kind]
    nv = fake.FakeNvml(Path(scenario_path).parent)
    nv.write(_dry_machine(values))
    time.sleep(max(0.0, _ready(seconds) - time.monotonic()))
    nv.write(_dry_machine(fake.gpm()))


def _dry_machine(values: dict) -> dict:
    from tests.fakes import nvml as fake

    return fake.scenario([fake.gpu("H100", 0, gpm=values, memory_used=3 * fake.GIB)])


# ---------------------------------------------------------------- sampling (this process)
def target_uuid(dry: bool) -> str | None:
    """NVML UUID of the unit CUDA device 0 is (to pick it among the node's units)."""
    if dry:
        return None
    try:
        import torch

        props = torch.cuda.get_device_properties(0)
        return str(getattr(props, "uuid", "") or "") or None
    except Exception:
        return None


def pick_unit(units, uuid_hint: str | None):
    if uuid_hint:
        for u in units:
            if u.uuid.endswith(uuid_hint):
                return u
    healthy = [u for u in units if u.healthy]
    return healthy[0] if healthy else None


def summarize(rows: list[dict], phase: str, skip_s: float) -> dict:
    sel = [r for r in rows if r["phase"] == phase and r["t_in_phase"] >= skip_s]
    out: dict = {"n": len(sel)}
    for key in ("sm_active", "dram_bw_active", "tensor_active", "sm_occupancy"):
        vals = [r[key] for r in sel if r[key] is not None]
        out[key] = statistics.median(vals) if vals else None
    return out


def verdict(summary: dict, th: Thresholds) -> tuple[bool, list[str]]:
    mm, cp = summary["matmul"], summary["copy"]
    notes = []
    if not mm["n"] or not cp["n"]:
        return False, ["no readings in one of the phases"]
    compute_key = "tensor_active" if mm["tensor_active"] is not None else "sm_active"
    mm_c, cp_c = mm[compute_key], cp[compute_key]
    mm_d, cp_d = mm["dram_bw_active"], cp["dram_bw_active"]
    if None in (mm_c, cp_c, mm_d, cp_d):
        return False, ["a needed metric is missing (no GPM and no coarse signal?)"]
    checks = [
        (mm_c >= th.compute_high, f"matmul {compute_key} {mm_c:.2f} >= {th.compute_high}"),
        (cp_d >= th.dram_high, f"copy dram_bw_active {cp_d:.2f} >= {th.dram_high}"),
        (mm_c >= cp_c + th.margin,
         f"matmul {compute_key} {mm_c:.2f} >= copy's {cp_c:.2f} + {th.margin}"),
        (cp_d >= mm_d + th.margin,
         f"copy dram_bw_active {cp_d:.2f} >= matmul's {mm_d:.2f} + {th.margin}"),
    ]
    for ok, text in checks:
        notes.append(("ok   " if ok else "FAIL ") + text)
    return all(ok for ok, _ in checks), notes


def main() -> int:
    ap = argparse.ArgumentParser(description="Agent sampler on a real GPU: matmul vs copy.")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--interval", type=float, default=0.5, help="sampling interval (s)")
    ap.add_argument("--phase-seconds", type=float, default=24.0,
                    help="length of the matmul and of the copy phase")
    ap.add_argument("--idle-seconds", type=float, default=4.0)
    ap.add_argument("--settle-seconds", type=float, default=2.0,
                    help="readings this early in a phase are left out of its medians")
    ap.add_argument("--dry-run", action="store_true", help="use the fake NVML, no GPU")
    ap.add_argument("--_worker", choices=("matmul", "copy"), help=argparse.SUPPRESS)
    ap.add_argument("--_scenario", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        worker(args._worker, args.phase_seconds, args._scenario)
        return 0

    try:
        import pynvml  # noqa: F401

        from node_agent.sampler import Sampler, SamplerConfig
    except ImportError as e:
        print(f"device_check: missing dependency: {e} (needs nvidia-ml-py, pydantic, orjson)",
              file=sys.stderr)
        return 2
    nvml_library = None
    scenario = None
    if args.dry_run:
        import tempfile

        from tests.fakes import nvml as fake

        tmp = Path(tempfile.mkdtemp(prefix="copack-device-check-"))
        nv = fake.FakeNvml(tmp, _dry_machine(fake.gpm()))
        os.environ.update(nv.env())
        nvml_library = str(nv.lib_path)
        scenario = str(nv.scenario_path)

    th = Thresholds()
    sampler = Sampler(SamplerConfig(node=platform.node(), interval_s=args.interval,
                                    window_s=10.0, ewma_halflife_s=2.0,
                                    nvml_library=nvml_library))
    phase = {"name": "idle", "start": time.monotonic()}
    rows: list[dict] = []
    hint = target_uuid(args.dry_run)

    def on_snapshot(snap) -> None:
        u = pick_unit(snap.units, hint)
        if u is None:
            return
        rows.append({
            "t": snap.timestamp, "phase": phase["name"],
            "t_in_phase": time.monotonic() - phase["start"], "uuid": u.uuid,
            "source": u.source, "healthy": u.healthy,
            "sm_active": u.sm_active.value, "dram_bw_active": u.dram_bw_active.value,
            "tensor_active": u.tensor_active.value, "sm_occupancy": u.sm_occupancy.value,
            "memory_used_bytes": u.memory_used_bytes,
        })

    sampler.add_listener(on_snapshot)
    sampler.start()
    first = None
    deadline = time.monotonic() + 30
    while first is None and time.monotonic() < deadline:
        snap = sampler.latest()
        if snap is not None and snap.units:
            first = snap
        time.sleep(0.05)
    if first is None:
        sampler.stop()
        err = sampler.latest().nvml_error if sampler.latest() else "no snapshot"
        print(f"device_check: no GPU unit found through NVML ({err})", file=sys.stderr)
        return 2
    unit = pick_unit(first.units, hint)

    def run_phase(name: str, seconds: float, kind: str | None) -> None:
        if kind is None:
            phase.update(name=name, start=time.monotonic())
            time.sleep(seconds)
            return
        phase.update(name=f"{name}-setup", start=time.monotonic())
        cmd = [sys.executable, __file__, "--_worker", kind, "--phase-seconds", str(seconds)]
        if scenario:
            cmd += ["--_scenario", scenario]
        with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip() == "READY":
                    phase.update(name=name, start=time.monotonic())
            if proc.wait() != 0:
                raise RuntimeError(f"the {kind} worker failed (exit {proc.returncode})")

    try:
        run_phase("idle", args.idle_seconds, None)
        run_phase("matmul", args.phase_seconds, "matmul")
        run_phase("gap", args.idle_seconds, None)
        run_phase("copy", args.phase_seconds, "copy")
    finally:
        sampler.stop()

    # Transients, and the GPM diff straddling a phase edge, stay out of the medians.
    skip = max(args.settle_seconds, 2 * args.interval)
    summary = {p: summarize(rows, p, skip) for p in PHASES}
    ok, notes = verdict(summary, th)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    tag = "dry-run" if args.dry_run else "gpu"
    result = {
        "kind": tag,
        "unit": {"uuid": unit.uuid, "product": unit.product, "mig_profile": unit.mig_profile,
                 "source": unit.source, "sm_count": unit.sm_count},
        "interval_s": args.interval,
        "phase_seconds": args.phase_seconds,
        "thresholds": asdict(th),
        "summary": summary,
        "passed": ok,
        "checks": notes,
        "readings": rows,
    }
    json_path = out / f"device_check-{tag}-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1))
    lines = [f"# device check ({tag}) {stamp}", "",
             f"unit {unit.uuid} ({unit.product}{' ' + unit.mig_profile if unit.mig_profile else ''}"
             f", source {unit.source}), interval {args.interval} s", "",
             "| phase | n | sm_active | dram_bw_active | tensor_active | sm_occupancy |",
             "|---|---|---|---|---|---|"]
    for p in PHASES:
        s = summary[p]
        cells = [f"{s[k]:.3f}" if s[k] is not None else "-" for k in
                 ("sm_active", "dram_bw_active", "tensor_active", "sm_occupancy")]
        lines.append(f"| {p} | {s['n']} | " + " | ".join(cells) + " |")
    lines += ["", *notes, "", f"RESULT: {'PASS' if ok else 'FAIL'} (readings: {json_path.name})"]
    md_path = out / f"device_check-{tag}-{stamp}.md"
    md_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
