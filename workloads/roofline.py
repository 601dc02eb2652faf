"""Roofline demand model: how much of a unit a serving pod needs, and how long its steps take.

One forward pass moves `bytes` (weights, KV cache) and does `flops`. On a unit with peak
compute C and bandwidth W (a MIG instance has its SM count / the GPU's of C and m/8 of W):

    t_c = flops / (C * eff_c * s)                       s = SM share (MPS cap), 0..1
    t_m = bytes / (W * eff_m * beta * g(s))             beta = bandwidth share under contention
    g(s) = 1 - (1 - s)**k                               few SMs cannot saturate HBM
    T   = layers * t_layer + max(t_c, t_m) + gamma * min(t_c, t_m)

Constants fitted (log least squares) on all 1,350 single-GPU points of MuxServe's LLaMA-7B and
13B A100 table (`workloads/data/muxserve_llama_a100_profile.json`): see CALIBRATION and
docs/policies.md. The same constants reproduce DistServe's OPT-13B fits within a few percent.

Demand (fractions of the unit, what telemetry measures as tensor and DRAM activity):
    sm = compute-seconds per second = rate * t_c(s=1),  bw = rate * t_m(beta=1, s=1),
    mem = weights + KV of the requests in flight + workspace.
Decode runs continuous batching: the batch B solves B = rps * output * T_step(B)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from policies.contention import slowdown_factor, sm_share_slowdown
from policies.inventory import LOAD_ANNOTATION
from policies.model import Demand, DemandOverride, LoadSpec, PodRequest, Timing, UnitType
from workloads.gpu_catalog import GiB, GpuSpec, find_gpu, gpu_spec
from workloads.mig_catalog import MEMORY_SLICES, find_mig_profile
from workloads.model_catalog import ModelSpec, find_model, model_spec


@dataclass(frozen=True, slots=True)
class Calibration:
    """Efficiency factors and fixed overhead of the step-time model (see module docstring).

    Fitted on MuxServe LLaMA-7B/13B, 1 A100-80GB, SM shares 30-100 %, batches 1-256,
    lengths 32-512 (1,350 points): RMS log error 8.7 %."""

    compute_eff: float = 0.6917  # achieved / peak dense bf16 tensor FLOP/s
    bw_eff: float = 0.6907  # achieved / peak HBM bandwidth
    overhead_per_layer_s: float = 54.8e-6  # launch + non-GEMM kernels per layer per step
    overlap_gamma: float = 0.612  # share of the smaller of t_c, t_m that does not overlap
    bw_sm_exponent: float = 3.53  # g(s) = 1 - (1 - s)^k


CALIBRATION = Calibration()

# Memory a vLLM process holds beyond weights and KV: CUDA context, PyTorch allocator, CUDA
# graphs, activations (vLLM's profiling run; ~1.5-2.5 GiB on Hopper for 7-8B models).
RUNTIME_OVERHEAD_BYTES = int(2.0 * GiB)
# vLLM allocates KV in blocks and keeps headroom: ask for this much more than the live tokens.
KV_HEADROOM = 1.2
DEFAULT_OUTPUT_TOKENS = 128
DEFAULT_LOAD = LoadSpec(rps=1.0, prompt_tokens=1024, output_tokens=DEFAULT_OUTPUT_TOKENS)
MAX_DECODE_BATCH = 1024

# Demand when the model is unknown: fractions of a *full GPU*, memory absolute. Prefill is
# compute-heavy, decode bandwidth-heavy (DESIGN.md "Why it works").
ROLE_DEFAULTS: dict[str, DemandOverride] = {
    "prefill": DemandOverride(sm=0.6, bw=0.25, mem_bytes=int(20 * GiB)),
    "decode": DemandOverride(sm=0.2, bw=0.6, mem_bytes=int(20 * GiB)),
    "mixed": DemandOverride(sm=0.5, bw=0.5, mem_bytes=int(24 * GiB)),
}


@dataclass(frozen=True, slots=True)
class UnitShape:
    """A unit type resolved through the catalogs: its peak compute, bandwidth and memory."""

    unit_type: UnitType
    gpu: GpuSpec
    sm_fraction: float  # of the whole GPU
    bw_fraction: float
    memory_bytes: int
    known: bool = True  # False: product or profile not in the catalog (figures assumed)
    note: str = ""

    @property
    def flops(self) -> float:
        return self.gpu.bf16_flops * self.sm_fraction

    @property
    def bw(self) -> float:
        return self.gpu.hbm_bw * self.bw_fraction


_PROFILE_NAME = re.compile(r"^(?:MIG\s+)?(\d)g\.(\d+)gb", re.IGNORECASE)


@lru_cache(maxsize=256)
def unit_shape(unit_type: UnitType) -> UnitShape:
    """Resolve product + MIG profile; unknown parts fall back to stated assumptions."""
    gpu = find_gpu(unit_type.product)
    known = gpu is not None
    note = ""
    if gpu is None:
        gpu = gpu_spec("A100-80GB")
        note = f"unknown product {unit_type.product!r}: assuming A100-80GB figures"
    if unit_type.mig_profile is None:
        return UnitShape(unit_type, gpu, 1.0, 1.0, gpu.memory_bytes, known, note)
    prof = find_mig_profile(gpu.key, unit_type.mig_profile)
    if prof is not None:
        return UnitShape(
            unit_type, gpu, prof.sm_fraction, prof.bw_fraction, prof.memory_bytes, known, note
        )
    m = _PROFILE_NAME.match(unit_type.mig_profile.strip())
    if m is None:
        raise ValueError(f"MIG profile {unit_type.mig_profile!r} is not of the form <g>g.<n>gb")
    g, gb = int(m.group(1)), int(m.group(2))
    mem_frac = min(1.0, gb * 1e9 / gpu.memory_bytes)
    slices = max(1, min(MEMORY_SLICES, round(mem_frac * MEMORY_SLICES)))
    note = (note + "; " if note else "") + (
        f"MIG profile {unit_type.mig_profile!r} not in the catalog for {gpu.key}: "
        f"assuming {g}/7 of the SMs and {slices}/8 of the bandwidth"
    )
    return UnitShape(unit_type, gpu, g / 7, slices / MEMORY_SLICES, int(gb * 1e9), False, note)


def _as_type(unit_type: UnitType | str | tuple) -> UnitType:
    if isinstance(unit_type, UnitType):
        return unit_type
    if isinstance(unit_type, str):
        return UnitType(unit_type)
    return UnitType(*unit_type)


def _as_model(model: ModelSpec | str) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else model_spec(model)


# -- work per step ----------------------------------------------------------------------------


def prefill_work(model: ModelSpec, prompt_tokens: int, batch: int = 1) -> tuple[float, float]:
    """(FLOPs, bytes) of prefilling `batch` prompts of `prompt_tokens` each.

    GEMMs: 2 FLOP per active parameter per token; causal attention: 2*L*n^2*H*d per prompt.
    Bytes: all weights once (every expert of an MoE is touched by a long prompt) + KV written."""
    n = prompt_tokens
    attn_dim = model.heads * model.head_dim
    flops = batch * (
        2.0 * model.matmul_params_per_token * n + 2.0 * model.layers * n * n * attn_dim
    )
    bytes_ = model.weight_bytes + batch * n * model.kv_bytes_per_token
    return flops, bytes_


def decode_work(model: ModelSpec, batch: float, context: float) -> tuple[float, float]:
    """(FLOPs, bytes) of one decode step for `batch` sequences of `context` tokens.

    An MoE step reads only the experts its tokens route to: expected distinct experts per layer
    E * (1 - (1 - k/E)^B)."""
    attn_dim = model.heads * model.head_dim
    flops = batch * (2.0 * model.matmul_params_per_token + 4.0 * model.layers * context * attn_dim)
    if model.is_moe:
        touched = model.experts * (1.0 - (1.0 - model.experts_per_token / model.experts) ** batch)
        untouched = (model.experts - touched) * model.expert_params * model.layers
        weights = (model.total_params - untouched) * model.bytes_per_param
    else:
        weights = model.weight_bytes
    bytes_ = weights + batch * context * model.kv_bytes_per_token
    return flops, bytes_


def step_time(
    flops: float,
    bytes_: float,
    layers: int,
    shape: UnitShape,
    sm_share: float = 1.0,
    bw_share: float = 1.0,
    cal: Calibration = CALIBRATION,
) -> tuple[float, float, float]:
    """(T, t_c, t_m) seconds for one forward pass on the unit (see module docstring)."""
    s = min(1.0, max(0.01, sm_share))
    beta = min(1.0, max(1e-3, bw_share))
    tc = flops / (shape.flops * cal.compute_eff * s)
    g = 1.0 - (1.0 - s) ** cal.bw_sm_exponent
    tm = bytes_ / (shape.bw * cal.bw_eff * beta * g)
    total = layers * cal.overhead_per_layer_s + max(tc, tm) + cal.overlap_gamma * min(tc, tm)
    return total, tc, tm


def step_time_vec(
    flops: np.ndarray,
    bytes_: np.ndarray,
    layers: np.ndarray,
    peak_flops: float,
    peak_bw: float,
    sm_share: np.ndarray,
    bw_share: np.ndarray | float = 1.0,
    cal: Calibration = CALIBRATION,
) -> np.ndarray:
    """step_time over arrays of passes (calibration fits, simulators): total seconds only."""
    s = np.clip(sm_share, 0.01, 1.0)
    beta = np.clip(bw_share, 1e-3, 1.0)
    tc = flops / (peak_flops * cal.compute_eff * s)
    g = 1.0 - (1.0 - s) ** cal.bw_sm_exponent
    tm = bytes_ / (peak_bw * cal.bw_eff * beta * g)
    return (
        layers * cal.overhead_per_layer_s
        + np.maximum(tc, tm)
        + cal.overlap_gamma * np.minimum(tc, tm)
    )


def _mem_fraction(total: float, tc: float, tm: float, cal: Calibration) -> float:
    """Share of the step that is memory-bound (what bandwidth contention stretches)."""
    part = tm if tm >= tc else cal.overlap_gamma * tm
    return min(1.0, part / total) if total > 0 else 0.0


@dataclass
class _Profile:
    """Everything computed for one (request shape, unit type); cached."""

    demand: Demand
    timing: Timing | None
    source: str
    batch: float = 0.0
    notes: list[str] = field(default_factory=list)


class DemandModel:
    """Demand and timing of pods on units; pure, cached per (request shape, unit type)."""

    def __init__(
        self,
        calibration: Calibration = CALIBRATION,
        default_load: LoadSpec = DEFAULT_LOAD,
        runtime_overhead_bytes: int = RUNTIME_OVERHEAD_BYTES,
    ) -> None:
        self.cal = calibration
        self.default_load = default_load
        self.runtime_overhead_bytes = runtime_overhead_bytes
        self._cache: dict[tuple, _Profile] = {}

    # -- timing API (the simulator models co-located pods with these) ----------------------
    def shape(self, unit_type: UnitType | str | tuple) -> UnitShape:
        return unit_shape(_as_type(unit_type))

    def prefill_time(
        self,
        model: ModelSpec | str,
        prompt_tokens: int,
        unit_type: UnitType | str | tuple,
        sm_share: float = 1.0,
        bw_share: float = 1.0,
        batch: int = 1,
    ) -> float:
        """Seconds to prefill `batch` prompts of `prompt_tokens` on the unit."""
        m = _as_model(model)
        flops, bytes_ = prefill_work(m, prompt_tokens, batch)
        return step_time(
            flops, bytes_, m.layers, self.shape(unit_type), sm_share, bw_share, self.cal
        )[0]

    def decode_step_time(
        self,
        model: ModelSpec | str,
        batch: float,
        context: float,
        unit_type: UnitType | str | tuple,
        sm_share: float = 1.0,
        bw_share: float = 1.0,
    ) -> float:
        """Seconds for one decode step of `batch` sequences at mean `context` tokens."""
        m = _as_model(model)
        flops, bytes_ = decode_work(m, max(1.0, batch), context)
        return step_time(
            flops, bytes_, m.layers, self.shape(unit_type), sm_share, bw_share, self.cal
        )[0]

    def prefill_sm_sensitivity(
        self, model: ModelSpec | str, prompt_tokens: int, unit_type: UnitType | str | tuple
    ) -> float:
        """`a` of the SM-share curve for this prefill: T(0.5)/T(1) - 1."""
        t1 = self.prefill_time(model, prompt_tokens, unit_type)
        return self.prefill_time(model, prompt_tokens, unit_type, sm_share=0.5) / t1 - 1.0

    def decode_sm_sensitivity(
        self,
        model: ModelSpec | str,
        batch: float,
        context: float,
        unit_type: UnitType | str | tuple,
    ) -> float:
        t1 = self.decode_step_time(model, batch, context, unit_type)
        return self.decode_step_time(model, batch, context, unit_type, sm_share=0.5) / t1 - 1.0

    @staticmethod
    def sm_share_slowdown(a: float, s: float) -> float:
        """The SM-share curve T(s)/T(1) = a/s + 1 - a."""
        return sm_share_slowdown(a, s)

    def slowdown(
        self,
        request: PodRequest,
        unit_type: UnitType | str | tuple,
        sm_share: float = 1.0,
        bw_demand_total: float = 1.0,
        sm_demand_total: float = 1.0,
    ) -> tuple[float, float]:
        """(TTFT factor, TPOT factor) for the pod at this SM share, on a unit whose pods
        together want `bw_demand_total` / `sm_demand_total` of it (contention above 1)."""
        t = self.timing(request, unit_type)
        if t is None:
            return 1.0, 1.0
        f_p = slowdown_factor(
            t.a_prefill, t.mem_frac_prefill, sm_share, bw_demand_total, sm_demand_total
        )
        f_d = slowdown_factor(
            t.a_decode, t.mem_frac_decode, sm_share, bw_demand_total, sm_demand_total
        )
        return f_p, f_d

    # -- demand API ----------------------------------------------------------------------
    def demand(self, request: PodRequest, unit_type: UnitType | str | tuple) -> Demand:
        """Demand on one unit of this type, as fractions of that unit (+ bytes)."""
        return self._profile(request, _as_type(unit_type)).demand

    def timing(self, request: PodRequest, unit_type: UnitType | str | tuple) -> Timing | None:
        """Predicted TTFT/TPOT alone on the unit and the curve parameters; None without a
        known model (role defaults carry no timing)."""
        return self._profile(request, _as_type(unit_type)).timing

    def full_gpu_demand(self, request: PodRequest, product: str) -> Demand:
        """Demand as fractions of a whole GPU of this product (for fluid lower bounds)."""
        return self.demand(request, UnitType(product))

    def explain(self, request: PodRequest, unit_type: UnitType | str | tuple) -> dict:
        """Where the demand came from, for decision explanations."""
        p = self._profile(request, _as_type(unit_type))
        out: dict = {"source": p.source, "demand": p.demand.as_dict(), "notes": list(p.notes)}
        if p.timing is not None:
            out["predicted"] = {
                "ttft_s": round(p.timing.ttft_s, 6),
                "tpot_s": round(p.timing.tpot_s, 6),
                "a_prefill": round(p.timing.a_prefill, 3),
                "a_decode": round(p.timing.a_decode, 3),
                "decode_batch": round(p.batch, 2),
            }
        return out

    # -- internals ----------------------------------------------------------------------
    def _profile(self, request: PodRequest, unit_type: UnitType) -> _Profile:
        key = (request.role, request.model, request.load, request.demand, unit_type)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            hit = self._compute(request, unit_type)
            self._cache[key] = hit
        return hit

    def _compute(self, request: PodRequest, unit_type: UnitType) -> _Profile:
        shape = unit_shape(unit_type)
        notes = [shape.note] if shape.note else []
        model = find_model(request.model) if request.model else None
        if request.model and model is None:
            notes.append(f"model {request.model!r} not in the catalog: role default demand")
        if model is not None:
            prof = self._roofline(model, request, shape)
            prof.notes[:0] = notes
            source = "roofline"
        else:
            d = ROLE_DEFAULTS.get(request.role, ROLE_DEFAULTS["mixed"])
            prof = _Profile(
                Demand(d.sm / shape.sm_fraction, d.bw / shape.bw_fraction, int(d.mem_bytes or 0)),
                None,
                "role-default",
                notes=notes,
            )
            source = "role-default"
        ov = request.demand
        if ov is not None and (ov.sm is not None or ov.bw is not None or ov.mem_bytes is not None):
            base = prof.demand
            prof.demand = Demand(
                ov.sm / shape.sm_fraction if ov.sm is not None else base.sm,
                ov.bw / shape.bw_fraction if ov.bw is not None else base.bw,
                int(ov.mem_bytes) if ov.mem_bytes is not None else base.mem_bytes,
            )
            complete = ov.sm is not None and ov.bw is not None and ov.mem_bytes is not None
            source = "annotation" if complete else f"annotation+{source}"
        prof.source = source
        return prof

    def _roofline(self, m: ModelSpec, request: PodRequest, shape: UnitShape) -> _Profile:
        cal = self.cal
        load = request.load or self.default_load
        notes: list[str] = []
        if request.load is None:
            notes.append(
                f"no {LOAD_ANNOTATION}: assuming rps={load.rps:g},prompt={load.prompt_tokens},"
                f"output={load.output_tokens}"
            )
        out_tokens = load.output_tokens or DEFAULT_OUTPUT_TOKENS
        prompt = load.prompt_tokens
        kv_tok = m.kv_bytes_per_token
        sm = bw = 0.0
        mem = m.weight_bytes + self.runtime_overhead_bytes
        ttft = tpot = 0.0
        a_p = a_d = 0.0
        mf_p = mf_d = 0.0
        rho_p = 0.0
        batch = 0.0

        do_prefill = request.role in ("prefill", "mixed")
        do_decode = request.role in ("decode", "mixed")
        if do_prefill:
            fl, by = prefill_work(m, prompt)
            t1, tc, tm = step_time(fl, by, m.layers, shape, cal=cal)
            t_half = step_time(fl, by, m.layers, shape, sm_share=0.5, cal=cal)[0]
            rho_p = load.rps * t1
            sm += load.rps * tc
            bw += load.rps * tm
            in_flight = max(1.0, rho_p)
            # KV of prompts in flight (held until handed to decode) + activations of one prompt.
            mem += KV_HEADROOM * in_flight * prompt * kv_tok + prompt * m.hidden * 2 * 8
            ttft, a_p, mf_p = t1, t_half / t1 - 1.0, _mem_fraction(t1, tc, tm, cal)
        if do_decode:
            ctx = prompt + out_tokens / 2.0
            tokens_per_s = load.rps * out_tokens
            batch = 1.0
            for _ in range(60):  # fixed point of B = rps*output*T(B); monotone, converges fast
                fl, by = decode_work(m, batch, ctx)
                t_b = step_time(fl, by, m.layers, shape, cal=cal)[0]
                nxt = min(float(MAX_DECODE_BATCH), max(1.0, tokens_per_s * t_b))
                if abs(nxt - batch) < 1e-3:
                    batch = nxt
                    break
                batch = nxt
            fl, by = decode_work(m, batch, ctx)
            t_b, tc, tm = step_time(fl, by, m.layers, shape, cal=cal)
            t_half = step_time(fl, by, m.layers, shape, sm_share=0.5, cal=cal)[0]
            steps_per_s = tokens_per_s / batch
            sm += steps_per_s * tc
            bw += steps_per_s * tm
            mem += KV_HEADROOM * math.ceil(batch) * (prompt + out_tokens) * kv_tok
            tpot = t_b / max(0.05, 1.0 - rho_p) if do_prefill else t_b
            a_d, mf_d = t_half / t_b - 1.0, _mem_fraction(t_b, tc, tm, cal)
            if batch >= MAX_DECODE_BATCH:
                notes.append(f"decode load needs a batch above {MAX_DECODE_BATCH}")
        if not do_prefill:
            ttft, a_p, mf_p = tpot, a_d, mf_d
        if not do_decode:
            tpot, a_d, mf_d = ttft, a_p, mf_p
        timing = Timing(ttft, tpot, a_p, a_d, mf_p, mf_d, sm_at_load=sm)
        return _Profile(Demand(sm, bw, int(mem)), timing, "roofline", batch, notes)
