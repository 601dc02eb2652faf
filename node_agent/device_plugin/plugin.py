"""The gRPC DevicePlugin service the kubelet calls, and the device board that feeds
ListAndWatch: every change of slot health is pushed to every open stream."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import grpc

from node_agent.device_plugin import api_pb2, api_pb2_grpc
from node_agent.device_plugin.allocator import Allocator, Grant
from node_agent.device_plugin.config import DevicePluginConfig
from node_agent.device_plugin.mps import pipe_dir
from node_agent.device_plugin.resolver import AllocationError
from policies.inventory import UNIT_ANNOTATION

log = logging.getLogger(__name__)

ENV_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
ENV_MPS_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
ENV_MPS_PIPE = "CUDA_MPS_PIPE_DIRECTORY"
ENV_UNIT = "COPACK_UNIT"


class DeviceBoard:
    """The current slot list with a version number; ListAndWatch streams wait on it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._devices: tuple[tuple[str, str], ...] = ()
        self._version = 0
        self._closed = False

    def update(self, devices: Sequence[api_pb2.Device]) -> bool:
        new = tuple((d.ID, d.health) for d in devices)
        with self._cond:
            if new == self._devices:
                return False
            self._devices = new
            self._version += 1
            self._cond.notify_all()
            return True

    def snapshot(self) -> tuple[int, list[api_pb2.Device]]:
        with self._cond:
            return self._version, [api_pb2.Device(ID=i, health=h) for i, h in self._devices]

    def wait_change(self, version: int, timeout: float) -> tuple[int, list[api_pb2.Device]] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._version != version or self._closed, timeout)
            if self._version == version:
                return None
            return self._version, [api_pb2.Device(ID=i, health=h) for i, h in self._devices]

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


def container_response(
    config: DevicePluginConfig, grant: Grant
) -> api_pb2.ContainerAllocateResponse:
    """Env, mounts and CDI devices that give the container its unit and MPS share."""
    uuid = grant.unit.uuid
    resp = api_pb2.ContainerAllocateResponse()
    if config.cdi:
        resp.cdi_devices.append(api_pb2.CDIDevice(name=f"{config.cdi_kind}={uuid}"))
    else:
        resp.envs[ENV_VISIBLE_DEVICES] = uuid
    resp.envs[ENV_UNIT] = uuid
    if grant.sm_share is not None:
        resp.envs[ENV_MPS_PERCENTAGE] = str(grant.sm_share)
    if config.mps:
        resp.envs[ENV_MPS_PIPE] = config.mps_container_pipe_dir
        resp.mounts.append(
            api_pb2.Mount(
                container_path=config.mps_container_pipe_dir,
                host_path=pipe_dir(config.mps_root, uuid),
                read_only=False,
            )
        )
    resp.annotations[UNIT_ANNOTATION] = uuid
    return resp


class DevicePluginServicer(api_pb2_grpc.DevicePluginServicer):
    def __init__(
        self,
        config: DevicePluginConfig,
        board: DeviceBoard,
        allocator: Allocator,
        mps_up: Callable[[str], bool] | None = None,
    ) -> None:
        self._cfg = config
        self._board = board
        self._alloc = allocator
        self._mps_up = mps_up

    def GetDevicePluginOptions(self, request, context):
        return api_pb2.DevicePluginOptions(
            pre_start_required=False, get_preferred_allocation_available=True
        )

    def ListAndWatch(self, request, context) -> Iterator[api_pb2.ListAndWatchResponse]:
        context.add_callback(self._board.wake)
        version, devices = self._board.snapshot()
        yield api_pb2.ListAndWatchResponse(devices=devices)
        while context.is_active() and not self._board.closed:
            got = self._board.wait_change(version, timeout=1.0)
            if got is None:
                continue
            version, devices = got
            yield api_pb2.ListAndWatchResponse(devices=devices)

    def GetPreferredAllocation(self, request, context):
        out = api_pb2.PreferredAllocationResponse()
        for cr in request.container_requests:
            ids = self._alloc.preferred(
                list(cr.available_deviceIDs), list(cr.must_include_deviceIDs), cr.allocation_size
            )
            out.container_responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=ids))
        return out

    def Allocate(self, request, context):
        out = api_pb2.AllocateResponse()
        for cr in request.container_requests:
            try:
                grant = self._alloc.allocate(list(cr.devices_ids))
            except AllocationError as e:
                log.warning("Allocate %s refused: %s", list(cr.devices_ids), e)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except Exception as e:  # the kubelet shows this text; never a bare stack trace
                log.exception("Allocate %s failed", list(cr.devices_ids))
                context.abort(grpc.StatusCode.UNAVAILABLE, f"copack device plugin: {e}")
            if self._cfg.mps and self._mps_up is not None and not self._mps_up(grant.unit.uuid):
                log.warning("pod %s: MPS daemon of unit %s is not up yet; its CUDA clients will "
                            "fail until the supervisor restarts it", grant.pod_key, grant.unit.uuid)
            out.container_responses.append(container_response(self._cfg, grant))
        return out

    def PreStartContainer(self, request, context):
        return api_pb2.PreStartContainerResponse()
