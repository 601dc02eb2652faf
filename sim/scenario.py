"""Scenario files: the cluster, the services and their traffic, the autoscaler, the scheduler.

A scenario is YAML validated by pydantic, so a typo or an impossible value is reported with
its path in the file (`cluster.pools[1].mig_layouts[0]: ...`) instead of surfacing as a crash
deep inside a run. The embedded default is `sim/scenarios/default.yaml` (`copack demo`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workloads.discovery import HANDOVER_DRAIN_S
from workloads.idle_wait import DEFAULT_IDLE_S

POLICIES: tuple[str, ...] = ("dedicated", "spread", "binpack", "complementary")
DEFAULT_SCENARIO = Path(__file__).parent / "scenarios" / "default.yaml"
LARGE_SCENARIO = Path(__file__).parent / "scenarios" / "large.yaml"
LONG_SCENARIO = Path(__file__).parent / "scenarios" / "long.yaml"
MIX_SCENARIO = Path(__file__).parent / "scenarios" / "mix.yaml"
SCARCE_SCENARIO = Path(__file__).parent / "scenarios" / "scarce.yaml"


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message says where and what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodePool(_Strict):
    """`count` identical nodes, each with `gpus_per_node` GPUs of `product`."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    count: int = Field(ge=1, le=10_000)
    gpus_per_node: int = Field(ge=1, le=16)
    product: str = Field(min_length=1, description="GPU catalog key or NVML product name")
    # MIG layouts cycled over the node's GPUs ([] in the list: that GPU stays whole); no list:
    # every GPU whole (MIG off).
    mig_layouts: list[list[str]] = Field(default_factory=list)
    sharing: Literal["mps", "time-slicing"] = "mps"
    cpu: int = Field(default=192, ge=1)
    memory_gib: int = Field(default=2048, ge=1)


class ClusterSpec(_Strict):
    pools: list[NodePool] = Field(min_length=1)
    # `copack.io/gpu` slots the device plugin advertises per unit (pods per unit at most).
    slots_per_unit: int = Field(default=4, ge=1, le=64)

    @field_validator("pools")
    @classmethod
    def _unique_names(cls, pools: list[NodePool]) -> list[NodePool]:
        names = [p.name for p in pools]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate pool names: {sorted(dup)}")
        return pools


class Slo(_Strict):
    ttft_s: float = Field(gt=0)
    tpot_s: float = Field(gt=0)


