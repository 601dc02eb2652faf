"""Entry point the agent calls: `DevicePluginService(config, units, kube_client).start()`.

Wires the pod cache (Kubernetes API), the kubelet's pod-resources view, the allocator, the
gRPC plugin server with its registrar, the health poller that turns the sampler's unit health
into slot health, and (MPS mode) the per-unit MPS daemon supervisor."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from kubernetes import client

from node_agent.device_plugin import api_pb2_grpc
from node_agent.device_plugin.allocations import read_boot_id
from node_agent.device_plugin.allocator import Allocator
from node_agent.device_plugin.config import DevicePluginConfig
from node_agent.device_plugin.kubelet_view import PodResourcesClient
from node_agent.device_plugin.mps import MpsSupervisor
from node_agent.device_plugin.plugin import DeviceBoard, DevicePluginServicer
from node_agent.device_plugin.pods import PodCache
from node_agent.device_plugin.registration import PluginEndpoint, Registrar
from node_agent.device_plugin.slots import slot_devices
from policies.inventory import InventoryUnit

log = logging.getLogger(__name__)

@runtime_checkable
class UnitSource(Protocol):
    """What the plugin needs from the agent's sampler: the node's units, each with its health
    (`InventoryUnit.healthy`). Called from the plugin's poller thread every health_poll_s."""

    def units(self) -> Sequence[InventoryUnit]: ...


UnitsLike = UnitSource | Callable[[], Sequence[InventoryUnit]]


class DevicePluginService:
    def __init__(self, config: DevicePluginConfig, units: UnitsLike, kube_client: Any) -> None:
        """units: an object with `units()` or a zero-argument callable giving the node's units
        (e.g. `lambda: sampler.latest().inventory().units`).
        kube_client: a kubernetes `ApiClient` (or a ready `CoreV1Api`)."""
        self.config = config
        self._source: Callable[[], Sequence[InventoryUnit]] = (
            units.units if isinstance(units, UnitSource) else units
        )
        self._api = (
            kube_client
            if isinstance(kube_client, client.CoreV1Api)
            else client.CoreV1Api(kube_client)
        )
        self._units_lock = threading.Lock()
        self._units: dict[str, InventoryUnit] = {}
        self.board = DeviceBoard()
        self.cache = PodCache(self._api, config.node_name, config.api_timeout_s,
                              on_delete=self._pod_deleted)
        self.pod_resources = (
            PodResourcesClient(config.pod_resources_socket, config.api_timeout_s)
            if config.pod_resources_socket
            else None
        )
        self.allocator = Allocator(
            config, self._api, self.cache, self.pod_resources, self.units_by_uuid,
            read_boot_id(config.boot_id_path),
        )
        self.mps = (
            MpsSupervisor(config.mps_root, config.mps_control_binary, self._unit_uuids,
                          config.mps_check_s)
            if config.mps
            else None
        )
        servicer = DevicePluginServicer(config, self.board, self.allocator,
                                        self.mps.is_up if self.mps else None)
        self.endpoint = PluginEndpoint(
            config, lambda server: api_pb2_grpc.add_DevicePluginServicer_to_server(servicer, server)
        )
        self.registrar = Registrar(config, self.endpoint, ready=lambda: bool(self._units))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._rebuilt = False

    # ---- units and health ------------------------------------------------------------------

    def units_by_uuid(self) -> dict[str, InventoryUnit]:
        with self._units_lock:
            return dict(self._units)

    def _unit_uuids(self) -> list[str]:
        with self._units_lock:
            return list(self._units)

    def refresh_units(self) -> bool:
        """Read the sampler once; push a new slot list to ListAndWatch if anything changed.
        A failing sampler keeps the last list (its own health series report the failure)."""
        try:
            units = list(self._source())
        except Exception as e:
            log.warning("unit source failed (%s); keeping the last slot list", e)
            return False
        with self._units_lock:
            self._units = {u.uuid: u for u in units}
        return self.board.update(slot_devices(units, self.config.slots_per_unit))

    def _pod_deleted(self, pod) -> None:
        self.allocator.forget(pod)

    def _maintain(self) -> None:
        """Rebuild the allocation table once the pod list is in (after an agent restart), then
        keep reconciling it against the pods that still exist."""
        if not self.cache.synced:
            return
        if not self._rebuilt:
            self.allocator.rebuild()
            self._rebuilt = True
            return
        self.allocator.reconcile()

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        if self._stop.is_set():
            raise RuntimeError("a stopped DevicePluginService cannot start again; make a new one")
        self._started = True
        self.refresh_units()
        self.cache.start()
        if self.cache.wait_synced(self.config.api_sync_timeout_s):
            self._maintain()
        else:
            log.warning("pod list from the API not ready after %.0fs; allocations are rebuilt "
                        "once it is, Allocate reads pods directly until then",
                        self.config.api_sync_timeout_s)
        if self.mps is not None:
            self.mps.start()
        self.registrar.start()
        self._spawn("dp-health", self.config.health_poll_s, self.refresh_units)
        self._spawn("dp-reconcile", self.config.reconcile_s, self._maintain)
        log.info("device plugin for node %s started (%d units x %d slots, mps=%s, cdi=%s)",
                 self.config.node_name, len(self._units), self.config.slots_per_unit,
                 self.config.mps, self.config.cdi)

    def _spawn(self, name: str, period: float, fn) -> None:
        def loop() -> None:
            while not self._stop.wait(period):
                try:
                    fn()
                except Exception:
                    log.exception("%s pass failed", name)

        t = threading.Thread(target=loop, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        if not self._started:
            return
        self._stop.set()
        self.registrar.stop()
        self.board.close()
        self.endpoint.stop()
        for t in self._threads:
            t.join(timeout=5)
        self.cache.stop()
        if self.mps is not None:
            self.mps.stop()
        if self.pod_resources is not None:
            self.pod_resources.close()
        self._started = False
        log.info("device plugin stopped")
