"""Find the proxy's backends in Kubernetes: the ready pods matching a label selector.

Polling a list (not a watch) keeps this small and self-healing: every interval the pool is set
to exactly the pods that are Running, Ready, not being deleted and have an IP; an API error
keeps the previous set (better stale backends than none) and is logged once per change of
state. Lists are read as raw JSON (`_preload_content=False`): the typed models are slow and
this needs three fields.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from workloads.balancer import BackendPool

log = logging.getLogger("copack.proxy.discovery")


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    if not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
        if isinstance(c, Mapping)
    )


def endpoints_from_pod_list(body: Mapping[str, Any], port: int) -> list[str]:
    urls = []
    for pod in body.get("items") or []:
        if isinstance(pod, Mapping) and pod_is_ready(pod):
            ip = pod["status"]["podIP"]
            host = f"[{ip}]" if ":" in ip else ip
            urls.append(f"http://{host}:{port}")
    return sorted(urls)


@dataclass
class KubeSelector:
    """Pods of one role: a namespace, a label selector and the port vLLM listens on."""

    pool: BackendPool
    namespace: str
    selector: str
    port: int = 8000


class KubeDiscovery:
    """Keeps pools in step with the cluster; run `loop()` as the proxy's background task."""

    def __init__(
        self, api_client: Any, selectors: list[KubeSelector], interval_s: float = 5.0
    ) -> None:
        from kubernetes import client as k8s

        self.core = k8s.CoreV1Api(api_client)
        self.selectors = selectors
        self.interval_s = interval_s
        self._failing = False

    def refresh_once(self) -> None:
        """One synchronous pass over every selector (raises on API errors)."""
        for sel in self.selectors:
            resp = self.core.list_namespaced_pod(
                sel.namespace, label_selector=sel.selector, _preload_content=False
            )
            try:
                body = orjson.loads(resp.data)
            finally:
                resp.release_conn()
            urls = endpoints_from_pod_list(body, sel.port)
            before = sorted(b.url for b in sel.pool.backends)
            sel.pool.set_urls(urls)
            if urls != before:
                log.info("%s backends (%s): %s", sel.pool.role, sel.selector, urls or "none")

    async def loop(self) -> AsyncIterator[None]:
        while True:
            try:
                await asyncio.to_thread(self.refresh_once)
                if self._failing:
                    log.warning("backend discovery recovered")
                self._failing = False
            except Exception as e:  # API down, RBAC, dropped connection: keep the last set
                if not self._failing:
                    log.warning("backend discovery failed (keeping the last backends): %s", e)
                self._failing = True
            yield
            await asyncio.sleep(self.interval_s)


def load_api_client(kubeconfig: str | None) -> Any:
    """The official client from a kubeconfig file, else the in-cluster service account."""
    from kubernetes import config as k8s_config

    if kubeconfig:
        return k8s_config.new_client_from_config(config_file=kubeconfig)
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        return k8s_config.new_client_from_config()
    from kubernetes import client as k8s

    return k8s.ApiClient()
