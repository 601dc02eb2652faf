"""Where a policy's GPU-hours above the fluid lower bound go.

At every step of a run the recorder reads nested levels, in GPUs:

    F   fluid need: the fluid lower bound of the step (work and memory spread at will)
    W   F rounded up to whole GPUs                                  -> rounding
    P   the packing bound: W, never below the memory bin bound of
        the pods then holding memory (pods cannot be split)          -> whole pods (memory)
    D1  the declared demand of READY pods, per unit the binding
        dimension of the summed demands clamped at the unit (time-
        sliced: at least the summed per-pod max(sm, bw), as kernels
        take turns)                                                  -> over-provisioning
    D2  D1 with the pods STARTING (model load) or DRAINING (scaled
        down, or evicted and being replaced)                         -> start/drain
    B   D2 with the SMs each unit keeps for its prefill bursts: a
        burst-provisioned pod declares its typical SMs and bursts to
        what its provisioned load needs; the extender keeps room for
        the largest burst per unit, above the declared SMs (MPS) or
        the summed times (time-sliced; docs/policies.md "one burst
        at a time")                                                  -> burst reserve
    M   B plus the rest of every unit in use whose free memory is
        below the smallest pod then bound (no pod could use it)     -> memory-stranded
    N   GPUs in use (any unit holds a pod)                           -> fragmentation

Each level is clamped between the one below it and N, so the levels are monotone and the
causes (differences of consecutive levels, times the step) add up exactly to the run's GPU
time in use minus its fluid GPU time. Fragmentation is the remainder: capacity on GPUs in use
that no declared demand or burst reserve holds although some pod's memory would fit. D1, D2, B
and M come from the engine's per-pod states (vectorized over pods, one bincount per
dimension), recomputed every `every` steps and whenever the number of GPUs in use changes; F,
W, P and N are exact per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.annotations import pod_request_from_k8s
from policies.cluster_view import burst_headroom
from sim.cluster import Cluster
from sim.engine import ST_DRAINING, ST_READY, ST_STARTING, Engine
from sim.lower_bound import DIMENSIONS, fluid_needs
from sim.perf import core_unit_type
from workloads.roofline import DemandModel

CAUSES = (
    "rounding",
    "whole pods (memory)",
    "over-provisioning",
    "start/drain",
    "burst reserve",
    "memory-stranded",
    "fragmentation",
)


@dataclass
class GapAttribution:
    """A run's excess over its own fluid bound, split by cause (GPU-seconds)."""

    fluid_s: float
    used_s: float
    causes: dict[str, float]  # CAUSES order
    binding: dict[str, float]  # share of fluid GPU-seconds each dimension sets
    series_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # (1 + len(CAUSES), samples): mean fluid need, then each cause, per series window
    series: np.ndarray = field(default_factory=lambda: np.zeros((1 + len(CAUSES), 0)))

    @property
    def excess_s(self) -> float:
        return self.used_s - self.fluid_s

    def hours(self) -> dict[str, float]:
        return {k: v / 3600.0 for k, v in self.causes.items()}

    def shares(self) -> dict[str, float]:
        """Each cause's fraction of the excess (0 where there is none)."""
        ex = self.excess_s
        return {k: (v / ex if ex > 0 else 0.0) for k, v in self.causes.items()}


def nested_levels(
    fluid: np.ndarray,
    packing: np.ndarray,
    ready: np.ndarray,
    bound: np.ndarray,
    used: np.ndarray,
    stranded: np.ndarray | None = None,
    reserve: np.ndarray | None = None,
) -> np.ndarray:
    """Levels F <= W <= P <= D1 <= D2 <= B <= M <= N per step, shape (8, steps), B = D2 +
    `reserve`, M = B + `stranded`. Each is clamped between the level below and N (N below F,
    which a bound should never allow, leaves every level at F and makes fragmentation
    negative, so the sum still holds)."""
    f = np.asarray(fluid, float)
    n = np.asarray(used, float)
    b = np.asarray(bound, float)
    br = b + (np.asarray(reserve, float) if reserve is not None else 0.0)
    m = br + (np.asarray(stranded, float) if stranded is not None else 0.0)
    out = [f]
    for raw in (np.ceil(f - 1e-9), packing, ready, b, br, m):
        lo = out[-1]
        out.append(np.minimum(np.maximum(np.asarray(raw, float), lo), np.maximum(n, lo)))
    out.append(n)
    return np.stack(out)


