"""The GPM (Hopper and newer) activity path: one reusable nvmlGpmMetricsGet_t with a fast ctypes
view of its results, and per unit the diff of this tick's GPM sample against the previous one.

Split out of sampler.py; `GpmSamplingMixin` is only ever used as a base of `Sampler`, which
provides the attributes declared below."""

from __future__ import annotations

import contextlib
import ctypes
import math
import time
from typing import Any

import pynvml

from node_agent.readings import METRICS
from node_agent.sampler_state import _Unit

GPM_MIN_GAP_S = 0.1  # GPM needs two samples more than 100 ms apart

# GPM metric ids (nvml.h) in the order of readings.METRICS.
GPM_METRIC_IDS = (
    pynvml.NVML_GPM_METRIC_SM_UTIL,  # 2
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL,  # 10
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,  # 5
    pynvml.NVML_GPM_METRIC_SM_OCCUPANCY,  # 3
)


class _GpmMetricView(ctypes.Structure):
    """nvmlGpmMetric_t without pynvml's slow attribute hooks, laid over the same memory."""

    _fields_ = [
        ("metricId", ctypes.c_uint),
        ("nvmlReturn", ctypes.c_int),
        ("value", ctypes.c_double),
        ("shortName", ctypes.c_char_p),
        ("longName", ctypes.c_char_p),
        ("unit", ctypes.c_char_p),
    ]


def _new_metrics_get() -> tuple[Any, Any]:
    """One reusable nvmlGpmMetricsGet_t with our metric ids set once, plus a fast view of its
    first len(GPM_METRIC_IDS) result slots."""
    mg = pynvml.c_nvmlGpmMetricsGet_t()
    mg.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    mg.numMetrics = len(GPM_METRIC_IDS)
    offset = pynvml.c_nvmlGpmMetricsGet_t.metrics.offset
    assert ctypes.sizeof(_GpmMetricView) == ctypes.sizeof(pynvml.c_nvmlGpmMetric_t)
    view = (_GpmMetricView * len(GPM_METRIC_IDS)).from_address(ctypes.addressof(mg) + offset)
    for i, mid in enumerate(GPM_METRIC_IDS):
        view[i].metricId = mid
    return mg, view


class GpmSamplingMixin:
    """GPM sampling of `Sampler` (see the module docstring)."""

    # provided by Sampler.__init__
    _metrics_get: Any
    _metrics_view: Any

    def _read_gpm(self, u: _Unit) -> bool:
        """Take this tick's GPM sample and diff it against the previous one; True when new
        values came out (False on the first sample and when the samples were too close)."""
        if u.spare_sample is None:
            u.spare_sample = pynvml.nvmlGpmSampleAlloc()
        sample = u.spare_sample
        before = time.monotonic()
        if u.gi_id is not None:
            pynvml.nvmlGpmMigSampleGet(u.parent_handle, u.gi_id, sample)
        else:
            pynvml.nvmlGpmSampleGet(u.handle, sample)
        after = time.monotonic()
        if u.prev_sample is None:
            u.prev_sample, u.prev_after, u.spare_sample = sample, after, None
            u.values = {}
            return False
        if before - u.prev_after < GPM_MIN_GAP_S:
            return False  # too close to diff reliably: keep the older sample, carry last values
        mg = self._metrics_get
        mg.sample1 = u.prev_sample
        mg.sample2 = sample
        pynvml.nvmlGpmMetricsGet(mg)
        values: dict[str, float | None] = {}
        for name, m in zip(METRICS, self._metrics_view, strict=True):
            v = m.value
            ok = m.nvmlReturn == 0 and math.isfinite(v)
            values[name] = min(max(v / 100.0, 0.0), 1.0) if ok else None
        u.values = values
        u.prev_sample, u.spare_sample, u.prev_after = sample, u.prev_sample, after
        return True

    @staticmethod
    def _free_samples(u: _Unit) -> None:
        for s in (u.prev_sample, u.spare_sample):
            if s is not None:
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlGpmSampleFree(s)
        u.prev_sample = u.spare_sample = None