class ServiceSpec(_Strict):
    """One disaggregated service: prefill and decode pods of `model`, traffic from `trace`."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    model: str = Field(min_length=1)
    trace: str = Field(
        min_length=1, description="`code`, `conv`, or a trace file (Azure-style CSV, JSON lines)"
    )
    rate: float = Field(default=1.0, gt=0, le=1000, description="arrival-rate multiplier")
    time_scale: float = Field(default=1.0, gt=0, le=1000)
    offset_s: float = Field(default=0.0, ge=0)
    # When the service is deployed: no pods and no traffic before it (a model that arrives on
    # a cluster whose GPUs other services already hold).
    start_s: float = Field(default=0.0, ge=0)
    # Lengths of the trace's requests scaled (e.g. a long-prompt mix from the same arrival
    # process); `max_prompt_tokens` is the longest prompt the service admits (its context
    # limit): longer ones are cut to it, as a client truncating to the model's window would.
    prompt_scale: float = Field(default=1.0, gt=0, le=100)
    output_scale: float = Field(default=1.0, gt=0, le=100)
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    slo: Slo
    min_prefill: int = Field(default=1, ge=1)
    min_decode: int = Field(default=1, ge=1)
    max_pods: int = Field(default=64, ge=2)


class AutoscalerSpec(_Strict):
    """Dynamo-planner-like: every `interval_s`, size prefill and decode from observed load."""

    interval_s: float = Field(default=60.0, gt=0)
    # Fraction of a pod's SLO-feasible capacity the planner aims to use (headroom for bursts).
    target_utilization: float = Field(default=0.7, gt=0, le=1)
    # Utilization allowed during the interval's busiest seconds (prefill bursts).
    peak_utilization: float = Field(default=1.0, gt=0, le=2)
    # How many intervals a burst is remembered when sizing prefill.
    peak_memory: int = Field(default=10, ge=1, le=1000)
    # Weight of the newest interval in the load predictor (1 = last interval only).
    smoothing: float = Field(default=0.5, gt=0, le=1)
    # Scale down only after this many consecutive intervals asking for fewer pods.
    scale_down_after: int = Field(default=3, ge=1)
    startup_s: float = Field(default=30.0, ge=0, description="model load time of a new pod")
    # Decode pods' declared bandwidth: `elastic` = the smallest share meeting half the TPOT
    # target (declared in copack.io/demand), `roofline` = the core's free-running estimate.
    decode_demand: Literal["elastic", "roofline"] = "elastic"
    # Prefill pods' declared SMs: `multiplexed` = their share of the service's
    # `multiplex_quantile` window load (declared `sm=` in copack.io/demand; bursts above it are
    # rare and, between services, independent, so two such pods may share a GPU), `burst` =
    # the roofline's estimate at the load the pod is provisioned for (the 99.9th burst).
    prefill_demand: Literal["multiplexed", "burst"] = "multiplexed"
    multiplex_quantile: float = Field(default=99.0, ge=50.0, le=100.0)
    # The GPU the planner's capacity profile is taken on (Dynamo profiles one GPU type).
    reference_gpu: str = "H100-SXM"
    # Prefill pods' speed: `measured` = the profile divided by the slowest speed the service's
    # prefill pods ran at while busy over the last `peak_memory` intervals (a pod packed
    # beside others runs its bursts slower than the profile; sim/prefill_speed.py), `profile`
    # = the profile as is (every policy gets the same pods).
    prefill_speed: Literal["measured", "profile"] = "measured"


class SchedulerSpec(_Strict):
    """kube-scheduler settings that change the outcome of a placement."""

    extender_weight: int = Field(default=5, ge=1, le=100)
    node_cache_capable: bool = True
    # How the extender is reached: `asgi` (its app in-process) or `http` (uvicorn, loopback).
    extender_transport: Literal["asgi", "http"] = "asgi"
    # Resources LeastAllocated scores (kube default: cpu and memory, weight 1 each).
    least_allocated_resources: list[str] = Field(default_factory=lambda: ["cpu", "memory"])
    # 0 = kube's adaptive default (50 % - nodes/125, at least 5 % and 100 nodes).
    percentage_of_nodes_to_score: int = Field(default=0, ge=0, le=100)
    retry_s: float = Field(default=10.0, gt=0, description="backoff before a pending pod retries")
    pod_cpu: int = Field(default=8, ge=1)
    pod_memory_gib: int = Field(default=64, ge=1)


class RebalancerSpec(_Strict):
    """copack-rebalancer in the simulator (rebalancer/README.md): its budget and which
    policies' runs it re-packs (it plans with the extender's own decision core)."""

    policies: list[Literal["dedicated", "spread", "binpack", "complementary"]] = Field(
        default_factory=lambda: ["complementary"]
    )
    interval_s: float = Field(default=60.0, gt=0)
    evictions_per_minute: int = Field(default=1, ge=0, description="per workload")
    min_age_s: float = Field(default=300.0, ge=0, description="a pod's warm-up")
    max_gpus_per_round: int = Field(default=2, ge=0)
    grace_s: float = Field(default=30.0, ge=0, description="terminationGracePeriodSeconds")
    # Make-before-break for prefill pods (docs/workloads.md, "Handover"): the proxy keeps
    # routing to an evicted prefill pod while another pod of its role is still starting, and
    # its preStop hook keeps it alive until it has been idle `handover_idle_s`; the proxy
    # stops `handover_drain_s` before the grace period ends.
    handover: bool = True
    handover_idle_s: float = Field(default=DEFAULT_IDLE_S, ge=0)
    handover_drain_s: float = Field(default=HANDOVER_DRAIN_S, ge=0)
    # Every service role's PodDisruptionBudget: minAvailable ready pods.
    pdb_min_available: int = Field(default=1, ge=0)


class Scenario(_Strict):
    name: str = Field(min_length=1)
    seed: int = 0
    duration_s: float = Field(gt=0, le=7 * 86400)
    step_s: float = Field(default=0.25, gt=0, le=5)
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    policies: list[Literal["dedicated", "spread", "binpack", "complementary"]] = Field(
        default_factory=lambda: list(POLICIES), min_length=1
    )
    cluster: ClusterSpec
    services: list[ServiceSpec] = Field(min_length=1)
    autoscaler: AutoscalerSpec = Field(default_factory=AutoscalerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    rebalancer: RebalancerSpec = Field(default_factory=RebalancerSpec)
    # Passed to the extender's config for every policy (policy name set per run).
    extender: dict[str, Any] = Field(default_factory=dict)
    # Per-policy additions to `extender` (deep-merged), e.g. no MPS cap for the baselines.
    extender_by_policy: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _expand_copies(cls, data: Any) -> Any:
        """`copies: N` on a service stands for N tenants of the same shape: services
        `<name>-00`..`<name>-NN`, each replaying its trace from a different offset."""
        if not isinstance(data, dict) or not isinstance(data.get("services"), list):
            return data
        out: list[Any] = []
        for svc in data["services"]:
            if not isinstance(svc, dict) or "copies" not in svc:
                out.append(svc)
                continue
            svc = dict(svc)
            n = svc.pop("copies")
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1000:
                raise ValueError(f"service {svc.get('name')!r}: copies must be an integer 1..1000")
            spread = float(svc.pop("copy_offset_s", 397.0))
            for k in range(n):
                c = dict(svc)
                c["name"] = f"{svc.get('name')}-{k:02d}"
                c["offset_s"] = float(svc.get("offset_s", 0.0)) + k * spread
                out.append(c)
        return {**data, "services": out}

    @field_validator("services")
    @classmethod
    def _unique_services(cls, services: list[ServiceSpec]) -> list[ServiceSpec]:
        names = [s.name for s in services]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate service names: {sorted(dup)}")
        return services

    @field_validator("policies")
    @classmethod
    def _unique_policies(cls, policies: list[str]) -> list[str]:
        if len(set(policies)) != len(policies):
            raise ValueError("each policy may be listed once")
        return policies

    @model_validator(mode="after")
    def _step_fits(self) -> Scenario:
        if self.step_s > self.autoscaler.interval_s:
            raise ValueError("step_s must not exceed autoscaler.interval_s")
        return self


def _format_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid scenario {source}:"]
    for err in e.errors()[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {where}: {err['msg']}")
    if len(e.errors()) > 10:
        lines.append(f"  ... and {len(e.errors()) - 10} more")
    return "\n".join(lines)


def parse_scenario(raw: Any, source: str = "<scenario>") -> Scenario:
    """Validate a parsed YAML/JSON document; raise ScenarioError naming every bad field."""
    if not isinstance(raw, dict):
        raise ScenarioError(f"invalid scenario {source}: top level must be a mapping")
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as e:
        raise ScenarioError(_format_error(e, source)) from None
    _check_catalog(scenario, source)
    return scenario


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ScenarioError(f"cannot read scenario {path}: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ScenarioError(f"scenario {path} is not valid YAML: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("services"), list):
        from sim.traces import TRACE_FILES

        for svc in raw["services"]:
            trace = svc.get("trace") if isinstance(svc, dict) else None
            local = isinstance(trace, str) and trace not in TRACE_FILES
            if local and not Path(trace).is_absolute():
                svc["trace"] = str((path.parent / trace).resolve())  # relative to the file
    return parse_scenario(raw, str(path))


def default_scenario() -> Scenario:
    return load_scenario(DEFAULT_SCENARIO)


def extender_config(scenario: Scenario, policy: str) -> Any:
    """The scenario's `extender:` section (an extender config file's content) with the
    policy under test; raises the extender's ConfigError naming the bad key."""
    from extender.config import validate_config

    raw = _merge(scenario.extender, scenario.extender_by_policy.get(policy, {}))
    section = dict(raw.get("policy") or {})
    section.pop("policy", None)
    section["name"] = policy
    raw["policy"] = section
    return validate_config(raw, source="extender")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _check_catalog(scenario: Scenario, source: str) -> None:
    """Names the catalogs must know: GPU products, MIG layouts, models, traces."""
    from sim import catalog

    problems: list[str] = []
    for i, pool in enumerate(scenario.cluster.pools):
        where = f"cluster.pools[{i}]"
        try:
            catalog.gpu(pool.product)
        except (KeyError, ValueError) as e:
            problems.append(f"{where}.product: {_msg(e)}")
            continue
        for j, layout in enumerate(pool.mig_layouts):
            problem = catalog.layout_problem(pool.product, layout)
            if problem:
                problems.append(f"{where}.mig_layouts[{j}]: {problem}")
    for i, svc in enumerate(scenario.services):
        try:
            catalog.model(svc.model)
        except (KeyError, ValueError) as e:
            problems.append(f"services[{i}].model: {_msg(e)}")
    problems.extend(_trace_problems(scenario))
    from extender.config import ConfigError

    unknown = sorted(set(scenario.extender_by_policy) - set(POLICIES))
    if unknown:
        problems.append(f"extender_by_policy: unknown policy {', '.join(unknown)}")
    for policy in scenario.policies:
        try:
            extender_config(scenario, policy)
        except ConfigError as e:
            problems.append(f"{e} (policy {policy})")
            break
    if problems:
        raise ScenarioError(f"invalid scenario {source}:\n  " + "\n  ".join(problems))


def _trace_problems(scenario: Scenario) -> list[str]:
    """Read every trace now (each once): a malformed row is reported before any run starts,
    with the file, line and column, instead of ending a run half way."""
    from sim.traces import TraceError, load_trace

    problems: list[str] = []
    seen: dict[str, str | None] = {}
    for i, svc in enumerate(scenario.services):
        if svc.trace not in seen:
            try:
                load_trace(svc.trace)
                seen[svc.trace] = None
            except TraceError as e:
                seen[svc.trace] = str(e)
        if seen[svc.trace] is not None:
            problems.append(f"services[{i}].trace: {seen[svc.trace]}")
    return problems


def with_trace(scenario: Scenario, trace: str | Path) -> Scenario:
    """The scenario with every service replaying `trace` (a user's own traffic through the
    scenario's services, their rates as multipliers of that trace's rate)."""
    path = Path(trace).resolve()
    raw = scenario.model_dump(mode="python")
    for svc in raw["services"]:
        svc["trace"] = str(path)
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in path.stem) or "trace"
    raw["name"] = f"{scenario.name}-{stem}"
    return parse_scenario(raw, f"{scenario.name} with --trace {trace}")


def _msg(e: Exception) -> str:
    return str(e.args[0]) if e.args else str(e)
