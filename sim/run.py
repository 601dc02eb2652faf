"""One simulated run: a scenario's traffic served under one placement policy.

The loop advances a simulated clock in fixed steps. At each autoscaler tick the planner sizes
every service (from the interval's arrivals and how fast its prefill pods ran); new pods are
created (and shown to the extender's state as the pod watch would), surplus pods drain and are
deleted once empty. Pending pods go through kube-scheduler's cycle (`sim.kube`) against the
real extender app; its bind lands in `SimBinder`, which sets the pod's node and copack
annotations as the API server would, and the updated pod is fed back to the extender's state.
Every telemetry interval each node's agent "sends" a Snapshot built from what the performance
model says its units did. The engine serves the requests in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from extender.binder import AlreadyBound, BindError
from policies.annotations import pod_request_from_k8s
from policies.inventory import DEMAND_ANNOTATION, SM_SHARE_ANNOTATION, UNIT_ANNOTATION
from sim.autoscaler import Observed, Planner
from sim.catalog import model as catalog_model
from sim.cluster import Cluster, build_cluster
from sim.deployment import Deployments, service_references
from sim.engine import DECODE, PREFILL, Engine, Requests
from sim.gap import GapRecorder
from sim.harness import ExtenderHarness
from sim.kube import KubeScheduler
from sim.perf import PerfTables, core_unit_type
from sim.pods import NAMESPACE, make_pod
from sim.prefill_speed import PrefillSpeedMeter
from sim.rebalance import SimRebalancer
from sim.results import PodRecord, RunResult
from sim.scenario import Scenario
from sim.telemetry import TelemetryAgent
from sim.workload import Workload
from workloads.roofline import DemandModel

EPOCH = 1_767_225_600.0  # simulated wall clock at t=0 (2026-01-01T00:00:00Z)
KV_LINK_BYTES_PER_S = 25e9  # prefill -> decode KV transfer (RDMA / NVLink mix)
SERIES_EVERY_S = 10.0
DRAIN_GRACE_S = 300.0  # serve requests still in flight at the end for at most this long
MAX_NUM_SEQS = 256  # vLLM's --max-num-seqs default: a decode pod's sequence slots


class SimBinder:
    """The API server's side of `pods/binding`: sets spec.nodeName and merges the binding's
    annotations into the simulated pod, atomically, with the UID precondition."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], PodRecord] = {}

    def bind(
        self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str]
    ) -> None:
        rec = self.pods.get((namespace, name))
        if rec is None or rec.state == "deleted":
            raise BindError(f"pods {name!r} not found in namespace {namespace!r}")
        meta = rec.obj["metadata"]
        if uid and meta["uid"] != uid:
            raise BindError(
                f"Precondition failed: UID in precondition: {uid}, "
                f"UID in object meta: {meta['uid']}"
            )
        current = rec.obj["spec"].get("nodeName")
        if current:
            ann = {
                k: v for k, v in meta.get("annotations", {}).items() if k.startswith("copack.io/")
            }
            raise AlreadyBound(f"{namespace}/{name} is already bound to {current}", current, ann)
        rec.obj["spec"]["nodeName"] = node
        meta.setdefault("annotations", {}).update(annotations)
        meta["resourceVersion"] = str(int(meta.get("resourceVersion", "1")) + 1)


