"""Where the extender's request time goes: py-spy samples the bench server while one client
schedules pods (filter, then prioritize), and every sample is put in one bucket of the request
path (JSON decode, name resolution, the decision, failure reasons, the answer's encoding, the
ASGI stack, ...).

Uses `bench/extender_latency.py`'s cluster and server. py-spy attaches to the server by pid, so
it needs ptrace rights (root, or kernel.yama.ptrace_scope=0).

    .venv/bin/python bench/extender_profile.py [--nodes 5000] [--pods 800] [--rate 1000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import extender_latency as bench

# Innermost frame first: the first function of a sample found here names its bucket.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("JSON decode + checks", ("parse_extender_args", "_loads", "_pod_identity", "parse_args")),
    ("body read", ("_read_body", "_body")),
    ("name resolution", ("_resolve", "rows_of")),
    ("pod request (annotations, cache)", ("Scheduler._request", "pod_request",
                                          "requests_gpu")),
    ("failure reasons", ("Decision.failed_nodes", "Scheduler._split_failures", "failures")),
    ("decision results (feasible, scores)", ("Decision.feasible_nodes", "Decision.scores",
                                             "Decision.node_score", "Decision._feasible_mask")),
    ("decision (policies)", ("decide", "type_table", "FeasibilityCache", "fast_decide")),
    ("answer encoding", ("filter_result", "priority_result", "encode_", "Encoder")),
    ("bookkeeping (explain, metrics)", ("_explain_filter", "record_explanation", "_remember",
                                        "ExtenderMetrics.observe")),
    ("verb handler (other)", ("Scheduler.filter", "Scheduler.prioritize")),
]
ASGI = "HTTP + ASGI stack (uvicorn, starlette/fastapi, asyncio)"


def _bucket(stack: str) -> str | None:
    frames = stack.split(";")
    if not any("Server.run" in f or "asyncio" in f for f in frames):
        return None  # not the serving thread (state build, spawn bootstrap)
    if any(f.startswith("noop ") for f in frames):
        return None
    for i in range(len(frames) - 1, -1, -1):
        name = frames[i].split(" (", 1)[0]
        if name == "<listcomp>" and frames[i - 1].startswith("Scheduler.prioritize "):
            return "answer encoding"  # the HostPriorityList built inline
        for label, keys in BUCKETS:
            if any(name == k or name.endswith("." + k) or name.startswith(k) for k in keys):
                return label
    return ASGI


def classify(raw: Path) -> Counter[str]:
    out: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        label = _bucket(stack)
        if label is not None:
            out[label] += int(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--pods", type=int, default=800)
    ap.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    a = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        sys.exit("error: py-spy not found (pip install py-spy)")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=bench._serve, args=(a.nodes, q), daemon=True)
    proc.start()
    try:
        port, *_ = q.get(timeout=900)
        conn = bench.Conn(port)
        all_names = [f"node-{i:05d}" for i in range(a.nodes)]
        small = min(500, a.nodes)

        def window(j: int) -> list[str]:
            s = (j * 389) % a.nodes
            return [all_names[(s + k) % a.nodes] for k in range(small)]

        cases = [(f"{small} names", window), (f"{a.nodes} names", lambda j: all_names)]
        for label, names_for in cases:
            pods = bench._pods(a.pods + 50)
            for j, pod in enumerate(pods[:50]):  # warm-up, not sampled
                bench._pair(conn, pod, names_for(j), noop=False)
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "raw.txt"
                sp = subprocess.Popen(
                    [spy, "record", "--pid", str(proc.pid), "-r", str(a.rate), "-f", "raw",
                     "-o", str(raw), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)  # py-spy attaches
                t0 = time.perf_counter()
                for j, pod in enumerate(pods[50:]):
                    bench._pair(conn, pod, names_for(j), noop=False)
                wall = time.perf_counter() - t0
                sp.send_signal(signal.SIGINT)
                sp.wait(30)
                counts = classify(raw)
            total = sum(counts.values()) or 1
            n = len(pods) - 50
            print(f"\n{label}: {n} pods, {n / wall:.0f} pods/s, {total} samples in the "
                  f"serving thread over {wall:.1f} s ({os.getloadavg()[0]:.1f} load)")
            print(f"  {'bucket':<58} {'share':>6} {'ms/pod':>7}")
            for lbl, c in counts.most_common():
                ms = c / a.rate / n * 1e3
                print(f"  {lbl:<58} {c / total:6.1%} {ms:7.3f}")
    finally:
        proc.terminate()
        proc.join(10)


if __name__ == "__main__":
    main()
