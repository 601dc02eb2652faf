"""Gap attribution (sim/gap.py): the causes add up to the excess over the fluid bound exactly,
the levels are nested, and hand-built clusters put each GPU-second where it belongs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.inventory import DEMAND_ANNOTATION, LOAD_ANNOTATION, MODEL_ANNOTATION
from sim.catalog import model as catalog_model
from sim.catalog import unit_type
from sim.cluster import build_cluster
from sim.engine import DECODE, Engine, Requests
from sim.gap import CAUSES, GapRecorder, attribute, nested_levels
from sim.perf import PerfTables
from sim.results import PodRecord
from sim.run import run_policy
from sim.scenario import ClusterSpec, parse_scenario
from sim.workload import build_workload
from tests.sim.conftest import small_raw

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("policy", ["dedicated", "complementary"])
def test_causes_sum_to_the_runs_excess_exactly(small, policy):
    r = run_policy(small, policy, build_workload(small))
    g = r.gap
    assert g is not None
    assert g.used_s == pytest.approx(r.gpu_seconds, rel=1e-12)
    assert g.fluid_s == pytest.approx(r.lb_gpu_seconds, rel=1e-12)
    excess = r.gpu_seconds - r.lb_gpu_seconds
    assert excess > 0
    assert math.isclose(sum(g.causes.values()), excess, rel_tol=1e-12, abs_tol=1e-9)
    assert list(g.causes) == list(CAUSES)
    assert min(g.causes.values()) >= -1e-9  # levels nested: no negative cause
    assert (g.series[1:] >= -1e-9).all()
    # the stacked series tops out at the GPUs in use, on average over the run
    assert g.series.sum(axis=0).mean() == pytest.approx(r.gpu_seconds / r.duration_s, rel=1e-6)
    assert sum(g.binding.values()) == pytest.approx(1.0)


def test_dedicated_loses_more_to_fragmentation_than_complementary():
    """One pod per GPU leaves most of each GPU idle; packing fills it. The small scenario's
    H200s run MPS here: time-sliced, its pods' times add up and they barely share."""
    raw = small_raw()
    raw["cluster"]["pools"][1]["sharing"] = "mps"
    scn = parse_scenario(raw, "small-mps")
    wl = build_workload(scn)
    ded = run_policy(scn, "dedicated", wl).gap
    com = run_policy(scn, "complementary", wl).gap
    assert ded.causes["fragmentation"] > 2 * com.causes["fragmentation"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(*(st.floats(0, 20, allow_nan=False) for _ in range(6)), st.integers(0, 20)),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from([0.25, 0.5, 1.0]),
)
def test_levels_nest_and_causes_telescope(rows, dt):
    a = np.array(rows, dtype=float)
    used = a[:, 6]
    fluid = np.minimum(a[:, 0], used)  # a bound never above the GPUs in use
    lv = nested_levels(fluid, a[:, 1], a[:, 2], a[:, 3], used, a[:, 4], a[:, 5])
    assert lv.shape[0] == len(CAUSES) + 1
    assert (np.diff(lv, axis=0) >= 0).all()
    assert (lv[-1] == used).all() and (lv[0] == fluid).all()
    g = attribute(
        fluid, a[:, 1], a[:, 2], a[:, 3], used, dt,
        stranded=a[:, 4], reserve=a[:, 5], series_every=3,
    )  # fmt: skip
    assert math.isclose(
        sum(g.causes.values()), (used - fluid).sum() * dt, rel_tol=1e-12, abs_tol=1e-9
    )
    assert min(g.causes.values()) >= -1e-9


# --- hand-built clusters: a real Engine and real pods, demands declared in full ----------


