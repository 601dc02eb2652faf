"""NIXL's UCX progress thread on a CPU-only host: find it and leave it only idle CPU.

nixl 1.5's Python API (`nixl_agent.__init__`) sets `pthrDelay = 0` for the UCX backend's shared
progress thread, so it polls its worker without sleeping and burns a whole core from the
moment the agent exists, transfer or not; vLLM's NixlConnector has no option for it. Measured
on the 2-core dev box: each server's worker process holds one thread at 100 % of a core while
the server is idle. With two servers that is both cores, and the API servers, the proxy and
the load generator starve: connect timeouts, TTFT 10-60 s for 20 small requests, and a CI run
whose replay ran into its 300 s timeout.

The end-to-end test moves those threads to SCHED_IDLE once both servers are up and idle: they
still progress transfers whenever a core is free, and nothing else waits behind them
(measured on the 2-core box, the 20-request replay: TTFT p50 29.6 s -> 8.7 s, p99 30.0 s ->
10.6 s, the whole e2e module 180 s -> 110 s). On a GPU node the thread costs one core
of the pod's CPU, which docs/workloads.md tells operators to budget for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")


def _descendants(roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _thread_ticks(pids: Iterable[int]) -> dict[tuple[int, int], int]:
    """utime + stime of every thread but each process's main thread (vLLM computes there)."""
    out: dict[tuple[int, int], int] = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(PROC / str(pid) / "task")]
        except OSError:
            continue
        for tid in tids:
            if tid == pid:
                continue
            try:
                fields = (PROC / str(pid) / "task" / str(tid) / "stat").read_text()
            except OSError:
                continue
            rest = fields.rsplit(")", 1)[1].split()
            out[(pid, tid)] = int(rest[11]) + int(rest[12])
    return out


def demote_idle_spinners(
    roots: Iterable[int], *, window_s: float = 1.0, windows: int = 2, busy: float = 0.8
) -> list[int]:
    """Threads under `roots` that used more than `busy` of a core in each of `windows`
    consecutive windows (while the servers are idle: a compute thread or a queue's short
    busy-wait does not last that long), set to SCHED_IDLE. Returns their thread ids."""
    hz = os.sysconf("SC_CLK_TCK")
    pids = _descendants(roots)
    candidates: set[tuple[int, int]] | None = None
    before = _thread_ticks(pids)
    for _ in range(windows):
        time.sleep(window_s)
        after = _thread_ticks(pids)
        hot = {k for k, t in after.items() if k in before and t - before[k] > busy * hz * window_s}
        candidates = hot if candidates is None else candidates & hot
        before = after
    demoted = []
    for _, tid in sorted(candidates or ()):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            continue  # gone, or not ours
        demoted.append(tid)
    return demoted