def _observe(
    wl: Workload, ref_work: np.ndarray, n_services: int, t0: float, t1: float
) -> list[Observed]:
    a = int(np.searchsorted(wl.arrival, t0, side="left"))
    b = int(np.searchsorted(wl.arrival, t1, side="left"))
    svc = wl.service[a:b]
    span = max(t1 - t0, 1e-9)
    counts = np.bincount(svc, minlength=n_services).astype(float)
    psum = np.bincount(svc, weights=wl.prompt[a:b], minlength=n_services)
    osum = np.bincount(svc, weights=wl.output[a:b], minlength=n_services)
    wsum = np.bincount(svc, weights=ref_work[a:b], minlength=n_services)
    arr, rw = wl.arrival[a:b], ref_work[a:b]
    peaks = np.zeros(n_services)
    dpeaks = np.zeros(n_services)
    out_tok = wl.output[a:b]
    for i in range(n_services):
        mine = svc == i
        if not mine.any():
            continue
        w = float(wl.ttft_slo[i])  # a burst must clear within one TTFT target
        win = ((arr[mine] - t0) // w).astype(np.int64)
        peaks[i] = np.bincount(win, weights=rw[mine]).max() / w
        # Decode: a sequence holds its batch slot (and KV) for its whole output, so a burst
        # of arrivals is in flight together for about one mean output at the TPOT target.
        life = max(1.0, float(out_tok[mine].mean()) * float(wl.tpot_slo[i]))
        dwin = ((arr[mine] - t0) // life).astype(np.int64)
        dpeaks[i] = np.bincount(dwin, weights=out_tok[mine]).max() / life
    out = []
    for i in range(n_services):
        c = counts[i]
        out.append(
            Observed(
                rps=c / span,
                prompt_mean=psum[i] / c if c else 0.0,
                output_mean=osum[i] / c if c else 0.0,
                prefill_load=wsum[i] / span,
                prefill_peak=float(peaks[i]),
                decode_peak=float(dpeaks[i]),
            )
        )
    return out


def run_policy(
    scenario: Scenario,
    policy: str,
    workload: Workload,
    *,
    progress: Callable[[float], None] | None = None,
) -> RunResult:
    """Simulate the scenario under one policy; `progress(fraction)` is called as it goes."""
    wall0 = time.perf_counter()
    now = [0.0]
    cluster: Cluster = build_cluster(scenario.cluster)
    units_by_uuid = cluster.units_by_uuid()
    binder = SimBinder()
    harness = ExtenderHarness(scenario, policy, binder, clock=lambda: EPOCH + now[0])
    for node in cluster.nodes:
        harness.upsert_node(node)
    harness.mark_synced()
    sched = KubeScheduler(
        harness.client,
        extender_weight=scenario.scheduler.extender_weight,
        least_allocated_resources=scenario.scheduler.least_allocated_resources,
        percentage_of_nodes_to_score=scenario.scheduler.percentage_of_nodes_to_score,
    )
    for node in cluster.nodes:
        sched.add_node(node)

    services = scenario.services
    ns = len(services)
    models = [catalog_model(s.model) for s in services]
    refs = service_references(scenario, models, workload)
    perf = PerfTables(models, refs)
    demand_model = DemandModel()
    reqs = Requests(workload.arrival, workload.prompt, workload.output, workload.service)
    kv_s = np.array([m.kv_bytes_per_token for m in models])[workload.service] * (
        workload.prompt / KV_LINK_BYTES_PER_S
    )
    n_units = len(cluster.units)
    engine = Engine(
        reqs,
        ns,
        perf,
        n_units,
        unit_mps=np.array([u.mps for u in cluster.units]),
        unit_flops=np.array([u.type.flops for u in cluster.units]),
        unit_bw=np.array([u.type.bandwidth for u in cluster.units]),
        kv_transfer_s=kv_s,
        dt=scenario.step_s,
    )
    ref_work = engine.ref_work

    deploy = Deployments(scenario, models, perf, workload, demand_model)

    # The operator knows each service's burstiness from its traffic history (the 99.9th
    # percentile of prefill work per TTFT-long window): the planner never sizes prefill for
    # less.
    deploy.mux_load = deploy.bursts(
        workload, ref_work, scenario.autoscaler.multiplex_quantile
    )
    planner = Planner(
        scenario.autoscaler, services, deploy.decode_capacity, deploy.bursts(workload, ref_work)
    )
    telemetry = TelemetryAgent(cluster, scenario.telemetry_interval_s, scenario.step_s)
    rebal = None
    if policy in scenario.rebalancer.policies:
        rebal = SimRebalancer(
            scenario.rebalancer,
            harness,
            cluster.nodes,
            EPOCH,
            scenario.autoscaler.startup_s,
            engine.in_flight,
        )
    targets: list[Any] = [None] * ns

    unit_gpu = np.array([cluster.gpu_uuids.index(u.gpu_uuid) for u in cluster.units])
    unit_sm_frac = np.array([u.type.sm_fraction for u in cluster.units])
    unit_bw_frac = np.array([u.type.bandwidth / u.type.spec.hbm_bw for u in cluster.units])
    unit_mem = np.array([u.type.memory_bytes for u in cluster.units], dtype=float)
    n_gpus = cluster.gpu_count
    unit_pods = np.zeros(n_units, np.int64)
    unit_mem_used = np.zeros(n_units)
    max_mem_frac = 0.0
    max_pods_unit = 0

    pods: list[PodRecord] = []
    live: list[list[list[PodRecord]]] = [[[], []] for _ in range(ns)]  # per service, per role
    by_pid: dict[int, PodRecord] = {}
    seq = [[0, 0] for _ in range(ns)]
    unsched = 0

    dt = scenario.step_s
    n_steps = round(scenario.duration_s / dt)
    interval = scenario.autoscaler.interval_s
    next_plan = 0.0
    series_every = max(1, round(SERIES_EVERY_S / dt))
    gpus_series: list[int] = []
    lb_inputs: list[tuple[float, float, float]] = []
    gpu_sm_sum = np.zeros(n_gpus)
    gpu_bw_sum = np.zeros(n_gpus)
    gpu_steps = np.zeros(n_gpus)
    gpu_in_use = np.zeros(n_gpus, bool)
    gpu_seconds = 0.0
    peak = 0
    mem_total = 0.0
    # the pods holding memory, for the packing bound: one entry per change of the set
    live_mem: dict[str, int] = {}
    mem_sets: list[tuple[int, ...]] = []
    mem_set_index: list[int] = []
    mem_changed = [True]

    def refresh_use() -> None:
        nonlocal gpu_in_use
        used = np.zeros(n_gpus, bool)
        used[unit_gpu[unit_pods > 0]] = True
        gpu_in_use = used

    def create(i: int, role: int, t: float, target) -> None:
        svc = services[i]
        rname = "prefill" if role == PREFILL else "decode"
        seq[i][role] += 1
        name = f"{svc.name}-{rname}-{seq[i][role]:04d}"
        n_target = target.prefill if role == PREFILL else target.decode
        obj = make_pod(
            svc,
            rname,
            name,
            seed=scenario.seed,
            rps=deploy.declared_rps(i, role, target, n_target),
            prompt=target.prompt_mean or 1024,
            output=target.output_mean or 128,
            cpu=scenario.scheduler.pod_cpu,
            memory_gib=scenario.scheduler.pod_memory_gib,
            created=EPOCH + t,
        )
        obj["metadata"]["annotations"][DEMAND_ANNOTATION] = deploy.demand_annotation(
            obj, i, role, target, n_target
        )
        rec = PodRecord(name, i, role, obj, t, t)
        pods.append(rec)
        live[i][role].append(rec)
        binder.pods[(NAMESPACE, name)] = rec
        harness.upsert_pod(obj)

    def delete(rec: PodRecord, t: float) -> None:
        nonlocal mem_total
        if rec.unit >= 0:
            unit_pods[rec.unit] -= 1
            unit_mem_used[rec.unit] -= rec.mem_bytes
            mem_total -= rec.mem_bytes
            live_mem.pop(rec.name, None)
            mem_changed[0] = True
        rec.state = "deleted"
        rec.deleted_t = t
        harness.delete_pod(NAMESPACE, rec.name)
        sched.remove_pod(rec.obj["metadata"]["uid"])
        refresh_use()

    def scale(i: int, role: int, want: int, t: float, target) -> None:
        cur = live[i][role]
        while len(cur) < want:
            create(i, role, t, target)
        if len(cur) > want:
            # Remove pending pods first, then the newest bound ones.
            order = sorted(cur, key=lambda r: (r.state != "pending", -r.created_t))
            for rec in order[: len(cur) - want]:
                cur.remove(rec)
                if rec.state == "pending":
                    delete(rec, t)
                else:
                    rec.state = "draining"
                    engine.drain(rec.pid)

    def on_bound(rec: PodRecord, t: float) -> None:
        nonlocal mem_total, max_mem_frac, max_pods_unit
        ann = rec.obj["metadata"]["annotations"]
        uuid = ann.get(UNIT_ANNOTATION)
        if uuid not in units_by_uuid:
            raise RuntimeError(
                f"extender bound {rec.name} to {rec.obj['spec'].get('nodeName')} without a "
                f"known {UNIT_ANNOTATION} (got {uuid!r})"
            )
        unit = units_by_uuid[uuid]
        if unit.node != rec.obj["spec"]["nodeName"]:
            raise RuntimeError(f"{rec.name}: unit {uuid} is not on node {unit.node}")
        share = ann.get(SM_SHARE_ANNOTATION)
        rec.sm_share = (int(share) / 100.0) if share else 1.0
        request = pod_request_from_k8s(rec.obj)
        rec.mem_bytes = int(demand_model.demand(request, core_unit_type(unit.type)).mem_bytes)
        rec.node, rec.unit, rec.state, rec.bound_t = unit.node, unit.index, "bound", t
        model = models[rec.service]
        dc = rec.role == DECODE
        kv = deploy.kv_tokens(rec.service, rec.mem_bytes) if dc else float("inf")
        ready = t if t == 0.0 else t + scenario.autoscaler.startup_s
        ptype = perf.type_id(model, unit.type)
        rec.pid = engine.add_pod(
            rec.service, rec.role, unit.index, ptype, rec.sm_share, ready,
            MAX_NUM_SEQS if dc else 1, kv,
        )
        by_pid[rec.pid] = rec
        unit_pods[unit.index] += 1
        unit_mem_used[unit.index] += rec.mem_bytes
        mem_total += rec.mem_bytes
        live_mem[rec.name] = rec.mem_bytes
        mem_changed[0] = True
        max_mem_frac = max(max_mem_frac, float(unit_mem_used[unit.index] / unit_mem[unit.index]))
        max_pods_unit = max(max_pods_unit, int(unit_pods[unit.index]))
        refresh_use()

    def evict(rec: PodRecord, reason: str, t: float, handover: bool) -> PodRecord:
        """The Eviction API's effect: the pod terminates, its ReplicaSet replaces it now. A pod
        handed over keeps taking requests until `unroute`."""
        live[rec.service][rec.role].remove(rec)
        rec.state, rec.last_reason, rec.evicted_t = "draining", reason, t
        if not handover:
            engine.drain(rec.pid)
        create(rec.service, rec.role, t, targets[rec.service])
        return live[rec.service][rec.role][-1]

    def unroute(rec: PodRecord) -> None:
        engine.drain(rec.pid)

    def kill(rec: PodRecord, t: float) -> int:
        lost = engine.kill(rec.pid)
        by_pid.pop(rec.pid, None)
        delete(rec, t)
        return lost

    retry = scenario.scheduler.retry_s
    # sampled every step, so only where the planner reads it
    measured = scenario.autoscaler.prefill_speed == "measured"
    speed_meter = PrefillSpeedMeter(ns) if measured else None
    gap = GapRecorder(cluster, engine, demand_model, by_pid)
    for k in range(n_steps):
        t = k * dt
        now[0] = t
        if t + 1e-9 >= next_plan:
            lo = t if t == 0.0 else t - interval
            hi = t + interval if t == 0.0 else t
            observed = _observe(workload, ref_work, ns, lo, hi)
            if speed_meter is not None:
                speeds = speed_meter.take()
                observed = [
                    replace(o, prefill_speed=sp) for o, sp in zip(observed, speeds, strict=True)
                ]
            current = [(len(live[i][0]), len(live[i][1])) for i in range(ns)]
            for i, target in enumerate(planner.plan(observed, current)):
                if t + 1e-9 < services[i].start_s:  # not deployed yet
                    target = replace(target, prefill=0, decode=0)
                targets[i] = target
                scale(i, PREFILL, target.prefill, t, target)
                scale(i, DECODE, target.decode, t, target)
            next_plan += interval
        # Pending pods through the scheduling cycle, oldest first (kube's activeQ order).
        for rec in [r for r in pods if r.state == "pending" and r.next_try_t <= t + 1e-9]:
            res = sched.schedule(rec.obj)
            if res.node is None:
                unsched += 1
                rec.last_reason = res.reason
                rec.next_try_t = t + retry
                continue
            harness.upsert_pod(rec.obj)  # the watch event of the bound pod
            on_bound(rec, t)
        for pid in engine.drained():
            rec = by_pid.pop(pid)
            delete(rec, t)
        if rebal is not None:
            rebal.tick(t, live, services, evict, kill, unroute)
        act = engine.step(t)
        if speed_meter is not None:
            speed_meter.sample(engine)
        telemetry.record(act)
        # Utilization of the GPUs in use, the lower bound's inputs, the count.
        n_used = int(gpu_in_use.sum())
        gpu_seconds += n_used * dt
        gap.sample(k, n_used)
        peak = max(peak, n_used)
        if n_used:
            g_sm = np.bincount(unit_gpu, weights=act.tensor * unit_sm_frac, minlength=n_gpus)
            g_bw = np.bincount(unit_gpu, weights=act.dram * unit_bw_frac, minlength=n_gpus)
            gpu_sm_sum[gpu_in_use] += g_sm[gpu_in_use]
            gpu_bw_sum[gpu_in_use] += g_bw[gpu_in_use]
            gpu_steps[gpu_in_use] += 1
        lb_inputs.append((act.flops, act.bytes_per_s, mem_total))
        if mem_changed[0]:
            mem_sets.append(tuple(sorted(live_mem.values())))
            mem_changed[0] = False
        mem_set_index.append(len(mem_sets) - 1)
        if k % series_every == 0:
            gpus_series.append(n_used)
        if telemetry.due(t + dt):
            now[0] = t + dt  # the tick covers the step just served
            for node, snap in telemetry.snapshots(EPOCH + t + dt, unit_pods, unit_mem_used, pods):
                harness.apply_snapshot(node, snap)
        if progress is not None and k % 200 == 0:
            progress(k / n_steps)
    # Requests in flight at the end are served to completion (no new arrivals, no planning);
    # GPU time is counted over the scenario's duration only. Whatever is still unfinished
    # after the grace period (e.g. requests of a service whose pods never got a unit) counts
    # as an SLO miss.
    k = n_steps
    while engine.pending_requests() and (k - n_steps) * dt < DRAIN_GRACE_S:
        now[0] = k * dt
        engine.step(k * dt)
        k += 1
    if progress is not None:
        progress(1.0)
    from sim.lower_bound import fluid_lower_bound, packing_lower_bound

    lb = fluid_lower_bound(cluster, np.asarray(lb_inputs))
    plb = packing_lower_bound(cluster, lb, mem_sets, np.asarray(mem_set_index, dtype=np.intp))
    calls = dict(harness.client.calls)
    harness.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        gsm = np.where(gpu_steps > 0, gpu_sm_sum / gpu_steps, np.nan)
        gbw = np.where(gpu_steps > 0, gpu_bw_sum / gpu_steps, np.nan)
    total_steps = gpu_steps.sum()
    return RunResult(
        policy=policy,
        scenario=scenario.name,
        duration_s=n_steps * dt,
        step_s=dt,
        requests=reqs,
        ttft_slo=workload.ttft_slo,
        tpot_slo=workload.tpot_slo,
        gpu_seconds=gpu_seconds,
        peak_gpus=peak,
        mean_sm=float(gpu_sm_sum.sum() / total_steps) if total_steps else 0.0,
        mean_bw=float(gpu_bw_sum.sum() / total_steps) if total_steps else 0.0,
        gpu_sm=gsm,
        gpu_bw=gbw,
        series_t=np.arange(len(gpus_series)) * series_every * dt,
        series_gpus=np.asarray(gpus_series),
        series_lb=lb[::series_every],
        lb_gpu_seconds=float(lb.sum() * dt),
        packing_lb_gpu_seconds=float(plb.sum() * dt),
        pods=pods,
        max_pods_per_unit=max_pods_unit,
        max_unit_mem_frac=max_mem_frac,
        unschedulable_attempts=unsched,
        extender_calls=calls,
        wall_s=time.perf_counter() - wall0,
        gpu_count=n_gpus,
        extra={"rebalancer": rebal.stats} if rebal is not None else {},
        gap=gap.finish(np.asarray(lb_inputs), lb, plb, dt, series_every),
    )
