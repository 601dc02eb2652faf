"""Prometheus `/metrics` for the agent (DESIGN.md, "Agent metrics").

One series per unit for each activity ratio, memory and health, labelled
node/gpu/uuid/mig_profile/gpu_instance_id/source. Pods are attached without breaking the
one-series-per-unit contract: `copack_gpu_unit_pod_info{<unit labels>, namespace, pod,
container} 1` is a separate info series per (unit, container) holding it, joined in PromQL:

    copack_gpu_sm_active_ratio * on(uuid) group_left(namespace, pod, container)
      copack_gpu_unit_pod_info

An unhealthy unit exports only `copack_gpu_healthy 0` (with its last known source), never
stale activity values; a coarse unit has no tensor/occupancy series. The collector renders the
sampler's latest snapshot at scrape time, so a scrape costs nothing between scrapes."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from node_agent.readings import Snapshot, UnitReading
from node_agent.telemetry_service import Broadcaster

log = logging.getLogger("copack.agent.metrics")

UNIT_LABELS = ("node", "gpu", "uuid", "mig_profile", "gpu_instance_id", "source")
POD_LABELS = ("namespace", "pod", "container")

_RATIOS = (
    ("copack_gpu_sm_active_ratio", "sm_active",
     "Fraction of time SMs had a warp resident (GPM SM_UTIL, or utilization.gpu on coarse)."),
    ("copack_gpu_dram_bw_active_ratio", "dram_bw_active",
     "Fraction of peak DRAM bandwidth used (GPM DRAM_BW_UTIL, or utilization.memory on coarse)."),
    ("copack_gpu_tensor_active_ratio", "tensor_active",
     "Fraction of time any tensor pipe was active (GPM ANY_TENSOR_UTIL); absent on coarse."),
    ("copack_gpu_sm_occupancy_ratio", "sm_occupancy",
     "Resident warps over the theoretical maximum (GPM SM_OCCUPANCY); absent on coarse."),
)


def unit_labels(node: str, u: UnitReading) -> list[str]:
    return [
        node,
        str(u.gpu_index),
        u.uuid,
        u.mig_profile or "",
        "" if u.gpu_instance_id is None else str(u.gpu_instance_id),
        u.source,
    ]


class AgentCollector:
    """prometheus_client collector over the latest snapshot and pod attribution."""

    def __init__(
        self,
        latest: Callable[[], Snapshot | None],
        pods_by_unit: Callable[[], dict[str, list[tuple[str, str, str]]]] = dict,
        broadcaster: Broadcaster | None = None,
    ) -> None:
        self._latest = latest
        self._pods = pods_by_unit
        self._broadcaster = broadcaster

    def collect(self) -> Iterator[Metric]:
        snap = self._latest()
        ratios = {
            attr: GaugeMetricFamily(name, doc, labels=UNIT_LABELS) for name, attr, doc in _RATIOS
        }
        used = GaugeMetricFamily("copack_gpu_memory_used_bytes",
                                 "Memory used on the unit (NVML v2: driver-reserved excluded).",
                                 labels=UNIT_LABELS)
        total = GaugeMetricFamily("copack_gpu_memory_total_bytes", "Memory of the unit.",
                                  labels=UNIT_LABELS)
        healthy = GaugeMetricFamily("copack_gpu_healthy",
                                    "1 while the unit answers NVML, 0 once it failed.",
                                    labels=UNIT_LABELS)
        pod_info = GaugeMetricFamily("copack_gpu_unit_pod_info",
                                     "A container holding the unit (kubelet pod-resources).",
                                     labels=UNIT_LABELS + POD_LABELS)
        up = GaugeMetricFamily("copack_agent_nvml_up", "1 while the NVML session works.",
                               labels=("node",))
        ticks = CounterMetricFamily("copack_agent_ticks", "Sampling ticks run.", labels=("node",))
        tick_s = GaugeMetricFamily("copack_agent_tick_seconds",
                                   "Wall time the last sampling tick took.", labels=("node",))
        if snap is not None:
            pods = self._pods() or {}
            for u in snap.units:
                labels = unit_labels(snap.node, u)
                healthy.add_metric(labels, 1.0 if u.healthy else 0.0)
                if not u.healthy:
                    continue
                total.add_metric(labels, float(u.memory_total_bytes))
                used.add_metric(labels, float(u.memory_used_bytes))
                for attr, fam in ratios.items():
                    m = getattr(u, attr)
                    if m.value is not None:
                        fam.add_metric(labels, m.value)
                for ns, pod, container in pods.get(u.uuid, ()):
                    pod_info.add_metric([*labels, ns, pod, container], 1.0)
            up.add_metric([snap.node], 1.0 if snap.nvml_ok else 0.0)
            ticks.add_metric([snap.node], float(snap.sequence))
            tick_s.add_metric([snap.node], snap.tick_seconds)
        yield from ratios.values()
        yield from (used, total, healthy, pod_info, up, ticks, tick_s)
        if self._broadcaster is not None:
            subs = GaugeMetricFamily("copack_agent_watch_subscribers",
                                     "Open gRPC Watch streams.")
            subs.add_metric([], float(self._broadcaster.subscribers))
            dropped = CounterMetricFamily("copack_agent_watch_dropped",
                                          "Snapshots dropped for Watch subscribers that fell "
                                          "behind (oldest first).")
            dropped.add_metric([], float(self._broadcaster.dropped_total))
            yield subs
            yield dropped


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry

    def setup(self) -> None:
        super().setup()
        # Without TCP_NODELAY, headers and body in two writes wait ~40 ms for a delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = generate_latest(self.registry)
            ctype = CONTENT_TYPE_LATEST
            code = 200
        elif path in ("/healthz", "/readyz"):
            body, ctype, code = b"ok\n", "text/plain", 200
        else:
            body, ctype, code = b"not found: try /metrics\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics %s - %s", self.address_string(), format % args)


class MetricsServer:
    """`/metrics` and `/healthz` on a stdlib threading HTTP server (TCP_NODELAY set)."""

    def __init__(self, collector: AgentCollector, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        handler = type("AgentMetricsHandler", (_Handler,), {"registry": self.registry})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="copack-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
