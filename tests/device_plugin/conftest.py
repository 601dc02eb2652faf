"""Device plugin test rig: the fake API server (official client), the fake kubelet on real unix
sockets, and the plugin service started the way the agent starts it."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from node_agent.device_plugin.config import DevicePluginConfig
from node_agent.device_plugin.service import DevicePluginService
from policies.inventory import (
    ASSIGNED_AT_ANNOTATION,
    GPU_RESOURCE,
    SCHEDULER_NAME,
    SM_SHARE_ANNOTATION,
    UNIT_ANNOTATION,
    InventoryUnit,
)
from tests.fakes.kube_fixtures import FakeKube, fake_kube  # noqa: F401
from tests.fakes.kubelet import FakeKubelet, KubeletPod

NODE = "gpu-node-1"
H100 = "NVIDIA H100 80GB HBM3"
T0 = datetime(2026, 11, 27, 9, 0, 0, tzinfo=UTC)


def gpu_uuid(i: int) -> str:
    return f"GPU-{i:08x}-1111-2222-3333-444455556666"


def h100(i: int, healthy: bool = True) -> InventoryUnit:
    return InventoryUnit(uuid=gpu_uuid(i), index=i, product=H100, sm_count=132,
                         memory_bytes=85_520_809_984, healthy=healthy)


class UnitTable:
    """A unit source with health the test flips; the agent's sampler gives the same shape."""

    def __init__(self, units: list[InventoryUnit]) -> None:
        self._lock = threading.Lock()
        self._units = list(units)

    def units(self) -> list[InventoryUnit]:
        with self._lock:
            return list(self._units)

    def set_units(self, units: list[InventoryUnit]) -> None:
        with self._lock:
            self._units = list(units)

    def set_healthy(self, uuid: str, healthy: bool) -> None:
        with self._lock:
            self._units = [u.model_copy(update={"healthy": healthy}) if u.uuid == uuid else u
                           for u in self._units]


def rfc3339(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def pod_manifest(name: str, namespace: str = "default", gpus: int = 1,
                 sidecars: int = 0, native_sidecar: bool = False,
                 init_gpu: bool = False, gpu_first: bool = False) -> dict[str, Any]:
    main = {"name": "vllm", "image": "vllm/vllm-openai",
            "resources": {"limits": {GPU_RESOURCE: str(gpus)}} if gpus else {}}
    extra = [{"name": f"sidecar-{i}", "image": "envoy"} for i in range(sidecars)]
    containers = [main, *extra] if gpu_first else [*extra, main]
    spec: dict[str, Any] = {"schedulerName": SCHEDULER_NAME, "containers": containers}
    inits = []
    if native_sidecar:
        inits.append({"name": "mesh", "image": "mesh", "restartPolicy": "Always"})
    if init_gpu:
        inits.append({"name": "warmup", "image": "vllm/vllm-openai",
                      "resources": {"limits": {GPU_RESOURCE: "1"}}})
    if inits:
        spec["initContainers"] = inits
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


@dataclass
class Rig:
    kube: FakeKube
    kubelet: FakeKubelet
    units: UnitTable
    root: Path
    config: DevicePluginConfig
    services: list[DevicePluginService] = field(default_factory=list)

    @property
    def service(self) -> DevicePluginService:
        return self.services[-1]

    def start_service(self, **overrides: Any) -> DevicePluginService:
        cfg = replace(self.config, **overrides) if overrides else self.config
        svc = DevicePluginService(cfg, self.units, self.kube.api_client)
        svc.start()
        self.services.append(svc)
        return svc

    def stop_service(self) -> None:
        self.services[-1].stop()

    def create_bound(self, name: str, unit: str | None, share: int | None = None,
                     assigned_at: datetime | None = None, namespace: str = "default",
                     **manifest: Any) -> dict[str, Any]:
        """A pod placed by copack: created, then bound with the extender's annotations."""
        self.kube.server.add_pod(pod_manifest(name, namespace, **manifest))
        ann: dict[str, str] = {}
        if unit is not None:
            ann[UNIT_ANNOTATION] = unit
            ann[ASSIGNED_AT_ANNOTATION] = rfc3339(assigned_at or T0)
        if share is not None:
            ann[SM_SHARE_ANNOTATION] = str(share)
        self.kube.server.bind(namespace, name, NODE, annotations=ann or None)
        return self.kube.server.get("pods", name, namespace)

    def kubelet_pod(self, name: str, namespace: str = "default") -> KubeletPod:
        return KubeletPod.from_api(self.kube.server.get("pods", name, namespace))

    def annotation(self, name: str, key: str, namespace: str = "default") -> str | None:
        pod = self.kube.server.get("pods", name, namespace)
        return (pod["metadata"].get("annotations") or {}).get(key)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll until cond() holds (state reached by background threads); False on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return cond()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="cpdp-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rig_factory(fake_kube: FakeKube, short_dir: Path) -> Iterator[Callable[..., Rig]]:  # noqa: F811
    rigs: list[Rig] = []

    def make(n_units: int = 4, slots: int = 4, pod_resources: bool = True,
             use_preferred: bool = True, start: bool = True, list_inactive: bool = False,
             **cfg: Any) -> Rig:
        fake_kube.server.add_node(NODE)
        socket_dir = short_dir / "dp"
        podres = short_dir / "pr" / "kubelet.sock"
        kubelet = FakeKubelet(socket_dir, podres if pod_resources else None,
                              use_preferred=use_preferred, kube_server=fake_kube.server,
                              list_inactive=list_inactive).start()
        boot = short_dir / "boot_id"
        boot.write_text("boot-1\n")
        config = DevicePluginConfig(
            node_name=NODE,
            slots_per_unit=slots,
            socket_dir=str(socket_dir),
            pod_resources_socket=str(podres) if pod_resources else None,
            boot_id_path=str(boot),
            mps_root=str(short_dir / "mps"),
            health_poll_s=0.05,
            socket_poll_s=0.05,
            reconcile_s=0.2,
            mps_check_s=0.1,
            **cfg,
        )
        rig = Rig(fake_kube, kubelet, UnitTable([h100(i) for i in range(n_units)]), short_dir,
                  config)
        rigs.append(rig)
        if start:
            rig.start_service()
            assert kubelet.wait_registered(10), "plugin never registered with the kubelet"
        return rig

    yield make
    for rig in rigs:
        for svc in rig.services:
            svc.stop()
        rig.kubelet.stop()


@pytest.fixture
def rig(rig_factory: Callable[..., Rig]) -> Rig:
    return rig_factory()


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)
