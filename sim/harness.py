"""The real extender, assembled in-process for one simulated run.

Its state (`extender.state.ClusterState`) is fed exactly what the watches and the agents
would feed it (Node and Pod JSON objects, telemetry Snapshots) on the simulated clock; its
FastAPI app (`extender.app.create_app`) answers kube-scheduler's extender v1 calls through
`AsgiExtenderClient` (or, with `transport: http`, over real HTTP from uvicorn on a loopback
port); its bind lands in the simulator's binder.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from extender.app import create_app
from extender.state import ClusterState
from sim.extender_client import AsgiExtenderClient, LoopbackExtenderClient
from sim.scenario import Scenario, extender_config


class ExtenderHarness:
    def __init__(
        self, scenario: Scenario, policy: str, binder: Any, clock: Callable[[], float]
    ) -> None:
        self.config = extender_config(scenario, policy)
        self.state = ClusterState(
            self.config.policy_config(),
            now=clock,
            telemetry_statistic=self.config.telemetry.statistic,
        )
        self.app = create_app(self.state, self.config, binder)
        cache = scenario.scheduler.node_cache_capable
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.client: AsgiExtenderClient | LoopbackExtenderClient
        if scenario.scheduler.extender_transport == "http":
            self.client = LoopbackExtenderClient(self._serve(), node_cache_capable=cache)
        else:
            self.client = AsgiExtenderClient(self.app, node_cache_capable=cache)

    def _serve(self) -> str:
        """uvicorn on 127.0.0.1 (a free port) in a thread, as `copack extender serve` runs."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the extender's HTTP server did not start on loopback")
            time.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    def upsert_node(self, node: dict[str, Any]) -> None:
        self.state.upsert_node(node)

    def mark_synced(self) -> None:
        self.state.mark_synced()

    def upsert_pod(self, pod: dict[str, Any]) -> None:
        self.state.upsert_pod(pod)

    def delete_pod(self, namespace: str, name: str) -> None:
        self.state.delete_pod(namespace, name)

    def apply_snapshot(self, node: str, snapshot: Any) -> None:
        self.state.apply_snapshot(node, snapshot)

    def close(self) -> None:
        self.client.close()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10.0)
