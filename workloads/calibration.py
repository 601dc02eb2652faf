"""Fit the roofline model's Calibration to measured step times (MuxServe's SM-share table).

The table gives, for LLaMA models on A100-80GB under MPS SM caps, the latency of a prefill of
`batch` prompts of `seq` tokens and of a decode step of `batch` sequences at context `seq`.
We minimise the mean squared log error of the predicted times over every measured point with a
plain coordinate descent (no SciPy in the environment; 5 parameters, a smooth loss). The
constants in workloads.roofline.CALIBRATION are the result on the 1-GPU LLaMA-7B and 13B
tables; `copack calibrate` re-runs the fit and prints them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from workloads.gpu_catalog import gpu_spec
from workloads.model_catalog import model_spec
from workloads.roofline import CALIBRATION, Calibration, decode_work, prefill_work, step_time_vec

# MuxServe table model keys -> catalog ids.
MUXSERVE_MODELS = {"llama-7b": "huggyllama/llama-7b", "llama-13b": "huggyllama/llama-13b"}
MUXSERVE_GPU = "A100-80GB"


@dataclass(frozen=True)
class Points:
    """Measured forward passes as arrays (one entry per table cell and phase)."""

    flops: np.ndarray
    bytes_: np.ndarray
    layers: np.ndarray
    sm_share: np.ndarray
    seconds: np.ndarray
    is_prefill: np.ndarray

    def __len__(self) -> int:
        return len(self.seconds)


def muxserve_points(table: dict, models: tuple[str, ...] = ("llama-7b", "llama-13b")) -> Points:
    """Every single-GPU cell of the MuxServe table (-1 = not measured, skipped)."""
    rows: list[tuple[float, float, int, float, float, bool]] = []
    for key in models:
        if key not in table:
            raise KeyError(f"model {key!r} not in the MuxServe table (has {', '.join(table)})")
        spec = model_spec(MUXSERVE_MODELS[key])
        for sm, by_batch in table[key]["1"].items():
            for b, by_seq in by_batch.items():
                for seq, cell in by_seq.items():
                    batch, n = int(b), int(seq)
                    for phase, ms in cell.items():
                        if ms is None or ms <= 0:
                            continue
                        if phase == "prefill":
                            f, by = prefill_work(spec, n, batch)
                        else:
                            f, by = decode_work(spec, batch, n)
                        rows.append(
                            (f, by, spec.layers, int(sm) / 100, ms / 1e3, phase == "prefill")
                        )
    a = np.array(rows, dtype=np.float64)
    return Points(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5].astype(bool))


def load_muxserve(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"MuxServe table not found at {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read the MuxServe table {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"MuxServe table {path} is not JSON: {e}") from None


def log_errors(cal: Calibration, pts: Points, gpu: str = MUXSERVE_GPU) -> np.ndarray:
    g = gpu_spec(gpu)
    pred = step_time_vec(
        pts.flops, pts.bytes_, pts.layers, g.bf16_flops, g.hbm_bw, pts.sm_share, 1.0, cal
    )
    return np.log(pred / pts.seconds)


def rms_log_error(cal: Calibration, pts: Points, gpu: str = MUXSERVE_GPU) -> float:
    e = log_errors(cal, pts, gpu)
    return float(np.sqrt(np.mean(e * e)))


def fit(
    pts: Points, start: Calibration = CALIBRATION, rounds: int = 400, gpu: str = MUXSERVE_GPU
) -> Calibration:
    """Coordinate descent on the 5 constants with step halving; deterministic."""
    names = [f.name for f in fields(Calibration)]
    cur = start
    best = rms_log_error(cur, pts, gpu)
    steps = {n: 0.1 * getattr(cur, n) for n in names}
    for _ in range(rounds):
        improved = False
        for n in names:
            for sign in (1.0, -1.0):
                v = getattr(cur, n) + sign * steps[n]
                if v <= 0 or (n in ("compute_eff", "bw_eff") and v > 1.0):
                    continue
                cand = replace(cur, **{n: v})
                err = rms_log_error(cand, pts, gpu)
                if err < best - 1e-12:
                    cur, best, improved = cand, err, True
        if not improved:
            steps = {n: s / 2 for n, s in steps.items()}
            if all(s < 1e-6 * max(1e-9, abs(getattr(cur, n))) for n, s in steps.items()):
                break
    return cur


def summary(cal: Calibration, pts: Points) -> dict[str, float]:
    e = np.abs(log_errors(cal, pts))
    out = {f.name: getattr(cal, f.name) for f in fields(Calibration)}
    out.update(
        points=float(len(pts)),
        rms_log_error=float(math.sqrt(np.mean(e * e))),
        median_abs_log_error=float(np.median(e)),
        max_abs_log_error=float(e.max()),
    )
    return out
