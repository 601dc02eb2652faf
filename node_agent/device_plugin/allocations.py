"""The record of what the plugin gave each pod, kept in memory and on the pod itself (annotation
`copack.io/allocated`) so a restarted agent can rebuild it, and operators can see it.

Annotation value (JSON, keys sorted):
  {"unit": "GPU-…|MIG-…",          the unit the container(s) got (NVIDIA_VISIBLE_DEVICES)
   "slots": ["GPU-…::0", …],       the slot IDs the kubelet allocated, all containers together
   "containers": 1,                how many Allocate calls (containers) were served
   "sm_share": 30,                 the MPS percentage handed out (null without one)
   "mismatch": false,              true if the kubelet's slots belong to another unit
   "resolved_by": "pod-resources", how the pod was identified ("pod-resources" or "assigned-at")
   "boot_id": "…",                 the node's boot ID: records from an earlier boot are stale
   "at": "2026-…Z"}                RFC 3339 time of the last Allocate
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import orjson

ALLOCATED_ANNOTATION = "copack.io/allocated"


class AllocationRecordError(ValueError):
    """A `copack.io/allocated` annotation that cannot be read; the message says why."""


@dataclass(frozen=True)
class AllocationRecord:
    unit: str
    slots: tuple[str, ...]
    containers: int
    sm_share: int | None
    mismatch: bool
    resolved_by: str
    boot_id: str
    at: str = field(default_factory=lambda: now_rfc3339())

    def to_annotation(self) -> str:
        body = {
            "unit": self.unit,
            "slots": list(self.slots),
            "containers": self.containers,
            "sm_share": self.sm_share,
            "mismatch": self.mismatch,
            "resolved_by": self.resolved_by,
            "boot_id": self.boot_id,
            "at": self.at,
        }
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()

    @classmethod
    def from_annotation(cls, text: str) -> AllocationRecord:
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise AllocationRecordError(f"{ALLOCATED_ANNOTATION} is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise AllocationRecordError(f"{ALLOCATED_ANNOTATION} is not a JSON object")
        unit = raw.get("unit")
        slots = raw.get("slots", [])
        containers = raw.get("containers", 1)
        share = raw.get("sm_share")
        if not isinstance(unit, str) or not unit:
            raise AllocationRecordError(f"{ALLOCATED_ANNOTATION}: 'unit' missing or not a string")
        if not isinstance(slots, list) or not all(isinstance(s, str) for s in slots):
            raise AllocationRecordError(f"{ALLOCATED_ANNOTATION}: 'slots' is not a list of IDs")
        if not isinstance(containers, int) or containers < 1:
            raise AllocationRecordError(f"{ALLOCATED_ANNOTATION}: 'containers' must be >= 1")
        if share is not None and not isinstance(share, int):
            raise AllocationRecordError(f"{ALLOCATED_ANNOTATION}: 'sm_share' is not an integer")
        return cls(
            unit=unit,
            slots=tuple(slots),
            containers=containers,
            sm_share=share,
            mismatch=bool(raw.get("mismatch", False)),
            resolved_by=str(raw.get("resolved_by", "")),
            boot_id=str(raw.get("boot_id", "")),
            at=str(raw.get("at", "")),
        )

    def plus_container(self, slots: tuple[str, ...], mismatch: bool) -> AllocationRecord:
        """The record after one more container of the same pod was served."""
        return replace(
            self,
            slots=self.slots + tuple(s for s in slots if s not in self.slots),
            containers=self.containers + 1,
            mismatch=self.mismatch or mismatch,
            at=now_rfc3339(),
        )


@dataclass
class Allocation:
    """One pod's entry in the plugin's table (keyed by namespace/name, as pod-resources is)."""

    uid: str
    record: AllocationRecord
    persisted: bool  # the annotation on the pod matches `record`


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_boot_id(path: str) -> str:
    """The node's boot ID, or "" where the file cannot be read (then stale-boot detection is
    off and the pod-resources cross-check alone guards against stale records)."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""
