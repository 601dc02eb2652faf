"""The prefill speed the planner reads, measured on the real engine: alone, under an MPS cap,
beside a busy decode pod, and with no work at all."""

from __future__ import annotations

import numpy as np
import pytest

from sim.engine import DECODE, PREFILL
from sim.prefill_speed import PrefillSpeedMeter
from tests.sim.test_engine import _engine


def _measure(eng, seconds: float) -> list[float | None]:
    meter = PrefillSpeedMeter(1)
    for k in range(round(seconds / eng.dt)):
        eng.step(k * eng.dt)
        meter.sample(eng)
    return meter.take()


def test_a_prefill_pod_alone_runs_at_the_profile():
    eng, _perf, pt = _engine([0.0, 0.5], [4000, 4000], [1, 1])
    eng.add_pod(0, PREFILL, 0, pt, 1.0, 0.0, 1)
    [speed] = _measure(eng, 2.0)
    assert speed == pytest.approx(1.0)


def test_an_mps_cap_shows_as_the_sm_curve():
    eng, perf, pt = _engine([0.0], [8000], [1])
    eng.add_pod(0, PREFILL, 0, pt, 0.5, 0.0, 1)
    [speed] = _measure(eng, 4.0)
    a, _m = perf.sensitivity(np.array([pt]), np.array([PREFILL]))
    assert speed == pytest.approx(1.0 / (a[0] / 0.5 + 1 - a[0]), rel=0.02)


def test_a_busy_decode_pod_beside_it_slows_its_bursts():
    # decode traffic keeps the decode pod busy; then a burst of long prompts hits the prefill
    n_dec = 64
    arrival = np.r_[np.zeros(n_dec), np.full(6, 2.0)]
    prompt = np.r_[np.full(n_dec, 200), np.full(6, 8000)]
    output = np.r_[np.full(n_dec, 2000), np.ones(6)]
    eng, _perf, pt = _engine(arrival, prompt, output, mps=False)
    eng.add_pod(0, PREFILL, 0, pt, 1.0, 0.0, 1)
    eng.add_pod(0, DECODE, 0, pt, 1.0, 0.0, 256)
    [speed] = _measure(eng, 8.0)
    assert speed is not None and 0.2 < speed < 0.95


def test_no_prefill_work_is_no_measurement_and_take_resets():
    eng, _perf, pt = _engine([5.0], [1000], [1])
    eng.add_pod(0, PREFILL, 0, pt, 1.0, 0.0, 1)
    meter = PrefillSpeedMeter(1)
    for k in range(round(1.0 / eng.dt)):
        eng.step(k * eng.dt)
        meter.sample(eng)
    assert meter.take() == [None]
    for k in range(round(1.0 / eng.dt), round(8.0 / eng.dt)):
        eng.step(k * eng.dt)
        meter.sample(eng)
    assert meter.take() == [pytest.approx(1.0)]
    assert meter.take() == [None]
