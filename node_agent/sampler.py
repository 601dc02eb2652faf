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
that suggests it changed (a MIG handle or GPU instance that disappeared).

`Sampler` is assembled from mixins, one module each: nvml_session.py (init, shutdown, re-init),
unit_enumeration.py (GPUs, MIG instances, layout changes), unit_reading.py (the per-tick reads
and the coarse fallback), gpm_metrics.py (GPM samples and their diff); the records they share
live in sampler_state.py and the NVML error classes in nvml_errors.py. Everything they define
stays importable from here."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

# The names the split moved out stay importable from here, as before it (`noqa: F401`: those
# only re-exported, for node_agent/, bench/ and tests/).
from node_agent.gpm_metrics import (  # noqa: F401
    GPM_METRIC_IDS,
    GPM_MIN_GAP_S,
    GpmSamplingMixin,
    _GpmMetricView,
    _new_metrics_get,
)
from node_agent.nvml_errors import (  # noqa: F401
    _LAYOUT_ERRORS,
    _SESSION_ERRORS,
    _nvml_error_text,
    _optional,
)
from node_agent.nvml_session import NvmlSessionMixin
from node_agent.readings import METRICS, MetricReading, Snapshot, UnitReading
from node_agent.sampler_state import MIN_INTERVAL_S, SamplerConfig, _Unit  # noqa: F401
from node_agent.unit_enumeration import UnitEnumerationMixin, _s, _unit_order  # noqa: F401
from node_agent.unit_reading import UnitReadingMixin
from policies.inventory import Inventory, InventoryUnit

log = logging.getLogger("copack.agent.sampler")


class Sampler(NvmlSessionMixin, UnitEnumerationMixin, UnitReadingMixin, GpmSamplingMixin):
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
