"""How the sampler sorts and words NVML errors: those that mean the whole NVML session is gone,
those that mean a MIG layout may have changed, and optional capabilities whose absence is a "no".

Split out of sampler.py so that its parts (nvml_session.py, unit_enumeration.py,
unit_reading.py) share these without importing sampler.py, which is built from them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pynvml

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


def _nvml_error_text(e: pynvml.NVMLError) -> str:
    try:
        return f"NVML error {e.value}: {e}"
    except Exception:  # str() calls back into the library, which may be gone
        return f"NVML error {getattr(e, 'value', '?')}"


def _optional(fn: Callable[[], Any], default: Any) -> Any:
    """An optional capability: NOT_SUPPORTED / FUNCTION_NOT_FOUND mean "no", never fatal."""
    try:
        return fn()
    except pynvml.NVMLError as e:
        if e.value in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
            return default
        raise
