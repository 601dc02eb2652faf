"""The shipped calibration is what fitting the MuxServe table gives, and the fit is sound."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from copack.cli import app
from policies.model import UnitType
from workloads.calibration import fit, muxserve_points, rms_log_error
from workloads.data import MUXSERVE_PROFILE, PACKAGE_DATA
from workloads.gpu_catalog import gpu_spec
from workloads.model_catalog import model_spec
from workloads.roofline import (
    CALIBRATION,
    Calibration,
    prefill_work,
    step_time,
    step_time_vec,
    unit_shape,
)

PROFILE = PACKAGE_DATA / MUXSERVE_PROFILE


@pytest.fixture(scope="module")
def table() -> dict:
    return json.loads(PROFILE.read_text())


def test_fit_from_neutral_start_recovers_the_shipped_constants(table: dict) -> None:
    models = ("llama-7b", "llama-13b") if "llama-13b" in table else ("llama-7b",)
    pts = muxserve_points(table, models)
    assert len(pts) >= 650
    fitted = fit(pts, start=Calibration(0.5, 0.5, 1e-4, 0.3, 2.0))
    shipped_err = rms_log_error(CALIBRATION, pts)
    assert rms_log_error(fitted, pts) >= shipped_err - 0.005  # shipped is (near) optimal
    assert shipped_err < 0.10
    if models == ("llama-7b", "llama-13b"):  # the exact data the constants were fitted on
        for f in fields(Calibration):
            assert getattr(fitted, f.name) == pytest.approx(getattr(CALIBRATION, f.name), rel=0.02)


def test_vectorized_step_time_equals_scalar() -> None:
    rng = np.random.default_rng(3)
    shape = unit_shape(UnitType("NVIDIA A100-SXM4-80GB"))
    m = model_spec("llama-7b")
    g = gpu_spec("A100-80GB")
    for _ in range(50):
        n = int(rng.integers(16, 4096))
        s, beta = float(rng.uniform(0.05, 1)), float(rng.uniform(0.2, 1))
        f, b = prefill_work(m, n)
        scalar = step_time(f, b, m.layers, shape, s, beta)[0]
        vec = step_time_vec(
            np.array([f]),
            np.array([b]),
            np.array([m.layers]),
            g.bf16_flops,
            g.hbm_bw,
            np.array([s]),
            beta,
        )
        assert vec[0] == pytest.approx(scalar, rel=1e-12)


def test_calibrate_command(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["calibrate", "--models", "llama-7b"])  # the bundled table
    assert r.exit_code == 0, r.output
    assert "compute_eff" in r.output and "rms_log_error" in r.output
    bad = CliRunner().invoke(app, ["calibrate", "--data", str(tmp_path / "none.json")])
    assert bad.exit_code == 2 and "not found" in bad.output
    wrong = CliRunner().invoke(app, ["calibrate", "--data", str(PROFILE), "--models", "llama-70b"])
    assert wrong.exit_code == 2 and "llama-70b" in wrong.output
