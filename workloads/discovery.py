"""Find the proxy's backends in Kubernetes: the ready pods matching a label selector.

Polling a list (not a watch) keeps this small and self-healing: every interval the pool is set
to exactly the pods that are Running, Ready, not being deleted and have an IP; an API error
keeps the previous set (better stale backends than none) and is logged once per change of
state. Lists are read as raw JSON (`_preload_content=False`): the typed models are slow and
this needs three fields.

Handover (make-before-break, on for prefill selectors): a pod being deleted that is still
Ready (the kubelet goes on probing it while its preStop hook keeps it up; EndpointSlice calls
that "serving") stays a backend while another pod of the selector is starting (not yet
Ready: the replacement its ReplicaSet created when it was evicted, loading its model), until
`handover_drain_s` before its deletion deadline. A prefill pod is sized for its service's
bursts; without this a move by the rebalancer (or a `kubectl drain`) takes one pod's worth of
burst capacity away for as long as the replacement loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from workloads.balancer import BackendPool

log = logging.getLogger("copack.proxy.discovery")


HANDOVER_DRAIN_S = 10.0  # a prefill request takes seconds: stop routing this long before


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """Running, Ready, with an IP and not being deleted."""
    return not (pod.get("metadata") or {}).get("deletionTimestamp") and _ready_condition(pod)


def _deletion_deadline(meta: Mapping[str, Any]) -> float | None:
    """The pod's deletionTimestamp (when the kubelet kills it) in unix seconds, or None."""
    ts = meta.get("deletionTimestamp")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _ready_condition(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and bool(status.get("podIP")) and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
        if isinstance(c, Mapping)
    )


def _starting(pod: Mapping[str, Any]) -> bool:
    """Not being deleted and not (yet) Ready: scheduled or loading its model."""
    meta = pod.get("metadata") or {}
    phase = (pod.get("status") or {}).get("phase")
    return not meta.get("deletionTimestamp") and phase in ("Pending", "Running") and (
        not _ready_condition(pod)
    )


def _hands_over(pod: Mapping[str, Any], now: float, drain_s: float) -> bool:
    deadline = _deletion_deadline(pod.get("metadata") or {})
    return deadline is not None and deadline - now > drain_s and _ready_condition(pod)


def _url(pod: Mapping[str, Any], port: int) -> str:
    ip = pod["status"]["podIP"]
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


def endpoints_from_pod_list(
    body: Mapping[str, Any], port: int, handover_drain_s: float | None = None,
    now: float | None = None,
) -> list[str]:
    """Ready pods' URLs; with `handover_drain_s`, also pods being deleted that hand over
    (module docstring)."""
    pods = [p for p in body.get("items") or [] if isinstance(p, Mapping)]
    urls = [_url(p, port) for p in pods if pod_is_ready(p)]
    if handover_drain_s is not None and any(_starting(p) for p in pods):
        t = time.time() if now is None else now
        urls += [_url(p, port) for p in pods if _hands_over(p, t, handover_drain_s)]
    return sorted(urls)


@dataclass
class KubeSelector:
    """Pods of one role: a namespace, a label selector and the port vLLM listens on."""

    pool: BackendPool
    namespace: str
    selector: str
    port: int = 8000
    handover_drain_s: float | None = None  # None: no handover (decode pods)


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
            urls = endpoints_from_pod_list(body, sel.port, sel.handover_drain_s)
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
