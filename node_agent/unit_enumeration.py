"""Enumeration of the node's units: whole GPUs and MIG GPU instances with their shape (SMs,
memory, bandwidth share, MIG profile), the merge that keeps surviving units' state across a
rescan, and the cheap per-tick check for a re-partition or a GPU that changed.

Split out of sampler.py; `UnitEnumerationMixin` is only ever used as a base of `Sampler`, which
provides the attributes declared below, `_note_error`, `_warn_once`, `_mark_all_unhealthy`
and `_free_samples`."""

from __future__ import annotations

import time
from typing import Any

import pynvml

from node_agent import unit_shape
from node_agent.nvml_errors import _SESSION_ERRORS, _nvml_error_text, _optional
from node_agent.sampler_state import _Unit


class UnitEnumerationMixin:
    """GPU and MIG instance enumeration of `Sampler` (see the module docstring)."""

    # provided by Sampler.__init__
    _units: dict[str, _Unit]
    _gpu_handles: dict[int, Any]
    _fingerprints: dict[int, tuple]
    _gpu_count: int
    _failed_gpus: set[int]
    _reinit_pending: bool
    _rescan_pending: bool
    _last_rescan: float
    _nvml_error: str

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


def _unit_order(u: _Unit) -> tuple:
    return (u.gpu_index, -1 if u.gi_id is None else u.gi_id, u.uuid)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