class _Setup:
    """Two H100s, one service; pods declare `copack.io/demand` in full (no roofline)."""

    def __init__(self, sharing: str = "mps") -> None:
        pool = {"name": "a", "count": 1, "gpus_per_node": 2, "product": "H100-SXM"}
        pool["sharing"] = sharing
        self.cluster = build_cluster(ClusterSpec.model_validate({"pools": [pool]}))
        m = catalog_model(MODEL)
        self.ref = unit_type("H100-SXM", None)
        self.perf = PerfTables([m], self.ref)
        self.ptype = self.perf.type_id(m, self.ref)
        empty = np.zeros(0)
        units = self.cluster.units
        self.engine = Engine(
            Requests(empty, empty.astype(np.int64), empty.astype(np.int64), empty.astype(int)),
            1,
            self.perf,
            len(units),
            unit_mps=np.array([u.mps for u in units]),
            unit_flops=np.array([u.type.flops for u in units]),
            unit_bw=np.array([u.type.bandwidth for u in units]),
            kv_transfer_s=empty,
            dt=1.0,
        )
        self.by_pid: dict[int, PodRecord] = {}
        from workloads.roofline import DemandModel

        self.rec = GapRecorder(self.cluster, self.engine, DemandModel(), self.by_pid, every=1)

    def pod(self, unit: int, demand: str, ready_at: float, load: str = "") -> int:
        """A decode pod declaring `demand`; with `load` a prefill pod of MODEL provisioned for
        that load (its bursts) that declares `demand` (its typical SMs)."""
        name = f"p{len(self.by_pid)}"
        ann = {"copack.io/role": "decode", DEMAND_ANNOTATION: demand}
        if load:
            ann |= {"copack.io/role": "prefill", MODEL_ANNOTATION: MODEL, LOAD_ANNOTATION: load}
        obj = {"metadata": {"name": name, "annotations": ann}, "spec": {}}
        rec = PodRecord(name, 0, DECODE, obj, 0.0, 0.0, state="bound", unit=unit)
        rec.pid = self.engine.add_pod(0, DECODE, unit, self.ptype, 1.0, ready_at, 8)
        self.by_pid[rec.pid] = rec
        return rec.pid

    def run(self, steps: int, used: int, fluid: float, packing: float | None = None):
        for k in range(steps):
            self.engine.step(float(k))
            self.rec.sample(k, used)
        f = np.full(steps, fluid)
        p = np.full(steps, packing if packing is not None else math.ceil(fluid))
        return self.rec.finish(np.zeros((steps, 3)), f, p, 1.0, 1)


def test_one_small_pod_on_a_whole_gpu_is_rounding():
    s = _Setup()
    s.pod(0, "sm=0.1,bw=0.2,mem=16Gi", ready_at=0.0)
    g = s.run(10, used=1, fluid=0.2)
    assert g.causes["rounding"] == pytest.approx(0.8 * 10)
    assert sum(v for k, v in g.causes.items() if k != "rounding") == pytest.approx(0.0)


def test_declared_but_unserved_demand_is_over_provisioning():
    s = _Setup()
    s.pod(0, "sm=0.8,bw=0.3,mem=16Gi", ready_at=0.0)
    s.pod(1, "sm=0.8,bw=0.3,mem=16Gi", ready_at=0.0)
    g = s.run(10, used=2, fluid=0.6)  # the two serve 0.3 each
    assert g.causes["rounding"] == pytest.approx(0.4 * 10)
    assert g.causes["over-provisioning"] == pytest.approx(0.6 * 10)  # 1.6 declared - 1
    assert g.causes["fragmentation"] == pytest.approx(0.4 * 10)  # 0.2 of each GPU unheld
    assert g.causes["start/drain"] == pytest.approx(0.0)


def test_a_pod_loading_its_model_is_start_drain_until_ready():
    s = _Setup()
    s.pod(0, "sm=1.0,bw=0.5,mem=16Gi", ready_at=0.0)
    s.pod(1, "sm=0.2,bw=0.5,mem=16Gi", ready_at=4.0)  # starting for steps 0-3
    g = s.run(10, used=2, fluid=1.0)
    assert g.causes["start/drain"] == pytest.approx(0.5 * 4)
    assert g.causes["over-provisioning"] == pytest.approx(0.5 * 6)  # ready, serving nothing
    assert g.causes["fragmentation"] == pytest.approx(0.5 * 10)
    assert g.causes["rounding"] == pytest.approx(0.0)


def test_a_draining_pod_is_start_drain_and_demands_clamp_per_unit():
    s = _Setup()
    s.pod(0, "sm=0.7,bw=0.2,mem=16Gi", ready_at=0.0)
    s.pod(0, "sm=0.7,bw=0.2,mem=16Gi", ready_at=0.0)  # 1.4 of one unit: holds 1 GPU, not 1.4
    gone = s.pod(1, "sm=0.1,bw=0.4,mem=16Gi", ready_at=0.0)
    s.engine.drain(gone)
    g = s.run(10, used=2, fluid=1.0)
    assert g.causes["start/drain"] == pytest.approx(0.4 * 10)
    assert g.causes["fragmentation"] == pytest.approx(0.6 * 10)
    assert g.causes["over-provisioning"] == pytest.approx(0.0)


