"""The sampler through the real pynvml against the fake libnvidia-ml built from C."""

from __future__ import annotations

import math

import pytest

from node_agent.readings import SOURCE_COARSE, SOURCE_GPM, SOURCE_NONE
from node_agent.sampler import SamplerConfig
from tests.fakes import nvml as fake
from tests.node_agent.conftest import ticks, wait_until

H100_LAYOUT = ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]


def _by_uuid(snap):
    return {u.uuid: u for u in snap.units}


def test_whole_gpus_and_mig_instances_are_enumerated_with_their_shape(nvml, make_sampler):
    mig = fake.mig_layout("H100", 1, H100_LAYOUT, first_gi_id=2)
    del mig[1]  # a hole at slot 1: NVML index loops must skip NotFound
    nvml.write(fake.scenario([
        fake.gpu("H100", 0, memory_used=5 * fake.GIB),
        fake.gpu("H100", 1, mig=mig),
        fake.gpu("H200", 2, mig=fake.mig_layout("H200", 2, ["3g.71gb", "4g.71gb"])),
        fake.gpu("L40S", 3),
    ]))
    s = make_sampler()
    snap = s.tick()
    units = _by_uuid(snap)
    g0 = units[fake.gpu_uuid(0)]
    assert (g0.parent_uuid, g0.mig_profile, g0.gpu_instance_id) == (None, None, None)
    assert g0.product == "NVIDIA H100 80GB HBM3"
    assert g0.sm_count == 132 and g0.sm_share == 1.0 and g0.bandwidth_share == 1.0
    assert g0.memory_total_bytes == 81559 * fake.MIB
    assert g0.memory_used_bytes == 5 * fake.GIB  # v2: driver-reserved memory not counted
    migs = [u for u in snap.units if u.gpu_index == 1]
    assert [u.mig_profile for u in migs] == ["3g.40gb", "1g.10gb", "1g.10gb"]
    assert [u.gpu_instance_id for u in migs] == [2, 4, 5]
    assert all(u.parent_uuid == fake.gpu_uuid(1) for u in migs)
    assert [u.sm_count for u in migs] == [60, 16, 16]
    assert [u.bandwidth_share for u in migs] == [0.5, 0.125, 0.125]
    assert migs[0].sm_share == pytest.approx(60 / 132)
    assert migs[0].memory_total_bytes == 42412802048  # DESIGN's example figure
    h200 = [u.mig_profile for u in snap.units if u.gpu_index == 2]
    assert h200 == ["3g.71gb", "4g.71gb"]
    l40s = units[fake.gpu_uuid(3)]
    assert l40s.sm_count == 142 and l40s.source == SOURCE_COARSE
    inv = s.inventory()
    assert len(inv.units) == 7 and all(u.healthy for u in inv.units)
    mig_unit = next(u for u in inv.units if u.mig_profile == "3g.40gb")
    assert mig_unit.parent == fake.gpu_uuid(1) and mig_unit.index == 1


def test_gpm_values_per_gpu_and_per_mig_instance_equal_the_scenario(nvml, make_sampler):
    mig = fake.mig_layout("H100", 1, H100_LAYOUT)
    values = [fake.gpm(80, 40, 70, 10), fake.gpm(20, 55, 5, 60), fake.gpm(33, 12, 0, 90),
              fake.gpm(0, 0, 0, 0)]
    for d, v in zip(mig, values, strict=True):
        d["gpm"] = v
    nvml.write(fake.scenario([fake.gpu("H100", 0, gpm=fake.gpm(50, 30, 20, 15)),
                              fake.gpu("H100", 1, mig=mig)]))
    s = make_sampler()
    first = s.tick()
    # First tick: one GPM sample per unit, nothing to diff yet: present but no values.
    assert all(u.healthy and u.source == SOURCE_GPM for u in first.units)
    assert all(not u.sm_active.present for u in first.units)
    ticks(s, 2)
    units = _by_uuid(s.latest())
    expect = {fake.gpu_uuid(0): fake.gpm(50, 30, 20, 15)}
    expect.update({d["uuid"]: v for d, v in zip(mig, values, strict=True)})
    for uuid, v in expect.items():
        u = units[uuid]
        assert u.sm_active.value == pytest.approx(v["sm_util"] / 100, abs=1e-9)
        assert u.sm_occupancy.value == pytest.approx(v["sm_occupancy"] / 100, abs=1e-9)
        assert u.tensor_active.value == pytest.approx(v["any_tensor_util"] / 100, abs=1e-9)
        assert u.dram_bw_active.value == pytest.approx(v["dram_bw_util"] / 100, abs=1e-9)
    # Per MIG GI via nvmlGpmMigSampleGet, never nvmlGpmSampleGet on a MIG handle (the fake
    # refuses that, which would have made the units unhealthy above).
    assert nvml.call_count("nvmlGpmMigSampleGet") >= 4 * 3


