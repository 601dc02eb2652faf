"""The Azure LLM inference traces (Splitwise, 2023) that drive the simulator's services.

Each service replays one trace, optionally time-scaled, shifted and superposed with copies of
itself to reach a target rate, so several services see real burstiness without all peaking in
the same second. Traces are read once per process and kept as numpy arrays.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "COPACK_DATA_DIR"
TRACE_FILES: dict[str, str] = {
    "code": "azure_llm_2023_code.csv",
    "conv": "azure_llm_2023_conv.csv",
}
_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(ValueError):
    """A trace that cannot be found or read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Trace:
    """Requests of one trace: arrival seconds from its first request, prompt and output tokens."""

    name: str
    arrival_s: np.ndarray  # float64, sorted, starting at 0
    prompt_tokens: np.ndarray  # int64, >= 1
    output_tokens: np.ndarray  # int64, >= 1

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self.arrival_s) else 0.0

    def __len__(self) -> int:
        return len(self.arrival_s)


def data_dir() -> Path:
    """`$COPACK_DATA_DIR`, else `../shared/data` relative to the repository root."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parent.parent
    return (repo_root / ".." / "shared" / "data").resolve()


def trace_path(name: str) -> Path:
    if name in TRACE_FILES:
        return data_dir() / TRACE_FILES[name]
    return Path(name)


@functools.lru_cache(maxsize=16)
def load_trace(name: str) -> Trace:
    """Load a trace by short name (`code`, `conv`) or by path to a CSV with the Azure columns."""
    path = trace_path(name)
    if not path.is_file():
        hint = f" (set {DATA_DIR_ENV} to the folder holding {TRACE_FILES[name]})" if (
            name in TRACE_FILES
        ) else ""
        raise TraceError(f"trace {name!r}: file {path} not found{hint}")
    stamps: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:3]) != _COLUMNS:
            raise TraceError(f"trace {path}: header must be {','.join(_COLUMNS)}, got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                stamp = dt.datetime.fromisoformat(row[0].strip()[:26])
                prompt, output = int(row[1]), int(row[2])
            except (ValueError, IndexError) as e:
                raise TraceError(f"trace {path}, line {lineno}: {e}") from None
            stamps.append(stamp.replace(tzinfo=dt.UTC).timestamp())
            prompts.append(max(prompt, 1))
            outputs.append(max(output, 1))
    if not stamps:
        raise TraceError(f"trace {path}: no requests")
    t = np.asarray(stamps, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    return Trace(
        name=name,
        arrival_s=t,
        prompt_tokens=np.asarray(prompts, dtype=np.int64)[order],
        output_tokens=np.asarray(outputs, dtype=np.int64)[order],
    )


def replay(
    trace: Trace,
    *,
    duration_s: float,
    rate: float = 1.0,
    time_scale: float = 1.0,
    offset_s: float = 0.0,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Requests of `trace` over `[0, duration_s)`, looping it as needed.

    `time_scale` > 1 plays the trace faster (more requests per second, same shape compressed);
    `offset_s` starts the replay that far into the trace; `rate` superposes `floor(rate)` copies
    shifted by random offsets plus a thinned fractional copy, multiplying the arrival rate while
    keeping each copy's burst structure and length distributions.
    """
    if duration_s <= 0:
        raise ValueError("duration_s must be positive")
    period = trace.duration_s + float(np.mean(np.diff(trace.arrival_s))) if len(trace) > 1 else 1.0
    copies = int(np.floor(rate))
    frac = rate - copies
    parts_t: list[np.ndarray] = []
    parts_p: list[np.ndarray] = []
    parts_o: list[np.ndarray] = []
    n_copies = copies + (1 if frac > 1e-9 else 0)
    for c in range(n_copies):
        shift = offset_s if c == 0 else offset_s + float(rng.uniform(0.0, period))
        # Trace time needed to cover the window, looping the trace end to end.
        span = duration_s * time_scale
        loops = int(np.ceil((span + shift % period) / period)) + 1
        base = (shift % period)
        t_all = (trace.arrival_s[None, :] + period * np.arange(loops)[:, None]).ravel() - base
        idx = np.tile(np.arange(len(trace)), loops)
        keep = (t_all >= 0.0) & (t_all < span)
        if c == copies:  # the fractional copy
            keep &= rng.random(len(keep)) < frac
        parts_t.append(t_all[keep] / time_scale)
        parts_p.append(trace.prompt_tokens[idx[keep]])
        parts_o.append(trace.output_tokens[idx[keep]])
    t = np.concatenate(parts_t) if parts_t else np.zeros(0)
    p = np.concatenate(parts_p) if parts_p else np.zeros(0, dtype=np.int64)
    o = np.concatenate(parts_o) if parts_o else np.zeros(0, dtype=np.int64)
    order = np.argsort(t, kind="stable")
    return t[order], p[order], o[order]
