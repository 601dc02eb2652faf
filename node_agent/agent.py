"""The node agent process: sampler + gRPC telemetry + Prometheus + pod attribution + inventory.

Data flows one way: the sampler thread produces a snapshot per tick and hands it to listeners
that never block (the gRPC broadcaster's bounded queues, the inventory publisher's mailbox);
gRPC streams, scrapes, the kubelet poll and the API-server patch each run on their own threads."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field

from node_agent.inventory_publisher import InventoryPublisher, load_api_client
from node_agent.pod_attribution import DEFAULT_SOCKET, PodAttribution
from node_agent.prometheus_exporter import AgentCollector, MetricsServer
from node_agent.readings import Snapshot
from node_agent.sampler import Sampler, SamplerConfig
from node_agent.telemetry_service import Broadcaster, TelemetryServer, snapshot_to_proto

log = logging.getLogger("copack.agent")

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9400


def default_node_name() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


def split_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be HOST:PORT (port 0-65535), got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass
class AgentConfig:
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    grpc_listen: str = f"0.0.0.0:{DEFAULT_GRPC_PORT}"
    metrics_listen: str = f"0.0.0.0:{DEFAULT_METRICS_PORT}"
    # host:port written to the node's copack.io/agent annotation; default POD_IP (or the
    # hostname) with the gRPC port actually bound.
    advertise: str | None = None
    kubeconfig: str | None = None
    publish_inventory: bool = True
    pod_resources_socket: str | None = DEFAULT_SOCKET  # None: no pod attribution
    pod_refresh_s: float = 10.0
    watch_queue_depth: int = 8
    max_watchers: int = 32

    def __post_init__(self) -> None:
        split_host_port(self.grpc_listen, "gRPC listen address")
        split_host_port(self.metrics_listen, "metrics listen address")
        if self.advertise is not None:
            split_host_port(self.advertise, "advertised address")
        if self.pod_refresh_s <= 0:
            raise ValueError("pod_refresh_s must be positive")
        if self.watch_queue_depth < 1 or self.max_watchers < 1:
            raise ValueError("watch_queue_depth and max_watchers must be at least 1")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        # First what can fail on bad input, before any port is bound.
        api_client = load_api_client(config.kubeconfig) if config.publish_inventory else None
        self.sampler = Sampler(config.sampler)
        self.broadcaster = Broadcaster(config.watch_queue_depth)
        self.pods = (
            PodAttribution(config.pod_resources_socket, config.pod_refresh_s)
            if config.pod_resources_socket
            else None
        )
        self.telemetry = TelemetryServer(self.broadcaster, config.grpc_listen, config.max_watchers)
        collector = AgentCollector(
            self.sampler.latest,
            self.pods.pods_by_unit if self.pods else dict,
            broadcaster=self.broadcaster,
        )
        host, port = split_host_port(config.metrics_listen, "metrics listen address")
        self.metrics = MetricsServer(collector, host, port)
        self.advertise = config.advertise or (
            f"{os.environ.get('POD_IP') or socket.gethostname()}:{self.telemetry.port}"
        )
        self.inventory = InventoryPublisher(config.sampler.node, self.advertise, api_client)
        self._published_generation = 0
        self._stopped = threading.Event()
        self.sampler.add_listener(self._on_snapshot)

    @property
    def grpc_port(self) -> int:
        return self.telemetry.port

    @property
    def metrics_port(self) -> int:
        return self.metrics.port

    def _on_snapshot(self, snap: Snapshot) -> None:
        pods = self.pods.pods_by_unit() if self.pods else None
        self.broadcaster.publish(snapshot_to_proto(snap, pods))
        if snap.inventory_generation != self._published_generation:
            self._published_generation = snap.inventory_generation
            self.inventory.submit(snap.inventory())

    def start(self) -> None:
        if self.pods:
            self.pods.start()
        self.telemetry.start()
        self.metrics.start()
        self.inventory.start()
        self.sampler.start()
        log.info(
            "agent on node %s: gRPC %s (advertised %s), metrics :%d, interval %.2f s",
            self.config.sampler.node, self.config.grpc_listen, self.advertise, self.metrics_port,
            self.config.sampler.interval_s,
        )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.sampler.stop()
        self.telemetry.stop()
        self.metrics.stop()
        self.inventory.stop()
        if self.pods:
            self.pods.stop()

    def wait(self) -> None:
        self._stopped.wait()

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