def test_gpm_diffs_consecutive_samples_and_frees_them(nvml, make_sampler):
    nvml.write(fake.scenario([fake.gpu("H100", 0, gpm=fake.gpm(sm=10))]))
    nvml.reset_counts()
    before = nvml.live_samples()
    s = make_sampler()
    ticks(s, 4)
    # One GPM sample and one metrics call per tick and unit: no second sample after a sleep.
    assert nvml.call_count("nvmlGpmSampleGet") == 4
    assert nvml.call_count("nvmlGpmMetricsGet") == 3
    assert nvml.live_samples() - before == 2  # previous + spare, reused every tick
    nvml.write(fake.scenario([fake.gpu("H100", 0, gpm=fake.gpm(sm=90))]))
    wait_until(lambda: s.tick().units[0].sm_active.value == pytest.approx(0.9),
               what="the new GPM value")
    s.stop()
    assert nvml.live_samples() == before


def test_gpm_step_timeline_is_time_weighted_like_real_counters(nvml, make_sampler):
    # The timeline steps from 20 % to 80 % 1 s after the file is read; once both samples of a
    # diff lie after the step, the reading is exactly 80 %.
    nvml.write(fake.scenario([fake.gpu("H100", 0, gpm=[{"t": 0, **fake.gpm(sm=20)},
                                                       {"t": 0.5, **fake.gpm(sm=80)}])]))
    s = make_sampler()
    ticks(s, 2)
    seen = [s.latest().units[0].sm_active.value]
    wait_until(
        lambda: seen.append(s.tick().units[0].sm_active.value) or seen[-1] == pytest.approx(0.8),
        what="the second step",
    )
    assert all(0.2 - 1e-9 <= v <= 0.8 + 1e-9 for v in seen if v is not None)


def test_coarse_fallback_on_gpus_without_gpm(nvml, make_sampler):
    nvml.write(fake.scenario([fake.gpu("L40S", 0, utilization=(37, 12)),
                              fake.gpu("A100", 1, utilization=(90, 45))]))
    nvml.reset_counts()
    s = make_sampler()
    ticks(s, 2)
    for u, (g, m) in zip(s.latest().units, [(37, 12), (90, 45)], strict=True):
        assert u.source == SOURCE_COARSE and u.healthy
        assert u.sm_active.value == pytest.approx(g / 100)
        assert u.dram_bw_active.value == pytest.approx(m / 100)
        assert not u.tensor_active.present and not u.sm_occupancy.present
    assert nvml.call_count("nvmlGpmSampleGet") == 0  # isSupportedDevice=0 was respected


def test_a100_mig_instances_have_no_activity_signal_but_stay_healthy(nvml, make_sampler):
    nvml.write(fake.scenario([fake.gpu("A100", 0, mig=fake.mig_layout("A100", 0,
                                                                      ["3g.40gb", "4g.40gb"]))]))
    s = make_sampler()
    ticks(s, 2)
    units = s.latest().units
    assert [u.mig_profile for u in units] == ["3g.40gb", "4g.40gb"]
    assert [u.sm_count for u in units] == [42, 56]
    for u in units:
        assert u.healthy and u.source == SOURCE_NONE
        assert not any(m.present for m in (u.sm_active, u.dram_bw_active, u.tensor_active))


def test_a_lost_gpu_is_unhealthy_while_the_others_keep_reporting(nvml, make_sampler):
    gpus = [fake.gpu("H100", 0, gpm=fake.gpm(sm=10)),
            fake.gpu("H100", 1, mig=fake.mig_layout("H100", 1, ["3g.40gb", "3g.40gb"])),
            fake.gpu("H100", 2, gpm=fake.gpm(sm=30))]
    nvml.write(fake.scenario(gpus))
    s = make_sampler()
    ticks(s, 2)
    before = _by_uuid(s.latest())
    assert len(before) == 4 and all(u.healthy for u in before.values())
    gen = s.inventory_generation
    gpus[1]["lost"] = True
    nvml.write(fake.scenario(gpus))
    ticks(s, 3)  # read error, then the rescan that finds GetHandleByIndex -> GPU_IS_LOST
    after = _by_uuid(s.latest())
    assert set(after) == set(before)  # lost units are kept, not dropped
    lost = [u for u in after.values() if u.gpu_index == 1]
    assert len(lost) == 2 and not any(u.healthy for u in lost)
    assert all("15" in u.error for u in lost)  # NVML_ERROR_GPU_IS_LOST
    assert not any(u.sm_active.present for u in lost)
    assert after[fake.gpu_uuid(0)].healthy and after[fake.gpu_uuid(2)].healthy
    assert after[fake.gpu_uuid(2)].sm_active.value == pytest.approx(0.3)
    assert s.inventory_generation > gen
    assert [u.healthy for u in s.units() if u.index == 1] == [False, False]
    # It comes back: healthy again under the same UUIDs.
    gpus[1]["lost"] = False
    nvml.write(fake.scenario(gpus))
    wait_until(lambda: all(u.healthy for u in s.tick().units), what="recovery")


