"""A fake kubelet for device plugin tests: the parts of the real kubelet a device plugin talks to,
over real gRPC on unix sockets.

- Registration server (`v1beta1.Registration/Register`) on `<socket_dir>/kubelet.sock`. A
  registration is checked like the kubelet does (API version, resource name), then the fake
  connects to the plugin's endpoint, calls GetDevicePluginOptions and keeps a ListAndWatch stream
  open, tracking every slot's health (all slots turn Unhealthy when the stream ends).
- Admission like the kubelet's device manager: pods are admitted one at a time (the kubelet's
  HandlePodAdditions loop is serial); the pod is added to the pod manager first (so the
  pod-resources API lists it during Allocate), init containers before app containers, slots of
  init containers reused by app containers, GetPreferredAllocation consulted when the plugin
  says it is available, then picks are completed from the free healthy slots in an arbitrary
  (seeded) order, Allocate is called, and the slots are recorded only after it returns.
  A refused Allocate rejects the pod (and, with a fake API server, sets its phase Failed).
- Pod-resources server (`v1.PodResourcesLister/List`) on its own socket: active pods with their
  app (and restartable init) containers and the slots each holds.
- `restart()`: what a kubelet restart does to the device-plugins directory: every socket in it
  is deleted (the plugin's too), a new kubelet.sock appears, the plugin must register again;
  allocations survive (the kubelet's checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc

from node_agent.device_plugin import (
    api_pb2,
    api_pb2_grpc,
    podresources_pb2,
    podresources_pb2_grpc,
)

SUPPORTED_VERSIONS = ("v1beta1",)
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
CHECKPOINT = "kubelet_internal_checkpoint"


@dataclass(frozen=True)
class KubeletContainer:
    name: str
    gpus: int = 0
    init: bool = False
    restartable: bool = False  # init container with restartPolicy Always (native sidecar)


@dataclass(frozen=True)
class KubeletPod:
    namespace: str
    name: str
    uid: str
    created: str  # RFC 3339, the kubelet sorts additions by creation time
    containers: tuple[KubeletContainer, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_api(cls, obj: dict[str, Any], resource: str = "copack.io/gpu") -> KubeletPod:
        """From a pod as the (fake) API server stores it (JSON dict)."""

        def count(c: dict[str, Any]) -> int:
            res = c.get("resources") or {}
            q = (res.get("limits") or {}).get(resource) or (res.get("requests") or {}).get(resource)
            return int(q) if q is not None else 0

        md, spec = obj["metadata"], obj.get("spec") or {}
        cs = [
            KubeletContainer(c["name"], count(c), init=True,
                             restartable=c.get("restartPolicy") == "Always")
            for c in spec.get("initContainers") or []
        ]
        cs += [KubeletContainer(c["name"], count(c)) for c in spec.get("containers") or []]
        return cls(md.get("namespace", "default"), md["name"], md.get("uid", ""),
                   md.get("creationTimestamp", ""), tuple(cs))


@dataclass
class ContainerAdmission:
    name: str
    devices: tuple[str, ...]
    envs: dict[str, str]
    mounts: list[tuple[str, str, bool]]  # (container_path, host_path, read_only)
    cdi_devices: list[str]
    annotations: dict[str, str]


@dataclass
class AdmitResult:
    key: str
    admitted: bool
    error: str = ""
    containers: dict[str, ContainerAdmission] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Env of the (first) container that got devices."""
        for c in self.containers.values():
            if c.devices:
                return c.envs
        return {}


class AdmissionError(Exception):
    pass


class _Registration(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self._k = kubelet

    def Register(self, request, context):
        if request.version not in SUPPORTED_VERSIONS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Requested API version {request.version!r} is not supported by kubelet. "
                f"Supported versions are {list(SUPPORTED_VERSIONS)}",
            )
        name = request.resource_name
        if "/" not in name or name.split("/", 1)[0].endswith("kubernetes.io"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"invalid extended resource name {name!r}")
        if "/" in request.endpoint:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"endpoint {request.endpoint!r} must be a file name")
        self._k._on_register(request)
        return api_pb2.Empty()


