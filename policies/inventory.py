"""The node's unit inventory: the `copack.io/inventory` annotation the agent writes and the
extender reads (schema in DESIGN.md). Parsing is strict so a bad annotation is reported with the
field at fault instead of silently dropping units."""

from __future__ import annotations

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

INVENTORY_ANNOTATION = "copack.io/inventory"
AGENT_ANNOTATION = "copack.io/agent"
UNIT_ANNOTATION = "copack.io/unit"
SM_SHARE_ANNOTATION = "copack.io/sm-share"
ASSIGNED_AT_ANNOTATION = "copack.io/assigned-at"
ROLE_ANNOTATION = "copack.io/role"
MODEL_ANNOTATION = "copack.io/model"
LOAD_ANNOTATION = "copack.io/load"
DEMAND_ANNOTATION = "copack.io/demand"
SLO_ANNOTATION = "copack.io/slo"
GPU_RESOURCE = "copack.io/gpu"
SCHEDULER_NAME = "copack-scheduler"
INVENTORY_VERSION = 1


class InventoryError(ValueError):
    """An inventory annotation that cannot be used; the message names the field at fault."""


class InventoryUnit(BaseModel):
    """One schedulable unit: a whole GPU (parent and mig_profile null) or a MIG GPU instance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uuid: str = Field(min_length=1)
    parent: str | None = None
    index: int = Field(ge=0)
    product: str = Field(min_length=1)
    mig_profile: str | None = None
    sm_count: int = Field(gt=0)
    memory_bytes: int = Field(gt=0)
    healthy: bool = True

    @field_validator("mig_profile")
    @classmethod
    def _profile_needs_parent(cls, v: str | None, info) -> str | None:
        if v is not None and info.data.get("parent") is None:
            raise ValueError("a MIG unit must name its parent GPU")
        return v

    @property
    def is_mig(self) -> bool:
        return self.mig_profile is not None


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = INVENTORY_VERSION
    units: tuple[InventoryUnit, ...] = ()

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != INVENTORY_VERSION:
            raise ValueError(f"unsupported inventory version {v} (expected {INVENTORY_VERSION})")
        return v

    @field_validator("units")
    @classmethod
    def _unique_uuids(cls, units: tuple[InventoryUnit, ...]) -> tuple[InventoryUnit, ...]:
        seen: set[str] = set()
        for u in units:
            if u.uuid in seen:
                raise ValueError(f"duplicate unit uuid {u.uuid}")
            seen.add(u.uuid)
        return units

    def to_annotation(self) -> str:
        """Compact, key-sorted JSON so an unchanged inventory gives an identical string."""
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS).decode()

    @classmethod
    def from_annotation(cls, text: str) -> Inventory:
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise InventoryError(f"{INVENTORY_ANNOTATION} is not valid JSON: {e}") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise InventoryError(f"{INVENTORY_ANNOTATION}: {where}: {first['msg']}") from None
