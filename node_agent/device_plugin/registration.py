"""Keeps the plugin served and registered across kubelet restarts. A restarting kubelet deletes
every socket in the device-plugins directory (ours too) and creates a new kubelet.sock; this
watcher polls the directory, restarts our gRPC server when our socket is gone and registers
again whenever kubelet.sock is a new file (inode or change time differ)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent import futures

import grpc

from node_agent.device_plugin import api_pb2, api_pb2_grpc, metrics
from node_agent.device_plugin.config import DevicePluginConfig
from policies.inventory import GPU_RESOURCE

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
REGISTER_TIMEOUT_S = 5.0

FileId = tuple[int, int, int]


def file_id(path: str) -> FileId | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class PluginEndpoint:
    """Our DevicePlugin gRPC server on <socket_dir>/<plugin_socket_name>."""

    def __init__(self, config: DevicePluginConfig, add_servicer: Callable[[grpc.Server], None]):
        self._cfg = config
        self._add = add_servicer
        self._server: grpc.Server | None = None
        self._served: FileId | None = None
        self.path = os.path.join(config.socket_dir, config.plugin_socket_name)

    def healthy(self) -> bool:
        return self._server is not None and file_id(self.path) == self._served

    def start(self) -> None:
        self.stop()
        os.makedirs(self._cfg.socket_dir, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left over from an earlier run: gRPC cannot bind over it
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="dp"))
        self._add(server)
        server.add_insecure_port(f"unix://{self.path}")
        server.start()
        self._server = server
        self._served = file_id(self.path)
        log.info("device plugin serving on %s", self.path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0.5).wait(2.0)
            self._server = None
            if file_id(self.path) == self._served:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self._served = None


def register(config: DevicePluginConfig) -> None:
    """One Register call to the kubelet; raises grpc.RpcError on failure."""
    kubelet = os.path.join(config.socket_dir, config.kubelet_socket_name)
    with grpc.insecure_channel(f"unix://{kubelet}") as channel:
        api_pb2_grpc.RegistrationStub(channel).Register(
            api_pb2.RegisterRequest(
                version=API_VERSION,
                endpoint=config.plugin_socket_name,
                resource_name=GPU_RESOURCE,
                options=api_pb2.DevicePluginOptions(
                    pre_start_required=False, get_preferred_allocation_available=True
                ),
            ),
            timeout=REGISTER_TIMEOUT_S,
        )


class Registrar:
    def __init__(self, config: DevicePluginConfig, endpoint: PluginEndpoint,
                 ready: Callable[[], bool] = lambda: True) -> None:
        """ready: False while there is nothing to advertise yet (the sampler has not reported
        units): registering then would let the kubelet fail pods against zero capacity."""
        self._cfg = config
        self._endpoint = endpoint
        self._ready = ready
        self._kubelet_path = os.path.join(config.socket_dir, config.kubelet_socket_name)
        self._registered_with: FileId | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.registrations = 0
        self.last_error = ""

    @property
    def registered(self) -> bool:
        with self._lock:
            return (self._registered_with is not None
                    and self._registered_with == file_id(self._kubelet_path))

    def start(self) -> None:
        self.tick()
        self._thread = threading.Thread(target=self._loop, name="dp-registrar", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=REGISTER_TIMEOUT_S + 2)
        metrics.REGISTERED.set(0)

    def _loop(self) -> None:
        while not self._stop.wait(self._cfg.socket_poll_s):
            try:
                self.tick()
            except Exception:
                log.exception("device plugin registration pass failed")

    def tick(self) -> None:
        """One pass: serve if our socket is gone, register if kubelet.sock is new."""
        if not self._endpoint.healthy():
            log.info("plugin socket %s missing: serving again", self._endpoint.path)
            self._endpoint.start()
            with self._lock:
                self._registered_with = None
        kubelet = file_id(self._kubelet_path)
        with self._lock:
            current = self._registered_with
        if kubelet is None:
            if current is not None:
                log.info("kubelet socket %s gone; waiting for it to come back", self._kubelet_path)
                with self._lock:
                    self._registered_with = None
            metrics.REGISTERED.set(0)
            return
        if kubelet == current or not self._ready():
            return
        try:
            register(self._cfg)
        except grpc.RpcError as e:
            detail = e.details() if hasattr(e, "details") else str(e)
            if detail != self.last_error:
                log.warning("registering %s with the kubelet failed: %s", GPU_RESOURCE, detail)
            self.last_error = detail or str(e)
            metrics.REGISTERED.set(0)
            return
        with self._lock:
            self._registered_with = kubelet
            self.registrations += 1
        self.last_error = ""
        metrics.REGISTERED.set(1)
        metrics.REGISTRATIONS.inc()
        log.info("registered %s with the kubelet at %s", GPU_RESOURCE, self._kubelet_path)
