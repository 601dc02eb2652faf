"""`copack.io/draining`: the units of a node the rebalancer is emptying.

The rebalancer writes it on the node before it evicts the pods of a GPU, so that the
replacements (created at once by their ReplicaSet, while the evicted pods still terminate on
the GPU) are placed elsewhere; the extender treats a draining unit as unavailable until the
`until` time, so a rebalancer that dies mid-way leaves nothing cordoned for long. Value: JSON
`{"until": <unix seconds>, "units": ["GPU-...", "MIG-..."]}`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import orjson

DRAINING_ANNOTATION = "copack.io/draining"


class DrainingError(ValueError):
    pass


def format_draining(units: Iterable[str], until: float) -> str:
    return orjson.dumps({"until": round(float(until), 3), "units": sorted(set(units))}).decode()


def parse_draining(text: str | None) -> tuple[frozenset[str], float]:
    """(units, until) of an annotation value; empty for None or ''."""
    if not text:
        return frozenset(), -math.inf
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise DrainingError(f"{DRAINING_ANNOTATION} is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DrainingError(f"{DRAINING_ANNOTATION} must be a JSON object")
    units, until = raw.get("units"), raw.get("until")
    if not isinstance(units, list) or not all(isinstance(u, str) and u for u in units):
        raise DrainingError(f"{DRAINING_ANNOTATION}: 'units' must be a list of unit UUIDs")
    if isinstance(until, bool) or not isinstance(until, int | float) or not math.isfinite(until):
        raise DrainingError(f"{DRAINING_ANNOTATION}: 'until' must be a time in unix seconds")
    return frozenset(units), float(until)
