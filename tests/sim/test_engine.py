"""The request-level engine against hand-computable cases: one pod alone, contention under MPS
and time-slicing, FIFO order, drain. Uses the real roofline tables (sim.perf)."""

from __future__ import annotations

import numpy as np
import pytest

from sim.catalog import model, unit_type
from sim.engine import DECODE, PREFILL, Engine, Requests
from sim.perf import PerfTables

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def _engine(arrival, prompt, output, *, n_units=1, mps=True, dt=0.05, kv_s=0.0):
    m = model(LLAMA)
    h100 = unit_type("H100-SXM", None)
    perf = PerfTables([m], h100)
    n = len(arrival)
    req = Requests(
        np.asarray(arrival, float),
        np.asarray(prompt, np.int64),
        np.asarray(output, np.int64),
        np.zeros(n, np.int32),
    )
    eng = Engine(
        req,
        1,
        perf,
        n_units,
        unit_mps=np.full(n_units, mps),
        unit_flops=np.full(n_units, h100.flops),
        unit_bw=np.full(n_units, h100.bandwidth),
        kv_transfer_s=np.full(n, kv_s),
        dt=dt,
    )
    return eng, perf, perf.type_id(m, h100)


def _run(eng, seconds):
    acts = []
    for k in range(round(seconds / eng.dt)):
        acts.append(eng.step(k * eng.dt))
    return acts


def test_single_request_alone_matches_roofline():
    eng, perf, pt = _engine([0.0], [2048], [101])
    eng.add_pod(0, PREFILL, 0, pt, 1.0, 0.0, 1)
    eng.add_pod(0, DECODE, 0, pt, 1.0, 0.0, 64)
    _run(eng, 3.0)
    r = eng.req
    work = perf.prefill_work(np.array([pt]), np.array([0]), np.array([2048]))[0]
    assert r.ttft[0] == pytest.approx(work, rel=1e-6)
    step = perf.decode_step(np.array([pt]), np.array([1]), np.array([2048 + 50]))[0]
    assert r.tpot[0] == pytest.approx(step, rel=0.05)
    assert r.finish[0] == pytest.approx(r.first_token[0] + 100 * r.tpot[0], rel=1e-9)


def test_prefill_is_fifo_and_queues():
    # Three long prompts at once on one prefill pod: completions one work-time apart.
    eng, perf, pt = _engine([0.0, 0.0, 0.0], [4000, 4000, 4000], [1, 1, 1])
    eng.add_pod(0, PREFILL, 0, pt, 1.0, 0.0, 1)
    _run(eng, 2.0)
    w = perf.prefill_work(np.array([pt]), np.array([0]), np.array([4000]))[0]
    assert np.allclose(eng.req.ttft, [w, 2 * w, 3 * w], rtol=1e-6)
    # output of one token: done at the first token, TPOT 0
    assert np.allclose(eng.req.finish, eng.req.first_token)


def test_request_never_starts_before_it_arrives():
    eng, perf, pt = _engine([0.37], [100], [1], dt=0.25)
    eng.add_pod(0, PREFILL, 0, pt, 1.0, 0.0, 1)
    _run(eng, 1.0)
    w = perf.prefill_work(np.array([pt]), np.array([0]), np.array([100]))[0]
    assert eng.req.first_token[0] >= 0.37 + w - 1e-9


def _decode_only(n_pods, *, mps, share=1.0, same_unit=True):
    n = 40 * n_pods
    eng, _perf, pt = _engine(np.zeros(n), np.full(n, 1000), np.full(n, 400), mps=mps, n_units=2)
    for _i in range(n_pods):
        eng.add_pod(0, PREFILL, 1, pt, 1.0, 0.0, 1)  # prefill on the other unit
    for _i in range(n_pods):
        eng.add_pod(0, DECODE, 0 if same_unit else 1, pt, share, 0.0, 1000)
    _run(eng, 30.0)
    return eng


def test_two_decode_pods_on_one_unit_share_bandwidth():
    alone = _decode_only(1, mps=True)
    two = _decode_only(2, mps=True)
    assert not np.isnan(alone.req.tpot).any() and not np.isnan(two.req.tpot).any()
    # Memory-bound decode: the second pod's bandwidth stretches both (DESIGN: ~no free lunch).
    assert np.median(two.req.tpot) > 1.3 * np.median(alone.req.tpot)


def test_time_slicing_serializes_busy_pods():
    ts = _decode_only(2, mps=False)
    alone = _decode_only(1, mps=False)
    assert np.median(ts.req.tpot) > 1.5 * np.median(alone.req.tpot)


def test_mps_share_slows_prefill_by_the_sm_curve():
    eng_full, perf, pt = _engine([0.0], [4000], [1])
    eng_full.add_pod(0, PREFILL, 0, pt, 1.0, 0.0, 1)
    _run(eng_full, 2.0)
    eng_half, _, pt2 = _engine([0.0], [4000], [1])
    eng_half.add_pod(0, PREFILL, 0, pt2, 0.5, 0.0, 1)
    _run(eng_half, 2.0)
    a, _m = perf.sensitivity(np.array([pt]), np.array([PREFILL]))
    expect = a[0] / 0.5 + 1 - a[0]
    assert eng_half.req.ttft[0] / eng_full.req.ttft[0] == pytest.approx(expect, rel=0.02)
    assert expect > 1.5  # prefill is SM-bound (MuxServe: ~1.84x at half the SMs)


def test_no_pod_means_requests_wait_and_stay_unfinished():
    eng, _, _pt = _engine([0.0, 0.1], [100, 100], [10, 10])
    _run(eng, 1.0)
    assert np.isnan(eng.req.finish).all()
    assert eng.pending_requests() == 2


