"""The struct-of-arrays storage under `ClusterView` (policies/cluster_view.py): which
per-unit arrays exist with their dtypes and defaults, and how rows are allocated, grown,
cleared and stamped. Kept apart from the view's event handling so the layout is read in one
place; `ClusterView` inherits `ViewStorageMixin`, whose state its `__init__` creates."""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.model import UnitType

_FLOAT_FIELDS = (
    "mem_cap",
    "tel_t",
    "tel_sm",
    "tel_bw",
    "tel_mem",
    "decl_sm",
    "decl_bw",
    "decl_mem",
    "recent_sm",
    "recent_bw",
    "recent_mem",
    "eff_sm",
    "eff_bw",
    "eff_mem",
    "tol_x",
    "tol_y",
    "burst_sm",
    "time_sum",
    "decode_caps",
    "typical_sm",
    "gpu_mem",
    "gpu_unit_mem",  # the largest unit of the unit's physical GPU (MIG: its biggest slice)
)
_INT_FIELDS = ("type_id", "npods", "index", "gpu_pods")
_BOOL_FIELDS = ("active", "healthy", "tel_tensor", "mps")
_DEFAULTS = {"tel_t": -np.inf, "tol_x": np.inf, "tol_y": np.inf, "mem_cap": 1.0}

Slot = tuple[int, int]  # (column j, row)


class ViewStorageMixin:
    """Row storage of `ClusterView`: array allocation, growth, row reuse, epoch stamps, scratch
    buffers and unit-type ids. The attributes it uses are created by `ClusterView.__init__`."""

    # -- storage ---------------------------------------------------------------------------
    def _new_array(self, f: str, rows: int) -> np.ndarray:
        if f in _INT_FIELDS:
            dtype: Any = np.intp
        elif f in _BOOL_FIELDS:
            dtype = bool
        else:
            dtype = np.float64
        arr = np.zeros((self.K, rows), dtype=dtype)
        if f in _DEFAULTS:
            arr[:] = _DEFAULTS[f]
        return arr

    def _grow_rows(self) -> None:
        new = self._rows_cap * 2
        for f in (*_FLOAT_FIELDS, *_INT_FIELDS, *_BOOL_FIELDS):
            old = getattr(self, f)
            arr = self._new_array(f, new)
            arr[:, : self._rows_cap] = old
            setattr(self, f, arr)
        rn = np.full(new, -1, dtype=np.intp)
        rn[: self._rows_cap] = self.row_node
        self.row_node = rn
        rp = np.zeros(new, dtype=bool)
        rp[: self._rows_cap] = self.row_primary
        self.row_primary = rp
        rs = np.zeros(new, dtype=np.int64)
        rs[: self._rows_cap] = self.row_stamp
        self.row_stamp = rs
        self._rows_cap = new
        self._scratch.clear()

    def _alloc_row(self, node_id: int, primary: bool) -> int:
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            if self._rows == self._rows_cap:
                self._grow_rows()
            row = self._rows
            self._rows += 1
        self.row_node[row] = node_id
        self.row_primary[row] = primary
        self._touch(row)
        return row

    def _clear_row(self, row: int) -> None:
        for f in (*_FLOAT_FIELDS, *_INT_FIELDS, *_BOOL_FIELDS):
            getattr(self, f)[:, row] = _DEFAULTS.get(f, 0)
        self.row_node[row] = -1
        self.row_primary[row] = False
        self._touch(row)

    def _touch(self, row: int) -> None:
        self.epoch += 1
        self.row_stamp[row] = self.epoch

    def scratch(self, name: str, dtype: Any = np.float64) -> np.ndarray:
        """A reusable (K, rows) work buffer: decisions write temporaries here instead of
        allocating (allocating 300 kB arrays per decision costs page faults)."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape[1] != self._rows or buf.dtype != dtype:
            buf = np.empty((self.K, self._rows), dtype=dtype)
            self._scratch[name] = buf
        return buf

    def _type_id(self, t: UnitType) -> int:
        tid = self._type_index.get(t)
        if tid is None:
            tid = len(self.types)
            self.types.append(t)
            self._type_index[t] = tid
        return tid
