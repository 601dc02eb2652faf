"""The roofline demand model against measurements: MuxServe's SM-share table (the bundled copy
in workloads/data), DistServe's fitted step latencies, and the physics DESIGN.md relies on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from policies.contention import slowdown_factor, sm_share_slowdown
from policies.model import DemandOverride, LoadSpec, PodRequest, UnitType
from workloads.data import MUXSERVE_PROFILE, PACKAGE_DATA
from workloads.gpu_catalog import gpu_spec
from workloads.model_catalog import model_spec
from workloads.roofline import (
    CALIBRATION,
    DemandModel,
    decode_work,
    prefill_work,
    step_time,
    unit_shape,
)

A100 = "NVIDIA A100-SXM4-80GB"
H100 = "NVIDIA H100 80GB HBM3"
LLAMA3 = "meta-llama/Llama-3.1-8B-Instruct"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def muxserve() -> dict:
    """llama-7b, 1 GPU: sm_percent -> batch -> seq -> {prefill, decoding} ms."""
    return json.loads((PACKAGE_DATA / MUXSERVE_PROFILE).read_text())["llama-7b"]["1"]


@pytest.fixture(scope="module")
def dm() -> DemandModel:
    return DemandModel()


def _measured(t: dict, phase: str, batch: int, seq: int, sm: int) -> float:
    return t[str(sm)][str(batch)][str(seq)][phase]


def test_prefill_512_at_half_the_sms(muxserve: dict, dm: DemandModel) -> None:
    measured = _measured(muxserve, "prefill", 1, 512, 50) / _measured(
        muxserve, "prefill", 1, 512, 100
    )
    assert measured == pytest.approx(1.84, abs=0.01)  # DESIGN.md's figure, from the table
    predicted = dm.prefill_time("llama-7b", 512, A100, sm_share=0.5) / dm.prefill_time(
        "llama-7b", 512, A100
    )
    assert predicted == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("seq", [128, 512])
def test_batch32_decode_at_half_the_sms(muxserve: dict, dm: DemandModel, seq: int) -> None:
    measured = _measured(muxserve, "decoding", 32, seq, 50) / _measured(
        muxserve, "decoding", 32, seq, 100
    )
    predicted = dm.decode_step_time("llama-7b", 32, seq, A100, sm_share=0.5) / dm.decode_step_time(
        "llama-7b", 32, seq, A100
    )
    assert predicted == pytest.approx(measured, rel=0.15)
    assert predicted < 1.3  # decode barely needs SMs: the premise of co-packing


def test_sm_share_curve_from_sensitivity(muxserve: dict, dm: DemandModel) -> None:
    """a/s + 1 - a with the model's `a` predicts the measured 30 % and 70 % points too."""
    a_p = dm.prefill_sm_sensitivity("llama-7b", 512, A100)
    a_d = dm.decode_sm_sensitivity("llama-7b", 32, 512, A100)
    assert 0.6 < a_p < 0.95 and 0.05 < a_d < 0.25  # data README: prefill ~0.6-0.85, decode 0.1-0.2
    for sm in (30, 70):
        s = sm / 100
        mp = _measured(muxserve, "prefill", 1, 512, sm) / _measured(
            muxserve, "prefill", 1, 512, 100
        )
        md = _measured(muxserve, "decoding", 32, 512, sm) / _measured(
            muxserve, "decoding", 32, 512, 100
        )
        assert sm_share_slowdown(a_p, s) == pytest.approx(mp, rel=0.15)
        assert sm_share_slowdown(a_d, s) == pytest.approx(md, rel=0.15)


def test_whole_table_fit(muxserve: dict, dm: DemandModel) -> None:
    """Every measured llama-7b point (all SM shares, batches, lengths): absolute step times."""
    errs = []
    for sm, by_batch in muxserve.items():
        for b, by_seq in by_batch.items():
            for seq, v in by_seq.items():
                s, batch, n = int(sm) / 100, int(b), int(seq)
                if v["prefill"] > 0:
                    pred = dm.prefill_time("llama-7b", n, A100, sm_share=s, batch=batch)
                    errs.append(math.log(pred * 1e3 / v["prefill"]))
                if v["decoding"] > 0:
                    pred = dm.decode_step_time("llama-7b", batch, n, A100, sm_share=s)
                    errs.append(math.log(pred * 1e3 / v["decoding"]))
    e = np.abs(np.array(errs))
    assert len(e) > 600
    assert float(np.sqrt(np.mean(e**2))) < 0.12  # fitted: ~8.7 % RMS log error
    assert float(np.median(e)) < 0.08
    assert float(e.max()) < 0.45


