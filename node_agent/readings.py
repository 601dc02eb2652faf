"""The agent's in-process view of one sampling tick: immutable readings per unit, shared by the
gRPC service, the Prometheus exporter, the inventory publisher and the device plugin."""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.inventory import Inventory, InventoryUnit

SOURCE_GPM = "gpm"
SOURCE_COARSE = "coarse"  # nvmlDeviceGetUtilizationRates: time-based, no tensor/occupancy
SOURCE_NONE = "none"  # readable unit without any activity signal (e.g. A100 MIG instance)

METRICS = ("sm_active", "dram_bw_active", "tensor_active", "sm_occupancy")


@dataclass(frozen=True, slots=True)
class MetricReading:
    """One activity ratio (0–1); `value` None when the source cannot give it this tick."""

    value: float | None = None
    ewma: float | None = None
    p95: float | None = None

    @property
    def present(self) -> bool:
        return self.value is not None


ABSENT = MetricReading()


@dataclass(frozen=True, slots=True)
class UnitReading:
    uuid: str
    parent_uuid: str | None  # None for a whole GPU
    gpu_index: int  # NVML index of the GPU (the parent for a MIG instance)
    mig_profile: str | None
    gpu_instance_id: int | None
    product: str
    sm_count: int
    sm_share: float  # of the parent GPU's SMs (1.0 for a whole GPU)
    bandwidth_share: float  # of the parent GPU's HBM bandwidth (1.0 for a whole GPU)
    memory_total_bytes: int
    healthy: bool
    source: str  # gpm | coarse | none; the last good source while unhealthy ("" if never read)
    timestamp: float
    memory_used_bytes: int = 0
    sm_active: MetricReading = ABSENT
    dram_bw_active: MetricReading = ABSENT
    tensor_active: MetricReading = ABSENT
    sm_occupancy: MetricReading = ABSENT
    error: str = ""

    def inventory_unit(self) -> InventoryUnit:
        return InventoryUnit(
            uuid=self.uuid,
            parent=self.parent_uuid,
            index=self.gpu_index,
            product=self.product,
            mig_profile=self.mig_profile,
            sm_count=self.sm_count,
            memory_bytes=self.memory_total_bytes,
            healthy=self.healthy,
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    node: str
    timestamp: float
    sequence: int
    interval_s: float
    units: tuple[UnitReading, ...] = ()
    inventory_generation: int = 0
    nvml_ok: bool = True
    nvml_error: str = ""
    tick_seconds: float = 0.0  # how long the tick took (agent overhead)
    by_uuid: dict[str, UnitReading] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.by_uuid.update({u.uuid: u for u in self.units})

    def inventory(self) -> Inventory:
        return Inventory(units=tuple(u.inventory_unit() for u in self.units))
