"""The preStop hook `copack workload wait-idle` against a real HTTP server on loopback serving a
vLLM-shaped /metrics page."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from workloads.cli import workload_app
from workloads.idle_wait import requests_held, wait_idle


def page(running: float, waiting: float) -> str:
    return (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}\n'
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}\n'
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
        "# TYPE vllm:prompt_tokens_total counter\n"
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0\n'
    )


class Metrics:
    """A /metrics server whose page the test sets."""

    def __init__(self) -> None:
        self.text = page(0, 0)
        self.reads = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.reads += 1
                body = outer.text.encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metrics():
    m = Metrics()
    yield m
    m.close()


def test_requests_held_sums_running_and_waiting() -> None:
    assert requests_held(page(3, 2)) == 5
    assert requests_held(page(0, 0)) == 0
    assert requests_held("# nothing here\n") == 0


def test_waits_while_busy_and_returns_once_idle(metrics: Metrics) -> None:
    metrics.text = page(2, 1)
    t0 = time.monotonic()
    done: list[str] = []
    th = threading.Thread(target=lambda: done.append(wait_idle(metrics.url, 0.3, poll_s=0.05)))
    th.start()
    time.sleep(0.6)
    assert not done, "returned while the server still held requests"
    metrics.text = page(0, 0)
    th.join(5)
    assert done and done[0].startswith("idle")
    assert time.monotonic() - t0 >= 0.9  # 0.6 busy + 0.3 idle
    assert metrics.reads >= 10


def test_a_request_in_the_idle_window_restarts_it(metrics: Metrics) -> None:
    def flip() -> None:
        time.sleep(0.2)
        metrics.text = page(1, 0)
        time.sleep(0.2)
        metrics.text = page(0, 0)

    threading.Thread(target=flip).start()
    t0 = time.monotonic()
    assert wait_idle(metrics.url, 0.4, poll_s=0.05).startswith("idle")
    assert time.monotonic() - t0 >= 0.8  # 0.4 until the request ended, then 0.4 idle


def test_no_server_means_nothing_to_drain() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "does not answer" in wait_idle(f"http://127.0.0.1:{port}/metrics", 30.0)


def test_max_s_bounds_the_wait(metrics: Metrics) -> None:
    metrics.text = page(1, 0)
    assert wait_idle(metrics.url, 0.1, poll_s=0.05, max_s=0.3).startswith("gave up")


def test_garbage_metrics_do_not_hang_the_hook(metrics: Metrics) -> None:
    metrics.text = "vllm:num_requests_running{ 3\n"
    assert "does not parse" in wait_idle(metrics.url, 10.0, poll_s=0.05)


def test_cli(metrics: Metrics) -> None:
    port = metrics.server.server_address[1]
    r = CliRunner().invoke(workload_app, ["wait-idle", "--port", str(port), "--idle", "0.2",
                                          "--poll", "0.05"])
    assert r.exit_code == 0, r.output
    assert "idle for" in r.output
    bad = CliRunner().invoke(workload_app, ["wait-idle", "--poll", "0"])
    assert bad.exit_code != 0 and "--poll" in bad.output