@pytest.mark.parametrize("tokens", [128, 512, 1024, 2048])
def test_distserve_prefill_fit(dm: DemandModel, tokens: int) -> None:
    # DistServe, OPT-13B on A100-80G: prefill_ms = 18.1 + 0.102*l + 7.1e-6*l^2
    fit = 18.1 + 0.102 * tokens + 7.1e-6 * tokens**2
    assert dm.prefill_time("opt-13b", tokens, A100) * 1e3 == pytest.approx(fit, rel=0.10)


@pytest.mark.parametrize(("batch", "ctx"), [(1, 256), (8, 512), (16, 1024), (32, 512), (64, 1024)])
def test_distserve_decode_fit(dm: DemandModel, batch: int, ctx: int) -> None:
    # decode_ms = 19.9 + 6.3e-4 * sum(ctx) + 0.0385 * batch
    fit = 19.9 + 6.3e-4 * batch * ctx + 0.0385 * batch
    assert dm.decode_step_time("opt-13b", batch, ctx, A100) * 1e3 == pytest.approx(fit, rel=0.10)


def test_prefill_is_compute_bound_and_decode_bandwidth_bound_on_h100() -> None:
    m = model_spec(LLAMA3)
    shape = unit_shape(UnitType(H100))
    flops, bytes_ = prefill_work(m, 2048)
    assert flops / bytes_ == pytest.approx(2000, rel=0.15)  # DESIGN: ~2,000 FLOP per byte
    assert flops / bytes_ > gpu_spec(H100).ridge_flop_per_byte
    _, tc, tm = step_time(flops, bytes_, m.layers, shape)
    assert tc > 3 * tm
    for batch in (1, 8, 32, 64):
        f, b = decode_work(m, batch, 2048)
        assert 0.5 < f / b < 40  # DESIGN: ~1-40 FLOP per byte
        _, tc, tm = step_time(f, b, m.layers, shape)
        assert tm > tc


def test_bandwidth_contention_stretches_memory_bound_time(dm: DemandModel) -> None:
    """Pods wanting x > 1 of the bandwidth: memory-bound time stretches by x."""
    req = PodRequest("ns", "d", role="decode", model=LLAMA3, load=LoadSpec(4, 1024, 256))
    t = dm.timing(req, UnitType(H100))
    assert t is not None
    base = dm.decode_step_time(LLAMA3, 8, 1024, H100)
    for x in (1.25, 1.5, 2.0):
        stretched = dm.decode_step_time(LLAMA3, 8, 1024, H100, bw_share=1 / x)
        m = model_spec(LLAMA3)
        f, b = decode_work(m, 8, 1024)
        _, _tc, tm = step_time(f, b, m.layers, unit_shape(UnitType(H100)))
        assert stretched - base == pytest.approx(tm * (x - 1), rel=1e-6)
    # the SLO formula uses the same law
    _f_p, f_d = dm.slowdown(req, UnitType(H100), sm_share=1.0, bw_demand_total=1.5)
    assert f_d == pytest.approx(1 + t.mem_frac_decode * 0.5)
    assert slowdown_factor(0.0, 1.0, 1.0, 2.0, 0.5) == pytest.approx(2.0)


def test_unit_demand_scales_with_the_mig_slice(dm: DemandModel) -> None:
    req = PodRequest("ns", "p", role="prefill", model=LLAMA3, load=LoadSpec(2, 2048, 128))
    whole = dm.demand(req, UnitType(H100))
    g3 = dm.demand(req, UnitType(H100, "3g.40gb"))
    assert g3.sm == pytest.approx(whole.sm * 132 / 60, rel=1e-9)  # compute share: 60 of 132 SMs
    assert g3.bw == pytest.approx(whole.bw * 2, rel=1e-9)  # 4 of 8 memory slices
    assert g3.mem_bytes == whole.mem_bytes