def test_per_call_error_on_one_unit_leaves_the_others_alone(nvml, make_sampler):
    mig = fake.mig_layout("H100", 0, ["4g.40gb", "3g.40gb"])
    nvml.write(fake.scenario([fake.gpu("H100", 0, mig=mig)]))
    s = make_sampler(rescan_interval_s=60)
    ticks(s, 2)
    mig[1]["errors"] = {"nvmlDeviceGetMemoryInfo": "UNKNOWN"}
    nvml.write(fake.scenario([fake.gpu("H100", 0, mig=mig)]))
    ticks(s, 2)
    good, bad = s.latest().units
    assert good.healthy and good.sm_active.present
    assert not bad.healthy and "999" in bad.error
    mig[1].pop("errors")
    nvml.write(fake.scenario([fake.gpu("H100", 0, mig=mig)]))
    ticks(s, 2)
    assert all(u.healthy for u in s.latest().units)


def test_per_metric_errors_and_nan_make_only_that_metric_absent(nvml, make_sampler):
    g = fake.gpu("H100", 0, gpm={**fake.gpm(50, 30, 20, 10), "sm_occupancy": float("nan")},
                 gpm_errors={"any_tensor_util": "NOT_SUPPORTED"})
    nvml.write(fake.scenario([g]))
    s = make_sampler()
    ticks(s, 3)
    u = s.latest().units[0]
    assert u.healthy
    assert u.sm_active.value == pytest.approx(0.5)
    assert u.dram_bw_active.value == pytest.approx(0.1)
    assert not u.tensor_active.present and not u.sm_occupancy.present


def test_nvml_library_missing_keeps_the_agent_up_without_units(tmp_path, nvml):
    from node_agent.sampler import Sampler

    s = Sampler(SamplerConfig(nvml_library=str(tmp_path / "no" / "libnvidia-ml.so.1"),
                              interval_s=0.1, nvml_retry_s=0.0))
    snap = s.tick()
    assert snap.units == () and not snap.nvml_ok
    assert "cannot load" in snap.nvml_error
    s.stop()


def test_driver_not_loaded_then_loaded(nvml, make_sampler):
    gpus = [fake.gpu("H100", 0, gpm=fake.gpm(sm=40))]
    nvml.write(fake.scenario(gpus, init_error="DRIVER_NOT_LOADED"))
    s = make_sampler(nvml_retry_s=0.0)
    snap = s.tick()
    assert not snap.nvml_ok and snap.units == ()
    assert "Driver Not Loaded" in snap.nvml_error or "9" in snap.nvml_error
    nvml.write(fake.scenario(gpus))
    ticks(s, 3)
    snap = s.latest()
    assert snap.nvml_ok and snap.units[0].healthy
    assert snap.units[0].sm_active.value == pytest.approx(0.4)


def test_driver_restart_reinitialises_nvml(nvml, make_sampler):
    gpus = [fake.gpu("H100", 0, gpm=fake.gpm(sm=40)), fake.gpu("L40S", 1, utilization=(5, 5))]
    nvml.write(fake.scenario(gpus, driver_epoch=1))
    s = make_sampler(nvml_retry_s=0.0, rescan_interval_s=60)
    ticks(s, 2)
    inits = nvml.call_count("nvmlInitWithFlags")
    nvml.write(fake.scenario(gpus, driver_loaded=False, driver_epoch=2))
    snap = s.tick()
    assert not any(u.healthy for u in snap.units) and len(snap.units) == 2
    nvml.write(fake.scenario(gpus, driver_epoch=2))
    wait_until(lambda: all(u.healthy and u.sm_active.present for u in s.tick().units),
               what="re-initialised NVML")
    assert nvml.call_count("nvmlInitWithFlags") > inits
    assert s.latest().units[0].sm_active.value == pytest.approx(0.4)


