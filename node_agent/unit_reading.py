"""One sampling tick's reads: every unit's memory and activity, from GPM where it works, else the
coarse utilization counters (whole GPUs) or nothing (MIG instances without GPM), fed into the
per-metric EWMA and p95; NVML errors are kept per unit.

Split out of sampler.py; `UnitReadingMixin` is only ever used as a base of `Sampler`, which
provides the attributes declared below, `_note_error`, `_warn_once`, `_read_gpm` and
`_free_samples`."""

from __future__ import annotations

import time
from collections.abc import Callable

import pynvml

from node_agent.metric_stats import MetricStats
from node_agent.nvml_errors import _LAYOUT_ERRORS, _nvml_error_text
from node_agent.readings import METRICS, SOURCE_COARSE, SOURCE_GPM, SOURCE_NONE
from node_agent.sampler_state import SamplerConfig, _Unit


class UnitReadingMixin:
    """Per-tick reading of `Sampler` (see the module docstring)."""

    # provided by Sampler.__init__
    config: SamplerConfig
    _clock: Callable[[], float]
    _units: dict[str, _Unit]
    _rescan_pending: bool

    # ---------------------------------------------------------------- reading
    def _read_all(self) -> None:
        lost_gpus: set[int] = set()
        for u in self._units.values():
            if u.handle is None or u.gpu_index in lost_gpus:
                if u.gpu_index in lost_gpus:
                    u.healthy = False
                continue
            try:
                self._read_unit(u)
                u.healthy, u.error = True, ""
            except pynvml.NVMLError as e:
                self._note_error(e)
                u.healthy = False
                u.error = _nvml_error_text(e)
                u.values = {}
                if e.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                    lost_gpus.add(u.gpu_index)
                    self._rescan_pending = True
                elif u.gi_id is not None and e.value in _LAYOUT_ERRORS:
                    self._rescan_pending = True
        for u in self._units.values():
            if u.gpu_index in lost_gpus:
                u.healthy = False
                u.error = u.error or "NVML error 15: GPU is lost"
                u.values = {}

    def _read_unit(self, u: _Unit) -> None:
        mem = pynvml.nvmlDeviceGetMemoryInfo(u.handle, version=pynvml.nvmlMemory_v2)
        u.memory_used = int(mem.used)
        u.timestamp = self._clock()
        fresh = True
        if u.gpm:
            u.source = SOURCE_GPM
            try:
                fresh = self._read_gpm(u)
            except pynvml.NVMLError as e:
                if e.value not in (pynvml.NVML_ERROR_NOT_SUPPORTED,
                                   pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
                    raise
                # GPM advertised but not usable (old driver, missing symbol): fall back.
                self._warn_once(f"gpm:{u.uuid}", "GPM unusable on %s (%s): falling back to %s",
                                u.uuid, _nvml_error_text(e),
                                "coarse utilization" if u.gi_id is None else "no activity")
                self._free_samples(u)
                u.gpm, u.coarse, u.gpm_broken = False, u.gi_id is None, True
                return self._read_unit(u)
        elif u.coarse:
            u.source = SOURCE_COARSE
            util = pynvml.nvmlDeviceGetUtilizationRates(u.handle)
            u.values = {"sm_active": util.gpu / 100.0, "dram_bw_active": util.memory / 100.0,
                        "tensor_active": None, "sm_occupancy": None}
        else:
            u.source = SOURCE_NONE
            u.values = {}
        if not fresh:
            return  # GPM values carried over: do not count them twice in EWMA and p95
        t = time.monotonic()
        for name in METRICS:
            v = u.values.get(name)
            if v is not None:
                st = u.stats.get(name)
                if st is None:
                    st = u.stats[name] = MetricStats(self.config.ewma_halflife_s,
                                                     self.config.window_s)
                st.add(t, v)
