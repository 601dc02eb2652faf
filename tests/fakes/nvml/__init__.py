"""A fake NVML for tests: `fake_nvml.c` built into `libnvidia-ml.so.1`, driven by a JSON scenario.

Code under test talks to it through the real `pynvml` (nvidia-ml-py): the C library exports the
NVML symbols pynvml looks up (`nvmlInitWithFlags`, `nvmlDeviceGetCount_v2`,
`nvmlDeviceGetHandleByIndex_v2`, `nvmlDeviceGetMemoryInfo[_v2]`, `nvmlDeviceGetAttributes_v2`,
`nvmlGpm*`, ...) with nvml.h's struct layouts, so a wrong struct, version field or argument
fails here as it would on a GPU node.

Typical use::

    from tests.fakes import nvml as fake

    nv = fake.FakeNvml(tmp_path)                     # builds the library once per process
    nv.write(fake.scenario([fake.gpu("H100", 0, gpm=fake.gpm(sm=50, dram=20)),
                            fake.gpu("A100", 1, utilization=(30, 10)),
                            fake.gpu("H100", 2, mig=fake.mig_layout("H100", 2,
                                     ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]))]))
    nv.install()                                     # env var + pynvml.nvmlLib; then nvmlInit()

`nv.write()` again changes the machine under a running process: the library re-reads the file
when its mtime/size/inode change (writes are atomic renames), so MIG re-partitions, lost GPUs,
new metric values and driver restarts show up on the next NVML call.

Scenario file format (JSON object; every key optional unless marked)
--------------------------------------------------------------------
Top level:
  ``gpus``               list of GPU objects, NVML index = position.
  ``init_error``         error name (``"DRIVER_NOT_LOADED"``, ``"UNKNOWN"``, any NVML_ERROR_*
                         suffix) or number that nvmlInit returns.
  ``driver_loaded``      false: every call (and nvmlInit) returns DRIVER_NOT_LOADED.
  ``driver_epoch``       integer; changing it simulates a driver restart: every call of a session
                         opened under another epoch returns ``stale_session_error`` (default
                         ``"UNINITIALIZED"``) until the caller runs nvmlShutdown + nvmlInit.
  ``driver_version``     string for nvmlSystemGetDriverVersion.
  ``errors``             ``{"nvmlFunctionName": "ERROR_NAME"}``: that call fails for everyone
                         (a name without ``_v2`` also matches the ``_v2`` symbol).
GPU object:
  ``uuid``, ``name``     strings (``GPU-…``; the product name nvmlDeviceGetName returns).
  ``lost``               true: nvmlDeviceGetHandleByIndex and every call on its handles (and its
                         MIG devices) return GPU_IS_LOST, while nvmlDeviceGetCount still counts it.
  ``memory_total``, ``memory_used``, ``memory_reserved``   bytes. MemoryInfo v1 reports
                         used + reserved as "used", v2 reports them apart (as the driver does).
  ``utilization``        ``{"gpu": pct, "memory": pct}`` for nvmlDeviceGetUtilizationRates; absent
                         means NOT_SUPPORTED (also always NOT_SUPPORTED in MIG mode / on MIG).
  ``gpm_supported``      bool: nvmlGpmQueryDeviceSupport's isSupportedDevice (the call itself
                         always succeeds); GPM sampling returns NOT_SUPPORTED when false.
  ``gpm``                metric values in percent 0–100, keys ``sm_util``, ``sm_occupancy``,
                         ``any_tensor_util``, ``dram_bw_util`` (NaN allowed: ``NaN`` or "nan").
                         Either one object (constant) or a list of steps
                         ``[{"t": 0, ...}, {"t": 2.5, ...}]`` with ``t`` in seconds since this
                         file version was loaded; the first step also covers the time before it.
                         nvmlGpmMetricsGet returns the time-weighted mean over the two samples'
                         interval, so values are exact once both samples fall in one step.
  ``gpm_errors``         ``{"any_tensor_util": "NOT_SUPPORTED"}``: per-metric nvmlReturn.
  ``num_cores``, ``cc_major``, ``cc_minor``   for nvmlDeviceGetNumGpuCores (NOT_SUPPORTED if 0)
                         and nvmlDeviceGetCudaComputeCapability.
  ``minor_number``       for nvmlDeviceGetMinorNumber (default: the index).
  ``mig_capable``        bool (default: true when ``mig`` is present); false → GetMigMode
                         returns NOT_SUPPORTED.
  ``mig``                ``{"enabled": bool, "pending": bool, "max_devices": 7, "devices": [...]}``.
  ``errors``             per-call injection for calls on this GPU's handles (and its MIG devices).
MIG device object (one per GPU instance, compute instance 0):
  ``slot``               index for nvmlDeviceGetMigDeviceHandleByIndex (holes → NOT_FOUND).
  ``gi_id``, ``ci_id``   GPU / compute instance ids.
  ``uuid``, ``name``     ``MIG-…`` UUID; name as the driver gives it.
  ``sm_count``, ``gi_slices``, ``ci_slices``, ``memory_mb``   nvmlDeviceGetAttributes_v2 fields
                         (the API only supports MIG handles; on a whole GPU it is NOT_SUPPORTED).
  ``memory_total``, ``memory_used``, ``memory_reserved``, ``gpm``, ``gpm_errors``, ``errors``
                         as for a GPU (GPM per GI via nvmlGpmMigSampleGet(parent, gi_id, s)).

GPM rules the fake enforces (each is a real-NVML trap): nvmlGpmSampleGet on a MIG handle is
NOT_SUPPORTED; nvmlGpmMetricsGet needs ``version == 1``, ``1 <= numMetrics <= 98``, two filled
samples of the same entity taken >= 100 ms apart (else INVALID_ARGUMENT); unknown metric ids get
per-metric NOT_SUPPORTED. Test hooks outside NVML: :meth:`FakeNvml.live_samples` (allocated minus
freed GPM samples) and :meth:`FakeNvml.call_count`.

The builders below (:func:`gpu`, :func:`mig_layout`, :func:`scenario`) fill in realistic values
for H100 80GB, H200 141GB, A100 80GB and L40S, so tests only state what they care about.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("fake_nvml.c")
SCENARIO_ENV = "COPACK_FAKE_NVML_SCENARIO"
MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass(frozen=True)
class GpuModel:
    name: str
    memory_total: int
    sm_count: int
    cores_per_sm: int
    cc: tuple[int, int]
    gpm: bool
    mig: bool
    memory_slices: int = 8
    compute_slices: int = 7


@dataclass(frozen=True)
class MigProfile:
    compute_slices: int
    memory_slices: int
    sm_count: int
    memory_mb: int


GPU_MODELS: dict[str, GpuModel] = {
    "H100": GpuModel("NVIDIA H100 80GB HBM3", 81559 * MIB, 132, 128, (9, 0), gpm=True, mig=True),
    "H200": GpuModel("NVIDIA H200", 143771 * MIB, 132, 128, (9, 0), gpm=True, mig=True),
    "A100": GpuModel("NVIDIA A100-SXM4-80GB", 81920 * MIB, 108, 64, (8, 0), gpm=False, mig=True),
    "L40S": GpuModel("NVIDIA L40S", 46068 * MIB, 142, 128, (8, 9), gpm=False, mig=False),
}

# SM counts and memory as `nvidia-smi mig -lgip` lists them (the figures workloads/mig_catalog.py
# carries); go-nvlib's naming rule (memory fraction rounded up to eighths of the parent's memory
# in whole GB) turns these memory sizes back into the nvidia-smi profile names.
MIG_PROFILES: dict[str, dict[str, MigProfile]] = {
    "H100": {
        "1g.10gb": MigProfile(1, 1, 16, 9984),
        "1g.20gb": MigProfile(1, 2, 26, 20091),
        "2g.20gb": MigProfile(2, 2, 32, 20091),
        "3g.40gb": MigProfile(3, 4, 60, 40448),
        "4g.40gb": MigProfile(4, 4, 64, 40448),
        "7g.80gb": MigProfile(7, 8, 132, 81152),
    },
    "H200": {
        "1g.18gb": MigProfile(1, 1, 16, 16384),
        "1g.35gb": MigProfile(1, 2, 26, 33280),
        "2g.35gb": MigProfile(2, 2, 32, 33280),
        "3g.71gb": MigProfile(3, 4, 60, 68096),
        "4g.71gb": MigProfile(4, 4, 64, 68096),
        "7g.141gb": MigProfile(7, 8, 132, 143360),
    },
    "A100": {
        "1g.10gb": MigProfile(1, 1, 14, 9728),
        "1g.20gb": MigProfile(1, 2, 14, 19968),
        "2g.20gb": MigProfile(2, 2, 28, 19968),
        "3g.40gb": MigProfile(3, 4, 42, 40192),
        "4g.40gb": MigProfile(4, 4, 56, 40192),
        "7g.80gb": MigProfile(7, 8, 98, 81152),
    },
}

_NS = uuidlib.UUID("6f1c7a52-8d0e-4a55-9a57-c0ba0c0ba001")


def gpu_uuid(index: int, salt: str = "") -> str:
    """A stable, realistic-looking GPU UUID for a GPU index."""
    return f"GPU-{uuidlib.uuid5(_NS, f'gpu{index}{salt}')}"


def mig_uuid(gpu_index: int, gi_id: int, profile: str, salt: str = "") -> str:
    return f"MIG-{uuidlib.uuid5(_NS, f'gpu{gpu_index}/gi{gi_id}/{profile}{salt}')}"


def gpm(
    sm: float = 0.0, occupancy: float = 0.0, tensor: float = 0.0, dram: float = 0.0
) -> dict[str, float]:
    """GPM metric values in percent (0–100), keyed as the scenario file wants them."""
    return {"sm_util": sm, "sm_occupancy": occupancy, "any_tensor_util": tensor,
            "dram_bw_util": dram}


def mig_device(
    model: str,
    profile: str,
    gpu_index: int,
    gi_id: int,
    *,
    slot: int | None = None,
    uuid: str | None = None,
    gpm: dict[str, float] | list[dict[str, float]] | None = None,
    memory_used: int = 0,
    memory_reserved: int = 0,
    errors: dict[str, str] | None = None,
    gpm_errors: dict[str, str] | None = None,
    salt: str = "",
) -> dict[str, Any]:
    """One MIG GPU instance (with compute instance 0) of a known profile."""
    try:
        p = MIG_PROFILES[model][profile]
    except KeyError:
        known = ", ".join(MIG_PROFILES.get(model, {})) or "none (model has no MIG)"
        raise ValueError(f"unknown MIG profile {profile!r} for {model}; known: {known}") from None
    d: dict[str, Any] = {
        "gi_id": gi_id,
        "ci_id": 0,
        "uuid": uuid or mig_uuid(gpu_index, gi_id, profile, salt),
        "name": f"{GPU_MODELS[model].name} MIG {profile}",
        "sm_count": p.sm_count,
        "gi_slices": p.compute_slices,
        "ci_slices": p.compute_slices,
        "memory_mb": p.memory_mb,
        "memory_total": p.memory_mb * MIB,
        "memory_used": memory_used,
        "memory_reserved": memory_reserved,
    }
    if slot is not None:
        d["slot"] = slot
    if gpm is not None:
        d["gpm"] = gpm
    if errors:
        d["errors"] = errors
    if gpm_errors:
        d["gpm_errors"] = gpm_errors
    return d


def mig_layout(
    model: str, gpu_index: int, profiles: list[str], *, first_gi_id: int = 1, salt: str = ""
) -> list[dict[str, Any]]:
    """MIG devices for a list of profiles, GI ids counted from `first_gi_id`, slots 0..n-1.

    Refuses layouts the hardware cannot hold (more than 7 compute or 8 memory slices)."""
    table = MIG_PROFILES.get(model)
    if table is None:
        raise ValueError(f"{model} does not support MIG")
    compute = sum(table[p].compute_slices if p in table else 0 for p in profiles)
    memory = sum(table[p].memory_slices if p in table else 0 for p in profiles)
    m = GPU_MODELS[model]
    if compute > m.compute_slices or memory > m.memory_slices:
        raise ValueError(
            f"invalid {model} MIG layout {profiles}: {compute} compute slices "
            f"(max {m.compute_slices}), {memory} memory slices (max {m.memory_slices})"
        )
    return [
        mig_device(model, p, gpu_index, first_gi_id + i, slot=i, salt=salt)
        for i, p in enumerate(profiles)
    ]


def gpu(
    model: str,
    index: int,
    *,
    uuid: str | None = None,
    mig: list[dict[str, Any]] | None = None,
    mig_enabled: bool | None = None,
    gpm: dict[str, float] | list[dict[str, float]] | None = None,
    utilization: tuple[int, int] | None = None,
    memory_used: int = 0,
    memory_reserved: int = 512 * MIB,
    lost: bool = False,
    errors: dict[str, str] | None = None,
    gpm_errors: dict[str, str] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """One GPU of a known model at NVML index `index`.

    `mig` (a list from :func:`mig_layout`) turns MIG mode on. `utilization` is (gpu %, memory %)
    for the coarse API; by default non-GPM GPUs report (0, 0) and GPM GPUs report it too."""
    try:
        m = GPU_MODELS[model]
    except KeyError:
        raise ValueError(f"unknown GPU model {model!r}; known: {', '.join(GPU_MODELS)}") from None
    g: dict[str, Any] = {
        "uuid": uuid or gpu_uuid(index),
        "name": m.name,
        "lost": lost,
        "memory_total": m.memory_total,
        "memory_used": memory_used,
        "memory_reserved": memory_reserved,
        "utilization": {"gpu": (utilization or (0, 0))[0], "memory": (utilization or (0, 0))[1]},
        "gpm_supported": m.gpm,
        "num_cores": m.sm_count * m.cores_per_sm,
        "cc_major": m.cc[0],
        "cc_minor": m.cc[1],
        "mig_capable": m.mig,
        "minor_number": index,
    }
    if m.mig:
        enabled = bool(mig) if mig_enabled is None else mig_enabled
        g["mig"] = {"enabled": enabled, "max_devices": 7, "devices": list(mig or [])}
    elif mig:
        raise ValueError(f"{model} does not support MIG")
    if gpm is not None:
        g["gpm"] = gpm
    if errors:
        g["errors"] = errors
    if gpm_errors:
        g["gpm_errors"] = gpm_errors
    g.update(overrides)
    return g


def scenario(
    gpus: list[dict[str, Any]],
    *,
    init_error: str | None = None,
    driver_loaded: bool = True,
    driver_epoch: int = 0,
    errors: dict[str, str] | None = None,
    driver_version: str = "550.54.15",
) -> dict[str, Any]:
    s: dict[str, Any] = {
        "gpus": gpus,
        "driver_loaded": driver_loaded,
        "driver_epoch": driver_epoch,
        "driver_version": driver_version,
    }
    if init_error:
        s["init_error"] = init_error
    if errors:
        s["errors"] = errors
    return s


_build_lock = threading.Lock()


def build_library(build_dir: Path | None = None) -> Path:
    """Compile fake_nvml.c into `libnvidia-ml.so.1` (once per source version) and return its path.

    The default directory is keyed by the source hash under the system temp dir, so every test
    process of one checkout shares one build and a changed source rebuilds."""
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:16]
    out_dir = build_dir or Path(tempfile.gettempdir()) / f"copack-fake-nvml-{digest}"
    lib = out_dir / "libnvidia-ml.so.1"
    with _build_lock:
        if lib.exists():
            return lib
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".libnvidia-ml.so.1.{os.getpid()}"
        cmd = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(tmp), str(SOURCE),
               "-lm", "-lpthread"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"building the fake NVML failed: {' '.join(cmd)}\n{res.stderr}")
        os.replace(tmp, lib)
    return lib


class FakeNvml:
    """One fake machine: the built library plus a scenario file in `directory`."""

    def __init__(self, directory: Path, initial: dict[str, Any] | None = None) -> None:
        self.lib_path = build_library()
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.scenario_path = Path(directory) / "nvml-scenario.json"
        self._lib: ctypes.CDLL | None = None
        self._seq = 0
        if initial is not None:
            self.write(initial)

    def write(self, scen: dict[str, Any]) -> None:
        """Atomically replace the scenario (a new inode, so the library always notices)."""
        self._seq += 1
        tmp = self.scenario_path.with_name(f".{self.scenario_path.name}.{self._seq}")
        tmp.write_text(json.dumps(scen))
        os.replace(tmp, self.scenario_path)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should use this fake machine."""
        return {SCENARIO_ENV: str(self.scenario_path)}

    @property
    def lib(self) -> ctypes.CDLL:
        if self._lib is None:
            self._lib = ctypes.CDLL(str(self.lib_path))
            self._lib.fakeNvmlCallCount.restype = ctypes.c_long
            self._lib.fakeNvmlCallCount.argtypes = [ctypes.c_char_p]
            self._lib.fakeNvmlLiveSamples.restype = ctypes.c_long
        return self._lib

    def install(self) -> None:
        """Point this process's pynvml at the fake (call before nvmlInit).

        Sets the scenario env var and `pynvml.nvmlLib`, and drops pynvml's cache of function
        pointers, which would otherwise keep pointing into a previously loaded library."""
        import pynvml

        os.environ[SCENARIO_ENV] = str(self.scenario_path)
        pynvml.nvmlLib = self.lib
        pynvml._nvmlGetFunctionPointer_cache.clear()

    def live_samples(self) -> int:
        """GPM samples allocated and not yet freed, process-wide."""
        return int(self.lib.fakeNvmlLiveSamples())

    def call_count(self, function: str) -> int:
        """How many times `function` (the exported symbol name) was called, process-wide."""
        return int(self.lib.fakeNvmlCallCount(function.encode()))

    def reset_counts(self) -> None:
        self.lib.fakeNvmlResetCounts()
