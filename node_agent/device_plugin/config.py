"""Settings of the device plugin, checked once at start so a bad flag fails the agent's start
with a message naming it, not an Allocate hours later."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SOCKET_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_MPS_ROOT = "/run/copack/mps"
DEFAULT_MPS_BINARY = "nvidia-cuda-mps-control"
DEFAULT_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


class DevicePluginConfigError(ValueError):
    """A device plugin setting that cannot work; the message names the setting."""


@dataclass(frozen=True)
class DevicePluginConfig:
    node_name: str
    # Slots advertised per unit: the most pods kube-scheduler may put on one unit through this
    # node's `copack.io/gpu` capacity (units x slots). The extender decides the real packing.
    slots_per_unit: int = 4
    socket_dir: str = DEFAULT_SOCKET_DIR
    kubelet_socket_name: str = "kubelet.sock"
    plugin_socket_name: str = "copack-gpu.sock"
    # None: no pod-resources cross-check (weaker: pods are then told apart by assigned-at order).
    pod_resources_socket: str | None = DEFAULT_POD_RESOURCES_SOCKET
    mps: bool = False
    mps_root: str = DEFAULT_MPS_ROOT
    mps_control_binary: str = DEFAULT_MPS_BINARY
    mps_container_pipe_dir: str = "/tmp/nvidia-mps"
    cdi: bool = False
    cdi_kind: str = "nvidia.com/gpu"
    boot_id_path: str = DEFAULT_BOOT_ID_PATH
    health_poll_s: float = 1.0
    socket_poll_s: float = 0.5
    reconcile_s: float = 30.0
    mps_check_s: float = 5.0
    api_timeout_s: float = 5.0
    # How long start() waits for the first pod list before going on without it.
    api_sync_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.node_name:
            raise DevicePluginConfigError("node_name is empty: set --node-name or NODE_NAME")
        if not 1 <= self.slots_per_unit <= 1000:
            raise DevicePluginConfigError(
                f"slots_per_unit must be in 1..1000, got {self.slots_per_unit}"
            )
        for name in ("kubelet_socket_name", "plugin_socket_name"):
            value = getattr(self, name)
            if not value or "/" in value:
                raise DevicePluginConfigError(f"{name} must be a bare file name, got {value!r}")
        if self.plugin_socket_name == self.kubelet_socket_name:
            raise DevicePluginConfigError("plugin_socket_name must differ from the kubelet's")
        if "=" in self.cdi_kind or "/" not in self.cdi_kind:
            raise DevicePluginConfigError(
                f"cdi_kind must look like vendor/class (e.g. nvidia.com/gpu), got {self.cdi_kind!r}"
            )
        for name in ("health_poll_s", "socket_poll_s", "reconcile_s", "mps_check_s",
                     "api_timeout_s", "api_sync_timeout_s"):
            if getattr(self, name) <= 0:
                raise DevicePluginConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.mps and not self.mps_control_binary:
            raise DevicePluginConfigError("mps is on but mps_control_binary is empty")
