"""Publishes the node's `copack.io/inventory` and `copack.io/agent` annotations.

Patches only when an annotation's value changes (units appear, vanish or change health; the
agent moves), never per tick; the work happens on its own thread so a slow or absent API server
never delays sampling. Without a cluster (no kubeconfig and not in a pod) it logs once and does
nothing; a failing API server is retried with backoff, and the newest inventory wins."""

from __future__ import annotations

import logging
import os
import threading

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from policies.inventory import AGENT_ANNOTATION, INVENTORY_ANNOTATION, Inventory

log = logging.getLogger("copack.agent.inventory")


def load_api_client(kubeconfig: str | None) -> k8s_client.ApiClient | None:
    """The API client from `kubeconfig`, else in-cluster config, else None (no cluster)."""
    if kubeconfig:
        return k8s_config.new_client_from_config(config_file=kubeconfig)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = k8s_client.Configuration()
        k8s_config.load_incluster_config(client_configuration=cfg)
        return k8s_client.ApiClient(cfg)
    return None


class InventoryPublisher:
    def __init__(
        self,
        node: str,
        agent_endpoint: str,
        api_client: k8s_client.ApiClient | None,
        *,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 30.0,
    ) -> None:
        self.node = node
        self.agent_endpoint = agent_endpoint
        self._api = k8s_client.CoreV1Api(api_client) if api_client is not None else None
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._cond = threading.Condition()
        self._pending: Inventory | None = None
        self._published: dict[str, str] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.patches = 0
        self.failures = 0
        if self._api is None:
            log.warning("no Kubernetes API server configured (no --kubeconfig, not in a pod): "
                        "serving metrics and gRPC only, not patching node %s", node)

    @property
    def enabled(self) -> bool:
        return self._api is not None

    def submit(self, inventory: Inventory) -> None:
        """Hand over the newest inventory; never blocks."""
        if self._api is None:
            return
        with self._cond:
            self._pending = inventory
            self._cond.notify()

    def start(self) -> None:
        if self._api is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="copack-inventory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def wanted(self, inventory: Inventory) -> dict[str, str]:
        return {
            INVENTORY_ANNOTATION: inventory.to_annotation(),
            AGENT_ANNOTATION: self.agent_endpoint,
        }

    def _run(self) -> None:
        backoff = self._retry_initial
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._pending is not None)
                if self._stop:
                    return
                inventory = self._pending
                self._pending = None
            assert inventory is not None
            if self._publish(inventory):
                backoff = self._retry_initial
                continue
            # Failed: put it back unless something newer arrived, then wait before retrying.
            with self._cond:
                if self._pending is None:
                    self._pending = inventory
                self._cond.wait_for(lambda: self._stop, timeout=backoff)
            backoff = min(backoff * 2, self._retry_max)

    def _publish(self, inventory: Inventory) -> bool:
        want = self.wanted(inventory)
        changed = {k: v for k, v in want.items() if self._published.get(k) != v}
        if not changed:
            return True
        assert self._api is not None
        try:
            self._api.patch_node(self.node, {"metadata": {"annotations": changed}})
        except ApiException as e:
            self.failures += 1
            log.warning("patching node %s annotations failed: HTTP %s %s", self.node, e.status,
                        e.reason)
            return False
        except Exception as e:  # connection refused, timeouts: the API server may come back
            self.failures += 1
            log.warning("patching node %s annotations failed: %s", self.node, e)
            return False
        self._published.update(changed)
        self.patches += 1
        log.info("node %s: published %s", self.node, ", ".join(sorted(changed)))
        return True