def test_memory_binds_a_units_need():
    s = _Setup()
    mem = int(0.75 * s.ref.memory_bytes)
    s.pod(0, f"sm=0.1,bw=0.1,mem={mem}", ready_at=0.0)
    s.pod(1, f"sm=0.1,bw=0.1,mem={mem}", ready_at=0.0)
    g = s.run(4, used=2, fluid=1.5, packing=2.0)  # two 75 % pods cannot share one GPU
    assert g.causes["rounding"] == pytest.approx(0.5 * 4)
    assert g.causes["whole pods (memory)"] == pytest.approx(0.0)
    assert g.causes["fragmentation"] == pytest.approx(0.0)
    g2 = _Setup()
    g2.pod(0, f"sm=0.1,bw=0.1,mem={mem}", ready_at=0.0)
    g2.pod(1, f"sm=0.1,bw=0.1,mem={mem}", ready_at=0.0)
    h = g2.run(4, used=2, fluid=0.9, packing=2.0)
    assert h.causes["rounding"] == pytest.approx(0.1 * 4)
    assert h.causes["whole pods (memory)"] == pytest.approx(1.0 * 4)


def test_a_unit_whose_free_memory_fits_no_pod_is_memory_stranded():
    s = _Setup()
    gib = s.ref.memory_bytes
    s.pod(0, f"sm=0.1,bw=0.1,mem={int(0.8 * gib)}", ready_at=0.0)  # 20 % left: fits no pod
    s.pod(1, f"sm=0.1,bw=0.1,mem={int(0.3 * gib)}", ready_at=0.0)
    s.pod(1, f"sm=0.1,bw=0.1,mem={int(0.3 * gib)}", ready_at=0.0)  # 40 % left: a 30 % pod fits
    g = s.run(5, used=2, fluid=0.5, packing=1.0)
    assert g.causes["rounding"] == pytest.approx(0.5 * 5)
    assert g.causes["over-provisioning"] == pytest.approx(0.4 * 5)  # 0.8 + 0.6 declared - 1
    assert g.causes["memory-stranded"] == pytest.approx(0.2 * 5, rel=1e-6)
    assert g.causes["fragmentation"] == pytest.approx(0.4 * 5, rel=1e-6)


@pytest.mark.parametrize("sharing", ["mps", "time-slicing"])
def test_room_kept_for_prefill_bursts_is_burst_reserve(sharing):
    """A prefill pod declaring typical SMs below what its provisioned load needs keeps room
    for its burst, one burst at a time per unit (the largest), under MPS and time-sliced."""
    s = _Setup(sharing)
    load = "rps=10,prompt=2048,output=64"
    s.pod(0, "sm=0.1,bw=0.05,mem=4Gi", ready_at=0.0, load=load)
    s.pod(0, "sm=0.1,bw=0.05,mem=4Gi", ready_at=0.0, load=load)
    s.pod(1, "sm=0.1,bw=0.9,mem=16Gi", ready_at=0.0)  # a decode pod: no burst
    g = s.run(5, used=2, fluid=0.5, packing=1.0)
    burst = s.rec.pod_burst[0]
    assert s.rec.pod_burst[2] == 0.0
    assert 0.1 < burst < 0.4  # rps=10 of 2k-token prompts: more than the declared 0.1
    reserve = burst
    assert g.causes["burst reserve"] == pytest.approx(reserve * 5, rel=1e-6)
    held = 0.2 + 0.9  # unit 0: sm 0.2 declared; unit 1: bw 0.9
    assert g.causes["over-provisioning"] == pytest.approx((held - 1.0) * 5, rel=1e-6)
    assert g.causes["fragmentation"] == pytest.approx((2 - held - reserve) * 5, rel=1e-6)


@pytest.mark.parametrize("sharing", ["mps", "time-slicing"])
def test_a_time_sliced_unit_holds_its_pods_summed_times(sharing):
    """Kernels overlap under MPS (the unit holds the larger summed dimension, here bandwidth
    0.55) and take turns time-sliced (each pod its larger dimension: 0.3 + 0.5)."""
    s = _Setup(sharing)
    s.pod(0, "sm=0.3,bw=0.05,mem=4Gi", ready_at=0.0)
    s.pod(0, "sm=0.05,bw=0.5,mem=16Gi", ready_at=0.0)
    s.pod(1, "sm=0.1,bw=0.9,mem=16Gi", ready_at=0.0)
    g = s.run(5, used=2, fluid=0.5, packing=1.0)
    held = (0.55 if sharing == "mps" else 0.8) + 0.9
    assert g.causes["over-provisioning"] == pytest.approx((held - 1.0) * 5, rel=1e-6)
    assert g.causes["fragmentation"] == pytest.approx((2 - held) * 5, rel=1e-6)