def test_drain_finishes_inflight_then_reports_empty():
    eng, _, pt = _engine(np.zeros(5), np.full(5, 500), np.full(5, 50))
    p = eng.add_pod(0, PREFILL, 0, pt, 1.0, 0.0, 1)
    d = eng.add_pod(0, DECODE, 0, pt, 1.0, 0.0, 64)
    eng.step(0.0)
    eng.drain(p)  # its queue still holds prompts: they are prefilled before it goes
    gone: list[int] = []
    k = 1
    while not gone and k < 100:
        eng.step(k * eng.dt)
        gone += eng.drained()
        k += 1
    assert gone == [p]
    assert not np.isnan(eng.req.first_token).any()
    eng.drain(d)
    while k < 200 and d not in gone:
        eng.step(k * eng.dt)
        gone += eng.drained()
        k += 1
    assert d in gone
    assert not np.isnan(eng.req.finish).any()


def test_activity_reports_bandwidth_bound_decode():
    n = 40
    eng, _, pt = _engine(np.zeros(n), np.full(n, 1000), np.full(n, 400), n_units=2)
    eng.add_pod(0, PREFILL, 1, pt, 1.0, 0.0, 1)
    eng.add_pod(0, DECODE, 0, pt, 1.0, 0.0, 1000)
    acts = _run(eng, 2.0)
    act = acts[-1]
    assert act.dram[0] > 0.5 > act.tensor[0]  # decode: bandwidth, not tensor pipes
    assert act.dram[0] <= 1.0 and act.sm_active[0] <= 1.0
    assert act.bytes_per_s > 0


def test_decode_context_does_not_drift_on_a_long_running_pod():
    # A pod that has run for a long time has a large iteration count; the mean context of its
    # batch must still be prompt + tokens so far (regression: joins skewed it by the count).
    arrivals = np.linspace(0.0, 2.0, 20)
    eng, perf, pt = _engine(arrivals, np.full(20, 2048), np.full(20, 101))
    eng.add_pod(0, PREFILL, 0, pt, 1.0, 0.0, 1)
    d = eng.add_pod(0, DECODE, 0, pt, 1.0, 0.0, 64)
    eng.p.iters[d] = 5e5
    _run(eng, 8.0)
    r = eng.req
    assert not np.isnan(r.tpot).any()
    slowest = perf.decode_step(np.array([pt]), np.array([20]), np.array([2048 + 101]))[0]
    assert np.all(r.tpot <= 1.2 * slowest)


def test_sm_share_slowdowns_match_muxserve_measurements():
    """The engine's contention parameters against MuxServe (LLaMA-7B, A100, MPS caps)."""
    import json

    from workloads.data import MUXSERVE_PROFILE, data_file

    table = json.loads(data_file(MUXSERVE_PROFILE).read_text())
    mux = table["llama-7b"]["1"]
    pf = mux["50"]["1"]["512"]["prefill"] / mux["100"]["1"]["512"]["prefill"]
    dec = mux["50"]["32"]["512"]["decoding"] / mux["100"]["32"]["512"]["decoding"]
    perf = PerfTables([model("huggyllama/llama-7b")], unit_type("A100-80GB", None))
    a, _ = perf.sensitivity(np.array([0, 0]), np.array([PREFILL, DECODE]))
    assert a[0] / 0.5 + 1 - a[0] == pytest.approx(pf, rel=0.1)  # 1.84x measured
    assert a[1] / 0.5 + 1 - a[1] == pytest.approx(dec, rel=0.05)  # 1.13x measured


def test_a_pod_drained_while_still_loading_is_reported_for_deletion():
    eng, _, pt = _engine([5.0], [100], [2])
    loading = eng.add_pod(0, PREFILL, 0, pt, 1.0, 60.0, 1)  # ready only at t=60
    eng.step(0.0)
    eng.drain(loading)
    eng.step(eng.dt)
    assert eng.drained() == [loading]
    assert loading not in eng.ready_prefill[0]


def test_decode_admits_by_the_tokens_its_kv_cache_holds_now():
    """As vLLM admits by free KV blocks: a request joins a decode pod only if its prompt fits
    beside the tokens the running requests hold now, first come first served (the wait counts
    in its TPOT). A pod with nothing running takes any request; sequence slots cap the batch."""

    def run(kv: float, slots: int = 64, prompts=(6000, 6000, 100)):
        n = len(prompts)
        eng, _, pt = _engine(np.zeros(n), list(prompts), np.full(n, 50))
        eng.add_pod(0, PREFILL, 0, pt, 1.0, 0.0, 1)
        eng.add_pod(0, DECODE, 0, pt, 1.0, 0.0, slots, kv_tokens=kv)
        _run(eng, 30.0)
        assert not np.isnan(eng.req.finish).any()
        return eng.req

    r = run(10_000.0)
    d0 = r.finish[0] - r.first_token[0]  # the first 6k request's decode, alone
    assert r.finish[1] >= r.finish[0] + 0.9 * d0  # the second joined only when it was done
    assert r.finish[2] >= r.finish[0]  # the small one queued behind it (FCFS)
    free = run(float("inf"))  # room for all: they overlap
    assert free.finish[1] < free.finish[0] + 0.5 * (free.finish[0] - free.first_token[0])
    assert not np.isnan(run(10_000.0, prompts=(20_000,)).finish).any()  # empty pod: any size
    two = run(float("inf"), slots=2, prompts=(100, 100, 100, 100))
    fin = np.sort(two.finish)
    assert fin[2] >= fin[0] + 0.9 * (two.finish[0] - two.first_token[0])  # slots full: waits
