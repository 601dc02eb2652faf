"""The kubelet's own view of which pod holds which `copack.io/gpu` slots, read from its
pod-resources API. This is the cross-check that identifies the pod being admitted: the kubelet
adds a pod to its pod manager before admitting it and records its devices only after Allocate
returns, so during Allocate the admitted pod is the one listed without its slots."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import grpc

from node_agent.device_plugin import podresources_pb2, podresources_pb2_grpc
from policies.inventory import GPU_RESOURCE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KubeletView:
    # namespace/name -> container name -> copack.io/gpu slot IDs (empty tuple: none yet)
    pods: dict[str, dict[str, tuple[str, ...]]]

    def holds(self, key: str) -> dict[str, tuple[str, ...]] | None:
        return self.pods.get(key)


class PodResourcesClient:
    """Client of the kubelet's pod-resources socket. `list()` returns None when the socket is
    unreachable; callers fall back to the weaker assigned-at order and say so."""

    def __init__(self, socket_path: str, timeout_s: float = 5.0) -> None:
        self._target = f"unix://{socket_path}"
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._warned = False

    def _stub(self) -> podresources_pb2_grpc.PodResourcesListerStub:
        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(self._target)
            return podresources_pb2_grpc.PodResourcesListerStub(self._channel)

    def list(self) -> KubeletView | None:
        try:
            resp = self._stub().List(
                podresources_pb2.ListPodResourcesRequest(), timeout=self._timeout
            )
        except grpc.RpcError as e:
            if not self._warned:
                log.warning(
                    "kubelet pod-resources API at %s unavailable (%s): telling admitted pods "
                    "apart by copack.io/assigned-at order only",
                    self._target,
                    e.code() if hasattr(e, "code") else e,
                )
                self._warned = True
            return None
        self._warned = False
        pods: dict[str, dict[str, tuple[str, ...]]] = {}
        for p in resp.pod_resources:
            containers: dict[str, tuple[str, ...]] = {}
            for c in p.containers:
                ids: list[str] = []
                for d in c.devices:
                    if d.resource_name == GPU_RESOURCE:
                        ids.extend(d.device_ids)
                containers[c.name] = tuple(ids)
            pods[f"{p.namespace}/{p.name}"] = containers
        return KubeletView(pods=pods)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
