"""The NVML session: loading the library (a given file or the system's), nvmlInit with retries,
nvmlShutdown, and noting the errors after which the session must be re-opened.

Split out of sampler.py; `NvmlSessionMixin` is only ever used as a base of `Sampler`, which
provides the attributes declared below and `_free_samples`."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import time
from typing import Any

import pynvml

from node_agent.nvml_errors import _SESSION_ERRORS, _nvml_error_text
from node_agent.sampler_state import SamplerConfig, _Unit

# The sampler's logger, as before the split.
log = logging.getLogger("copack.agent.sampler")


class NvmlSessionMixin:
    """NVML session handling of `Sampler` (see the module docstring)."""

    # provided by Sampler.__init__
    config: SamplerConfig
    _units: dict[str, _Unit]
    _gpu_handles: dict[int, Any]
    _fingerprints: dict[int, tuple]
    _initialized: bool
    _nvml_error: str
    _reinit_pending: bool
    _rescan_pending: bool
    _last_init_try: float

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
