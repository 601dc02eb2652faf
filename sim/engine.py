"""Request-level serving simulation of every pod, in fixed time steps, vectorized with numpy.

Each step (a few hundred ms) does, for all pods at once:

1. **Contention.** Per unit, from the previous step's activity: under MPS each pod's SM share is
   its `copack.io/sm-share` cap, scaled down when the caps of busy pods sum above the unit, and
   its memory-bound time is stretched by the unit's summed bandwidth demand over 1; the SM-share
   curve `a/s + 1 - a` gives the compute slowdown. Time-sliced units never overlap kernels: a
   pod's work waits for the kernels of the others (`1 + sum of their busy fractions`).
2. **Prefill.** Arrivals join the prefill pod of their service with the least queued work
   (FIFO per pod). A pod drains `step × speed` standalone-seconds of queued work; a request
   completes when the pod's cumulative work passes its mark, at the interpolated time.
3. **Decode.** After the KV transfer, a request joins the decode pod with the fewest running
   requests that has room for its prompt in its KV cache (tokens held now, as vLLM admits by
   KV blocks; continuous batching). A pod runs
   `busy time / step time` iterations, the step time coming from the roofline at its batch and
   mean context, times its slowdown; a request finishes when the pod's iteration count passes
   `join + output - 1`. TPOT = (finish - first token) / (output - 1).
4. **Activity** per unit for telemetry, utilization and the lower bound.

Cumulative marks make per-request completion exact for piecewise-constant speeds, with no
per-token or per-request Python event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policies.contention import slowdown_factor
from sim.decode_admission import admit
from sim.perf import PerfTables

PREFILL, DECODE = 0, 1
ST_PENDING, ST_STARTING, ST_READY, ST_DRAINING, ST_GONE = range(5)


@dataclass
class Requests:
    """All requests of a run, sorted by arrival, and their outcomes (NaN until known)."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    service: np.ndarray
    ttft: np.ndarray = field(init=False)
    tpot: np.ndarray = field(init=False)
    finish: np.ndarray = field(init=False)
    first_token: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.arrival)
        self.ttft = np.full(n, np.nan)
        self.tpot = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.first_token = np.full(n, np.nan)

    def __len__(self) -> int:
        return len(self.arrival)


@dataclass
class StepActivity:
    """What each unit did during one step (ratios of the unit, 0..1)."""

    tensor: np.ndarray  # compute use (tensor-pipe activity)
    dram: np.ndarray  # bandwidth use
    sm_active: np.ndarray  # time any kernel ran (NVML "SM active", overstates compute)
    flops: float  # absolute work of the step, for the lower bound (FLOP/s)
    bytes_per_s: float


class _Grow:
    """Arrays indexed by pod id that grow as pods are created."""

    def __init__(self, cap: int = 64) -> None:
        self.cap = cap
        self.role = np.zeros(cap, np.int8)
        self.service = np.zeros(cap, np.int32)
        self.unit = np.full(cap, -1, np.int32)
        self.ptype = np.zeros(cap, np.int32)
        self.state = np.full(cap, ST_GONE, np.int8)
        self.ready_at = np.zeros(cap)
        self.cap_sm = np.ones(cap)  # MPS share cap, fraction of the unit
        self.mps = np.zeros(cap, bool)
        self.max_batch = np.zeros(cap, np.int64)  # decode: sequence slots (max_num_seqs)
        self.kv_tokens = np.zeros(cap)  # decode: KV cache capacity, tokens
        self.arrived = np.zeros(cap)  # prefill: cumulative queued work (standalone s)
        self.done = np.zeros(cap)  # prefill: cumulative work done
        self.iters = np.zeros(cap)  # decode: cumulative iterations
        self.active = np.zeros(cap, np.int64)  # decode: running requests
        self.ctx_base = np.zeros(cap)  # decode: sum(prompt - join_iter) of running requests
        self.busy = np.zeros(cap)  # previous step's busy fraction of wall time
        self.kernel = np.zeros(cap)  # previous step's kernel share of its busy time
        self.bw_use = np.zeros(cap)  # bandwidth use per standalone second of work
        self.sm_use = np.zeros(cap)  # compute (tensor) use per standalone second of work
        self.speed = np.ones(cap)

    def ensure(self, n: int) -> None:
        if n <= self.cap:
            return
        new = max(n, self.cap * 2)
        for name, arr in vars(self).items():
            if isinstance(arr, np.ndarray):
                ext = np.resize(arr, new)
                ext[self.cap :] = (
                    ST_GONE if name == "state" else (-1 if name == "unit" else 0)
                )
                if name in ("cap_sm", "speed"):
                    ext[self.cap :] = 1.0
                setattr(self, name, ext)
        self.cap = new


