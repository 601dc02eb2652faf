"""The NVML sampler: enumerates GPUs and MIG GPU instances and reads their activity every tick.

Activity comes from GPM (Hopper and newer) per whole GPU (`nvmlGpmSampleGet`) or per MIG GPU
instance (`nvmlGpmMigSampleGet`): each unit keeps its previous GPM sample and every tick diffs a
fresh sample against it, so there is never a sleep between two samples and a tick costs one
sample per unit. GPUs without GPM fall back to `nvmlDeviceGetUtilizationRates` (marked
`coarse`: no tensor or occupancy signal). MIG instances without GPM (A100) have no activity
signal at all (`none`): NVML does not give utilization for MIG devices.

Failures are per unit: an NVML error on one unit marks it unhealthy while the others keep
reporting; a lost GPU (handle by index returns GPU_IS_LOST while the count still includes it)
keeps its last known units, unhealthy. Errors that mean the NVML session itself is gone
(uninitialized, driver not loaded, driver/library mismatch) trigger nvmlShutdown + nvmlInit on
the next tick. The layout is re-enumerated every `rescan_interval_s` and right after any error
that suggests it changed (a MIG handle or GPU instance that disappeared)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml

from node_agent import unit_shape
from node_agent.metric_stats import MetricStats
from node_agent.readings import (
    METRICS,
    SOURCE_COARSE,
    SOURCE_GPM,
    SOURCE_NONE,
    MetricReading,
    Snapshot,
    UnitReading,
)
from policies.inventory import Inventory, InventoryUnit

log = logging.getLogger("copack.agent.sampler")

MIN_INTERVAL_S = 0.1
GPM_MIN_GAP_S = 0.1  # GPM needs two samples more than 100 ms apart

# GPM metric ids (nvml.h) in the order of readings.METRICS.
GPM_METRIC_IDS = (
    pynvml.NVML_GPM_METRIC_SM_UTIL,  # 2
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL,  # 10
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,  # 5
    pynvml.NVML_GPM_METRIC_SM_OCCUPANCY,  # 3
)

# Errors after which the whole NVML session must be re-opened.
_SESSION_ERRORS = frozenset(
    {
        pynvml.NVML_ERROR_UNINITIALIZED,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
    }
)
# Errors on a MIG unit that mean its instance may have been destroyed (re-partition).
_LAYOUT_ERRORS = frozenset({pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT})


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


def _nvml_error_text(e: pynvml.NVMLError) -> str:
    try:
        return f"NVML error {e.value}: {e}"
    except Exception:  # str() calls back into the library, which may be gone
        return f"NVML error {getattr(e, 'value', '?')}"


@dataclass
class SamplerConfig:
    node: str = "localhost"
    interval_s: float = 1.0
    ewma_halflife_s: float = 10.0
    window_s: float = 60.0
    rescan_interval_s: float = 30.0  # safety net; layout changes are caught per tick
    nvml_retry_s: float = 5.0
    # Load this file as libnvidia-ml instead of the system's (tests, non-standard installs).
    nvml_library: str | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.interval_s) or self.interval_s < MIN_INTERVAL_S:
            raise ValueError(
                f"sampling interval must be at least {MIN_INTERVAL_S} s, got {self.interval_s}"
            )
        if self.window_s <= 0 or self.ewma_halflife_s <= 0:
            raise ValueError("window_s and ewma_halflife_s must be positive")
        if self.rescan_interval_s < 0 or self.nvml_retry_s < 0:
            raise ValueError("rescan_interval_s and nvml_retry_s must not be negative")


@dataclass
class _Unit:
    """Mutable per-unit state owned by the sampler thread."""

    uuid: str
    parent_uuid: str | None
    gpu_index: int
    gi_id: int | None
    mig_profile: str | None
    product: str
    sm_count: int
    sm_share: float
    bw_share: float
    memory_total: int
    handle: Any
    parent_handle: Any
    gpm: bool
    coarse: bool
    healthy: bool = True
    gpm_broken: bool = False  # GPM advertised but its calls are not supported: stay off it
    error: str = ""
    source: str = ""
    memory_used: int = 0
    timestamp: float = 0.0
    prev_sample: Any = None
    prev_after: float = 0.0  # monotonic time just after the previous sample returned
    spare_sample: Any = None
    values: dict[str, float | None] = field(default_factory=dict)
    stats: dict[str, MetricStats] = field(default_factory=dict)

    def static_key(self) -> tuple:
        return (self.uuid, self.parent_uuid, self.gpu_index, self.gi_id, self.mig_profile,
                self.product, self.sm_count, self.memory_total)


class Sampler:
    """Samples NVML on its own thread; everything else reads its immutable snapshots.

    In-process API (used by the device plugin): :meth:`latest`, :meth:`units`,
    :meth:`inventory`, :meth:`wait_units` and :meth:`add_units_listener` for health/layout
    changes, :meth:`add_listener` for every snapshot."""

    def __init__(self, config: SamplerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._units: dict[str, _Unit] = {}
        self._gpu_handles: dict[int, Any] = {}
        self._fingerprints: dict[int, tuple] = {}  # gpu index -> (MIG mode, MIG UUID per slot)
        self._gpu_count = 0
        self._failed_gpus: set[int] = set()
        self._initialized = False
        self._nvml_error = ""
        self._reinit_pending = False
        self._rescan_pending = True
        self._last_rescan = -math.inf
        self._last_init_try = -math.inf
        self._sequence = 0
        self._inventory_key: tuple = ()
        self._inventory_generation = 0
        self._latest: Snapshot | None = None
        self._cond = threading.Condition()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._unit_listeners: list[Callable[[int, tuple[InventoryUnit, ...]], None]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._tick_lock = threading.Lock()
        self._metrics_get, self._metrics_view = _new_metrics_get()
        self._warned: set[str] = set()

    # ---------------------------------------------------------------- public API
    def latest(self) -> Snapshot | None:
        return self._latest

    def units(self) -> tuple[InventoryUnit, ...]:
        """The current units with health, as the inventory annotation lists them."""
        snap = self._latest
        return _inventory_units(snap) if snap else ()

    def inventory(self) -> Inventory:
        return Inventory(units=self.units())

    @property
    def inventory_generation(self) -> int:
        return self._inventory_generation

    def wait_units(
        self, after_generation: int, timeout: float | None = None
    ) -> tuple[int, tuple[InventoryUnit, ...]]:
        """Block until the inventory generation exceeds `after_generation` (or timeout), then
        return (generation, units). Pass 0 first: generation 1 is the first enumeration."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._inventory_generation > after_generation or self._stop.is_set(),
                timeout=timeout,
            )
            return self._inventory_generation, self.units()

    def add_listener(self, fn: Callable[[Snapshot], None]) -> Callable[[], None]:
        """Call `fn(snapshot)` on the sampler thread after every tick; it must not block."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def add_units_listener(
        self, fn: Callable[[int, tuple[InventoryUnit, ...]], None]
    ) -> Callable[[], None]:
        """Call `fn(generation, units)` when units appear, vanish or change health."""
        self._unit_listeners.append(fn)
        return lambda: self._unit_listeners.remove(fn) if fn in self._unit_listeners else None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="copack-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._tick_lock:
            self._shutdown_nvml()

    def tick(self) -> Snapshot:
        """Run one sampling tick now (the loop calls this; tests and benches may too)."""
        with self._tick_lock:
            start = time.perf_counter()
            self._ensure_session()
            if self._initialized:
                now = time.monotonic()
                if (
                    self._rescan_pending
                    or now - self._last_rescan >= self.config.rescan_interval_s
                    or self._layout_changed()
                ):
                    self._rescan()
                if self._initialized:
                    self._read_all()
            snap = self._publish(time.perf_counter() - start)
        return snap

    # ---------------------------------------------------------------- loop
    def _run(self) -> None:
        interval = self.config.interval_s
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bug must not kill the agent's only sampling thread
                log.exception("sampling tick failed")
            next_t += interval
            now = time.monotonic()
            if next_t <= now:  # overran: skip the missed slots, keep the cadence
                next_t = now + interval - ((now - next_t) % interval)
            self._stop.wait(next_t - now)

    # ---------------------------------------------------------------- NVML session
    def _ensure_session(self) -> None:
        if self._reinit_pending and self._initialized:
            log.warning("NVML session lost (%s): re-initialising", self._nvml_error)
            self._shutdown_nvml()
            self._last_init_try = -math.inf
        if self._initialized:
            return
        now = time.monotonic()
        if now - self._last_init_try < self.config.nvml_retry_s:
            return
        self._last_init_try = now
        try:
            if self.config.nvml_library:
                self._load_library(self.config.nvml_library)
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            msg = f"NVML unavailable: {_nvml_error_text(e)}"
            if msg != self._nvml_error:
                log.error("%s; will retry every %.1f s", msg, self.config.nvml_retry_s)
            self._nvml_error = msg
            self._mark_all_unhealthy(msg)
            return
        except OSError as e:
            msg = f"NVML unavailable: cannot load {self.config.nvml_library}: {e}"
            if msg != self._nvml_error:
                log.error("%s", msg)
            self._nvml_error = msg
            self._mark_all_unhealthy(msg)
            return
        if self._nvml_error:
            log.info("NVML initialised again after: %s", self._nvml_error)
        self._initialized = True
        self._reinit_pending = False
        self._rescan_pending = True
        self._nvml_error = ""

    @staticmethod
    def _load_library(path: str) -> None:
        if getattr(pynvml.nvmlLib, "_name", None) == path:
            return
        lib = ctypes.CDLL(path)
        with pynvml.libLoadLock:
            pynvml.nvmlLib = lib
            pynvml._nvmlGetFunctionPointer_cache.clear()

    def _shutdown_nvml(self) -> None:
        for u in self._units.values():
            self._free_samples(u)
        if self._initialized:
            # A dead driver cannot be shut down cleanly; re-init anyway.
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()
        self._initialized = False
        self._gpu_handles.clear()
        self._fingerprints.clear()

    @staticmethod
    def _free_samples(u: _Unit) -> None:
        for s in (u.prev_sample, u.spare_sample):
            if s is not None:
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlGpmSampleFree(s)
        u.prev_sample = u.spare_sample = None

    def _note_error(self, e: pynvml.NVMLError) -> None:
        if e.value in _SESSION_ERRORS:
            self._reinit_pending = True
            self._nvml_error = _nvml_error_text(e)

    def _mark_all_unhealthy(self, reason: str) -> None:
        for u in self._units.values():
            self._free_samples(u)
            u.healthy = False
            u.error = reason
            u.handle = u.parent_handle = None

    # ---------------------------------------------------------------- enumeration
    def _rescan(self) -> None:
        self._last_rescan = time.monotonic()
        self._rescan_pending = False
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as e:
            self._note_error(e)
            self._reinit_pending = True
            self._nvml_error = f"nvmlDeviceGetCount failed: {_nvml_error_text(e)}"
            self._mark_all_unhealthy(self._nvml_error)
            return
        found: dict[str, _Unit] = {}
        failed_gpus: dict[int, str] = {}
        self._gpu_handles.clear()
        self._fingerprints.clear()
        self._gpu_count = count
        for index in range(count):
            try:
                for u in self._enumerate_gpu(index):
                    found[u.uuid] = u
            except pynvml.NVMLError as e:
                self._note_error(e)
                failed_gpus[index] = _nvml_error_text(e)
                self._gpu_handles.pop(index, None)
        self._failed_gpus = set(failed_gpus)
        # Merge: keep state (stats, GPM samples) of units that survived, drop vanished ones,
        # keep the last known units of GPUs that failed to enumerate (lost), unhealthy.
        merged: dict[str, _Unit] = {}
        for uuid, new in found.items():
            old = self._units.get(uuid)
            if old is not None and old.static_key() == new.static_key() and old.handle is not None:
                old.handle, old.parent_handle = new.handle, new.parent_handle
                if not old.gpm_broken:
                    old.gpm, old.coarse = new.gpm, new.coarse
                merged[uuid] = old
            else:
                if old is not None:
                    self._free_samples(old)
                    new.stats = old.stats if old.static_key() == new.static_key() else {}
                    new.source = old.source
                merged[uuid] = new
        for uuid, old in self._units.items():
            if uuid in merged:
                continue
            if old.gpu_index in failed_gpus:
                self._free_samples(old)
                old.healthy = False
                old.error = failed_gpus[old.gpu_index]
                old.handle = old.parent_handle = None
                merged[uuid] = old
            else:
                self._free_samples(old)  # gone for good (re-partitioned away)
        for index, why in failed_gpus.items():
            if not any(u.gpu_index == index for u in merged.values()):
                self._warn_once(f"gpu{index}:{why}", "GPU %d failed before it was ever "
                                "enumerated (%s): it cannot be reported", index, why)
        self._units = dict(sorted(merged.items(), key=lambda kv: _unit_order(kv[1])))

    def _enumerate_gpu(self, index: int) -> list[_Unit]:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._gpu_handles[index] = h
        uuid = _s(pynvml.nvmlDeviceGetUUID(h))
        product = _s(pynvml.nvmlDeviceGetName(h))
        mem = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
        gpm = _optional(lambda: bool(pynvml.nvmlGpmQueryDeviceSupport(h).isSupportedDevice), False)
        mig_on = _optional(
            lambda: pynvml.nvmlDeviceGetMigMode(h)[0] == pynvml.NVML_DEVICE_MIG_ENABLE, False
        )
        sm_total = self._whole_gpu_sm_count(h, product)
        if not mig_on:
            self._fingerprints[index] = (False,)
            return [
                _Unit(uuid=uuid, parent_uuid=None, gpu_index=index, gi_id=None, mig_profile=None,
                      product=product, sm_count=sm_total, sm_share=1.0, bw_share=1.0,
                      memory_total=int(mem.total), handle=h, parent_handle=None, gpm=gpm,
                      coarse=not gpm)
            ]
        units = []
        slots = []
        for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                mh = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
            except pynvml.NVMLError_NotFound:
                continue  # MIG device indices have holes
            slots.append((slot, _s(pynvml.nvmlDeviceGetUUID(mh))))
            try:
                units.append(self._enumerate_mig(index, h, mh, uuid, product, mem.total, sm_total,
                                                 gpm))
            except pynvml.NVMLError as e:
                if e.value in _SESSION_ERRORS or e.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                    raise
                self._warn_once(f"mig{index}/{slot}:{e.value}",
                                "skipping MIG device %d/%d: %s", index, slot,
                                _nvml_error_text(e))
        self._fingerprints[index] = (True, tuple(slots))
        return units

    def _layout_changed(self) -> bool:
        """Cheap per-tick check (a few calls per GPU) for a re-partition, a MIG mode switch, a
        GPU appearing or coming back: MIG handles and GPU-instance ids are reused after a
        re-partition, so only the UUIDs behind the slots tell."""
        try:
            if pynvml.nvmlDeviceGetCount() != self._gpu_count:
                return True
        except pynvml.NVMLError as e:
            self._note_error(e)
            return True
        for index in self._failed_gpus:
            try:
                pynvml.nvmlDeviceGetHandleByIndex(index)
                return True  # a failed GPU answers again
            except pynvml.NVMLError as e:
                if e.value in _SESSION_ERRORS:
                    self._note_error(e)
                    return True
        for index, h in self._gpu_handles.items():
            try:
                if self._fingerprint(h) != self._fingerprints.get(index):
                    return True
            except pynvml.NVMLError as e:
                self._note_error(e)
                return True
        return False

    @staticmethod
    def _fingerprint(h: Any) -> tuple:
        mig_on = _optional(
            lambda: pynvml.nvmlDeviceGetMigMode(h)[0] == pynvml.NVML_DEVICE_MIG_ENABLE, False
        )
        if not mig_on:
            return (False,)
        slots = []
        for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                mh = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
            except pynvml.NVMLError_NotFound:
                continue
            slots.append((slot, _s(pynvml.nvmlDeviceGetUUID(mh))))
        return (True, tuple(slots))

    @staticmethod
    def _enumerate_mig(index, h, mh, parent_uuid, product, parent_mem, parent_sms, gpm) -> _Unit:
        uuid = _s(pynvml.nvmlDeviceGetUUID(mh))
        gi_id = pynvml.nvmlDeviceGetGpuInstanceId(mh)
        attrs = pynvml.nvmlDeviceGetAttributes(mh)
        mem = pynvml.nvmlDeviceGetMemoryInfo(mh, version=pynvml.nvmlMemory_v2)
        profile = unit_shape.mig_profile_name(
            attrs.gpuInstanceSliceCount, attrs.computeInstanceSliceCount, attrs.memorySizeMB,
            parent_mem,
        )
        sms = int(attrs.multiprocessorCount)
        return _Unit(
            uuid=uuid, parent_uuid=parent_uuid, gpu_index=index, gi_id=int(gi_id),
            mig_profile=profile, product=product, sm_count=sms,
            sm_share=sms / parent_sms if parent_sms else 0.0,
            bw_share=unit_shape.bandwidth_share(attrs.memorySizeMB, parent_mem),
            memory_total=int(mem.total) or int(attrs.memorySizeMB) * unit_shape.MIB,
            handle=mh, parent_handle=h, gpm=gpm, coarse=False,
        )

    @staticmethod
    def _whole_gpu_sm_count(h: Any, product: str) -> int:
        try:
            cores = pynvml.nvmlDeviceGetNumGpuCores(h)
            cc = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            sms = unit_shape.sm_count_from_cores(cores, tuple(cc))
            if sms:
                return sms
        except pynvml.NVMLError as e:
            if e.value in _SESSION_ERRORS or e.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise
        return unit_shape.sm_count_from_product(product) or 0

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

    # ---------------------------------------------------------------- publishing
    def _publish(self, tick_seconds: float) -> Snapshot:
        self._sequence += 1
        readings = tuple(self._reading(u) for u in self._units.values())
        key = tuple((r.uuid, r.parent_uuid, r.gpu_index, r.mig_profile, r.product, r.sm_count,
                     r.memory_total_bytes, r.healthy) for r in readings)
        changed = key != self._inventory_key
        if changed:
            self._inventory_key = key
            self._inventory_generation += 1
        snap = Snapshot(
            node=self.config.node,
            timestamp=self._clock(),
            sequence=self._sequence,
            interval_s=self.config.interval_s,
            units=readings,
            inventory_generation=self._inventory_generation,
            nvml_ok=self._initialized and not self._reinit_pending,
            nvml_error=self._nvml_error,
            tick_seconds=tick_seconds,
        )
        with self._cond:
            self._latest = snap
            self._cond.notify_all()
        for fn in list(self._listeners):
            try:
                fn(snap)
            except Exception:
                log.exception("snapshot listener failed")
        if changed:
            units = _inventory_units(snap)
            for fn in list(self._unit_listeners):
                try:
                    fn(snap.inventory_generation, units)
                except Exception:
                    log.exception("units listener failed")
        return snap

    def _reading(self, u: _Unit) -> UnitReading:
        metrics = {}
        if u.healthy:
            for name in METRICS:
                v = u.values.get(name)
                if v is None:
                    continue
                st = u.stats.get(name)
                metrics[name] = MetricReading(v, st.ewma if st else v, st.p95() if st else v)
        return UnitReading(
            uuid=u.uuid, parent_uuid=u.parent_uuid, gpu_index=u.gpu_index,
            mig_profile=u.mig_profile, gpu_instance_id=u.gi_id, product=u.product,
            sm_count=u.sm_count, sm_share=u.sm_share, bandwidth_share=u.bw_share,
            memory_total_bytes=u.memory_total, healthy=u.healthy, source=u.source,
            timestamp=u.timestamp, error=u.error,
            memory_used_bytes=u.memory_used if u.healthy else 0, **metrics,
        )

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)


def _inventory_units(snap: Snapshot) -> tuple[InventoryUnit, ...]:
    out = []
    for r in snap.units:
        if r.sm_count > 0 and r.memory_total_bytes > 0:
            out.append(r.inventory_unit())
    return tuple(out)


def _unit_order(u: _Unit) -> tuple:
    return (u.gpu_index, -1 if u.gi_id is None else u.gi_id, u.uuid)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _optional(fn: Callable[[], Any], default: Any) -> Any:
    """An optional capability: NOT_SUPPORTED / FUNCTION_NOT_FOUND mean "no", never fatal."""
    try:
        return fn()
    except pynvml.NVMLError as e:
        if e.value in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
            return default
        raise
