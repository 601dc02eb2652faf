"""A fake kubelet pod-resources server (`v1.PodResourcesLister`) on a unix socket, real gRPC.

The agent's pod attribution polls `List`; a test sets what the kubelet would answer::

    with FakePodResources(tmp_path / "kubelet.sock") as kubelet:
        kubelet.set_pods([PodAssignment("ns", "pod", "ctr", "copack.io/gpu", ["GPU-…::0"])])

`fail(code)` makes `List` fail until `fail(None)`, `list_calls` counts calls. (The device plugin's
fuller kubelet, with admission, is `tests/fakes/kubelet.py`.)"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from node_agent.device_plugin import podresources_pb2 as pb
from node_agent.device_plugin import podresources_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class PodAssignment:
    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: list[str] = field(default_factory=list)


class _Lister(pb_grpc.PodResourcesListerServicer):
    def __init__(self, owner: FakePodResources) -> None:
        self._owner = owner

    def List(self, request, context):
        o = self._owner
        with o._lock:
            o.list_calls += 1
            if o._fail is not None:
                context.abort(o._fail, "injected failure")
            return o._response()

    def GetAllocatableResources(self, request, context):
        return pb.AllocatableResourcesResponse()


class FakePodResources:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = Path(socket_path)
        self._lock = threading.Lock()
        self._assignments: list[PodAssignment] = []
        self._fail: grpc.StatusCode | None = None
        self.list_calls = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_PodResourcesListerServicer_to_server(_Lister(self), self._server)
        self._server.add_insecure_port(f"unix://{self.socket_path}")

    def set_pods(self, assignments: list[PodAssignment]) -> None:
        with self._lock:
            self._assignments = list(assignments)

    def fail(self, code: grpc.StatusCode | None) -> None:
        with self._lock:
            self._fail = code

    def _response(self) -> pb.ListPodResourcesResponse:
        pods: dict[tuple[str, str], pb.PodResources] = {}
        for a in self._assignments:
            p = pods.get((a.namespace, a.pod))
            if p is None:
                p = pods[(a.namespace, a.pod)] = pb.PodResources(name=a.pod, namespace=a.namespace)
            c = next((c for c in p.containers if c.name == a.container), None)
            if c is None:
                c = p.containers.add(name=a.container)
            c.devices.add(resource_name=a.resource, device_ids=a.device_ids)
        return pb.ListPodResourcesResponse(pod_resources=list(pods.values()))

    def start(self) -> FakePodResources:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0).wait(5)

    def __enter__(self) -> FakePodResources:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
