"""`copack workload wait-idle`: a vLLM server pod's preStop hook.

The kubelet runs the hook when the pod is deleted and sends SIGTERM only once it returns, so the
server keeps serving while the hook waits. It returns when the server has held no request
(`vllm:num_requests_running` + `vllm:num_requests_waiting` on its /metrics) for `idle_s` in a
row, or at once when the server does not answer (nothing left to drain). `idle_s` must be
longer than the proxy's discovery interval: a backend the proxy has not dropped yet may still
get a request. A prefill pod handed over by the proxy (workloads/discovery.py) keeps getting
requests until its replacement is Ready, so its hook returns only after that; a pod scaled
down is dropped by the proxy at once and returns `idle_s` after its last request.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

BUSY_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
# Longer than the proxy's 5 s discovery interval: no request arrives after the hook returns.
DEFAULT_IDLE_S = 15.0


def requests_held(metrics_text: str) -> float:
    """Running + waiting requests in a /metrics page (summed over its label sets)."""
    total = 0.0
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name in BUSY_GAUGES:
            total += sum(s.value for s in fam.samples if s.name == fam.name)
    return total


def _scrape(url: str, timeout_s: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_idle(
    url: str,
    idle_s: float,
    poll_s: float = 1.0,
    max_s: float = float("inf"),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Block until the server at `url` (its /metrics) has been idle `idle_s`; the reason."""
    start = clock()
    idle_since: float | None = None
    while True:
        now = clock()
        if now - start >= max_s:
            return f"gave up after {max_s:g} s"
        text = _scrape(url, timeout_s=max(poll_s, 1.0))
        if text is None:
            return "the server does not answer: nothing to drain"
        try:
            held = requests_held(text)
        except ValueError:
            return "the server's /metrics does not parse: nothing to wait for"
        if held > 0:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= idle_s:
            return f"idle for {idle_s:g} s"
        sleep(poll_s)
