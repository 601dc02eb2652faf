"""Tunable knobs of the decision core, validated once so a bad config file fails at start-up
with the field at fault instead of producing odd placements later."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

POLICIES: tuple[str, ...] = ("complementary", "spread", "binpack", "dedicated")


class PolicyConfigError(ValueError):
    """A policy configuration value that is out of range or unknown."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """policy: which scoring policy (DESIGN.md "Scoring").
    overcommit: allowed excess of summed sm and bw demand over 1.0 (memory never overcommits).
    stale_after_s: telemetry older than this falls back to declared demand (flagged stale).
    assumed_window_s: a pod placed less than this before a telemetry sample is not yet visible
      in it, so its declared demand is added on top (Koordinator-style "assumed" pods).
    max_pods_per_unit: hard cap of pods sharing one unit (device-plugin slots).
    slo_check: filter placements predicted to break an SLO (the pod's or its neighbours').
    decode_min_share / prefill_min_share: floors of the MPS SM share given to a pod (percent
      written to copack.io/sm-share is derived from these and the pod's demand).
    fragmentation_weight: complementary only: a unit the pod would leave "closed" (leftover
      memory below the smallest pod the cluster runs, or its last pod slot taken) can never use
      its leftover SMs and bandwidth, so that residual counts (1 + weight) times in the
      best-fit norm; 0 = plain vector best-fit.
    separate_bursty_replicas: complementary only: a burst-provisioned pod (declared sm below
      what its load needs) never shares a unit with a burst-provisioned replica of the same
      workload (same controller owner): they get the same traffic, so their bursts coincide.
    consolidate: complementary only: a unit on a physical GPU that already holds pods always
      beats one on an idle GPU, and among idle GPUs the largest goes first. GPU-hours are
      counted per physical GPU, so opening one is the cost that matters; best-fit alone would
      open a small GPU rather than join a large, partly used one whose relative residual is
      bigger (vector best-fit normalises each unit to its own size)."""

    policy: str = "complementary"
    overcommit: float = 0.0
    stale_after_s: float = 15.0
    assumed_window_s: float = 10.0
    max_pods_per_unit: int = 4  # = the device plugin's default slots_per_unit
    slo_check: bool = True
    decode_min_share: float = 0.3
    prefill_min_share: float = 0.1
    fragmentation_weight: float = 1.0
    separate_bursty_replicas: bool = True
    consolidate: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise PolicyConfigError(
                f"policy: unknown {self.policy!r} (expected one of {', '.join(POLICIES)})"
            )
        if not 0.0 <= self.overcommit <= 4.0:
            raise PolicyConfigError(f"overcommit: {self.overcommit!r} must be within 0..4")
        if self.stale_after_s <= 0:
            raise PolicyConfigError(f"stale_after_s: {self.stale_after_s!r} must be > 0")
        if self.assumed_window_s < 0:
            raise PolicyConfigError(f"assumed_window_s: {self.assumed_window_s!r} must be >= 0")
        if self.max_pods_per_unit < 1:
            raise PolicyConfigError(
                f"max_pods_per_unit: {self.max_pods_per_unit!r} must be at least 1"
            )
        if not 0.0 <= self.fragmentation_weight <= 10.0:
            raise PolicyConfigError(
                f"fragmentation_weight: {self.fragmentation_weight!r} must be within 0..10"
            )
        for name in ("decode_min_share", "prefill_min_share"):
            v = getattr(self, name)
            if not 0.01 <= v <= 1.0:
                raise PolicyConfigError(f"{name}: {v!r} must be within 0.01..1")

    @property
    def exclusive(self) -> bool:
        """Baselines that give each pod a unit of its own."""
        return self.policy in ("spread", "dedicated")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PolicyConfig:
        """Build from a config file section; unknown keys are errors (typos would be silent)."""
        if not isinstance(raw, Mapping):
            raise PolicyConfigError(f"policy config must be a mapping, got {type(raw).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise PolicyConfigError(
                f"unknown policy config key(s) {', '.join(unknown)} (known: {', '.join(known)})"
            )
        kwargs: dict[str, Any] = {}
        for k, v in raw.items():
            want = known[k].type
            try:
                if want in ("float", float):
                    kwargs[k] = float(v)
                elif want in ("int", int):
                    if isinstance(v, bool) or float(v) != int(float(v)):
                        raise ValueError
                    kwargs[k] = int(float(v))
                elif want in ("bool", bool):
                    if not isinstance(v, bool):
                        raise ValueError
                    kwargs[k] = v
                else:
                    kwargs[k] = str(v)
            except (TypeError, ValueError):
                raise PolicyConfigError(f"{k}: {v!r} is not a valid {want}") from None
        return cls(**kwargs)
