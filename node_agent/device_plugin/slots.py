"""Slot device IDs: each unit is advertised as `slots_per_unit` devices `<unit-uuid>::<k>`, so
several pods can hold one unit while the kubelet still counts whole devices."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from node_agent.device_plugin import api_pb2
from policies.inventory import InventoryUnit

SLOT_SEPARATOR = "::"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


def slot_id(unit_uuid: str, k: int) -> str:
    return f"{unit_uuid}{SLOT_SEPARATOR}{k}"


def slot_unit(device_id: str) -> str:
    """The unit UUID a slot ID belongs to; ValueError naming the ID if it is not one of ours."""
    uuid, sep, k = device_id.rpartition(SLOT_SEPARATOR)
    if not sep or not uuid or not k.isdigit():
        raise ValueError(f"device ID {device_id!r} is not a copack slot (<unit-uuid>::<k>)")
    return uuid


def units_of(device_ids: Iterable[str]) -> set[str]:
    """Unit UUIDs of the given slot IDs, ignoring IDs that are not slots."""
    out: set[str] = set()
    for d in device_ids:
        try:
            out.add(slot_unit(d))
        except ValueError:
            continue
    return out


def slot_devices(units: Sequence[InventoryUnit], slots_per_unit: int) -> list[api_pb2.Device]:
    """The device list for ListAndWatch: every slot of an unhealthy unit is Unhealthy."""
    out = []
    for u in sorted(units, key=lambda u: u.uuid):
        health = HEALTHY if u.healthy else UNHEALTHY
        out.extend(
            api_pb2.Device(ID=slot_id(u.uuid, k), health=health) for k in range(slots_per_unit)
        )
    return out
