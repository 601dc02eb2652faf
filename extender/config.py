"""The extender's configuration: one YAML file, every key overridable by a flag.

Strict on purpose: an unknown key or a wrong type is refused at start with the dotted key and the
reason, because a typo in a scheduler's policy file would otherwise silently run the default
policy on a production cluster."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from policies.config import PolicyConfig, PolicyConfigError


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8888, ge=0, le=65535)


class TlsConfig(_Strict):
    """HTTPS as kube-scheduler's `enableHTTPS` expects; both files or neither."""

    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        for f in (self.cert_file, self.key_file):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"file not found: {f}")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


def build_policy(raw: dict[str, Any]) -> PolicyConfig:
    """The `policy:` section is `policies.PolicyConfig` (docs/policies.md), with `name` accepted
    for its `policy` key; validated by the core so new knobs need no change here."""
    data = dict(raw)
    if "name" in data:
        if "policy" in data:
            raise ValueError("give the policy as `name` or as `policy`, not both")
        data["policy"] = data.pop("name")
    try:
        return PolicyConfig.from_dict(data)
    except PolicyConfigError as e:
        raise ValueError(str(e)) from None


class KubeConfigSection(_Strict):
    kubeconfig: str | None = None
    watch_timeout_s: float = Field(default=300.0, gt=0.0)
    backoff_initial_s: float = Field(default=0.2, gt=0.0)
    backoff_max_s: float = Field(default=30.0, gt=0.0)
    # An assumed placement whose pod never shows up bound in the watch is dropped after this.
    bind_confirm_timeout_s: float = Field(default=120.0, gt=0.0)
    bind_timeout_s: float = Field(default=4.0, gt=0.0)
    # Which pods to watch: copack's own, not finished (a pod leaving the selector arrives as
    # DELETED). "" watches every pod of the cluster.
    pod_field_selector: str = (
        "spec.schedulerName=copack-scheduler,status.phase!=Succeeded,status.phase!=Failed"
    )


class TelemetrySection(_Strict):
    enabled: bool = True
    statistic: Literal["value", "ewma", "p95"] = "ewma"
    backoff_initial_s: float = Field(default=0.2, gt=0.0)
    backoff_max_s: float = Field(default=10.0, gt=0.0)
    # what the extender absorbs from all agents together; 0 = every tick of every agent
    snapshots_per_s: float = Field(default=1000.0, ge=0.0)


class LimitsSection(_Strict):
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    explain_entries: int = Field(default=10_000, ge=1)


_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class LeaderElectionSection(_Strict):
    """One replica leads (answers the verbs, binds); the others keep their state warm and
    answer 503 (docs/extender.md, "High availability and failure"). Timings as client-go's."""

    enabled: bool = False
    lease_name: str = "copack-extender"
    lease_namespace: str = "copack-system"
    # null: the POD_NAME environment variable (downward API), else the hostname
    identity: str | None = None
    lease_duration_s: float = Field(default=15.0, gt=0.0)
    renew_deadline_s: float = Field(default=10.0, gt=0.0)
    retry_period_s: float = Field(default=2.0, gt=0.0)
    # The label copack.io/extender-role=leader|standby on this replica's own pod, which the
    # Service selects on (extender/role_label.py); also without election (always leader).
    route_label: bool = True
    # the pod's namespace; null: the POD_NAMESPACE environment variable; neither: no label
    pod_namespace: str | None = None

    @field_validator("lease_name", "lease_namespace")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not _DNS1123.match(v) or len(v) > 253:
            raise ValueError(f"{v!r} is not a valid Kubernetes object name (DNS-1123 subdomain)")
        return v

    @field_validator("identity")
    @classmethod
    def _identity(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty (leave it null for POD_NAME or the hostname)")
        return v

    @model_validator(mode="after")
    def _timings(self) -> LeaderElectionSection:
        # a leader must give up (renew deadline) before a rival may take the Lease (duration),
        # and retry at least once within the deadline
        if not self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                f"renew_deadline_s ({self.renew_deadline_s}) must be less than "
                f"lease_duration_s ({self.lease_duration_s})"
            )
        if not self.retry_period_s < self.renew_deadline_s:
            raise ValueError(
                f"retry_period_s ({self.retry_period_s}) must be less than "
                f"renew_deadline_s ({self.renew_deadline_s})"
            )
        return self

    def resolved_pod_namespace(self) -> str | None:
        if not self.route_label:
            return None
        return self.pod_namespace or os.environ.get("POD_NAMESPACE") or None

    def resolved_identity(self) -> str:
        """POD_NAME (the Deployment sets it from the downward API), else the hostname."""
        return self.identity or os.environ.get("POD_NAME") or socket.gethostname()


