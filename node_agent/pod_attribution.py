"""Which containers hold which unit, from the kubelet pod-resources API (v1 `List`).

Device IDs name units directly (NVIDIA's plugin: `GPU-…`/`MIG-…`, with `::<n>` replicas when
shared; copack's plugin: `<unit-uuid>::<slot>`), so a device ID maps to a unit by the part
before `::`. The list is refreshed on its own thread every `refresh_s` (the kubelet serves it
from memory, but there is no watch), and readers get the last good answer: a kubelet that stops
answering leaves the previous attribution in place and is logged once per outage."""

from __future__ import annotations

import logging
import threading

import grpc

from node_agent.device_plugin import podresources_pb2 as prpb
from node_agent.device_plugin import podresources_pb2_grpc as prgrpc

log = logging.getLogger("copack.agent.pods")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"

PodRef = tuple[str, str, str]  # (namespace, pod, container)


def unit_of_device(device_id: str) -> str:
    return device_id.split("::", 1)[0]


def attribution_from_response(resp: prpb.ListPodResourcesResponse) -> dict[str, list[PodRef]]:
    """unit UUID -> containers holding it (each container once per unit, in listing order)."""
    out: dict[str, list[PodRef]] = {}
    for pod in resp.pod_resources:
        for c in pod.containers:
            seen: set[str] = set()
            for dev in c.devices:
                for device_id in dev.device_ids:
                    unit = unit_of_device(device_id)
                    if unit in seen:
                        continue
                    seen.add(unit)
                    out.setdefault(unit, []).append((pod.namespace, pod.name, c.name))
    return out


class PodAttribution:
    """Polls the kubelet's pod-resources socket; `pods_by_unit()` is safe from any thread."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, refresh_s: float = 10.0,
                 timeout_s: float = 2.0) -> None:
        self.socket_path = socket_path
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self._by_unit: dict[str, list[PodRef]] = {}
        self._channel: grpc.Channel | None = None
        self._stub: prgrpc.PodResourcesListerStub | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.refreshes = 0

    def pods_by_unit(self) -> dict[str, list[PodRef]]:
        return self._by_unit

    def refresh(self) -> bool:
        """Fetch once now; returns whether the kubelet answered."""
        if self._stub is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket_path}")
            self._stub = prgrpc.PodResourcesListerStub(self._channel)
        try:
            resp = self._stub.List(prpb.ListPodResourcesRequest(), timeout=self.timeout_s)
        except grpc.RpcError as e:
            if not self._failing:
                log.warning("kubelet pod-resources at %s not answering (%s): keeping the last "
                            "pod attribution", self.socket_path, e.code())
            self._failing = True
            return False
        if self._failing:
            log.info("kubelet pod-resources at %s answers again", self.socket_path)
        self._failing = False
        self._by_unit = attribution_from_response(resp)
        self.refreshes += 1
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="copack-pods", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.refresh_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 2)
            self._thread = None
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None
