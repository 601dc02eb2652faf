"""The traces that drive the simulator's services: the bundled Azure LLM inference traces
(Splitwise, 2023) or a user's own file in the same shape (CSV or JSON lines).

Each service replays one trace, optionally time-scaled, shifted and superposed with copies of
itself to reach a target rate, so several services see real burstiness without all peaking in
the same second. Traces are read once per process and kept as numpy arrays.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from workloads.data import DATA_DIR_ENV, TRACE_FILES, trace_file
from workloads.trace import TraceError, load_trace_file

__all__ = ["DATA_DIR_ENV", "TRACE_FILES", "Trace", "TraceError", "load_trace", "replay"]


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


@functools.lru_cache(maxsize=16)
def load_trace(name: str) -> Trace:
    """A bundled trace by short name (`code`, `conv`), or a trace file by path (an Azure-style
    CSV or JSON lines, see workloads.trace.load_trace_file)."""
    path = trace_file(name)
    if name in TRACE_FILES and not path.is_file():
        raise TraceError(
            f"trace {name!r}: file {path} not found ({DATA_DIR_ENV} points at a folder without "
            f"{TRACE_FILES[name]}; unset it to use the bundled traces)"
        )
    if not path.is_file():
        raise TraceError(f"trace {name!r}: file {path} not found")
    reqs = load_trace_file(path)
    return Trace(
        name=name,
        arrival_s=np.fromiter((r.at_s for r in reqs), dtype=np.float64, count=len(reqs)),
        prompt_tokens=np.fromiter((r.prompt_tokens for r in reqs), dtype=np.int64, count=len(reqs)),
        output_tokens=np.fromiter((r.output_tokens for r in reqs), dtype=np.int64, count=len(reqs)),
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
