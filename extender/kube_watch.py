"""List + watch of Nodes and Pods through the official client, feeding the ClusterState.

Raw JSON everywhere (`_preload_content=False` + orjson): typed deserialization of a 10k-pod list
takes seconds (FACTS #5), and the typed watch helper hides 410s behind a silent retry and breaks
its own error handling with `deserialize=False` (FACTS #3). So this is a small informer:

    list (resourceVersion R) -> state.replace_*  -> watch from R (bookmarks on) -> events
        410 Gone (HTTP or in-stream ERROR)  -> relist at once
        any other error / dropped connection -> backoff, re-watch from the last R; a second
                                                error in a row (no event between) -> relist
        stream ended normally (timeoutSeconds) -> re-watch from the last R

The state is marked synced only when both resources have been listed once, and a relist
replaces the resource's contents atomically, so decisions never see a half-listed cluster."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

if TYPE_CHECKING:
    from extender.state import ClusterState

log = logging.getLogger("copack.extender.watch")


def kube_client(kubeconfig: str | None) -> k8s.ApiClient:
    """From the kubeconfig file, else the in-cluster service account (the extender and the
    rebalancer run with one)."""
    if kubeconfig:
        return k8s_config.new_client_from_config(config_file=kubeconfig)
    cfg = k8s.Configuration()
    k8s_config.load_incluster_config(client_configuration=cfg)
    return k8s.ApiClient(cfg)


class _Expired(Exception):
    """The watch's resourceVersion is gone from the server's history: relist."""


class ResourceWatcher:
    """List+watch one resource ("nodes" or "pods") in a thread."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        resource: str,
        state: ClusterState,
        *,
        watch_timeout_s: float = 300.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0,
        page_size: int = 5000,
        field_selector: str = "",
    ) -> None:
        if resource not in ("nodes", "pods"):
            raise ValueError(f"cannot watch {resource!r}")
        core = k8s.CoreV1Api(api_client)
        self._list: Callable[..., Any] = (
            core.list_node if resource == "nodes" else core.list_pod_for_all_namespaces
        )
        self.resource = resource
        self._state = state
        self._watch_timeout = watch_timeout_s
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._page_size = page_size
        self._selector = {"field_selector": field_selector} if field_selector else {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp: Any = None
        self.resource_version: str | None = None
        self._delivered = 0  # events delivered by the current watch

    def start(self) -> ResourceWatcher:
        self._thread = threading.Thread(
            target=self._run, name=f"copack-watch-{self.resource}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:  # unblock a read waiting on the stream
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._backoff_initial
        need_list = True
        failures = 0  # consecutive failed watches
        while not self._stop.is_set():
            try:
                if need_list:
                    self._relist()
                    need_list = False
                self._delivered = 0
                self._watch()
                backoff = self._backoff_initial  # a clean end (timeoutSeconds): re-watch
                failures = 0
                continue
            except _Expired:
                self._state.count("watch_restarts", f"{self.resource}:expired")
                need_list = True
                continue  # relist at once: the server told us exactly what to do
            except Exception as e:
                if self._stop.is_set():
                    break
                reason = _reason(e)
                self._state.count("watch_restarts", f"{self.resource}:{reason}")
                self._state.watch_error(self.resource, f"{type(e).__name__}: {e}")
                log.info("watch %s: %s; retrying in %.1fs", self.resource, e, backoff)
                # One failure (a dropped connection) loses nothing: re-watch from the last
                # resourceVersion. A second in a row without an event between: relist.
                failures = 1 if self._delivered else failures + 1
                if failures >= 2:
                    need_list = True
            self._stop.wait(backoff * (0.5 + random.random()))
            backoff = min(self._backoff_max, backoff * 2)

    def _relist(self) -> None:
        started = self._state.now()
        items: list[dict[str, Any]] = []
        cont: str | None = None
        rv = ""
        while True:
            kwargs: dict[str, Any] = {"limit": self._page_size, "_preload_content": False,
                                      "_request_timeout": 60, **self._selector}
            if cont:
                kwargs["_continue"] = cont
            resp = self._list(**kwargs)
            body = orjson.loads(resp.data)
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            rv = meta.get("resourceVersion", rv)
            cont = meta.get("continue")
            if not cont:
                break
        if self.resource == "nodes":
            self._state.replace_nodes(items, started)
        else:
            self._state.replace_pods(items, started)
        self.resource_version = rv
        self._state.listed(self.resource)

    def _watch(self) -> None:
        try:
            resp = self._list(
                watch=True,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=int(self._watch_timeout),
                _preload_content=False,
                _request_timeout=(10, self._watch_timeout + 30),
                **self._selector,
            )
        except ApiException as e:
            if e.status == 410:
                raise _Expired from None
            raise
        self._resp = resp
        state = self._state
        upsert = state.upsert_node if self.resource == "nodes" else state.upsert_pod
        try:
            buf = bytearray()
            for chunk in resp.stream(amt=None, decode_content=False):
                if self._stop.is_set():
                    return
                buf += chunk
                start = 0
                while (nl := buf.find(b"\n", start)) >= 0:
                    line = bytes(buf[start:nl])
                    start = nl + 1
                    if line.strip():
                        self._event(orjson.loads(line), upsert)
                del buf[:start]
        finally:
            self._resp = None
            resp.release_conn()

    def _event(self, ev: dict[str, Any], upsert: Callable[[dict[str, Any]], None]) -> None:
        etype = ev.get("type")
        obj = ev.get("object") or {}
        meta = obj.get("metadata") or {}
        if etype == "ERROR":
            if obj.get("code") == 410:
                raise _Expired
            raise ApiException(status=obj.get("code", 500), reason=obj.get("message", ""))
        rv = meta.get("resourceVersion")
        self._delivered += 1
        if etype in ("ADDED", "MODIFIED"):
            upsert(obj)
        elif etype == "DELETED":
            if self.resource == "nodes":
                self._state.delete_node(meta.get("name", ""))
            else:
                self._state.delete_pod(meta.get("namespace", ""), meta.get("name", ""),
                                       meta.get("uid"))
        # BOOKMARK: only the resourceVersion matters (FACTS #4)
        if rv:
            self.resource_version = rv


def _reason(e: Exception) -> str:
    if isinstance(e, ApiException):
        return f"http_{e.status}"
    name = type(e).__name__
    return {"ProtocolError": "dropped", "ReadTimeoutError": "timeout"}.get(name, "error")


class ClusterWatcher:
    """Both watchers together, plus the periodic sweep of unconfirmed binds."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        state: ClusterState,
        pod_field_selector: str = "",
        **kwargs: Any,
    ) -> None:
        self.nodes = ResourceWatcher(api_client, "nodes", state, **kwargs)
        self.pods = ResourceWatcher(
            api_client, "pods", state, field_selector=pod_field_selector, **kwargs
        )
        self._state = state
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="copack-sweep", daemon=True)

    def start(self) -> ClusterWatcher:
        self.nodes.start()
        self.pods.start()
        self._sweeper.start()
        return self

    def _sweep(self) -> None:
        while not self._stop.wait(2.0):
            self._state.sweep()

    def stop(self) -> None:
        self._stop.set()
        self.nodes.stop()
        self.pods.stop()

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._state.synced:
                return True
            time.sleep(0.02)
        return self._state.synced