class _PodResources(podresources_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self._k = kubelet

    def List(self, request, context):
        return self._k._pod_resources()

    def GetAllocatableResources(self, request, context):
        with self._k._lock:
            ids = sorted(d for d, h in self._k._devices.items() if h == HEALTHY)
        return podresources_pb2.AllocatableResourcesResponse(
            devices=[podresources_pb2.ContainerDevices(resource_name=self._k.resource,
                                                       device_ids=ids)]
        )


class FakeKubelet:
    def __init__(
        self,
        socket_dir: str | os.PathLike[str],
        pod_resources_socket: str | os.PathLike[str] | None = None,
        resource: str = "copack.io/gpu",
        use_preferred: bool = True,
        seed: int = 0,
        kube_server: Any = None,
        list_inactive: bool = False,
    ) -> None:
        """list_inactive: pod-resources List keeps pods refused at admission (kubelets before
        1.28 listed every pod of the pod manager; newer ones list active pods only)."""
        self.socket_dir = str(socket_dir)
        self.kubelet_socket = os.path.join(self.socket_dir, "kubelet.sock")
        self.pod_resources_socket = str(pod_resources_socket) if pod_resources_socket else None
        self.resource = resource
        self.use_preferred = use_preferred
        self._rng = random.Random(seed)
        self._kube = kube_server  # FakeKubeApiServer: phase Running/Failed after admission
        self._lock = threading.Condition()
        self._admit_lock = threading.Lock()  # HandlePodAdditions is one loop: one pod at a time
        self._servers: list[grpc.Server] = []
        self._devices: dict[str, str] = {}
        self._endpoint: str | None = None
        self._options: api_pb2.DevicePluginOptions | None = None
        self._channel: grpc.Channel | None = None
        self._stream: Any = None
        self._stream_gen = 0
        self._pods: dict[str, KubeletPod] = {}
        self._inactive: dict[str, KubeletPod] = {}
        self.list_inactive = list_inactive
        self._pod_devices: dict[str, dict[str, tuple[str, ...]]] = {}
        self.registrations = 0
        self.register_requests: list[api_pb2.RegisterRequest] = []
        self.list_and_watch_updates = 0
        self.preferred_calls: list[tuple[list[str], list[str], int, list[str]]] = []
        self.allocate_calls: list[list[str]] = []

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> FakeKubelet:
        os.makedirs(self.socket_dir, exist_ok=True)
        reg = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_RegistrationServicer_to_server(_Registration(self), reg)
        reg.add_insecure_port(f"unix://{self.kubelet_socket}")
        reg.start()
        self._servers.append(reg)
        if self.pod_resources_socket:
            os.makedirs(os.path.dirname(self.pod_resources_socket), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pod_resources_socket)
            pr = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            podresources_pb2_grpc.add_PodResourcesListerServicer_to_server(_PodResources(self), pr)
            pr.add_insecure_port(f"unix://{self.pod_resources_socket}")
            pr.start()
            self._servers.append(pr)
        return self

    def _disconnect_plugin(self) -> None:
        with self._lock:
            self._stream_gen += 1
            stream, self._stream = self._stream, None
            channel, self._channel = self._channel, None
            self._endpoint = None
            self._options = None
            self._lock.notify_all()
        if stream is not None:
            stream.cancel()
        if channel is not None:
            channel.close()

    def stop(self) -> None:
        self._disconnect_plugin()
        for s in self._servers:
            s.stop(grace=0).wait(2.0)
        self._servers = []
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.kubelet_socket)

    def restart(self) -> None:
        """Like a kubelet restart: servers go, every socket in the device-plugins directory is
        deleted (the plugin's too), a new kubelet.sock comes up. Allocations are kept."""
        self.stop()
        for entry in os.listdir(self.socket_dir):
            if entry != CHECKPOINT:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(os.path.join(self.socket_dir, entry))
        with self._lock:
            # Until the plugin registers again its resource has no healthy devices.
            self._devices = {}
        self.start()

    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- registration and ListAndWatch ------------------------------------------------------

    def _on_register(self, request: api_pb2.RegisterRequest) -> None:
        self._disconnect_plugin()
        with self._lock:
            self.register_requests.append(request)
            gen = self._stream_gen
        threading.Thread(target=self._connect, args=(request, gen), daemon=True,
                         name="fake-kubelet-plugin").start()

    def _connect(self, request: api_pb2.RegisterRequest, gen: int) -> None:
        channel = grpc.insecure_channel(f"unix://{os.path.join(self.socket_dir, request.endpoint)}")
        stub = api_pb2_grpc.DevicePluginStub(channel)
        try:
            options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
            stream = stub.ListAndWatch(api_pb2.Empty())
        except grpc.RpcError:
            channel.close()
            return
        with self._lock:
            if gen != self._stream_gen:
                stream.cancel()
                channel.close()
                return
            self._channel, self._stream = channel, stream
            self._endpoint = request.endpoint
            self._options = options
            self._lock.notify_all()
        first = True
        try:
            for resp in stream:
                with self._lock:
                    if gen != self._stream_gen:
                        return
                    self._devices = {d.ID: d.health for d in resp.devices}
                    if first:  # registered = connected and the first device list is in
                        self.registrations += 1
                        first = False
                    self.list_and_watch_updates += 1
                    self._lock.notify_all()
        except grpc.RpcError:
            pass
        with self._lock:
            if gen == self._stream_gen:
                # The plugin went away: its devices are no longer usable.
                self._devices = {d: UNHEALTHY for d in self._devices}
                self._endpoint = None
                self._lock.notify_all()

    def _stub(self) -> api_pb2_grpc.DevicePluginStub:
        with self._lock:
            if self._channel is None:
                raise AdmissionError(f"no device plugin registered for {self.resource}")
            return api_pb2_grpc.DevicePluginStub(self._channel)

    @property
    def registered(self) -> bool:
        with self._lock:
            return self._endpoint is not None

    def wait_registered(self, timeout: float = 10.0, count: int = 1) -> bool:
        """True once the plugin has registered (at least `count` times) and is streaming."""
        with self._lock:
            return self._lock.wait_for(
                lambda: self._endpoint is not None and self.registrations >= count
                and bool(self._devices), timeout)

    def devices(self) -> dict[str, str]:
        with self._lock:
            return dict(self._devices)

    def wait_devices(self, predicate, timeout: float = 10.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: predicate(dict(self._devices)), timeout)

    # ---- admission --------------------------------------------------------------------------

    def admit(self, pod: KubeletPod) -> AdmitResult:
        with self._admit_lock:
            with self._lock:
                self._pods[pod.key] = pod  # pod manager first, as HandlePodAdditions does
                self._pod_devices.setdefault(pod.key, {})
            try:
                result = self._admit_containers(pod)
            except AdmissionError as e:
                return self._refuse(pod, str(e))
            self._set_phase(pod, "Running")
            return result

    def reject(self, pod: KubeletPod, reason: str = "OutOfcpu") -> AdmitResult:
        """Refuse a pod before device allocation (another admit handler said no)."""
        with self._admit_lock:
            with self._lock:
                self._pods[pod.key] = pod
            return self._refuse(pod, reason)

    def _refuse(self, pod: KubeletPod, error: str) -> AdmitResult:
        with self._lock:
            self._pods.pop(pod.key, None)
            self._pod_devices.pop(pod.key, None)
            self._inactive[pod.key] = pod
        self._set_phase(pod, "Failed")
        return AdmitResult(pod.key, False, error)

    def admit_many(self, pods: Iterable[KubeletPod]) -> list[AdmitResult]:
        """One HandlePodAdditions batch: sorted by creation time, admitted one by one."""
        ordered = sorted(pods, key=lambda p: (_ts(p.created), p.key))
        return [self.admit(p) for p in ordered]

    def _set_phase(self, pod: KubeletPod, phase: str) -> None:
        if self._kube is not None:
            with contextlib.suppress(Exception):
                self._kube.set_pod_phase(pod.namespace, pod.name, phase)

    def _admit_containers(self, pod: KubeletPod) -> AdmitResult:
        result = AdmitResult(pod.key, True)
        reusable: list[str] = []
        inits = [c for c in pod.containers if c.init]
        apps = [c for c in pod.containers if not c.init]
        for c in inits + apps:
            if c.gpus <= 0:
                continue
            devs = self._pick(pod, c, reusable)
            stub = self._stub()
            with self._lock:
                self.allocate_calls.append(list(devs))
            try:
                resp = stub.Allocate(
                    api_pb2.AllocateRequest(
                        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=devs)]
                    ),
                    timeout=30,
                )
            except grpc.RpcError as e:
                raise AdmissionError(
                    f"Allocate failed due to {e.details()}, which is unexpected"
                ) from None
            cr = resp.container_responses[0]
            with self._lock:
                self._pod_devices[pod.key][c.name] = tuple(devs)
            if c.init and not c.restartable:
                reusable.extend(devs)
            else:
                for d in devs:
                    if d in reusable:
                        reusable.remove(d)
            result.containers[c.name] = ContainerAdmission(
                name=c.name,
                devices=tuple(devs),
                envs=dict(cr.envs),
                mounts=[(m.container_path, m.host_path, m.read_only) for m in cr.mounts],
                cdi_devices=[d.name for d in cr.cdi_devices],
                annotations=dict(cr.annotations),
            )
        return result

    def _in_use(self) -> set[str]:
        return {d for cs in self._pod_devices.values() for ids in cs.values() for d in ids}

    def _pick(self, pod: KubeletPod, c: KubeletContainer, reusable: list[str]) -> list[str]:
        needed = c.gpus
        chosen = reusable[:needed]
        needed -= len(chosen)
        if needed == 0:
            return chosen
        with self._lock:
            if self._endpoint is None:
                raise AdmissionError(f"no device plugin registered for {self.resource}")
            available = sorted(
                d for d, h in self._devices.items() if h == HEALTHY and d not in self._in_use()
            )
            options = self._options
        available = [d for d in available if d not in chosen]
        if len(available) < needed:
            raise AdmissionError(
                f"requested number of devices unavailable for {self.resource}. "
                f"Requested: {c.gpus}, Available: {len(available) + len(chosen)}"
            )
        picked: list[str] = []
        wants_preference = options is not None and options.get_preferred_allocation_available
        if self.use_preferred and wants_preference:
            resp = self._stub().GetPreferredAllocation(
                api_pb2.PreferredAllocationRequest(container_requests=[
                    api_pb2.ContainerPreferredAllocationRequest(
                        available_deviceIDs=available + chosen,
                        must_include_deviceIDs=chosen,
                        allocation_size=c.gpus,
                    )
                ]),
                timeout=30,
            )
            crs = resp.container_responses
            preferred = list(crs[0].deviceIDs) if crs else []
            with self._lock:
                self.preferred_calls.append((available + chosen, list(chosen), c.gpus, preferred))
            picked = [d for d in preferred if d in available][:needed]
        rest = [d for d in available if d not in picked]
        self._rng.shuffle(rest)  # the kubelet takes an unsorted set: any free slot
        picked += rest[: needed - len(picked)]
        return chosen + picked

    def remove_pod(self, namespace: str, name: str) -> None:
        """The pod was deleted: its slots are free again."""
        key = f"{namespace}/{name}"
        with self._lock:
            self._pods.pop(key, None)
            self._inactive.pop(key, None)
            self._pod_devices.pop(key, None)

    def pod_devices(self, namespace: str, name: str) -> dict[str, tuple[str, ...]]:
        with self._lock:
            return dict(self._pod_devices.get(f"{namespace}/{name}", {}))

    def _pod_resources(self) -> podresources_pb2.ListPodResourcesResponse:
        out = podresources_pb2.ListPodResourcesResponse()
        with self._lock:
            listed = list(self._pods.items())
            if self.list_inactive:
                listed += [(k, p) for k, p in self._inactive.items() if k not in self._pods]
            for key, pod in listed:
                held = self._pod_devices.get(key, {})
                pr = out.pod_resources.add(namespace=pod.namespace, name=pod.name)
                for c in pod.containers:
                    if c.init and not c.restartable:
                        continue  # pod-resources lists app containers (and sidecars) only
                    cr = pr.containers.add(name=c.name)
                    if held.get(c.name):
                        cr.devices.add(resource_name=self.resource, device_ids=held[c.name])
        return out


def _ts(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return t if t.tzinfo else t.replace(tzinfo=UTC)
