"""The fake NVML itself, through the real pynvml: it must reproduce the traps FACTS.md lists, or
the agent's tests would pass against behaviour no driver has."""

from __future__ import annotations

import contextlib
import ctypes
import time

import pynvml
import pytest

from tests.fakes import nvml as fake


@pytest.fixture
def session(nvml):
    nvml.write(fake.scenario([
        fake.gpu("H100", 0, gpm=fake.gpm(50, 30, 20, 10), memory_used=fake.GIB),
        fake.gpu("H100", 1, mig=[fake.mig_device("H100", "3g.40gb", 1, 2, slot=0),
                                 fake.mig_device("H100", "1g.10gb", 1, 9, slot=5)]),
        fake.gpu("L40S", 2, utilization=(70, 20)),
        fake.gpu("H100", 3, lost=True),
    ]))
    pynvml.nvmlInit()
    yield nvml
    pynvml.nvmlShutdown()


def test_count_includes_a_lost_gpu_whose_handle_fails(session):
    assert pynvml.nvmlDeviceGetCount() == 4
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetHandleByIndex(3)


def test_memory_v1_counts_reserved_as_used_v2_does_not(session):
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    v1 = pynvml.nvmlDeviceGetMemoryInfo(h)
    v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    assert v2.used == fake.GIB and v2.reserved == 512 * fake.MIB
    assert v1.used == v2.used + v2.reserved
    assert v1.total == v2.total == 81559 * fake.MIB


def test_mig_indices_have_holes_and_is_mig_handle_is_a_c_uint(session):
    h = pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlDeviceGetMigMode(h) == [1, 1]
    found = []
    for i in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(h)):
        with contextlib.suppress(pynvml.NVMLError_NotFound):
            found.append((i, pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, i)))
    assert [i for i, _ in found] == [0, 5]
    mh = found[1][1]
    is_mig = pynvml.nvmlDeviceIsMigDeviceHandle(mh)
    assert isinstance(is_mig, ctypes.c_uint) and is_mig.value == 1
    assert pynvml.nvmlDeviceGetGpuInstanceId(mh) == 9
    attrs = pynvml.nvmlDeviceGetAttributes(mh)
    assert (attrs.multiprocessorCount, attrs.gpuInstanceSliceCount) == (16, 1)
    with pytest.raises(pynvml.NVMLError_NotSupported):  # only MIG handles have attributes
        pynvml.nvmlDeviceGetAttributes(h)
    with pytest.raises(pynvml.NVMLError_NotSupported):  # no utilization on MIG
        pynvml.nvmlDeviceGetUtilizationRates(mh)


def test_gpm_rules(session):
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    l40s = pynvml.nvmlDeviceGetHandleByIndex(2)
    assert pynvml.nvmlGpmQueryDeviceSupport(h).isSupportedDevice == 1
    assert pynvml.nvmlGpmQueryDeviceSupport(l40s).isSupportedDevice == 0  # succeeds, says no
    s1, s2 = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
    try:
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlGpmSampleGet(l40s, s1)
        mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(pynvml.nvmlDeviceGetHandleByIndex(1), 0)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlGpmSampleGet(mig, s1)  # MIG goes through nvmlGpmMigSampleGet
        mg = pynvml.c_nvmlGpmMetricsGet_t()
        mg.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        mg.numMetrics = 2
        mg.metrics[0].metricId = pynvml.NVML_GPM_METRIC_SM_UTIL
        mg.metrics[1].metricId = 1  # graphics util: not modelled
        pynvml.nvmlGpmSampleGet(h, s1)
        pynvml.nvmlGpmSampleGet(h, s2)
        mg.sample1, mg.sample2 = s1, s2
        with pytest.raises(pynvml.NVMLError_InvalidArgument):  # samples < 100 ms apart
            pynvml.nvmlGpmMetricsGet(mg)
        time.sleep(0.12)
        pynvml.nvmlGpmSampleGet(h, s2)
        pynvml.nvmlGpmMetricsGet(mg)
        assert mg.metrics[0].nvmlReturn == 0 and mg.metrics[0].value == pytest.approx(50)
        assert mg.metrics[0].metricInfo.shortName == b"sm_util"
        assert mg.metrics[1].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
        mg.numMetrics = pynvml.NVML_GPM_METRIC_MAX  # larger than old headers' maximum
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlGpmMetricsGet(mg)
        mg.numMetrics, mg.version = 1, 2
        with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
            pynvml.nvmlGpmMetricsGet(mg)
    finally:
        pynvml.nvmlGpmSampleFree(s1)
        pynvml.nvmlGpmSampleFree(s2)


def test_injected_errors_and_driver_states(session):
    scen = fake.scenario([fake.gpu("H100", 0)], errors={"nvmlDeviceGetCount": "UNKNOWN"})
    session.write(scen)
    with pytest.raises(pynvml.NVMLError_Unknown):
        pynvml.nvmlDeviceGetCount()  # the _v2 symbol matches the plain name
    session.write(fake.scenario([fake.gpu("H100", 0)], driver_epoch=5))
    with pytest.raises(pynvml.NVMLError_Uninitialized):  # a stale session after a restart
        pynvml.nvmlDeviceGetCount()
    pynvml.nvmlShutdown()
    pynvml.nvmlInit()
    assert pynvml.nvmlDeviceGetCount() == 1


def test_bad_layouts_and_models_are_refused():
    with pytest.raises(ValueError, match="9 memory slices"):
        fake.mig_layout("H100", 0, ["3g.40gb", "3g.40gb", "1g.10gb"])
    with pytest.raises(ValueError, match="unknown GPU model"):
        fake.gpu("B300", 0)
    with pytest.raises(ValueError, match="does not support MIG"):
        fake.mig_layout("L40S", 0, ["1g.10gb"])
