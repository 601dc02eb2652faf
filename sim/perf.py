"""Per-unit performance model, vectorized: the core's roofline (`workloads/roofline.py`) turned
into lookup tables the engine evaluates for every pod at once.

A *perf type* is one (model, unit type) pair. For each, at construction:
- prefill seconds per prompt length (log-spaced grid, linear interpolation),
- decode step seconds and the compute-/memory-bound shares of a step over a (batch, context)
  grid (bilinear in log space),
- the SM-share sensitivity `a` (T(0.5)/T(1) - 1) and memory-bound share `m` of prefill and
  decode at representative sizes, the parameters of the contention formula.
All numbers come from the core's `step_time`, `prefill_work`, `decode_work` and calibration;
nothing here re-derives the roofline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from policies.model import UnitType as CoreUnitType
from sim.catalog import UnitType
from workloads.model_catalog import ModelSpec
from workloads.roofline import CALIBRATION, decode_work, prefill_work, step_time, unit_shape

PREFILL_GRID = np.unique(np.round(np.geomspace(1, 65536, 64)).astype(np.int64))
BATCH_GRID = np.unique(np.round(np.geomspace(1, 1024, 28)).astype(np.int64)).astype(float)
CTX_GRID = np.geomspace(8, 131072, 30)
_PREFILL_GRID_F = PREFILL_GRID.astype(float)
REP_PROMPT = 1500  # representative prompt for prefill's contention parameters
REP_BATCH, REP_CTX = 16.0, 1500.0


def core_unit_type(ut: UnitType) -> CoreUnitType:
    return CoreUnitType(ut.product, ut.profile)


@dataclass(frozen=True)
class _TypeTables:
    model: ModelSpec
    unit: UnitType
    prefill_s: np.ndarray  # over PREFILL_GRID
    dec_t: np.ndarray  # [batch, ctx] step seconds
    dec_sm: np.ndarray  # t_c / T
    dec_bw: np.ndarray  # t_m / T
    dec_kernel: np.ndarray  # share of T not spent in per-layer launch overhead
    pf_sm: float
    pf_bw: float
    pf_kernel: float
    a_pf: float
    m_pf: float
    a_dc: float
    m_dc: float


def _mem_share(total: float, tc: float, tm: float) -> float:
    part = tm if tm >= tc else CALIBRATION.overlap_gamma * tm
    return min(1.0, part / total) if total > 0 else 0.0


@lru_cache(maxsize=256)
def _build(model: ModelSpec, unit: UnitType) -> _TypeTables:
    shape = unit_shape(core_unit_type(unit))
    layers = model.layers
    overhead = layers * CALIBRATION.overhead_per_layer_s
    pf = np.array([step_time(*prefill_work(model, int(n)), layers, shape)[0] for n in PREFILL_GRID])
    nb, nc = len(BATCH_GRID), len(CTX_GRID)
    dec_t = np.empty((nb, nc))
    dec_sm = np.empty((nb, nc))
    dec_bw = np.empty((nb, nc))
    for i, b in enumerate(BATCH_GRID):
        for j, c in enumerate(CTX_GRID):
            t, tc, tm = step_time(*decode_work(model, b, c), layers, shape)
            dec_t[i, j], dec_sm[i, j], dec_bw[i, j] = t, tc / t, tm / t
    dec_kernel = 1.0 - overhead / dec_t

    fl, by = prefill_work(model, REP_PROMPT)
    t1, tc, tm = step_time(fl, by, layers, shape)
    t_half = step_time(fl, by, layers, shape, sm_share=0.5)[0]
    fl_d, by_d = decode_work(model, REP_BATCH, REP_CTX)
    d1, dtc, dtm = step_time(fl_d, by_d, layers, shape)
    d_half = step_time(fl_d, by_d, layers, shape, sm_share=0.5)[0]
    return _TypeTables(
        model=model,
        unit=unit,
        prefill_s=pf,
        dec_t=dec_t,
        dec_sm=dec_sm,
        dec_bw=dec_bw,
        dec_kernel=dec_kernel,
        pf_sm=tc / t1,
        pf_bw=tm / t1,
        pf_kernel=1.0 - overhead / t1,
        a_pf=t_half / t1 - 1.0,
        m_pf=_mem_share(t1, tc, tm),
        a_dc=d_half / d1 - 1.0,
        m_dc=_mem_share(d1, dtc, dtm),
    )


_LOG_GRIDS: dict[int, np.ndarray] = {}


def _bilinear_index(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lg = _LOG_GRIDS.get(id(grid))
    if lg is None:
        lg = _LOG_GRIDS[id(grid)] = np.log(grid)
    lx = np.log(np.minimum(np.maximum(x, grid[0]), grid[-1]))
    i = np.searchsorted(lg, lx, side="right") - 1
    i = np.minimum(np.maximum(i, 0), len(grid) - 2)
    w = (lx - lg[i]) / (lg[i + 1] - lg[i])
    return i, w


class PerfTables:
    """All perf types of a run, addressed by integer id for vectorized lookups."""

    def __init__(
        self, service_models: list[ModelSpec], reference: UnitType | Sequence[UnitType]
    ) -> None:
        """`reference`: the GPU the planner profiles on, one for all services or one per
        service (sim.deployment.service_references)."""
        self._types: list[_TypeTables] = []
        self._ids: dict[tuple[str, UnitType], int] = {}
        self.service_models = service_models
        # per service, the GPU it is profiled on (what the simulated operator configures for)
        self.references: list[UnitType] = (
            [reference] * len(service_models) if isinstance(reference, UnitType)
            else list(reference))
        self._ref_ids = [self.type_id(m, r)
                         for m, r in zip(service_models, self.references, strict=True)]
        self._stack()

    def type_id(self, model: ModelSpec, unit: UnitType) -> int:
        key = (model.model_id, unit)
        if key not in self._ids:
            self._ids[key] = len(self._types)
            self._types.append(_build(model, unit))
            self._stack()
        return self._ids[key]

    def tables(self, ptype: int) -> _TypeTables:
        return self._types[ptype]

    def _stack(self) -> None:
        ts = self._types
        if not ts:
            return
        self._pf = np.stack([t.prefill_s for t in ts])
        # [type, batch, ctx, (step s, kernel share, compute share, memory share)]
        self._dec = np.stack(
            [np.stack([t.dec_t, t.dec_kernel, t.dec_sm, t.dec_bw], axis=-1) for t in ts]
        )
        self._pf_sm = np.array([t.pf_sm for t in ts])
        self._pf_bw = np.array([t.pf_bw for t in ts])
        self._pf_k = np.array([t.pf_kernel for t in ts])
        self._a = np.array([[t.a_pf, t.a_dc] for t in ts])
        self._m = np.array([[t.m_pf, t.m_dc] for t in ts])

    # --- prefill ---
    def prefill_work(
        self, ptype: np.ndarray, service: np.ndarray, prompt: np.ndarray
    ) -> np.ndarray:
        """Standalone prefill seconds of each request on its pod's unit type."""
        del service
        i, w = _bilinear_index(_PREFILL_GRID_F, np.asarray(prompt, float))
        rows = self._pf
        return rows[ptype, i] * (1 - w) + rows[ptype, i + 1] * w

    def reference_prefill_work(self, service: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        ref = np.asarray(self._ref_ids, np.int64)[service]
        return self.prefill_work(ref, service, prompt)

    def prefill_use(self, ptype: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._pf_sm[ptype], self._pf_bw[ptype]

    def prefill_kernel_frac(self, ptype: np.ndarray) -> np.ndarray:
        return self._pf_k[ptype]

    # --- decode ---
    def decode_all(
        self, ptype: np.ndarray, batch: np.ndarray, ctx: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(step seconds, kernel share, compute share, memory share) of a decode step, one
        bilinear lookup for all four."""
        i, wi = _bilinear_index(BATCH_GRID, np.asarray(batch, float))
        j, wj = _bilinear_index(CTX_GRID, np.asarray(ctx, float))
        tab = self._dec
        wi = wi[:, None]
        wj = wj[:, None]
        v = (tab[ptype, i, j] * (1 - wj) + tab[ptype, i, j + 1] * wj) * (1 - wi) + (
            tab[ptype, i + 1, j] * (1 - wj) + tab[ptype, i + 1, j + 1] * wj
        ) * wi
        return v[:, 0], v[:, 1], v[:, 2], v[:, 3]

    def decode_step(self, ptype: np.ndarray, batch: np.ndarray, ctx: np.ndarray) -> np.ndarray:
        return self.decode_all(ptype, batch, ctx)[0]

    # --- contention parameters ---
    def sensitivity(self, ptype: np.ndarray, role: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a, m): SM-share sensitivity and memory-bound share, per pod."""
        r = role.astype(np.int64)
        return self._a[ptype, r], self._m[ptype, r]

    # --- planner ---
    def decode_tokens_per_s(
        self, service: int, ctx: float, tpot_target: float, max_batch: int = 1024
    ) -> float:
        """Output tokens/s of one decode pod on the reference unit at the largest batch whose
        step time meets `tpot_target`."""
        pt = np.full(len(BATCH_GRID), self._ref_ids[service])
        steps = self.decode_step(pt, BATCH_GRID, np.full(len(BATCH_GRID), ctx))
        ok = (steps <= tpot_target) & (max_batch >= BATCH_GRID)
        if not ok.any():
            return 1.0 / float(steps[0]) * min(1.0, tpot_target / float(steps[0]))
        k = int(np.nonzero(ok)[0][-1])
        return float(BATCH_GRID[k] / steps[k])