def attribute(
    fluid: np.ndarray,
    packing: np.ndarray,
    ready: np.ndarray,
    bound: np.ndarray,
    used: np.ndarray,
    dt: float,
    *,
    stranded: np.ndarray | None = None,
    reserve: np.ndarray | None = None,
    needs: np.ndarray | None = None,
    series_every: int = 1,
) -> GapAttribution:
    """The attribution of a run from its per-step levels (see `nested_levels`)."""
    lv = nested_levels(fluid, packing, ready, bound, used, stranded, reserve)
    per = np.diff(lv, axis=0)  # (causes, steps)
    causes = {c: float(per[i].sum() * dt) for i, c in enumerate(CAUSES)}
    # fragmentation as the remainder: the causes then sum to used - fluid to the last bit
    used_s, fluid_s = float(lv[-1].sum() * dt), float(lv[0].sum() * dt)
    causes["fragmentation"] = (used_s - fluid_s) - sum(
        v for k, v in causes.items() if k != "fragmentation"
    )
    binding = dict.fromkeys(DIMENSIONS, 0.0)
    if needs is not None and len(needs) and fluid_s > 0:
        arg = np.argmax(needs, axis=1)
        for d, name in enumerate(DIMENSIONS):
            binding[name] = float(lv[0][arg == d].sum() * dt / fluid_s)
    steps = lv.shape[1]
    m = max(1, series_every)
    w = -(-steps // m)
    pad = np.zeros((lv.shape[0], w * m))
    pad[:, :steps] = np.r_[lv[:1], per]
    counts = np.minimum(m, steps - np.arange(w) * m)
    series = pad.reshape(lv.shape[0], w, m).sum(axis=2) / np.maximum(counts, 1)
    return GapAttribution(
        fluid_s=fluid_s,
        used_s=used_s,
        causes=causes,
        binding=binding,
        series_t=np.arange(w) * m * dt,
        series=series,
    )


class GapRecorder:
    """Reads D1, D2, B, M and N on the sim's clock; `finish` adds the bounds and attributes."""

    def __init__(
        self,
        cluster: Cluster,
        engine: Engine,
        demand_model: DemandModel,
        records: Mapping[int, Any],
        *,
        every: int = 4,
    ) -> None:
        self.cluster = cluster
        self.engine = engine
        self.demand_model = demand_model
        self.records = records  # pid -> PodRecord while the pod is in the engine
        self.every = max(1, every)
        units = cluster.units
        self.unit_type = [core_unit_type(u.type) for u in units]
        self.n_units = len(units)
        # per unit: what one unit-fraction of each dimension is in GPUs of its own type
        self.to_gpu = np.array(
            [
                (
                    u.type.sm_fraction,
                    u.type.bandwidth / u.type.spec.hbm_bw,
                    u.type.memory_bytes / u.type.spec.memory_bytes,
                )
                for u in units
            ]
        )
        self.unit_mem = np.array([float(u.type.memory_bytes) for u in units])
        self.unit_mps = np.array([bool(u.mps) for u in units])
        self.pod_unit = np.zeros(0, np.int64)
        self.pod_demand = np.zeros((0, 3))  # sm, bw (unit fractions), mem (bytes)
        self.pod_burst = np.zeros(0)  # SMs above the declared ones while it bursts (unit fr.)
        self.used: list[int] = []
        self.ready: list[float] = []
        self.bound: list[float] = []
        self.reserve: list[float] = []
        self.stranded: list[float] = []
        self._last_n = -1
        self._held = (0.0, 0.0, 0.0, 0.0)

    def _learn(self) -> None:
        """Declared demands of pods bound since the last call (the engine's pids grow)."""
        n = self.engine.n_pods
        old = len(self.pod_unit)
        if n <= old:
            return
        unit = np.full(n, -1, np.int64)
        dem = np.zeros((n, 3))
        burst = np.zeros(n)
        unit[:old], dem[:old], burst[:old] = self.pod_unit, self.pod_demand, self.pod_burst
        for pid in range(old, n):
            rec = self.records.get(pid)
            if rec is None or rec.unit < 0:
                continue
            req = pod_request_from_k8s(rec.obj)
            ut = self.unit_type[rec.unit]
            d = self.demand_model.demand(req, ut)
            unit[pid], dem[pid] = rec.unit, (d.sm, d.bw, float(d.mem_bytes))
            burst[pid] = burst_headroom(req.role, d.sm, self.demand_model.timing(req, ut))
        self.pod_unit, self.pod_demand, self.pod_burst = unit, dem, burst

    def _need(self, mask: np.ndarray) -> tuple[float, float, float]:
        """GPUs the masked pods' declared demand holds (per unit and dimension the sum clamped
        at the unit, the binding dimension, on a time-sliced unit at least the summed per-pod
        times, summed over units); the GPUs their bursts keep above that (the largest burst
        per unit over the declared SMs, or times, clamped at the unit); the GPUs left on units
        whose free memory no one of these pods would fit in."""
        u = self.pod_unit[mask]
        if len(u) == 0:
            return 0.0, 0.0, 0.0
        d = self.pod_demand[mask]
        per = np.stack(
            [np.bincount(u, weights=d[:, j], minlength=self.n_units) for j in range(3)], axis=1
        )
        free_mem = self.unit_mem - per[:, 2]
        per[:, 2] /= self.unit_mem
        held = (np.minimum(per, 1.0) * self.to_gpu).max(axis=1)
        # time-sliced: kernels take turns, each pod holds the larger of its SM and bandwidth
        time = np.bincount(u, weights=d[:, :2].max(axis=1), minlength=self.n_units)
        ts = ~self.unit_mps
        held[ts] = np.maximum(held[ts], np.minimum(time[ts], 1.0) * self.to_gpu[ts, 0])
        top = np.zeros(self.n_units)
        np.maximum.at(top, u, self.pod_burst[mask])
        base = np.where(self.unit_mps, per[:, 0], time)
        with_burst = np.maximum(held, np.minimum(base + top, 1.0) * self.to_gpu[:, 0])
        in_use = np.bincount(u, minlength=self.n_units) > 0
        full = in_use & (free_mem < d[:, 2].min())
        left = self.to_gpu.max(axis=1) - with_burst
        return (
            float(held.sum()),
            float((with_burst - held).sum()),
            float(np.maximum(left[full], 0.0).sum()),
        )

    def sample(self, k: int, n_used: int) -> None:
        """Called once per step after the engine served it."""
        if k % self.every == 0 or n_used != self._last_n:
            self._learn()
            n = len(self.pod_unit)
            st = self.engine.p.state[:n]
            known = self.pod_unit >= 0
            ready = known & (st == ST_READY)
            bound = known & ((st == ST_READY) | (st == ST_STARTING) | (st == ST_DRAINING))
            d1 = self._need(ready)[0]
            d2, reserve, stranded = self._need(bound)
            self._held = (d1, d2, reserve, stranded)
            self._last_n = n_used
        self.used.append(n_used)
        self.ready.append(self._held[0])
        self.bound.append(self._held[1])
        self.reserve.append(self._held[2])
        self.stranded.append(self._held[3])

    def finish(
        self, inputs: np.ndarray, fluid: np.ndarray, packing: np.ndarray, dt: float, every: int
    ) -> GapAttribution:
        """`inputs`, `fluid`, `packing`: the lower bounds' inputs and outputs per step."""
        return attribute(
            fluid,
            packing,
            np.asarray(self.ready),
            np.asarray(self.bound),
            np.asarray(self.used),
            dt,
            stranded=np.asarray(self.stranded),
            reserve=np.asarray(self.reserve),
            needs=fluid_needs(self.cluster, inputs),
            series_every=every,
        )


def _h(x: float) -> str:
    """GPU-hours: one decimal, two below 10 (short runs)."""
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def gap_rows(results: Sequence[Any]) -> list[list[str]]:
    """Per run: GPU-h, its own fluid GPU-h, the excess, each cause as GPU-h (share)."""
    out = []
    for r in results:
        g: GapAttribution | None = getattr(r, "gap", None)
        if g is None:
            continue
        cells = [r.policy, _h(g.used_s / 3600), _h(g.fluid_s / 3600), _h(g.excess_s / 3600)]
        sh = g.shares()
        cells += [f"{_h(v)} ({sh[k]:.0%})" for k, v in g.hours().items()]
        out.append(cells)
    return out


GAP_HEADERS = ("policy", "GPU-h", "fluid GPU-h", "excess", *CAUSES)
