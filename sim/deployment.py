"""How the simulated operator configures each pod it deploys: vLLM's memory (weights, runtime,
KV budget, `--max-model-len`), the planner's per-pod capacity, and what the pod declares to
copack (`copack.io/load`, `copack.io/demand`).

Every policy gets the very same pods with the very same declarations; only placement differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from policies.annotations import pod_request_from_k8s
from sim.autoscaler import Target
from sim.catalog import UnitType, unit_type
from sim.perf import PerfTables, core_unit_type
from sim.scenario import Scenario
from sim.workload import Workload
from workloads.model_catalog import ModelSpec
from workloads.roofline import RUNTIME_OVERHEAD_BYTES, DemandModel

MODEL_LEN_ROUND = 1024  # --max-model-len: the service's longest request, rounded up to this
KV_BURST_FACTOR = 2.0  # prefill KV budget over the roofline's in-flight estimate
ELASTIC_TPOT_FRACTION = 0.5  # elastic decode demand keeps half the TPOT target in reserve
ELASTIC_GRID = tuple(round(0.05 * k, 2) for k in range(1, 21))
DECODE_KV_SHARE = 0.3  # of the reference GPU's memory: each decode pod's KV budget
PLANNER_TPOT_FRACTION = 0.6  # the planner's decode capacity is taken at this much of TPOT
# Decode capacity is profiled on a whole reference GPU; on a shared unit with an MPS share
# the pod runs ~20 % slower (SM-share curve at 30 %): the planner plans with that margin.
DECODE_SPEED_MARGIN = 0.8
GPU_MEMORY_UTILIZATION = 0.9  # most of a reference GPU a single pod may configure
# Of per-window load over the run (windows of one TTFT target): the operator's burst estimate.
BURST_QUANTILE = 99.9
PREFILL, DECODE = 0, 1


def max_model_len(workload: Workload, n_services: int) -> np.ndarray:
    """vLLM's --max-model-len per service: its longest request, rounded up; a pod's KV must
    hold at least one such sequence or vLLM refuses to start."""
    longest = np.zeros(n_services)
    np.maximum.at(longest, workload.service, workload.prompt + workload.output)
    return np.ceil(np.maximum(longest, 1) / MODEL_LEN_ROUND) * MODEL_LEN_ROUND


def _holds(unit: UnitType, model: ModelSpec, max_len: float) -> bool:
    usable = GPU_MEMORY_UTILIZATION * unit.memory_bytes - model.weight_bytes
    return usable - RUNTIME_OVERHEAD_BYTES >= max_len * model.kv_bytes_per_token


def service_references(
    scenario: Scenario, models: Sequence[ModelSpec], workload: Workload
) -> list[UnitType]:
    """The GPU each service is profiled and configured on: the scenario's `reference_gpu`,
    unless its weights and one --max-model-len sequence do not fit in GPU_MEMORY_UTILIZATION
    of it (Mixtral-8x7B's 93 GB on an 80 GB H100); then the smallest whole GPU of the cluster
    that holds them, where the operator runs and profiles it. Sized on a GPU it cannot run
    on, such a model got KV for one sequence per pod and a profile of the wrong GPU."""
    ref = unit_type(scenario.autoscaler.reference_gpu, None)
    max_len = max_model_len(workload, len(scenario.services))
    whole = sorted({unit_type(p.product, None) for p in scenario.cluster.pools},
                   key=lambda u: (u.memory_bytes, u.gpu))
    out = []
    for i, m in enumerate(models):
        if _holds(ref, m, max_len[i]):
            out.append(ref)
        else:
            out.append(next((u for u in whole if _holds(u, m, max_len[i])), ref))
    return out


class Deployments:
    def __init__(
        self,
        scenario: Scenario,
        models: Sequence[ModelSpec],
        perf: PerfTables,
        workload: Workload,
        demand_model: DemandModel,
    ) -> None:
        self.scenario = scenario
        self.services = scenario.services
        self.models = list(models)
        self.perf = perf
        self.refs = perf.references  # per service, the GPU it is sized on (service_references)
        self.dm = demand_model
        self.max_len = max_model_len(workload, len(self.services))
        # per service: prefill work (reference GPU-s per s) of its multiplex_quantile window
        self.mux_load = [0.0] * len(self.services)

    # --- memory ---
    def kv_cap(self, i: int) -> float:
        """KV bytes a pod may hold on its service's reference GPU (vLLM's
        gpu_memory_utilization)."""
        m = self.models[i]
        usable = GPU_MEMORY_UTILIZATION * self.refs[i].memory_bytes
        return max(usable - m.weight_bytes - RUNTIME_OVERHEAD_BYTES, 0.0)

    def decode_kv(self, i: int) -> float:
        """KV budget of every decode pod of the service (bytes)."""
        floor = self.max_len[i] * self.models[i].kv_bytes_per_token
        return max(floor, min(DECODE_KV_SHARE * self.refs[i].memory_bytes, self.kv_cap(i)))

    def pod_memory(self, pod: dict, i: int, role: int) -> int:
        """The memory vLLM is given: weights, runtime, and a KV budget. Prefill: twice the
        roofline's in-flight KV; decode: `decode_kv` (what the planner's capacity assumes);
        never less than one max-length sequence."""
        m = self.models[i]
        if role == DECODE:
            kv = self.decode_kv(i)
        else:
            core = self.dm.demand(pod_request_from_k8s(pod), core_unit_type(self.refs[i]))
            kv_core = max(core.mem_bytes - m.weight_bytes - RUNTIME_OVERHEAD_BYTES, 0.0)
            floor = self.max_len[i] * m.kv_bytes_per_token
            kv = min(max(floor, KV_BURST_FACTOR * kv_core), max(floor, self.kv_cap(i)))
        return int(m.weight_bytes + RUNTIME_OVERHEAD_BYTES + kv)

    def kv_tokens(self, i: int, mem_bytes: int) -> float:
        """Tokens a decode pod's KV cache holds (what it admits requests against)."""
        m = self.models[i]
        return max(mem_bytes - m.weight_bytes - RUNTIME_OVERHEAD_BYTES, 0.0) / (
            m.kv_bytes_per_token
        )

    # --- planner capacity ---
    def decode_capacity(self, i: int, ctx: float) -> float:
        """Output tokens/s one decode pod sustains: at the largest batch whose step meets
        PLANNER_TPOT_FRACTION of the TPOT target and whose KV fits the budget, derated."""
        kv_batch = int(self.decode_kv(i) // (self.models[i].kv_bytes_per_token * max(ctx, 1.0)))
        goal = self.services[i].slo.tpot_s * PLANNER_TPOT_FRACTION
        tokens = self.perf.decode_tokens_per_s(i, ctx, goal, max(kv_batch, 1))
        return tokens * DECODE_SPEED_MARGIN

    def bursts(
        self, wl: Workload, ref_work: np.ndarray, quantile: float = BURST_QUANTILE
    ) -> list[float]:
        """Per service, over the whole run: the `quantile` of prefill work per window of
        one TTFT target (reference GPU-seconds per second); BURST_QUANTILE is the operator's
        burst estimate."""
        out = []
        for i in range(len(self.services)):
            mine = wl.service == i
            if not mine.any():
                out.append(0.0)
                continue
            w = float(wl.ttft_slo[i])
            win = (wl.arrival[mine] // w).astype(np.int64)
            work = np.bincount(win, weights=ref_work[mine], minlength=int(win.max()) + 1)
            out.append(float(np.percentile(work, quantile)) / w)
        return out

    # --- declarations ---
    def declared_rps(self, i: int, role: int, target: Target, n: int) -> float:
        """The load each pod is sized for (its `copack.io/load`): its share of the mean at the
        planner's target utilization; for prefill also its share of the remembered burst,
        since a prefill pod is provisioned (and must have its SMs) for the bursts."""
        a = self.scenario.autoscaler
        rps = target.rps / max(n, 1) / a.target_utilization
        if role == PREFILL:
            prompt = max(round(target.prompt_mean or 1024), 1)
            per_req = float(self.perf.reference_prefill_work(np.array([i]), np.array([prompt]))[0])
            rps = max(rps, target.prefill_peak / max(n, 1) / a.peak_utilization / per_req)
        return rps

    def multiplexed_sm(self, pod: dict, i: int, target: Target, n: int) -> float:
        """SMs (fraction of the reference GPU) a prefill pod needs in all but its service's
        busiest (100 - multiplex_quantile) % of TTFT windows: its share of the mean at the
        target utilization or of that quantile's load, whichever is more, through the roofline.
        Provisioned for the 99.9th burst, the pod idles most of the time; declaring the burst
        would keep it alone. Bursts of different services are independent, so pods whose
        quantile loads sum under one GPU overflow it only when one is in its top few percent
        of windows, and then only by the excess (the TTFT target has room for it)."""
        a = self.scenario.autoscaler
        req = pod_request_from_k8s(pod)
        if req.load is None:
            return 1.0
        prompt = max(round(target.prompt_mean or 1024), 1)
        per_req = float(self.perf.reference_prefill_work(np.array([i]), np.array([prompt]))[0])
        rps = max(
            target.rps / max(n, 1) / a.target_utilization,
            self.mux_load[i] / max(n, 1) / max(per_req, 1e-12),
        )
        load = dataclasses.replace(req.load, rps=min(rps, req.load.rps))
        d = self.dm.demand(dataclasses.replace(req, load=load), core_unit_type(self.refs[i]))
        return float(min(1.0, max(d.sm, 0.01)))

    def elastic_bw(self, pod: dict, i: int) -> float:
        """The smallest bandwidth share at which a decode pod still meets ELASTIC_TPOT_FRACTION
        of its TPOT target at its declared load: continuous batching trades step time for
        batch size, so a decode pod needs far less than the ~0.85 of the roof it takes when it
        free-runs alone."""
        load = pod_request_from_k8s(pod).load
        if load is None:
            return 1.0
        m = self.models[i]
        out = float(load.output_tokens or 128)
        ctx = float(load.prompt_tokens) + out / 2
        goal = self.services[i].slo.tpot_s * ELASTIC_TPOT_FRACTION
        ref = core_unit_type(self.refs[i])
        for beta in ELASTIC_GRID:
            batch = 1.0
            for _ in range(30):  # B = rps * output * T(B, beta)
                step = self.dm.decode_step_time(m, batch, ctx, ref, bw_share=beta)
                nxt = max(1.0, load.rps * out * step)
                if abs(nxt - batch) < 1e-3 or nxt > 1024:
                    batch = nxt
                    break
                batch = nxt
            step = self.dm.decode_step_time(m, batch, ctx, ref, bw_share=beta)
            if batch <= 1024 and step <= goal:
                return float(beta)
        return 1.0

    def demand_annotation(
        self, pod: dict, i: int, role: int, target: Target | None = None, n: int = 1
    ) -> str:
        """`copack.io/demand`: the configured memory, for decode the elastic bandwidth, for
        prefill the multiplexed SMs."""
        a = self.scenario.autoscaler
        demand = f"mem={self.pod_memory(pod, i, role) // 2**20}Mi"
        if role == DECODE and a.decode_demand == "elastic":
            demand = f"bw={self.elastic_bw(pod, i):.3f},{demand}"
        if role == PREFILL and a.prefill_demand == "multiplexed" and target is not None:
            demand = f"sm={self.multiplexed_sm(pod, i, target, n):.3f},{demand}"
        return demand
