"""The real extender, assembled in-process for one simulated run.

Its state (`extender.state.ClusterState`) is fed exactly what the watches and the agents
would feed it (Node and Pod JSON objects, telemetry Snapshots) on the simulated clock; its
FastAPI app (`extender.app.create_app`) answers kube-scheduler's extender v1 calls through
`AsgiExtenderClient`; its bind lands in the simulator's binder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from extender.app import create_app
from extender.state import ClusterState
from sim.extender_client import AsgiExtenderClient
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
        self.client = AsgiExtenderClient(
            self.app, node_cache_capable=scenario.scheduler.node_cache_capable
        )

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
