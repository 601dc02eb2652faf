"""`copack workload serve`: the vLLM command line for a prefill, decode or mixed pod.

A pod's command becomes one line (`copack workload serve --role decode --model M`) and this
module fills in what differs by role and by placement:

- the KV connector (`--kv-transfer-config`): prefill is `kv_producer`, decode `kv_consumer`,
  a mixed server with a connector `kv_both`; NIXL or vLLM's ExampleConnector (shared storage).
- the NIXL side channel: `VLLM_NIXL_SIDE_CHANNEL_HOST` is the pod's IP (downward API
  `status.podIP` as `POD_IP`), so decode servers on other nodes can reach it.
- memory sizing when pods share a GPU: vLLM takes 90 % of the device by default, so a second
  pod on the same GPU would not start. `--gpu-memory-utilization` is set from the pod's
  declared memory (`copack.io/demand` mem, as `COPACK_DEMAND`) over the unit's memory
  (`COPACK_UNIT_MEMORY_BYTES`, else NVML's total of the unit, found by the UUID copack wrote
  in `copack.io/unit`, as `COPACK_UNIT`, so a MIG slice counts its own memory); a pod that
  shares its unit (`copack.io/sm-share` below 100, as `COPACK_SM_SHARE`) but declared no
  memory gets an even split (0.45).

The server is started with `python -m vllm.entrypoints.openai.api_server` because the `vllm`
console script of the CPU wheel fails on package metadata.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workloads.roles import DECODE, MIXED, PREFILL, ROLES

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
CONNECTORS = ("nixl", "example", "none")
KV_ROLES = {PREFILL: "kv_producer", DECODE: "kv_consumer", MIXED: "kv_both"}

# Environment the rendered manifests set through the downward API.
ENV_POD_IP = "POD_IP"
ENV_SM_SHARE = "COPACK_SM_SHARE"
ENV_DEMAND = "COPACK_DEMAND"
ENV_UNIT_MEMORY = "COPACK_UNIT_MEMORY_BYTES"
ENV_UNIT = "COPACK_UNIT"

DEFAULT_SIDE_CHANNEL_PORT = 5600
MIN_GPU_MEMORY_UTILIZATION = 0.05
MAX_GPU_MEMORY_UTILIZATION = 0.92  # leave room for the CUDA context of a neighbour pod
SHARED_DEFAULT_UTILIZATION = 0.45


_CORE_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_LAUNCHER_FLAGS = frozenset(
    {"--model", "--host", "--port", "--kv-transfer-config", "--served-model-name"}
)


class LaunchError(ValueError):
    """A serve request that cannot be turned into a working vLLM command; says why."""


@dataclass
class ServeSpec:
    role: str
    model: str
    connector: str | None = None  # None: nixl for prefill/decode, none for mixed
    host: str = "0.0.0.0"
    port: int = 8000
    device: str = "auto"  # auto | gpu | cpu
    served_model_name: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    side_channel_port: int = DEFAULT_SIDE_CHANNEL_PORT
    shared_storage_path: str = "/tmp/copack-kv"
    cpu_cores: str | None = None  # CPU device: cores for vLLM's OpenMP threads, e.g. "0-3,8"
    python: str = field(default_factory=lambda: sys.executable)
    extra_args: list[str] = field(default_factory=list)


@dataclass
class LaunchPlan:
    """The command to exec and the environment variables it adds (with why, for --dry-run)."""

    argv: list[str]
    env: dict[str, str]
    notes: list[str]

    def render(self) -> str:
        lines = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        lines.append(shlex.join(self.argv))
        return "\n".join([*(f"# {n}" for n in self.notes), *lines])


def resolve_connector(role: str, connector: str | None) -> str:
    if role not in ROLES:
        raise LaunchError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if connector is None:
        return "none" if role == MIXED else "nixl"
    if connector not in CONNECTORS:
        raise LaunchError(f"connector {connector!r} is not one of {', '.join(CONNECTORS)}")
    if connector == "none" and role != MIXED:
        raise LaunchError(
            f"a {role} server needs a KV connector to hand KV to its peer (use nixl or example)"
        )
    return connector


def kv_transfer_config(
    role: str, connector: str, *, device: str, shared_storage_path: str
) -> dict[str, object] | None:
    """The `--kv-transfer-config` JSON for a role (vLLM 0.32 keys only)."""
    connector = resolve_connector(role, connector)
    if connector == "none":
        return None
    kv_role = KV_ROLES[role]
    if connector == "nixl":
        return {
            "kv_connector": "NixlConnector",
            "kv_role": kv_role,
            "kv_buffer_device": "cpu" if device == "cpu" else "cuda",
        }
    return {
        "kv_connector": "ExampleConnector",
        "kv_role": kv_role,
        "kv_connector_extra_config": {"shared_storage_path": shared_storage_path},
    }


def detect_device(env: Mapping[str, str]) -> str:
    """gpu when an NVIDIA device is visible to this container, else cpu."""
    visible = env.get("NVIDIA_VISIBLE_DEVICES", "").strip().lower()
    if visible in ("void", "none"):
        return "cpu"
    if visible or Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists():
        return "gpu"
    return "cpu"


def unit_uuid(env: Mapping[str, str]) -> str | None:
    """The UUID of the unit this container was given: copack's `copack.io/unit` annotation
    (as COPACK_UNIT), else a single GPU-/MIG- UUID in NVIDIA_VISIBLE_DEVICES."""
    for value in (env.get(ENV_UNIT, ""), env.get("NVIDIA_VISIBLE_DEVICES", "")):
        value = value.strip()
        if value.startswith(("GPU-", "MIG-")) and "," not in value:
            return value
    return None


def nvml_total_memory(uuid: str | None) -> int | None:
    """Total memory of the unit: by UUID, which also finds a MIG instance (NVML's index 0 in
    a MIG container is the whole parent GPU, whose memory would overstate the slice's)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if uuid:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no device, old driver: sizing falls back to the even split
        return None


def memory_utilization(
    env: Mapping[str, str], unit_memory_bytes: int | None
) -> tuple[float | None, str]:
    """The fraction of the unit's memory this pod may take, and where it came from."""
    from policies.annotations import AnnotationError, parse_demand

    demand = env.get(ENV_DEMAND, "").strip()
    if demand:
        try:
            mem = parse_demand(demand).mem_bytes
        except AnnotationError as e:
            raise LaunchError(f"{ENV_DEMAND}: {e}") from None
        if mem is not None:
            if not unit_memory_bytes:
                return None, (
                    f"{ENV_DEMAND} gives mem but the unit's memory is unknown "
                    f"(set {ENV_UNIT_MEMORY} or run with NVML)"
                )
            frac = mem / unit_memory_bytes
            if frac > 1.0:
                raise LaunchError(
                    f"{ENV_DEMAND} mem={mem} bytes exceeds the unit's {unit_memory_bytes} bytes"
                )
            return _clamp(frac), f"demand mem {mem} B of unit {unit_memory_bytes} B"
    share = env.get(ENV_SM_SHARE, "").strip()
    if share:
        try:
            pct = int(share)
        except ValueError:
            raise LaunchError(f"{ENV_SM_SHARE}={share!r} is not a whole percentage") from None
        if not 1 <= pct <= 100:
            raise LaunchError(f"{ENV_SM_SHARE}={share!r} must be between 1 and 100")
        if pct < 100:
            # Shared, but nobody said how much memory: split evenly between the two pods
            # copack packs together (a prefill and a decode). The SM share is no guide: decode
            # gets few SMs yet needs the most memory (its KV cache).
            return SHARED_DEFAULT_UTILIZATION, (
                f"unit shared (SM share {pct}%) and no memory demand declared: even split"
            )
    return None, "unit not shared: vLLM's default memory use"


def _clamp(frac: float) -> float:
    return round(min(MAX_GPU_MEMORY_UTILIZATION, max(MIN_GPU_MEMORY_UTILIZATION, frac)), 3)


def build_plan(spec: ServeSpec, env: Mapping[str, str] | None = None) -> LaunchPlan:
    """The vLLM command and added environment for `spec`, given the pod's environment."""
    env = dict(os.environ if env is None else env)
    if not spec.model.strip():
        raise LaunchError("--model is empty")
    if not 0 < spec.port < 65536:
        raise LaunchError(f"port {spec.port} is out of range")
    if spec.device not in ("auto", "gpu", "cpu"):
        raise LaunchError(f"device {spec.device!r} is not auto, gpu or cpu")
    device = detect_device(env) if spec.device == "auto" else spec.device
    connector = resolve_connector(spec.role, spec.connector)
    notes = [f"role {spec.role}, connector {connector}, device {device}"]
    argv = [
        spec.python,
        "-m",
        VLLM_MODULE,
        "--model",
        spec.model,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
    ]
    if spec.served_model_name:
        argv += ["--served-model-name", spec.served_model_name]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.enforce_eager:
        argv.append("--enforce-eager")
    added: dict[str, str] = {}

    cfg = kv_transfer_config(
        spec.role, connector, device=device, shared_storage_path=spec.shared_storage_path
    )
    if cfg is not None:
        argv += ["--kv-transfer-config", json.dumps(cfg, separators=(",", ":"))]
    if connector == "nixl":
        host = env.get("VLLM_NIXL_SIDE_CHANNEL_HOST") or env.get(ENV_POD_IP)
        if host:
            added["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host
        else:
            notes.append(f"{ENV_POD_IP} unset: NIXL side channel on vLLM's default host")
        added["VLLM_NIXL_SIDE_CHANNEL_PORT"] = env.get(
            "VLLM_NIXL_SIDE_CHANNEL_PORT", str(spec.side_channel_port)
        )
        if device == "cpu" and "UCX_TLS" not in env:
            added["UCX_TLS"] = "tcp,self,sm"  # no RDMA/CUDA transports on a CPU host

    if device == "gpu":
        if spec.gpu_memory_utilization is not None:
            if not 0 < spec.gpu_memory_utilization <= 1:
                raise LaunchError("--gpu-memory-utilization must be in (0, 1]")
            util: float | None = spec.gpu_memory_utilization
            why = "given on the command line"
        else:
            unit_mem = _unit_memory(env)
            util, why = memory_utilization(env, unit_mem)
        if util is not None:
            argv += ["--gpu-memory-utilization", f"{util:g}"]
        notes.append(f"memory: {why}")
    if spec.cpu_cores is not None:
        if device != "cpu":
            raise LaunchError("--cpu-cores applies to the CPU device only")
        if not _CORE_LIST.match(spec.cpu_cores):
            raise LaunchError(f"--cpu-cores {spec.cpu_cores!r} is not a core list like 0-3,8")
        # Servers sharing a host must not share cores: a prefill engine steps (and spins its
        # threads) until its KV is pulled, and on shared cores it starves that very pull.
        added["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpu_cores
    for arg in spec.extra_args:
        flag = arg.split("=", 1)[0]
        if flag in _LAUNCHER_FLAGS:
            raise LaunchError(f"{flag} is set by the launcher; use its own option instead")
    argv += list(spec.extra_args)
    return LaunchPlan(argv=argv, env=added, notes=notes)


def _unit_memory(env: Mapping[str, str]) -> int | None:
    raw = env.get(ENV_UNIT_MEMORY, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise LaunchError(f"{ENV_UNIT_MEMORY}={raw!r} is not a byte count") from None
        if value <= 0:
            raise LaunchError(f"{ENV_UNIT_MEMORY}={raw!r} must be positive")
        return value
    return nvml_total_memory(unit_uuid(env))


def exec_plan(plan: LaunchPlan, env: Mapping[str, str] | None = None) -> None:
    """Replace this process with vLLM, so it is the container's main process (gets signals)."""
    full = dict(os.environ if env is None else env)
    full.update(plan.env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(plan.argv[0], plan.argv, full)


def split_extra(args: Sequence[str]) -> list[str]:
    """Extra vLLM flags passed after `--`, kept verbatim."""
    return [a for a in args if a != "--"] if args and args[0] == "--" else list(args)
