"""Everything `copack rebalance` runs: the API client, the state with the extender's own
watchers and telemetry subscriber, the controller, and the metrics/explain server."""

from __future__ import annotations

import logging
import threading
from typing import Any

from kubernetes import client as k8s

from extender.kube_watch import ClusterWatcher, kube_client
from extender.telemetry import TelemetrySubscriber
from policies.config import PolicyConfig
from rebalancer.controller import ControllerConfig, Rebalancer
from rebalancer.kube import KubeActions
from rebalancer.metrics import MetricsServer, RebalancerMetrics
from rebalancer.state import RebalancerState

log = logging.getLogger("copack.rebalancer")


class RebalancerService:
    """`start()` begins watching (and serving, unless `metrics_port` is None); `run_forever()`
    plans every interval; `once()` waits for the sync and plans one round."""

    def __init__(
        self,
        config: ControllerConfig,
        policy: PolicyConfig,
        *,
        kubeconfig: str | None = None,
        api_client: k8s.ApiClient | None = None,
        telemetry: bool = True,
        metrics_host: str = "0.0.0.0",
        metrics_port: int | None = 9402,
        watch_backoff_s: tuple[float, float] = (0.2, 30.0),
    ) -> None:
        self._own_client = api_client is None
        self.api_client = api_client or kube_client(kubeconfig)
        self.state = RebalancerState(policy)
        self.watcher = ClusterWatcher(self.api_client, self.state,
                                      backoff_initial_s=watch_backoff_s[0],
                                      backoff_max_s=watch_backoff_s[1])
        self.telemetry = TelemetrySubscriber(self.state) if telemetry else None
        self.metrics = RebalancerMetrics()
        self.controller = Rebalancer(self.state, KubeActions(self.api_client), config,
                                     self.metrics)
        self.server = (
            MetricsServer(self.metrics, self.controller.explain, self.controller.health,
                          metrics_host, metrics_port)
            if metrics_port is not None else None
        )
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        assert self.server is not None, "no metrics server"
        return f"http://127.0.0.1:{self.server.port}"

    def start(self) -> RebalancerService:
        self.watcher.start()
        if self.telemetry is not None:
            self.telemetry.start()
        if self.server is not None:
            self.server.start()
        return self

    def once(self, sync_timeout_s: float = 60.0) -> dict[str, Any]:
        if not self.watcher.wait_synced(sync_timeout_s):
            raise TimeoutError(f"the cluster state did not sync within {sync_timeout_s:.0f} s")
        return self.controller.round()

    def run_forever(self, tick_s: float = 1.0) -> None:
        self.controller.run(self._stop, tick_s)

    def request_stop(self) -> None:
        """Thread- and signal-safe: end `run_forever` after the current tick."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()
        if self.telemetry is not None:
            self.telemetry.stop()
        self.watcher.stop()
        if self._own_client:
            self.api_client.close()
