"""The rebalancer's Prometheus metrics (its own registry) and its small HTTP server:
/metrics, /healthz, /explain/{namespace}/{pod} (JSON: why the pod was evicted, or why its GPU
was kept). A stdlib server with TCP_NODELAY (FACTS #6): three read-only paths need no framework."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

OUTCOMES = ("evicted", "refused", "failed", "dry_run")


class RebalancerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.evictions = Counter("copack_rebalancer_evictions", "Evictions by outcome "
                                 "(refused: a PodDisruptionBudget said no, HTTP 429)",
                                 ["outcome"], registry=r)
        for o in OUTCOMES:
            self.evictions.labels(o)
        self.gpus_freed = Counter("copack_rebalancer_gpus_freed", "GPUs emptied by the "
                                  "rebalancer (seen empty after its evictions)", registry=r)
        self.rounds = Counter("copack_rebalancer_rounds", "Planning rounds", registry=r)
        self.gpus_kept = Counter("copack_rebalancer_gpus_kept", "GPUs in use considered and "
                                 "left as they are (budget, or their pods fit nowhere else)",
                                 registry=r)
        self.budget_left = Gauge("copack_rebalancer_budget_left", "Evictions a workload may "
                                 "still take this minute", ["workload"], registry=r)
        self.draining = Gauge("copack_rebalancer_draining_gpus", "GPUs marked draining now",
                              registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_EXPLAIN = re.compile(r"^/explain/([^/]+)/([^/]+)$")


class MetricsServer:
    """Serves the metrics, the health answer and the explanations on `host:port`."""

    def __init__(
        self,
        metrics: RebalancerMetrics,
        explain: Callable[[str], dict[str, Any] | None],
        healthy: Callable[[], tuple[bool, dict[str, Any]]],
        host: str = "0.0.0.0",
        port: int = 9402,
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer._get(self)

        self.metrics, self._explain, self._healthy = metrics, explain, healthy
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="copack-rebalancer-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0].rstrip("/")
        if path == "/metrics":
            return _send(h, 200, self.metrics.render(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            ok, body = self._healthy()
            return _send(h, 200 if ok else 503, orjson.dumps(body), "application/json")
        m = _EXPLAIN.match(path)
        if m:
            key = f"{unquote(m[1])}/{unquote(m[2])}"
            entry = self._explain(key)
            if entry is None:
                body = {"Error": f"the rebalancer has not evicted or considered {key}"}
                return _send(h, 404, orjson.dumps(body), "application/json")
            return _send(h, 200, orjson.dumps(entry), "application/json")
        _send(h, 404, orjson.dumps({"Error": f"no such path: {path}"}), "application/json")


def _send(h: BaseHTTPRequestHandler, code: int, data: bytes, ctype: str) -> None:
    h.send_response(code)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