def test_big_decode_does_not_fit_small_slices(dm: DemandModel) -> None:
    """DESIGN: high-concurrency decode needs memory and SMs a small slice does not have."""
    req = PodRequest("ns", "d", role="decode", model=LLAMA3, load=LoadSpec(8, 2048, 256))
    for prof in ("1g.10gb", "2g.20gb"):
        unit = UnitType(H100, prof)
        d = dm.demand(req, unit)
        assert d.mem_bytes > unit_shape(unit).memory_bytes or d.bw > 1 or d.sm > 1
    whole = dm.demand(req, UnitType(H100))
    assert whole.mem_bytes < gpu_spec(H100).memory_bytes and whole.bw <= 1
    light = PodRequest("ns", "l", role="decode", model=LLAMA3, load=LoadSpec(0.05, 512, 64))
    small = UnitType(H100, "2g.20gb")
    ld = dm.demand(light, small)
    assert ld.mem_bytes < unit_shape(small).memory_bytes and ld.bw < 1 and ld.sm < 1


def test_decode_batch_and_demand_grow_with_load(dm: DemandModel) -> None:
    prev = None
    for rps in (0.1, 0.5, 2.0, 8.0):
        req = PodRequest("ns", "d", role="decode", model=LLAMA3, load=LoadSpec(rps, 1024, 128))
        d = dm.demand(req, UnitType(H100))
        if prev is not None:
            assert d.bw >= prev.bw - 1e-12 and d.mem_bytes >= prev.mem_bytes
        prev = d
    low = dm.demand(
        PodRequest("ns", "d", role="decode", model=LLAMA3, load=LoadSpec(0.1, 1024, 128)),
        UnitType(H100),
    )
    assert low.bw < 0.3  # a lightly loaded decode server idles most of the time


def test_prefill_demand_is_linear_in_rate(dm: DemandModel) -> None:
    one = dm.demand(
        PodRequest("a", "p", role="prefill", model=LLAMA3, load=LoadSpec(1, 1024)), H100
    )
    three = dm.demand(
        PodRequest("a", "p", role="prefill", model=LLAMA3, load=LoadSpec(3, 1024)), H100
    )
    assert three.sm == pytest.approx(3 * one.sm) and three.bw == pytest.approx(3 * one.bw)
    assert one.sm > 3 * one.bw  # prefill: compute, not bandwidth (1,024 tokens: ~1,000 FLOP/B)


def test_moe_decode_reads_only_routed_experts() -> None:
    m = model_spec("mixtral-8x7b")
    _, b1 = decode_work(m, 1, 0)
    _, b64 = decode_work(m, 64, 0)
    assert b1 < 0.45 * m.weight_bytes  # 2 of 8 experts + attention
    assert b64 == pytest.approx(m.weight_bytes, rel=0.01)


def test_override_is_full_gpu_fraction_and_role_default_without_model(dm: DemandModel) -> None:
    req = PodRequest(
        "ns", "x", role="decode", demand=DemandOverride(sm=0.3, bw=0.4, mem_bytes=10 * 2**30)
    )
    d = dm.demand(req, UnitType(H100, "3g.40gb"))
    assert d.sm == pytest.approx(0.3 * 132 / 60) and d.bw == pytest.approx(0.8)
    assert d.mem_bytes == 10 * 2**30
    assert dm.explain(req, UnitType(H100, "3g.40gb"))["source"] == "annotation"
    partial = PodRequest("ns", "y", role="decode", model=LLAMA3, demand=DemandOverride(mem_bytes=5))
    assert dm.demand(partial, UnitType(H100)).mem_bytes == 5
    assert dm.explain(partial, UnitType(H100))["source"] == "annotation+roofline"
    unknown = PodRequest("ns", "z", role="prefill", model="acme/unknown-13b")
    info = dm.explain(unknown, UnitType(H100))
    assert info["source"] == "role-default" and "not in the catalog" in info["notes"][0]
    assert dm.timing(unknown, UnitType(H100)) is None


def test_unknown_gpu_and_profile_fall_back_with_a_note(dm: DemandModel) -> None:
    shape = unit_shape(UnitType("NVIDIA Future GPU", None))
    assert not shape.known and "unknown product" in shape.note
    odd = unit_shape(UnitType(H100, "2g.24gb"))
    assert odd.sm_fraction == pytest.approx(2 / 7) and "not in the catalog" in odd.note
    with pytest.raises(ValueError, match="not of the form"):
        unit_shape(UnitType(H100, "banana"))


def test_calibration_constants_are_the_documented_ones() -> None:
    doc = (ROOT / "docs" / "policies.md").read_text()
    for value in (CALIBRATION.compute_eff, CALIBRATION.bw_eff, CALIBRATION.overlap_gamma):
        assert f"{value:.4g}" in doc or f"{value:.3f}" in doc