def test_mig_layout_change_is_reenumerated(nvml, make_sampler):
    nvml.write(fake.scenario([fake.gpu("H100", 0, mig=fake.mig_layout("H100", 0,
                                                                      ["3g.40gb", "3g.40gb"]))]))
    s = make_sampler(rescan_interval_s=60)  # only the error path can notice the change
    ticks(s, 2)
    gen0, units0 = s.wait_units(0, timeout=0)
    assert [u.mig_profile for u in units0] == ["3g.40gb", "3g.40gb"]
    changes = []
    s.add_units_listener(lambda gen, units: changes.append((gen, units)))
    # Re-partition: the same GPU-instance ids 1 and 2 come back with other profiles and UUIDs,
    # plus a third instance.
    new = fake.mig_layout("H100", 0, ["4g.40gb", "2g.20gb", "1g.10gb"], salt="v2")
    nvml.write(fake.scenario([fake.gpu("H100", 0, mig=new)]))
    wait_until(lambda: [u.mig_profile for u in s.tick().units] == ["4g.40gb", "2g.20gb",
                                                                    "1g.10gb"],
               what="the new layout")
    ticks(s, 2)
    snap = s.latest()
    assert {u.uuid for u in snap.units} == {d["uuid"] for d in new}
    assert all(u.healthy for u in snap.units)
    gen1, units1 = s.wait_units(gen0, timeout=0)
    assert gen1 > gen0 and {u.uuid for u in units1} == {d["uuid"] for d in new}
    assert changes and changes[-1][0] == gen1


def test_mig_mode_switch_on_a_gpu_is_found_by_the_periodic_rescan(nvml, make_sampler):
    nvml.write(fake.scenario([fake.gpu("H100", 0, mig_enabled=False)]))
    s = make_sampler(rescan_interval_s=0.2)
    s.tick()
    assert [u.mig_profile for u in s.latest().units] == [None]
    nvml.write(fake.scenario([fake.gpu("H100", 0, mig=fake.mig_layout("H100", 0, ["7g.80gb"]))]))
    wait_until(lambda: [u.mig_profile for u in s.tick().units] == ["7g.80gb"],
               what="MIG mode")


def test_ewma_and_p95_follow_the_readings(nvml, make_sampler):
    nvml.write(fake.scenario([fake.gpu("L40S", 0, utilization=(10, 0))]))
    s = make_sampler(ewma_halflife_s=0.05, window_s=60)
    ticks(s, 3)
    u = s.latest().units[0]
    assert u.sm_active.ewma == pytest.approx(0.1) and u.sm_active.p95 == pytest.approx(0.1)
    nvml.write(fake.scenario([fake.gpu("L40S", 0, utilization=(90, 0))]))
    ticks(s, 3)
    u = s.latest().units[0]
    assert u.sm_active.value == pytest.approx(0.9)
    assert 0.1 < u.sm_active.ewma <= 0.9  # short half-life: close to, never above, 0.9
    assert u.sm_active.ewma > 0.8
    assert u.sm_active.p95 == pytest.approx(0.9)


def test_units_listener_hears_health_changes_only(nvml, make_sampler):
    gpus = [fake.gpu("H100", 0, gpm=fake.gpm(sm=10))]
    nvml.write(fake.scenario(gpus))
    s = make_sampler()
    heard = []
    s.add_units_listener(lambda gen, units: heard.append([u.healthy for u in units]))
    ticks(s, 3)
    assert heard == [[True]]  # the first enumeration; metric changes are not unit changes
    nvml.write(fake.scenario([{**gpus[0], "errors": {"nvmlDeviceGetMemoryInfo": "UNKNOWN"}}]))
    ticks(s, 2)
    assert heard == [[True], [False]]


@pytest.mark.parametrize("bad", [0.05, 0.0, -1.0, math.nan])
def test_interval_below_minimum_is_refused(bad):
    with pytest.raises(ValueError, match=r"at least 0\.1"):
        SamplerConfig(interval_s=bad)


def test_sampling_loop_runs_on_its_thread(nvml, make_sampler):
    nvml.write(fake.scenario([fake.gpu("H100", 0, gpm=fake.gpm(sm=25))]))
    s = make_sampler()
    s.start()
    wait_until(
        lambda: (snap := s.latest()) and snap.units[0].sm_active.value == pytest.approx(0.25),
        what="the loop's readings",
    )
    seq = s.latest().sequence
    wait_until(lambda: s.latest().sequence > seq + 2, what="more ticks")


def test_gpm_advertised_but_unusable_falls_back_to_coarse(nvml, make_sampler):
    g = fake.gpu("H100", 0, gpm=fake.gpm(sm=50), utilization=(66, 33),
                 errors={"nvmlGpmSampleGet": "FUNCTION_NOT_FOUND"})
    nvml.write(fake.scenario([g]))
    s = make_sampler(rescan_interval_s=0.0)  # a rescan every tick must not switch GPM back on
    ticks(s, 3)
    u = s.latest().units[0]
    assert u.healthy and u.source == SOURCE_COARSE
    assert u.sm_active.value == pytest.approx(0.66) and not u.tensor_active.present
    assert nvml.live_samples() == 0