class Engine:
    """Serves `requests` with the pods the orchestrator adds, drains and removes."""

    def __init__(
        self,
        requests: Requests,
        n_services: int,
        perf: PerfTables,
        n_units: int,
        unit_mps: np.ndarray,
        unit_flops: np.ndarray,
        unit_bw: np.ndarray,
        kv_transfer_s: np.ndarray,  # per service
        dt: float,
    ) -> None:
        self.req = requests
        self.perf = perf
        self.n_services = n_services
        self.n_units = n_units
        self.unit_mps = unit_mps.astype(bool)
        self.unit_flops = unit_flops
        self.unit_bw = unit_bw
        self.kv_transfer_s = kv_transfer_s
        self.dt = dt
        self.p = _Grow()
        self.n_pods = 0
        self.next_arrival = 0
        self.ready_prefill: list[list[int]] = [[] for _ in range(n_services)]
        self.ready_decode: list[list[int]] = [[] for _ in range(n_services)]
        self.wait_prefill: list[list[int]] = [[] for _ in range(n_services)]
        # Requests out of prefill waiting for a decode slot: (ids, first-token times).
        self.wait_decode: list[tuple[np.ndarray, np.ndarray]] = [
            (np.zeros(0, np.int64), np.zeros(0)) for _ in range(n_services)
        ]
        # Active prefill requests: request id, pod, cumulative-work mark, own work.
        self.pf_req = np.zeros(0, np.int64)
        self.pf_pod = np.zeros(0, np.int64)
        self.pf_mark = np.zeros(0)
        self.pf_work = np.zeros(0)
        # Active decode requests: request id, pod, finishing iteration mark.
        self.dc_req = np.zeros(0, np.int64)
        self.dc_pod = np.zeros(0, np.int64)
        self.dc_mark = np.zeros(0)
        self.dc_base = np.zeros(0)
        # Reference prefill work per request (for routing), on its service's reference unit.
        self.ref_work = perf.reference_prefill_work(requests.service, requests.prompt)

    # --- pod lifecycle (driven by the orchestrator) ---
    def add_pod(
        self,
        service: int,
        role: int,
        unit: int,
        ptype: int,
        cap_sm: float,
        ready_at: float,
        max_batch: int,
        kv_tokens: float = float("inf"),
    ) -> int:
        pid = self.n_pods
        self.n_pods += 1
        p = self.p
        p.ensure(self.n_pods)
        p.role[pid], p.service[pid], p.unit[pid], p.ptype[pid] = role, service, unit, ptype
        p.state[pid] = ST_STARTING
        p.ready_at[pid] = ready_at
        p.cap_sm[pid] = min(max(cap_sm, 0.01), 1.0)
        p.mps[pid] = self.unit_mps[unit]
        p.max_batch[pid] = max(1, max_batch)
        p.kv_tokens[pid] = kv_tokens
        p.arrived[pid] = p.done[pid] = p.iters[pid] = p.ctx_base[pid] = 0.0
        p.active[pid] = 0
        p.busy[pid] = p.kernel[pid] = p.bw_use[pid] = p.sm_use[pid] = 0.0
        p.speed[pid] = 1.0
        return pid

    def drain(self, pid: int) -> None:
        """Stop routing new requests to the pod; it finishes what it holds, then `drained`
        reports it (at once for a pod still loading its model)."""
        p = self.p
        if p.state[pid] in (ST_STARTING, ST_READY):
            p.state[pid] = ST_DRAINING
        self._unlist(pid)

    def _unlist(self, pid: int) -> None:
        s = int(self.p.service[pid])
        lst = self.ready_prefill[s] if self.p.role[pid] == PREFILL else self.ready_decode[s]
        if pid in lst:
            lst.remove(pid)

    def in_flight(self, pid: int) -> int:
        """Requests the pod holds now (what evicting it puts at risk)."""
        if self.p.role[pid] == PREFILL:
            return int(np.count_nonzero(self.pf_pod == pid))
        return int(self.p.active[pid])

    def kill(self, pid: int) -> int:
        """The pod's grace period is over: what it still holds is lost (those requests never
        finish, so they count as SLO misses). Returns how many."""
        p = self.p
        self._unlist(pid)
        lost = 0
        if len(self.pf_req):
            gone = self.pf_pod == pid
            lost += int(gone.sum())
            keep = ~gone
            self.pf_req, self.pf_pod = self.pf_req[keep], self.pf_pod[keep]
            self.pf_mark, self.pf_work = self.pf_mark[keep], self.pf_work[keep]
        if len(self.dc_req):
            gone = self.dc_pod == pid
            lost += int(gone.sum())
            keep = ~gone
            self.dc_req, self.dc_pod = self.dc_req[keep], self.dc_pod[keep]
            self.dc_mark, self.dc_base = self.dc_mark[keep], self.dc_base[keep]
        p.active[pid] = 0
        p.ctx_base[pid] = 0.0
        p.arrived[pid] = p.done[pid]
        p.state[pid] = ST_GONE
        return lost

    def drained(self) -> list[int]:
        """Draining pods with nothing left to do (the orchestrator deletes them)."""
        p = self.p
        ids = np.nonzero(p.state[: self.n_pods] == ST_DRAINING)[0]
        out = []
        for pid in ids:
            if p.role[pid] == PREFILL:
                empty = p.arrived[pid] - p.done[pid] <= 1e-12
            else:
                empty = p.active[pid] == 0
            if empty:
                p.state[pid] = ST_GONE
                out.append(int(pid))
        return out

    def pods_on_units(self) -> np.ndarray:
        """Pods holding a unit (starting, ready or draining)."""
        st = self.p.state[: self.n_pods]
        return np.nonzero((st == ST_STARTING) | (st == ST_READY) | (st == ST_DRAINING))[0]

    # --- the step ---
    def step(self, t: float) -> StepActivity:
        p = self.p
        n = self.n_pods
        # Pods whose model finished loading start serving.
        st = p.state[:n]
        starting = np.nonzero((st == ST_STARTING) & (p.ready_at[:n] <= t))[0]
        for pid in starting:
            p.state[pid] = ST_READY
            s = int(p.service[pid])
            (self.ready_prefill if p.role[pid] == PREFILL else self.ready_decode)[s].append(
                int(pid)
            )
        serving = np.nonzero((st == ST_READY) | (st == ST_DRAINING))[0]
        self._contention(serving)
        self._prefill(t, serving)
        dec_busy, dec_step, dec_iters = self._decode(t, serving)
        return self._activity(serving, dec_busy, dec_step, dec_iters)

    def _contention(self, serving: np.ndarray) -> None:
        p = self.p
        if len(serving) == 0:
            return
        u = p.unit[serving]
        busy = p.busy[serving]
        kern = p.kernel[serving]
        mps = p.mps[serving]
        nu = self.n_units
        cap = p.cap_sm[serving]
        # MPS: caps of busy pods over 1 share the SMs; bandwidth over the roof stretches
        # memory-bound time.
        sm_sum = np.bincount(u, weights=busy * cap, minlength=nu)
        bw_sum = np.bincount(u, weights=busy * p.bw_use[serving], minlength=nu)
        a, m = self.perf.sensitivity(p.ptype[serving], p.role[serving])
        slow_mps = slowdown_factor(a, m, cap, bw_sum[u], sm_sum[u])
        # Time-slicing: the other pods' kernel time on the unit delays ours.
        gpu_time = busy * kern
        others = np.bincount(u, weights=gpu_time, minlength=nu)[u] - gpu_time
        slow_ts = 1.0 + others
        p.speed[serving] = 1.0 / np.where(mps, slow_mps, slow_ts)

    def _prefill(self, t: float, serving: np.ndarray) -> None:
        dt = self.dt
        p, r = self.p, self.req
        # Route arrivals of this step (and earlier waiters) to prefill pods.
        end = int(np.searchsorted(r.arrival, t + dt, side="left"))
        new = np.arange(self.next_arrival, end)
        self.next_arrival = end
        if len(new) or any(self.wait_prefill):
            self._route_prefill(new)
        # Progress.
        pf = serving[p.role[serving] == PREFILL]
        if len(pf):
            cap_work = dt * p.speed[pf]
            backlog = p.arrived[pf] - p.done[pf]
            did = np.minimum(np.maximum(backlog, 0.0), cap_work)
            done_before = np.zeros(p.cap)
            done_before[pf] = p.done[pf]
            p.done[pf] += did
            p.busy[pf] = did / cap_work
            p.kernel[pf] = self.perf.prefill_kernel_frac(p.ptype[pf])
            p.sm_use[pf], p.bw_use[pf] = self.perf.prefill_use(p.ptype[pf])
            self._pf_did = (pf, did)
        else:
            self._pf_did = (pf, np.zeros(0))
            done_before = None
        if len(self.pf_req) == 0 or done_before is None:
            return
        fin = self.pf_mark <= p.done[self.pf_pod] + 1e-12
        if not fin.any():
            return
        ids = self.pf_req[fin]
        pods = self.pf_pod[fin]
        speed = p.speed[pods]
        t_done = t + (self.pf_mark[fin] - done_before[pods]) / speed
        t_done = np.maximum(t_done, r.arrival[ids] + self.pf_work[fin] / speed)
        keep = ~fin
        self.pf_req, self.pf_pod = self.pf_req[keep], self.pf_pod[keep]
        self.pf_mark, self.pf_work = self.pf_mark[keep], self.pf_work[keep]
        first = t_done + self.kv_transfer_s[r.service[ids]]
        r.first_token[ids] = first
        r.ttft[ids] = first - r.arrival[ids]
        one = r.output[ids] <= 1
        if one.any():
            r.finish[ids[one]] = first[one]
            r.tpot[ids[one]] = 0.0
        more = ~one
        if more.any():
            ids_m, first_m = ids[more], first[more]
            svc_m = r.service[ids_m]
            for s in np.unique(svc_m).tolist():
                sel = svc_m == s
                wi, wt = self.wait_decode[s]
                self.wait_decode[s] = (
                    np.concatenate((wi, ids_m[sel])),
                    np.concatenate((wt, first_m[sel])),
                )

    def _route_prefill(self, new: np.ndarray) -> None:
        p, r = self.p, self.req
        chosen_req: list[np.ndarray] = []
        chosen_pod: list[np.ndarray] = []
        if len(new):
            svc_new = r.service[new]
            present = set(np.unique(svc_new).tolist())
        else:
            svc_new, present = None, set()
        for s in range(self.n_services):
            waiting = self.wait_prefill[s]
            if s not in present and not waiting:
                continue
            mine = new[svc_new == s] if s in present else new[:0]
            pods = self.ready_prefill[s]
            if not pods:
                self.wait_prefill[s] = waiting + mine.tolist()
                continue
            todo = np.concatenate([np.asarray(waiting, np.int64), mine]) if waiting else mine
            self.wait_prefill[s] = []
            if len(pods) == 1:
                chosen_req.append(todo)
                chosen_pod.append(np.full(len(todo), pods[0], np.int64))
                continue
            # Join the pod with the least queued work, in seconds at its current speed.
            speeds = [float(p.speed[q]) for q in pods]
            loads = [
                float(p.arrived[q] - p.done[q]) / sp for q, sp in zip(pods, speeds, strict=True)
            ]
            refw = self.ref_work[todo].tolist()
            picks = []
            rng = range(len(pods))
            for w in refw:
                k = min(rng, key=loads.__getitem__)
                loads[k] += w / speeds[k]
                picks.append(pods[k])
            chosen_req.append(todo)
            chosen_pod.append(np.asarray(picks, np.int64))
        if not chosen_req:
            return
        ids = np.concatenate(chosen_req)
        pods_a = np.concatenate(chosen_pod)
        if len(ids) == 0:
            return
        work = self.perf.prefill_work(p.ptype[pods_a], r.service[ids], r.prompt[ids])
        # FIFO marks: cumulative queued work per pod, in routing order.
        order = np.argsort(pods_a, kind="stable")
        po, wo = pods_a[order], work[order]
        cs = np.cumsum(wo)
        starts = np.concatenate(([0], np.nonzero(np.diff(po))[0] + 1))
        seg_base = np.repeat(cs[starts] - wo[starts], np.diff(np.append(starts, len(po))))
        marks = np.empty_like(work)
        marks[order] = p.arrived[po] + (cs - seg_base)
        totals = np.bincount(pods_a, weights=work, minlength=p.cap)
        touched = np.nonzero(totals)[0]
        p.arrived[touched] += totals[touched]
        self.pf_req = np.concatenate((self.pf_req, ids))
        self.pf_pod = np.concatenate((self.pf_pod, pods_a))
        self.pf_mark = np.concatenate((self.pf_mark, marks))
        self.pf_work = np.concatenate((self.pf_work, work))

    def _decode(
        self, t: float, serving: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dt = self.dt
        p, r = self.p, self.req
        # Join: requests whose first token is out by the end of this step go to the decode
        # pod with the fewest running requests (least-loaded), within each pod's KV capacity.
        horizon = t + dt
        jr_parts: list[np.ndarray] = []
        jp_parts: list[np.ndarray] = []
        jt_parts: list[np.ndarray] = []
        for s in range(self.n_services):
            wi, wt = self.wait_decode[s]
            pods = self.ready_decode[s]
            if len(wi) == 0 or not pods:
                continue
            due = wt <= horizon
            n_due = int(due.sum())
            if n_due == 0:
                continue
            order = np.nonzero(due)[0]
            order = order[np.argsort(wt[order], kind="stable")]
            pods_a = np.asarray(pods, np.int64)
            take, pick = admit(
                p.active[pods_a], p.max_batch[pods_a],
                p.kv_tokens[pods_a] - p.ctx_base[pods_a] - p.active[pods_a] * p.iters[pods_a],
                r.prompt[wi[order]],
            )
            if not take:
                continue
            take = order[:take]
            jr_parts.append(wi[take])
            jp_parts.append(pods_a[pick])
            jt_parts.append(wt[take])
            keep = np.ones(len(wi), bool)
            keep[take] = False
            self.wait_decode[s] = (wi[keep], wt[keep])
        j_req = bool(jr_parts)
        dc = serving[p.role[serving] == DECODE]
        active_before = p.active[dc].copy()
        busy_start = np.full(p.cap, np.inf)
        busy_start[dc[active_before > 0]] = t
        if j_req:
            jr = np.concatenate(jr_parts)
            jp = np.concatenate(jp_parts)
            jt = np.maximum(np.concatenate(jt_parts), t)
            np.minimum.at(busy_start, jp, jt)
            np.add.at(p.active, jp, 1)
        if len(dc) == 0:
            return dc, np.zeros(0), np.zeros(0)
        b = p.active[dc]
        running = b > 0
        # Context of the running requests (prompt + tokens so far) plus the joining prompts.
        ctx_sum = p.ctx_base[dc] + active_before * p.iters[dc]
        if j_req:
            ctx_sum = ctx_sum + np.bincount(jp, weights=r.prompt[jr], minlength=p.cap)[dc]
        mean_ctx = np.where(running, ctx_sum / np.maximum(b, 1), 0.0)
        step_alone, kern, sm, bw = self.perf.decode_all(p.ptype[dc], np.maximum(b, 1), mean_ctx)
        step = step_alone / p.speed[dc]
        t0 = np.minimum(busy_start[dc], horizon)
        busy_time = np.where(running, horizon - t0, 0.0)
        iters_before = np.zeros(p.cap)
        iters_before[dc] = p.iters[dc]
        rate = np.zeros(p.cap)
        rate[dc] = 1.0 / step
        start_at = np.zeros(p.cap)
        start_at[dc] = t0
        if j_req:
            join_iter = iters_before[jp] + (jt - start_at[jp]) * rate[jp]
            marks = join_iter + (r.output[jr] - 1)
            base = r.prompt[jr] - join_iter
            np.add.at(p.ctx_base, jp, base)
            self.dc_req = np.concatenate((self.dc_req, jr))
            self.dc_pod = np.concatenate((self.dc_pod, jp))
            self.dc_mark = np.concatenate((self.dc_mark, marks))
            self.dc_base = np.concatenate((self.dc_base, base))
        iters_step = busy_time / step
        p.iters[dc] += iters_step
        p.busy[dc] = busy_time / dt
        p.kernel[dc], p.sm_use[dc], p.bw_use[dc] = kern, sm, bw
        if len(self.dc_req):
            fin = self.dc_mark <= p.iters[self.dc_pod] + 1e-9
            if fin.any():
                ids = self.dc_req[fin]
                pods = self.dc_pod[fin]
                t_fin = start_at[pods] + (self.dc_mark[fin] - iters_before[pods]) / rate[pods]
                t_fin = np.maximum(t_fin, r.first_token[ids])
                r.finish[ids] = t_fin
                r.tpot[ids] = (t_fin - r.first_token[ids]) / np.maximum(r.output[ids] - 1, 1)
                np.subtract.at(p.active, pods, 1)
                np.subtract.at(p.ctx_base, pods, self.dc_base[fin])
                keep = ~fin
                self.dc_req, self.dc_pod = self.dc_req[keep], self.dc_pod[keep]
                self.dc_mark, self.dc_base = self.dc_mark[keep], self.dc_base[keep]
        return dc, busy_time, step_alone * iters_step

    def _activity(
        self,
        serving: np.ndarray,
        dec_busy: np.ndarray,
        dec_step: np.ndarray,
        dec_iters_work: np.ndarray,
    ) -> StepActivity:
        p = self.p
        nu = self.n_units
        dt = self.dt
        if len(serving) == 0:
            z = np.zeros(nu)
            return StepActivity(z, z.copy(), z.copy(), 0.0, 0.0)
        pf, did = self._pf_did
        dc = serving[p.role[serving] == DECODE]
        # Standalone-equivalent work rate (GPU-seconds of work at full speed per second).
        work = np.zeros(p.cap)
        if len(pf):
            work[pf] = did / dt
        if len(dc):
            work[dc] = dec_iters_work / dt
        w = work[serving]
        sm_use, bw_use = p.sm_use[serving], p.bw_use[serving]
        u = p.unit[serving]
        tensor = np.minimum(np.bincount(u, weights=w * sm_use, minlength=nu), 1.0)
        dram = np.minimum(np.bincount(u, weights=w * bw_use, minlength=nu), 1.0)
        active = np.minimum(
            np.bincount(u, weights=p.busy[serving] * p.kernel[serving], minlength=nu), 1.0
        )
        # What the lower bound sees: no unit delivers more than its peak, whatever the
        # contention model's rounding lets a step's work add up to.
        flops = float(np.sum(tensor * self.unit_flops))
        bps = float(np.sum(dram * self.unit_bw))
        return StepActivity(tensor, dram, active, flops, bps)

    def pending_requests(self) -> int:
        return (
            sum(len(w) for w in self.wait_prefill)
            + sum(len(w[0]) for w in self.wait_decode)
            + len(self.pf_req)
            + len(self.dc_req)
        )