class ExtenderConfig(_Strict):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    policy: dict[str, Any] = Field(default_factory=dict)
    kube: KubeConfigSection = Field(default_factory=KubeConfigSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    leader_election: LeaderElectionSection = Field(default_factory=LeaderElectionSection)

    @field_validator("policy")
    @classmethod
    def _valid_policy(cls, v: dict[str, Any]) -> dict[str, Any]:
        build_policy(v)
        return v

    def policy_config(self) -> PolicyConfig:
        return build_policy(self.policy)

    def with_overrides(self, overrides: dict[str, Any]) -> ExtenderConfig:
        """Apply dotted-key overrides (from flags); None values are ignored."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            cur = data
            *parents, last = dotted.split(".")
            for p in parents:
                cur = cur.setdefault(p, {})
            if dotted == "policy.policy":
                cur.pop("name", None)
            cur[last] = value
        return validate_config(data, source="flags")


def _describe(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        m = re.match(r"^(\w+): (.*)$", msg, re.S)
        if where == "policy" and m:  # the core names its own key: make it policy.<key>
            where, msg = f"policy.{m.group(1)}", m.group(2)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {where}: {msg}")
    return "; ".join(lines)


def validate_config(data: Any, source: str = "config") -> ExtenderConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return ExtenderConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def load_config(path: str | Path | None) -> ExtenderConfig:
    """Read the YAML file (None: all defaults)."""
    if path is None:
        return ExtenderConfig()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return validate_config(data, source=str(p))


_POLICY_COMMENTS = {
    "policy": "complementary | spread | binpack | dedicated",
    "overcommit": "allowed sm/bw load above 1.0 per unit",
    "stale_after_s": "telemetry older than this falls back to declared demand",
    "assumed_window_s": "a new placement counts as declared demand this long",
    "max_pods_per_unit": "pods sharing one unit at most",
    "decode_min_share": "MPS SM-share floor of a decode pod",
    "prefill_min_share": "MPS SM-share floor of a prefill pod",
}


def _policy_example() -> str:
    """The policy section from the decision core's own defaults, so it never drifts."""
    lines = []
    for key, value in PolicyConfig().to_dict().items():
        shown = "name" if key == "policy" else key
        text = yaml.safe_dump({shown: value}, default_flow_style=True).strip()[1:-1]
        comment = _POLICY_COMMENTS.get(key)
        entry = f"  {text}"
        lines.append(f"{entry:<26}# {comment}" if comment else entry)
    return "\n".join(lines)


EXAMPLE_CONFIG = (
    """\
# copack extender configuration (every key optional; flags of `copack extender serve` override)
listen:
  host: 0.0.0.0
  port: 8888
tls:                      # HTTPS for kube-scheduler's enableHTTPS; both or neither
  cert_file: null
  key_file: null
policy:                   # policies.PolicyConfig (docs/policies.md); these are its defaults
"""
    + _policy_example()
    + """
kube:
  kubeconfig: null        # null: in-cluster config
  watch_timeout_s: 300
  backoff_initial_s: 0.2
  backoff_max_s: 30
  bind_confirm_timeout_s: 120
  bind_timeout_s: 4
  # which pods to watch ("" = all): copack's own, unfinished
  pod_field_selector: >-
    spec.schedulerName=copack-scheduler,status.phase!=Succeeded,status.phase!=Failed
telemetry:
  enabled: true
  statistic: ewma         # value | ewma | p95 of the agent's readings
  backoff_initial_s: 0.2
  backoff_max_s: 10
  snapshots_per_s: 1000   # all agents together: at 5,000 nodes each sends every 5 s (0: every tick)
limits:
  max_body_bytes: 67108864
  explain_entries: 10000
leader_election:          # one replica answers and binds; the others stand by (503)
  enabled: false
  lease_name: copack-extender
  lease_namespace: copack-system
  identity: null          # null: $POD_NAME, else the hostname
  lease_duration_s: 15    # a rival takes an unrenewed Lease after this
  renew_deadline_s: 10    # the leader stops answering when it could not renew this long
  retry_period_s: 2
"""
)
