"""bench/extender_latency.py --quick end to end (server process, loopback HTTP, the no-op), and
the serving-thread CPU counter its worker capacity divides by."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import extender_latency as bench  # noqa: E402


def test_serving_cpu_counts_only_its_thread():
    """The counter follows the main thread's CPU and ignores another thread's spinning: the
    worker capacity must not charge the telemetry feed's CPU to the verbs twice."""
    read = bench._serving_cpu(os.getpid())
    assert threading.current_thread() is threading.main_thread()
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    c0, p0 = read(), bench._process_cpu(os.getpid())
    t = threading.Thread(target=spin)
    t.start()
    stop.wait(0.3)  # the main thread sleeps while the other one runs
    stop.set()
    t.join()
    c1, p1 = read(), bench._process_cpu(os.getpid())
    assert c1 - c0 < 0.05
    assert p1 - p0 > 0.05
    c2 = read()
    x = 0
    while read() - c2 < 0.05:
        x += 1
    assert read() - c2 >= 0.05


@pytest.mark.slow
def test_quick_run_prints_both_throughputs():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "extender_latency.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.startswith("500 names ")]
    assert {r[2] for r in rows} == {"extender", "no-op"}
    for r in rows:
        cpu_ms, worker = float(r[-2]), float(r[-1])
        assert 0 < cpu_ms < 1000 and worker > 0
    assert re.search(r"one worker's capacity (met|MISSED) \(\d+\)", res.stdout)
