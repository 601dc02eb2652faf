"""Device plugin metrics on prometheus_client's default registry (served by the agent's
exporter). Defined once at import: a second definition of a name would raise."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.metrics_core import Metric

MPS_DAEMON_UP = Gauge(
    "copack_mps_daemon_up",
    "1 while the unit's MPS control daemon answers, 0 while it is down or restarting",
    ["uuid"],
)
MPS_DAEMON_RESTARTS = Counter(
    "copack_mps_daemon_restarts",
    "MPS control daemon (re)starts after it was found dead or unresponsive",
    ["uuid"],
)
ALLOCATIONS = Counter(
    "copack_device_plugin_allocations",
    "Allocate calls per container by outcome: ok, mismatch (kubelet's slots belong to another "
    "unit; the assigned unit was given), error (admission refused)",
    ["result"],
)
ALLOCATED_PODS = Gauge(
    "copack_device_plugin_allocated_pods", "Pods currently holding a copack.io/gpu allocation"
)
REGISTERED = Gauge(
    "copack_device_plugin_registered", "1 while registered with the current kubelet socket"
)
REGISTRATIONS = Counter(
    "copack_device_plugin_registrations", "Successful registrations with the kubelet"
)


ALL = (MPS_DAEMON_UP, MPS_DAEMON_RESTARTS, ALLOCATIONS, ALLOCATED_PODS, REGISTERED, REGISTRATIONS)


class DevicePluginCollector:
    """The metrics above as one collector, for an exporter that serves its own registry
    (the agent's): `registry.register(DevicePluginCollector())`."""

    def collect(self) -> Iterator[Metric]:
        for m in ALL:
            yield from m.collect()
